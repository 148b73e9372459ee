"""MongoDB-shaped command errors: ``{ok: 0, errmsg, code, codeName, errorLabels?}``."""

from __future__ import annotations

from typing import Any

# The codes this server raises, with MongoDB's names for them (error_codes.yml).
CODE_NAMES: dict[int, str] = {
    1: "InternalError",
    2: "BadValue",
    6: "HostUnreachable",
    7: "HostNotFound",
    8: "UnknownError",
    9: "FailedToParse",
    11: "UserNotFound",
    13: "Unauthorized",
    14: "TypeMismatch",
    20: "IllegalOperation",
    23: "AlreadyInitialized",
    26: "NamespaceNotFound",
    27: "IndexNotFound",
    40: "ConflictingUpdateOperators",
    43: "CursorNotFound",
    48: "NamespaceExists",
    50: "MaxTimeMSExpired",
    59: "CommandNotFound",
    66: "ImmutableField",
    72: "InvalidOptions",
    73: "InvalidNamespace",
    86: "IndexKeySpecsConflict",
    89: "NetworkTimeout",
    91: "ShutdownInProgress",
    100: "UnsatisfiableWriteConcern",
    115: "CommandNotSupported",
    134: "ReadConcernMajorityNotAvailableYet",
    189: "PrimarySteppedDown",
    216: "ElectionInProgress",
    238: "NotImplemented",
    251: "NoSuchTransaction",
    260: "InvalidResumeToken",
    262: "ExceededTimeLimit",
    280: "ChangeStreamFatalError",
    286: "ChangeStreamHistoryLost",
    9001: "SocketException",
    10107: "NotWritablePrimary",
    11000: "DuplicateKey",
    11600: "InterruptedAtShutdown",
    11602: "InterruptedDueToReplStateChange",
    13435: "NotPrimaryNoSecondaryOk",
    13436: "NotPrimaryOrSecondary",
    14031: "OutOfDiskSpace",
    40573: "Location40573",
    40602: "Location40602",
    40674: "Location40674",
    50865: "Location50865",
}

# Codes that make a retryable write retryable (retryable-writes spec).
RETRYABLE_WRITE_CODES = frozenset(
    {6, 7, 89, 91, 134, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436}
)
# Codes a change stream resumes on (change-streams spec, plus CursorNotFound).
RESUMABLE_CHANGE_STREAM_CODES = RETRYABLE_WRITE_CODES | {43, 63, 133, 150, 234, 13388}


def code_name(code: int) -> str:
    """MongoDB's name for ``code`` (``Location<code>`` for unnamed ones)."""
    return CODE_NAMES.get(code, f"Location{code}")


class CloseConnection(Exception):
    """Close the client connection without replying (failpoints, fatal input)."""


class CommandError(Exception):
    """A command failed: replied as ``ok: 0`` with ``code`` and ``codeName``.

    Args:
        code: The MongoDB error code.
        message: ``errmsg``: what was wrong, for a person.
        labels: ``errorLabels``; given explicitly (even empty) they replace the
            standard ones, None lets the server add those.
        extra: More reply fields (``keyPattern``, ``keyValue``...).
    """

    def __init__(
        self,
        code: int,
        message: str,
        *,
        labels: list[str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.labels = labels
        self.labels_explicit = labels is not None
        # Raised while serving a change stream (gets ResumableChangeStreamError when resumable).
        self.change_stream = False
        self.extra = extra or {}

    @property
    def code_name(self) -> str:
        """MongoDB's name for the code."""
        return code_name(self.code)

    def to_reply(self) -> dict[str, Any]:
        """The reply document (without cluster time)."""
        reply: dict[str, Any] = {
            "ok": 0.0,
            "errmsg": self.message,
            "code": self.code,
            "codeName": self.code_name,
        }
        reply.update(self.extra)
        if self.labels:
            reply["errorLabels"] = list(self.labels)
        return reply
