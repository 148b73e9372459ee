"""Trust: Ed25519-signed plugin records.

When a host trusts keys, it runs only records signed by one of them, so a writer to the
functions collection who does not hold a private key cannot make the host run code.
The format below is a stable interface: other tools sign records without plugin-host
(``docs/signing.md`` has a stand-alone example).

**Canonical payload** (version 1). The signed bytes are::

    b"plugin-host-signature-v1\\n" + UTF-8(JSON({"entrypoint": E, "name": N,
                                                 "revision": R, "source": S}))

where the JSON text has its keys in this (sorted) order, no whitespace at all
(separators ``,`` and ``:``), ``R`` written as a plain decimal integer, and strings
written as UTF-8 text with only ``"``, ``\\`` and U+0000-U+001F escaped (``\\b``,
``\\t``, ``\\n``, ``\\f``, ``\\r``, other control characters as ``\\u00xx`` with lowercase
hex); nothing else is escaped, not even non-ASCII, ``/`` or U+2028. That is Python's
``json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)``, and for
these four fields it is also the RFC 8785 (JCS) canonical form. The values are the
record's effective ones, byte for byte as stored (no newline or Unicode normalisation):

- ``N``: the record's ``_id``;
- ``S``: its ``source`` (or the ``fn`` alias when ``source`` is absent);
- ``E``: its ``entrypoint``, or ``"main"`` when the field is absent or null;
- ``R``: its ``revision``, an integer from 0 to 2**53 - 1. **Required**: an unsigned
  revision would let an old signed record replace a newer one, so a signed record
  without a revision is refused.

**Triggers** (issue 17). A record that declares ``triggers`` signs them too: the JSON
object above gains a fifth key, ``"triggers"`` (last in sorted order), whose value is
the list of the record's triggers with every option at its effective value
(``TriggerSpec.as_document()``: defaults filled in, ``operations`` in the order insert,
update, replace, delete), in MongoDB Extended JSON v2 *canonical* mode
(``{"$numberInt": "5"}``, ``{"$date": {"$numberLong": ...}}``), keys sorted at every
level. A record without triggers has the four-key payload above, so every signature
made before triggers existed stays valid.

Other fields (``enabled``, ``timeout``, ``max_concurrency``, ``meta``, dates) are not
signed: they cannot make the host run code that was not signed, and changing them
(enable/disable) needs no key.

**Signature field**: ``signature`` is the string ``"ed25519:<key_id>:<sig>"``, where
``<key_id>`` is the first 16 lowercase hex digits of the SHA-256 of the raw 32-byte
Ed25519 public key and ``<sig>`` the standard base64 (with ``=`` padding) of the 64-byte
Ed25519 signature (RFC 8032) of the canonical payload.

**Replays**: a signed record stays valid forever, so :class:`SignatureVerifier` also
refuses one whose revision is lower than a revision it already accepted for that name
(or than the serving one), and one that reuses an accepted revision with other content.

Key files are PEM: private keys PKCS#8 (``-----BEGIN PRIVATE KEY-----``), public keys
SubjectPublicKeyInfo (``-----BEGIN PUBLIC KEY-----``); an OpenSSH ``ssh-ed25519`` public
key line is accepted too. Reading and writing key files blocks: in async code, call those
functions from a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from bson import json_util
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import PluginHostError, RecordError
from .records import PluginRecord, TriggerSpec, is_valid_name

__all__ = (
    "MAX_SIGNED_REVISION",
    "PAYLOAD_PREFIX",
    "SignatureError",
    "SignatureVerifier",
    "TrustError",
    "TrustedKeys",
    "canonical_payload",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_keys",
    "sign_record",
    "verify_signature",
)

PAYLOAD_PREFIX = b"plugin-host-signature-v1\n"
"""Domain separation: these bytes start every signed payload (format version 1)."""

MAX_SIGNED_REVISION = 2**53 - 1
"""Largest signable revision (every JSON implementation reads it exactly)."""

_PUBLIC_KEY_SUFFIXES = (".pub", ".pem")
_SCHEME = "ed25519"
_KEY_ID_RE = re.compile(r"[0-9a-f]{16}")
_SIGNATURE_B64_LEN = 88  # base64 of 64 bytes, with padding


class TrustError(PluginHostError, ValueError):
    """A key file or a signing input is unusable; the message names the file or field."""


class SignatureError(PluginHostError, ValueError):
    """A record's signature does not check out.

    Attributes:
        code: What failed: ``unsigned``, ``malformed``, ``unknown_key``, ``no_revision``
            or ``mismatch`` (altered after signing, or signed by another key).
        key_id: The key the signature names, when it could be read.
        reason: A sentence saying what is wrong.
    """

    def __init__(self, code: str, reason: str, key_id: str | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.key_id = key_id


# -- the payload and the signature field -----------------------------------------------


def canonical_payload(
    name: str,
    source: str,
    entrypoint: str,
    revision: int,
    triggers: Sequence[TriggerSpec] = (),
) -> bytes:
    """The exact bytes a record's signature covers (see the module docstring).

    Args:
        name: The plugin name (the record's ``_id``).
        source: The plugin source, as stored.
        entrypoint: The effective entrypoint (``"main"`` when the record sets none).
        revision: The record's revision, 0 to ``MAX_SIGNED_REVISION``.
        triggers: The record's triggers (signed only when there is at least one).

    Returns:
        ``PAYLOAD_PREFIX`` followed by the canonical JSON, UTF-8 encoded.

    Raises:
        TrustError: An argument has the wrong type or cannot be encoded.
    """
    if not is_valid_name(name):
        raise TrustError(f"cannot sign: invalid plugin name {name!r}")
    if not isinstance(source, str):
        raise TrustError(f"cannot sign: source must be a string, got {type(source).__name__}")
    if not isinstance(entrypoint, str) or not entrypoint:
        raise TrustError(f"cannot sign: entrypoint must be a non-empty string, got {entrypoint!r}")
    if isinstance(revision, bool) or not isinstance(revision, int):
        raise TrustError(f"cannot sign: revision must be an integer, got {type(revision).__name__}")
    if not 0 <= revision <= MAX_SIGNED_REVISION:
        raise TrustError(f"cannot sign: revision must be 0 to 2**53 - 1, got {revision}")
    fields: dict[str, object] = {
        "entrypoint": entrypoint,
        "name": name,
        "revision": revision,
        "source": source,
    }
    if triggers:
        fields["triggers"] = _triggers_value(triggers)
    body = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    try:
        return PAYLOAD_PREFIX + body.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TrustError(f"cannot sign: text is not valid Unicode ({exc.reason})") from None


def _triggers_value(triggers: Sequence[TriggerSpec]) -> object:
    # Canonical Extended JSON keeps BSON types apart (an int 5 is not a double 5.0) and
    # is text JSON can sort; decoded back, it nests as plain lists and dicts.
    text = json_util.dumps(
        [spec.as_document() for spec in triggers], json_options=json_util.CANONICAL_JSON_OPTIONS
    )
    return json.loads(text)


def key_id(public_key: Ed25519PublicKey) -> str:
    """A key's short fingerprint: the first 16 hex digits of SHA-256 of its raw 32 bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign_record(
    private_key: Ed25519PrivateKey,
    name: str,
    source: str,
    entrypoint: str,
    revision: int,
    triggers: Sequence[TriggerSpec] = (),
) -> str:
    """Sign a record's content for publishing.

    Args:
        private_key: The publisher's key.
        name: The plugin name.
        source: The source exactly as it will be stored.
        entrypoint: The effective entrypoint (``"main"`` if the record sets none).
        revision: The revision the record will carry; sign again for every revision.
        triggers: The record's triggers, parsed (``PluginRecord.triggers``).

    Returns:
        The value of the record's ``signature`` field: ``"ed25519:<key_id>:<base64>"``.

    Raises:
        TrustError: An argument cannot be signed (see :func:`canonical_payload`).
    """
    payload = canonical_payload(name, source, entrypoint, revision, triggers)
    signature = base64.b64encode(private_key.sign(payload)).decode("ascii")
    return f"{_SCHEME}:{key_id(private_key.public_key())}:{signature}"


