"""Schema validation: a collection's ``validator`` enforced on inserts and updates.

As mongod (``create``/``collMod`` options): ``validator`` is a query filter every
written document must match; ``validationLevel`` ``strict`` (default) checks every
write, ``moderate`` skips updates of documents that were already invalid, ``off``
checks nothing; ``validationAction`` ``error`` (default) refuses the write with 121
DocumentValidationFailure, ``warn`` only logs it. ``bypassDocumentValidation`` on the
command skips the check. ``$jsonSchema`` validators are refused by the engine (238,
naming the operator) rather than misjudged.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping
from typing import Any

import structlog

from .errors import CommandError

log = structlog.get_logger("host.embedded")

# Set by the command being executed; commands run one at a time on the server's loop.
bypass: contextvars.ContextVar[bool] = contextvars.ContextVar("bypass_validation", default=False)


def check_document(
    options: Mapping[str, Any],
    namespace: str,
    doc: Mapping[str, Any],
    before: Mapping[str, Any] | None = None,
) -> None:
    """Refuse ``doc`` when it fails the collection's validator (see the module doc).

    Raises:
        CommandError: 121 when the document does not match the validator.
    """
    from .indexes import filter_applies
    from .storage import engine_error

    validator = options.get("validator")
    if not isinstance(validator, Mapping) or not validator or bypass.get():
        return
    level = options.get("validationLevel", "strict")
    try:
        if level == "off" or (
            level == "moderate" and before is not None and not filter_applies(validator, before)
        ):
            return
        if filter_applies(validator, doc):
            return
    except Exception as exc:
        raise engine_error(exc) from exc
    if options.get("validationAction", "error") == "warn":
        log.warning("embedded.document_validation_failed", ns=namespace, id=doc.get("_id"))
        return
    raise CommandError(
        121,
        "Document failed validation",
        extra={"errInfo": {"failingDocumentId": doc.get("_id"), "details": {}}},
    )


__all__ = ["bypass", "check_document"]
