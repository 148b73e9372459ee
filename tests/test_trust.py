"""Signed plugins: the canonical payload, key files, and a host that trusts keys."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from host import PluginHost, PluginNotFound, PluginRecord, RecordError
from host.trust import (
    SignatureError,
    SignatureVerifier,
    TrustedKeys,
    TrustError,
    canonical_payload,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_keys,
    sign_record,
    verify_signature,
)
from tests.support import Db, next_event

# The golden vector: any change to these bytes breaks every signature already published.
GOLDEN_SEED = bytes(range(32))
GOLDEN_SOURCE = 'async def main(ctx, args):\n\treturn "h\u00e9/\\\\ \u2028 \x01 \U0001f600"\n'
GOLDEN_PAYLOAD = (
    b'plugin-host-signature-v1\n{"entrypoint":"main","name":"greet","revision":7,'
    b'"source":"async def main(ctx, args):\\n\\treturn \\"h\xc3\xa9/\\\\\\\\ '
    b'\xe2\x80\xa8 \\u0001 \xf0\x9f\x98\x80\\"\\n"}'
)
GOLDEN_KEY_ID = "56475aa75463474c"
GOLDEN_SIGNATURE = (
    "ed25519:56475aa75463474c:"
    "5JdaLMXYqxULqSQjTBuXYxU+SsG5XRaAExkTUy+fnmSKfN+T+Mw5/sSyiORo1kBmSbbgCDiiv21sbjV7ecTSBw=="
)


def source_v(n: int) -> str:
    """A plugin whose ``main`` returns ``n`` and whose ``other`` returns ``-n``."""
    return (
        f"async def main(ctx, args):\n    return {n}\n\n"
        f"async def other(ctx, args):\n    return -{n}\n"
    )


def signed(
    key: Ed25519PrivateKey, name: str, source: str, revision: int, entrypoint: str | None = None
) -> dict[str, Any]:
    """A record document signed by ``key``."""
    doc: dict[str, Any] = {"_id": name, "source": source, "revision": revision}
    if entrypoint is not None:
        doc["entrypoint"] = entrypoint
    doc["signature"] = sign_record(key, name, source, entrypoint or "main", revision)
    return doc


@dataclass
class Keys:
    """Two key pairs on disk: ``old`` (being retired) and ``new``."""

    folder: Path
    old: Ed25519PrivateKey
    new: Ed25519PrivateKey
    old_pub: Path
    new_pub: Path

    @property
    def both(self) -> TrustedKeys:
        """Both public keys."""
        return TrustedKeys([self.old.public_key(), self.new.public_key()])


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    """Two freshly generated key pairs in one folder (written outside the event loop)."""
    folder = tmp_path / "keys"
    old_key, old_pub = generate_keypair(folder, "old")
    new_key, new_pub = generate_keypair(folder, "new")
    return Keys(folder, load_private_key(old_key), load_private_key(new_key), old_pub, new_pub)


@pytest.fixture
def umask_zero() -> Iterator[None]:
    """Run with umask 0, so only the explicit file mode can keep a key private."""
    previous = os.umask(0)
    yield
    os.umask(previous)


# -- the format ----------------------------------------------------------------------


def test_golden_vector() -> None:
    """A fixed key and record give the documented payload bytes and signature string."""
    key = Ed25519PrivateKey.from_private_bytes(GOLDEN_SEED)
    assert canonical_payload("greet", GOLDEN_SOURCE, "main", 7) == GOLDEN_PAYLOAD
    assert key_id(key.public_key()) == GOLDEN_KEY_ID
    assert sign_record(key, "greet", GOLDEN_SOURCE, "main", 7) == GOLDEN_SIGNATURE
    trusted = TrustedKeys([key.public_key()])
    kid = verify_signature(
        trusted, GOLDEN_SIGNATURE, name="greet", source=GOLDEN_SOURCE, entrypoint="main", revision=7
    )
    assert kid == GOLDEN_KEY_ID


def test_docs_example_signs_like_the_library() -> None:
    """The stand-alone signing example in docs/signing.md reproduces the golden signature."""
    text = (Path(__file__).parent.parent / "docs" / "signing.md").read_text(encoding="utf-8")
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(compile(code, "docs/signing.md", "exec"), namespace)
    pem = Ed25519PrivateKey.from_private_bytes(GOLDEN_SEED).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert namespace["sign"](pem, "greet", GOLDEN_SOURCE, "main", 7) == GOLDEN_SIGNATURE


@pytest.mark.parametrize(
    "change",
    [
        {"name": "greet2"},
        {"source": GOLDEN_SOURCE + " "},
        {"entrypoint": "other"},
        {"revision": 8},
    ],
)
def test_any_signed_field_change_breaks_the_signature(change: dict[str, Any]) -> None:
    """Changing name, source, entrypoint or revision makes the golden signature fail."""
    trusted = TrustedKeys([Ed25519PrivateKey.from_private_bytes(GOLDEN_SEED).public_key()])
    fields: dict[str, Any] = {
        "name": "greet",
        "source": GOLDEN_SOURCE,
        "entrypoint": "main",
        "revision": 7,
        **change,
    }
    with pytest.raises(SignatureError) as info:
        verify_signature(trusted, GOLDEN_SIGNATURE, **fields)
    assert info.value.code == "mismatch"
    assert info.value.key_id == GOLDEN_KEY_ID


@pytest.mark.parametrize(
    ("revision", "message"),
    [(-1, r"0 to 2\*\*53 - 1"), (2**53, r"0 to 2\*\*53 - 1"), (True, "integer"), ("7", "integer")],
)
def test_payload_refuses_unsignable_revisions(revision: Any, message: str) -> None:
    """Revisions outside 0..2**53-1, or not integers, cannot be signed."""
    with pytest.raises(TrustError, match=message):
        canonical_payload("greet", "x", "main", revision)


@pytest.mark.parametrize(
    ("signature", "code"),
    [
        (None, "unsigned"),
        ("garbage", "malformed"),
        ("rsa:56475aa75463474c:AAAA", "malformed"),
        ("ed25519:XYZ:" + GOLDEN_SIGNATURE.split(":")[2], "malformed"),
        ("ed25519:56475aa75463474c:not*base64", "malformed"),
        ("ed25519:56475aa75463474c:" + "A" * 86 + "==", "mismatch"),
        ("ed25519:0123456789abcdef:" + GOLDEN_SIGNATURE.split(":")[2], "unknown_key"),
    ],
)
def test_verifier_refusals_carry_code_and_key(signature: str | None, code: str) -> None:
    """The verifier refuses bad signatures with field 'signature' and details naming the check."""
    trusted = TrustedKeys([Ed25519PrivateKey.from_private_bytes(GOLDEN_SEED).public_key()])
    record = PluginRecord("greet", GOLDEN_SOURCE, revision=7, signature=signature)
    with pytest.raises(RecordError) as info:
        SignatureVerifier(trusted)(record, None)
    assert info.value.field == "signature"
    assert info.value.details["check"] == "signature"
    assert info.value.details["code"] == code
    if code == "unknown_key":
        assert info.value.details["key_id"] == "0123456789abcdef"
        assert "0123456789abcdef" in info.value.reason


def test_signed_record_needs_a_revision() -> None:
    """A signature on a record without revision is refused: replay protection needs one."""
    key = Ed25519PrivateKey.from_private_bytes(GOLDEN_SEED)
    record = PluginRecord("greet", GOLDEN_SOURCE, signature=GOLDEN_SIGNATURE)
    with pytest.raises(RecordError, match="revision") as info:
        SignatureVerifier(TrustedKeys([key.public_key()]))(record, None)
    assert info.value.details["code"] == "no_revision"


def test_verifier_needs_a_key() -> None:
    """A verifier that trusts no key is a configuration error, not a host that runs nothing."""
    with pytest.raises(TrustError, match="no trusted key"):
        SignatureVerifier(TrustedKeys())


# -- key files -----------------------------------------------------------------------


def test_private_key_file_is_0600_and_never_overwritten(tmp_path: Path, umask_zero: None) -> None:
    """generate_keypair writes a 0600 private key (even with umask 0) and refuses to overwrite."""
    private, public = generate_keypair(tmp_path / "k")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert (private.name, public.name) == ("signing.key", "signing.pub")
    before = private.read_bytes()
    with pytest.raises(TrustError, match="refusing to overwrite"):
        generate_keypair(tmp_path / "k")
    assert private.read_bytes() == before
    key = load_private_key(private)
    assert list(load_public_keys(public)) == [key_id(key.public_key())]


def test_folder_of_public_keys_loads_every_key(keys: Keys) -> None:
    """A folder yields every *.pub/*.pem key and ignores the private .key files beside them."""
    trusted = load_public_keys(keys.folder)
    assert set(trusted) == {key_id(keys.old.public_key()), key_id(keys.new.public_key())}


def test_openssh_public_key_is_accepted(tmp_path: Path) -> None:
    """An OpenSSH 'ssh-ed25519 ...' public key line is a valid trusted key."""
    key = Ed25519PrivateKey.generate()
    line = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    path = tmp_path / "id_ed25519.pub"
    path.write_bytes(line + b" me@example\n")
    assert list(load_public_keys(path)) == [key_id(key.public_key())]


def _rsa_public_pem() -> bytes:
    """An RSA public key in PEM, to show that only Ed25519 keys are accepted."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    return rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a key\n", "is not a valid public key"),
        (b"", "is not a valid public key"),
        (None, "holds a private key"),
        ("rsa", "not an Ed25519 key"),
    ],
)
def test_bad_public_key_file_is_named(
    tmp_path: Path, content: bytes | str | None, message: str
) -> None:
    """An unusable public key file fails with TrustError naming that file and the problem."""
    good = tmp_path / "a_good.pub"
    good.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    bad = tmp_path / "b_bad.pem"
    if content is None:
        generate_keypair(tmp_path, "priv")
        bad.write_bytes((tmp_path / "priv.key").read_bytes())
    elif content == "rsa":
        bad.write_bytes(_rsa_public_pem())
    else:
        assert isinstance(content, bytes)
        bad.write_bytes(content)
    with pytest.raises(TrustError, match=message) as info:
        load_public_keys(tmp_path)
    assert str(bad) in str(info.value)


def test_missing_paths_and_empty_folders_are_named(tmp_path: Path) -> None:
    """A missing key path, or a folder without public keys, is an error naming it."""
    missing = tmp_path / "nope.pub"
    with pytest.raises(TrustError, match="does not exist") as info:
        load_public_keys([missing])
    assert str(missing) in str(info.value)
    with pytest.raises(TrustError, match="holds no public key") as info:
        load_public_keys(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_bad_private_key_file_is_named(keys: Keys, tmp_path: Path) -> None:
    """load_private_key names the file when it is not an Ed25519 private key."""
    with pytest.raises(TrustError, match="not a usable private key") as info:
        load_private_key(keys.new_pub)
    assert str(keys.new_pub) in str(info.value)
    missing = tmp_path / "missing.key"
    with pytest.raises(TrustError, match="cannot read") as info:
        load_private_key(missing)
    assert str(missing) in str(info.value)


# -- a host that trusts keys ---------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("field", ["source", "entrypoint", "revision", "name"])
async def test_altered_record_is_rejected_and_old_version_serves(
    db: Db, keys: Keys, field: str
) -> None:
    """A signed record altered after signing is rejected (reason names the key); r1 serves."""
    async with PluginHost(db, trusted_keys=keys.both) as host, host.events() as events:
        await db.functions.insert_one(signed(keys.new, "p", source_v(1), 1))
        loaded = await next_event(events, "plugin.loaded")
        assert await host.call("p") == 1
        if field == "name":  # the same signed content under another _id
            doc = await db.functions.find_one({"_id": "p"})
            assert doc is not None
            await db.functions.insert_one({**doc, "_id": "q"})
            target = "q"
        else:
            value = {"source": source_v(666), "entrypoint": "other", "revision": 2}[field]
            await db.functions.update_one({"_id": "p"}, {"$set": {field: value}})
            target = "p"
        rejected = await next_event(events, "plugin.rejected", lambda e: e["plugin"] == target)
        assert await host.call("p") == 1
    assert rejected["field"] == "signature"
    assert rejected["check"] == "signature"
    assert rejected["code"] == "mismatch"
    assert rejected["key_id"] == key_id(keys.new.public_key())
    assert rejected["key_id"] in rejected["reason"]
    if target == "p":
        assert rejected["serving"] == loaded["version"]


@pytest.mark.anyio
async def test_previous_version_keeps_serving_after_tamper(db: Db, keys: Keys) -> None:
    """After a tampered write is rejected, calls still reach the signed version."""
    async with PluginHost(db, trusted_keys=keys.both) as host, host.events() as events:
        await db.functions.insert_one(signed(keys.new, "p", source_v(1), 1))
        await next_event(events, "plugin.loaded")
        await db.functions.update_one({"_id": "p"}, {"$set": {"source": source_v(666)}})
        await next_event(events, "plugin.rejected")
        assert await host.call("p") == 1
        info = host.plugin("p")
        assert info is not None
        assert info.status == "degraded"


@pytest.mark.anyio
async def test_unsigned_record_is_refused(db: Db, keys: Keys) -> None:
    """With trust on, an unsigned record never loads and plugin.rejected says why."""
    await db.functions.insert_one({"_id": "u", "source": source_v(1), "revision": 1})
    host = PluginHost(db, trusted_keys=keys.both)
    async with host.events() as events:
        async with host:
            with pytest.raises(PluginNotFound):
                await host.call("u")
        rejected = await next_event(events, "plugin.rejected")
    assert rejected["plugin"] == "u"
    assert rejected["field"] == "signature"
    assert rejected["code"] == "unsigned"
    assert rejected["key_id"] is None
    assert rejected["serving"] is None


@pytest.mark.anyio
async def test_key_rotation(db: Db, keys: Keys) -> None:
    """Records signed by either trusted key load; a host without the old key refuses its records."""
    await db.functions.insert_many(
        [signed(keys.old, "by_old", source_v(1), 1), signed(keys.new, "by_new", source_v(2), 1)]
    )
    async with PluginHost(db, trusted_keys=keys.folder) as host:
        assert await host.call("by_old") == 1
        assert await host.call("by_new") == 2
        assert host.trusted_keys is not None
        assert len(host.trusted_keys) == 2
    rotated = PluginHost(db, trusted_keys=[str(keys.new_pub)])
    async with rotated.events() as events:
        async with rotated:
            assert await rotated.call("by_new") == 2
            with pytest.raises(PluginNotFound):
                await rotated.call("by_old")
        rejected = await next_event(events, "plugin.rejected")
    assert rejected["plugin"] == "by_old"
    assert rejected["code"] == "unknown_key"
    assert rejected["key_id"] == key_id(keys.old.public_key())


@pytest.mark.anyio
async def test_replayed_older_revision_cannot_roll_back(db: Db, keys: Keys) -> None:
    """Overwriting signed r2 with the signed r1 record is rejected; r2 keeps serving."""
    r1 = signed(keys.new, "p", source_v(1), 1)
    async with PluginHost(db, trusted_keys=keys.both) as host, host.events() as events:
        await db.functions.insert_one(r1)
        await next_event(events, "plugin.loaded")
        await db.functions.replace_one({"_id": "p"}, signed(keys.new, "p", source_v(2), 2))
        await next_event(events, "plugin.reloaded")
        await db.functions.replace_one({"_id": "p"}, r1)
        rejected = await next_event(events, "plugin.rejected")
        assert rejected["code"] == "replay"
        assert rejected["revision"] == 1
        assert rejected["accepted_revision"] == 2
        assert "must not go backwards" in rejected["reason"]
        assert await host.call("p") == 2


@pytest.mark.anyio
async def test_delete_then_replay_cannot_roll_back(db: Db, keys: Keys) -> None:
    """Deleting a plugin and re-inserting an older signed record is refused as a replay."""
    r1 = signed(keys.new, "p", source_v(1), 1)
    async with PluginHost(db, trusted_keys=keys.both) as host, host.events() as events:
        await db.functions.insert_one(r1)
        await next_event(events, "plugin.loaded")
        await db.functions.replace_one({"_id": "p"}, signed(keys.new, "p", source_v(2), 2))
        await next_event(events, "plugin.reloaded")
        await db.functions.delete_one({"_id": "p"})
        await next_event(events, "plugin.unloaded")
        await db.functions.insert_one(r1)
        rejected = await next_event(events, "plugin.rejected")
        assert rejected["code"] == "replay"
        with pytest.raises(PluginNotFound):
            await host.call("p")
        await db.functions.insert_one(signed(keys.new, "p2", source_v(3), 1))
        await next_event(events, "plugin.loaded")


@pytest.mark.anyio
async def test_same_revision_with_other_content_is_refused(db: Db, keys: Keys) -> None:
    """A re-signed different source at the same revision is refused: it must bump the revision."""
    async with PluginHost(db, trusted_keys=keys.both) as host, host.events() as events:
        await db.functions.insert_one(signed(keys.new, "p", source_v(1), 3))
        await next_event(events, "plugin.loaded")
        await db.functions.replace_one({"_id": "p"}, signed(keys.old, "p", source_v(9), 3))
        rejected = await next_event(events, "plugin.rejected")
        assert rejected["code"] == "revision_reused"
        assert rejected["key_id"] == key_id(keys.old.public_key())
        await db.functions.replace_one({"_id": "p"}, signed(keys.old, "p", source_v(9), 4))
        await next_event(events, "plugin.reloaded")
        assert await host.call("p") == 9


@pytest.mark.anyio
async def test_unsigned_fields_change_without_a_key(db: Db, keys: Keys) -> None:
    """Disabling a signed record, or touching unsigned fields, needs no re-signing."""
    async with PluginHost(db, trusted_keys=keys.both) as host, host.events() as events:
        await db.functions.insert_one(signed(keys.new, "p", source_v(1), 1))
        await next_event(events, "plugin.loaded")
        await db.functions.update_one({"_id": "p"}, {"$set": {"timeout": 5.0}})
        await next_event(events, "plugin.reloaded")
        await db.functions.update_one({"_id": "p"}, {"$set": {"enabled": False}})
        await next_event(events, "plugin.unloaded")
        await db.functions.update_one({"_id": "p"}, {"$set": {"enabled": True}})
        await next_event(events, "plugin.loaded")
        assert await host.call("p") == 1


@pytest.mark.anyio
async def test_custom_verifier_sees_only_signed_records(db: Db, keys: Keys) -> None:
    """A verifier passed with trusted_keys runs after the signature check, on signed records."""
    seen: list[str] = []

    def verifier(record: PluginRecord, current: PluginRecord | None) -> None:
        seen.append(record.name)

    await db.functions.insert_many(
        [{"_id": "unsigned", "source": source_v(1)}, signed(keys.new, "ok", source_v(2), 1)]
    )
    async with PluginHost(db, trusted_keys=keys.both, verifier=verifier) as host:
        assert await host.call("ok") == 2
    assert seen == ["ok"]


@pytest.mark.anyio
async def test_without_keys_signatures_are_ignored_and_warned_once(db: Db) -> None:
    """With no trusted keys, any record loads and trust.disabled is emitted exactly once."""
    await db.functions.insert_one({"_id": "p", "source": source_v(1), "signature": "ed25519:bogus"})
    host = PluginHost(db)
    async with host.events() as events:
        async with host:
            assert await host.call("p") == 1
        events.close()  # iteration ends after what is buffered
        seen = [event async for event in events]
    warnings = [event for event in seen if event.event == "trust.disabled"]
    assert len(warnings) == 1
    assert "any writer to the collection can run code" in warnings[0]["message"]
    names = [event.event for event in seen]
    assert names.index("trust.disabled") < names.index("host.started")


@pytest.mark.anyio
async def test_with_keys_there_is_no_trust_warning(db: Db, keys: Keys) -> None:
    """A host that checks signatures emits no trust.disabled event."""
    host = PluginHost(db, trusted_keys=keys.both)
    async with host.events() as events:
        async with host:
            pass
        events.close()  # iteration ends after what is buffered
        names = [event.event async for event in events]
    assert "host.started" in names
    assert "trust.disabled" not in names


@pytest.mark.anyio
async def test_bad_trusted_key_path_fails_on_enter(db: Db, tmp_path: Path) -> None:
    """A host given an unusable key file refuses to start, naming the file."""
    bad = tmp_path / "bad.pub"
    bad.write_text("nope")
    with pytest.raises(TrustError) as info:
        async with PluginHost(db, trusted_keys=bad):
            pass  # pragma: no cover
    assert str(bad) in str(info.value)