def _parse_signature(value: str) -> tuple[str, bytes]:
    parts = value.split(":")
    if len(parts) != 3 or parts[0] != _SCHEME:
        raise SignatureError(
            "malformed", "is malformed: expected 'ed25519:<key id>:<base64 signature>'"
        )
    kid, encoded = parts[1], parts[2]
    if _KEY_ID_RE.fullmatch(kid) is None:
        raise SignatureError("malformed", "is malformed: the key id is not 16 lowercase hex digits")
    try:
        raw = (
            base64.b64decode(encoded, validate=True) if len(encoded) == _SIGNATURE_B64_LEN else b""
        )
    except binascii.Error:
        raw = b""
    if len(raw) != 64:
        raise SignatureError(
            "malformed",
            "is malformed: the signature is not the base64 of 64 bytes",
            kid,
        )
    return kid, raw


def verify_signature(
    trusted: Mapping[str, Ed25519PublicKey],
    signature: str | None,
    *,
    name: str,
    source: str,
    entrypoint: str,
    revision: int | None,
    triggers: Sequence[TriggerSpec] = (),
) -> str:
    """Check a signature field against a record's content (no replay check).

    Args:
        trusted: Trusted keys by key id (a :class:`TrustedKeys`).
        signature: The record's ``signature`` field.
        name: The plugin name.
        source: The source as stored.
        entrypoint: The effective entrypoint.
        revision: The record's revision.
        triggers: The record's triggers.

    Returns:
        The id of the key that signed it.

    Raises:
        SignatureError: Unsigned, malformed, by an untrusted key, without a revision, or
            not matching the content.
    """
    if signature is None:
        raise SignatureError(
            "unsigned", "is missing: this host runs only records signed by a trusted key"
        )
    kid, raw = _parse_signature(signature)
    public_key = trusted.get(kid)
    if public_key is None:
        raise SignatureError("unknown_key", f"is by key {kid}, which this host does not trust", kid)
    if revision is None:
        raise SignatureError(
            "no_revision",
            "covers no revision: a signed record must carry a revision (replay protection)",
            kid,
        )
    try:
        payload = canonical_payload(name, source, entrypoint, revision, triggers)
    except TrustError as exc:
        raise SignatureError("malformed", f"cannot be checked: {exc}", kid) from None
    try:
        public_key.verify(raw, payload)
    except InvalidSignature:
        raise SignatureError(
            "mismatch",
            f"does not match the record (key {kid}): the record was altered after signing",
            kid,
        ) from None
    return kid


# -- keys ------------------------------------------------------------------------------


class TrustedKeys(Mapping[str, Ed25519PublicKey]):
    """The public keys a host trusts, by key id; several allow key rotation.

    Args:
        keys: Ed25519 public keys (duplicates are merged).
    """

    def __init__(self, keys: Iterable[Ed25519PublicKey] = ()) -> None:
        self._keys: dict[str, Ed25519PublicKey] = {}
        for public_key in keys:
            if not isinstance(public_key, Ed25519PublicKey):
                raise TypeError(f"expected an Ed25519PublicKey, got {type(public_key).__name__}")
            self._keys.setdefault(key_id(public_key), public_key)

    def __getitem__(self, kid: str) -> Ed25519PublicKey:
        return self._keys[kid]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"TrustedKeys({sorted(self._keys)})"


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TrustError(f"cannot read {what} file {str(path)!r}: {exc.strerror or exc}") from None


def _load_public_key_file(path: Path) -> Ed25519PublicKey:
    data = _read(path, "public key")
    if b"PRIVATE KEY" in data:
        raise TrustError(
            f"public key file {str(path)!r} holds a private key: trust the public key (.pub)"
        )
    public_key: object
    try:
        if data.lstrip().startswith(b"ssh-"):
            public_key = serialization.load_ssh_public_key(data.strip())
        else:
            public_key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise TrustError(
            f"public key file {str(path)!r} is not a valid public key: {exc}"
        ) from None
    if not isinstance(public_key, Ed25519PublicKey):
        raise TrustError(
            f"public key file {str(path)!r} holds a {type(public_key).__name__}, not an Ed25519 key"
        )
    return public_key


def load_public_keys(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
) -> TrustedKeys:
    """Load trusted public keys from files and folders (blocking).

    Args:
        paths: A key file, a folder (its ``*.pub`` and ``*.pem`` files are loaded; other
            files are ignored), or several of these.

    Returns:
        The keys, by key id.

    Raises:
        TrustError: A path does not exist, a file is unreadable or not an Ed25519 public
            key (the message names it), or no key was found at all.
    """
    items = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    keys: list[Ed25519PublicKey] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            files = sorted(
                p for p in path.iterdir() if p.suffix in _PUBLIC_KEY_SUFFIXES and p.is_file()
            )
            if not files:
                raise TrustError(f"folder {str(path)!r} holds no public key (*.pub or *.pem)")
            keys.extend(_load_public_key_file(p) for p in files)
        elif path.exists():
            keys.append(_load_public_key_file(path))
        else:
            raise TrustError(f"public key file or folder {str(path)!r} does not exist")
    if not keys:
        raise TrustError("no public key given: pass at least one key file or folder")
    return TrustedKeys(keys)


def load_private_key(
    path: str | os.PathLike[str], password: bytes | None = None
) -> Ed25519PrivateKey:
    """Load an Ed25519 private key from a PEM (PKCS#8) file (blocking).

    Args:
        path: The key file, as written by :func:`generate_keypair`.
        password: Its passphrase, if it is encrypted.

    Returns:
        The key.

    Raises:
        TrustError: The file is unreadable or not an Ed25519 private key (the message
            names it).
    """
    file = Path(path)
    data = _read(file, "private key")
    try:
        private_key = serialization.load_pem_private_key(data, password=password)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise TrustError(
            f"private key file {str(file)!r} is not a usable private key: {exc}"
        ) from None
    if not isinstance(private_key, Ed25519PrivateKey):
        raise TrustError(
            f"private key file {str(file)!r} holds a {type(private_key).__name__}, "
            "not an Ed25519 key"
        )
    return private_key


def _write_new(path: Path, data: bytes, mode: int) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, mode)  # the mode applies from creation: never readable
    except FileExistsError:
        raise TrustError(f"refusing to overwrite existing key file {str(path)!r}") from None
    with os.fdopen(fd, "wb") as file:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, mode)  # exactly ``mode`` whatever the umask
        file.write(data)


def generate_keypair(out_dir: str | os.PathLike[str], name: str = "signing") -> tuple[Path, Path]:
    """Create a new Ed25519 key pair as two PEM files (blocking).

    The private key file is created with mode 0600 (never readable by others, even
    briefly); existing files are never overwritten.

    Args:
        out_dir: The folder for the files (created with mode 0700 if missing).
        name: The files' stem: ``<name>.key`` (private) and ``<name>.pub`` (public).

    Returns:
        ``(private_path, public_path)``.

    Raises:
        TrustError: A file already exists or cannot be written, or ``name`` is not a
            plain file name.
    """
    if not name or Path(name).name != name or name in (".", ".."):
        raise TrustError(f"key name must be a plain file name, got {name!r}")
    folder = Path(out_dir)
    private_path, public_path = folder / f"{name}.key", folder / f"{name}.pub"
    private_key = Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if public_path.exists() or public_path.is_symlink():
            raise TrustError(f"refusing to overwrite existing key file {str(public_path)!r}")
        _write_new(private_path, private_pem, 0o600)
        try:
            _write_new(public_path, public_pem, 0o644)
        except BaseException:
            private_path.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise TrustError(f"cannot write key files in {str(folder)!r}: {exc}") from None
    return private_path, public_path


# -- the verifier the loader calls -----------------------------------------------------


class SignatureVerifier:
    """The loader's ``RecordVerifier`` for signed records; one instance per host.

    Refuses, with a :class:`~host.errors.RecordError` on field ``signature`` whose
    ``details`` carry ``check="signature"``, ``code`` and ``key_id`` (they show in the
    ``plugin.rejected`` event), a record that is unsigned, malformed, signed by a key not
    in ``trusted``, altered after signing, or a replay: its revision is lower than one
    already accepted for that name (or than the serving version's), or equal to it with
    other content. Accepted revisions are remembered in memory, so deleting a plugin and
    re-inserting an older signed record does not roll it back either (until a restart).

    Args:
        trusted: The keys to trust; at least one.

    Raises:
        TrustError: ``trusted`` is empty.
    """

    def __init__(self, trusted: Mapping[str, Ed25519PublicKey]) -> None:
        if not trusted:
            raise TrustError("no trusted key: a verifier trusting no key would refuse everything")
        self._trusted = trusted
        # name -> (highest accepted revision, SHA-256 of its payload)
        self._accepted: dict[str, tuple[int, bytes]] = {}

    @property
    def trusted(self) -> Mapping[str, Ed25519PublicKey]:
        """The trusted keys, by key id."""
        return self._trusted

    def __call__(self, record: PluginRecord, current: PluginRecord | None) -> None:
        """Accept ``record`` (return) or refuse it (raise ``RecordError``).

        Args:
            record: The validated record about to compile.
            current: The serving version's record, if any.

        Raises:
            RecordError: The record is refused; field ``signature``.
        """
        try:
            kid = verify_signature(
                self._trusted,
                record.signature,
                name=record.name,
                source=record.source,
                entrypoint=record.entrypoint,
                revision=record.revision,
                triggers=record.triggers,
            )
        except SignatureError as exc:
            raise _refusal(record.name, exc.code, exc.reason, exc.key_id) from None
        assert record.revision is not None  # verify_signature refuses a missing revision
        digest = _digest(record, record.revision)
        floor = self._accepted.get(record.name)
        if (
            current is not None
            and current.revision is not None
            and (floor is None or current.revision > floor[0])
        ):
            floor = (current.revision, _digest(current, current.revision))
        if floor is not None:
            if record.revision < floor[0]:
                raise _refusal(
                    record.name,
                    "replay",
                    f"revision {record.revision} is older than revision {floor[0]}, already "
                    "accepted: revision must not go backwards (a replayed record?); to roll "
                    "back, publish the old source as a new revision",
                    kid,
                    revision=record.revision,
                    accepted_revision=floor[0],
                )
            if record.revision == floor[0] and digest != floor[1]:
                raise _refusal(
                    record.name,
                    "revision_reused",
                    f"revision {record.revision} was already accepted with other content: "
                    "a changed record must bump the revision",
                    kid,
                    revision=record.revision,
                    accepted_revision=floor[0],
                )
        self._accepted[record.name] = (record.revision, digest)


def _digest(record: PluginRecord, revision: int) -> bytes:
    try:
        payload = canonical_payload(
            record.name, record.source, record.entrypoint, revision, record.triggers
        )
    except TrustError:
        payload = b""  # unsignable (a legacy record): never equal to a signed one's
    return hashlib.sha256(payload).digest()


def _refusal(name: str, code: str, reason: str, kid: str | None, **extra: int) -> RecordError:
    return RecordError(
        name,
        "signature",
        reason,
        details={"check": "signature", "code": code, "key_id": kid, **extra},
    )
