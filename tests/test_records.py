"""Tests for host.records: validation of raw plugin documents."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import pytest

from host.errors import RecordError
from host.records import PluginRecord, is_valid_name, parse_record

SOURCE = "async def main(ctx, args):\n    return args\n"


def doc(**fields: Any) -> dict[str, Any]:
    """Return a valid document for plugin 'greet', with ``fields`` overriding."""
    base: dict[str, Any] = {"_id": "greet", "source": SOURCE}
    base.update(fields)
    return base


def test_minimal_record_gets_defaults() -> None:
    """A document with only _id and source loads with every default."""
    record = parse_record(doc())
    assert record == PluginRecord(name="greet", source=SOURCE)
    assert record.entrypoint == "main"
    assert record.enabled is True
    assert record.revision is None
    assert record.timeout is None
    assert record.max_concurrency is None
    assert dict(record.meta) == {}


def test_full_record_loads_every_field() -> None:
    """Every known field is parsed into the record."""
    created = datetime(2024, 1, 1, tzinfo=UTC)
    updated = datetime(2024, 2, 1, tzinfo=UTC)
    record = parse_record(
        doc(
            entrypoint="handle",
            enabled=False,
            revision=7,
            createdAt=created,
            updatedAt=updated,
            timeout=2,
            max_concurrency=3,
            meta={"owner": "ada"},
            signature="c2ln",
        )
    )
    assert record.entrypoint == "handle"
    assert record.enabled is False
    assert record.revision == 7
    assert record.created_at == created
    assert record.updated_at == updated
    assert record.timeout == 2.0
    assert isinstance(record.timeout, float)
    assert record.max_concurrency == 3
    assert record.meta == {"owner": "ada"}
    assert record.signature == "c2ln"


def test_blog_post_record_shape_loads_as_is() -> None:
    """A record shaped like the hot-require blog post ({_id, fn, createdAt}) loads."""
    created = datetime(2017, 6, 1, tzinfo=UTC)
    record = parse_record({"_id": "my-function", "fn": SOURCE, "createdAt": created})
    assert record.name == "my-function"
    assert record.source == SOURCE
    assert record.created_at == created


def test_fn_and_source_equal_is_accepted() -> None:
    """Giving the same text as both source and fn is not a conflict."""
    assert parse_record(doc(fn=SOURCE)).source == SOURCE


def test_fn_and_source_conflict_is_rejected() -> None:
    """Different source and fn are an error naming the fn field."""
    with pytest.raises(RecordError) as info:
        parse_record(doc(fn="def main(ctx, args): pass\n"))
    assert info.value.field == "fn"
    assert "conflicts" in info.value.reason


def test_unknown_fields_are_ignored() -> None:
    """Fields the host does not know are ignored (forward compatible)."""
    assert parse_record(doc(futureField={"x": 1}, _v=3)).name == "greet"


def test_null_optional_fields_take_defaults() -> None:
    """An optional field set to null behaves as absent."""
    record = parse_record(doc(entrypoint=None, enabled=None, revision=None, meta=None))
    assert (record.entrypoint, record.enabled, record.revision) == ("main", True, None)


def test_error_message_names_record_and_field() -> None:
    """The message reads: record 'greet': field 'source': must be a string, got int."""
    with pytest.raises(RecordError) as info:
        parse_record(doc(source=42))
    assert str(info.value) == "record 'greet': field 'source': must be a string, got int"
    assert (info.value.name, info.value.field) == ("greet", "source")
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("fields", "field", "reason"),
    [
        ({"source": None}, "source", "is required"),
        ({"source": b"def main(ctx, a): pass"}, "source", "must be text, got binary"),
        ({"source": bytearray(b"x")}, "source", "must be text, got binary"),
        ({"source": "", "fn": None}, "source", "must not be empty"),
        ({"source": "   \n\t"}, "source", "must not be empty"),
        ({"source": "x = 1\x00"}, "source", "NUL"),
        ({"source": "x = '\ud800'"}, "source", "not valid Unicode"),
        ({"source": None, "fn": 3}, "fn", "must be a string, got int"),
        ({"source": None, "fn": b"x"}, "fn", "must be text, got binary"),
        ({"entrypoint": 1}, "entrypoint", "must be a string, got int"),
        ({"entrypoint": "not valid"}, "entrypoint", "must be a Python identifier"),
        ({"entrypoint": "class"}, "entrypoint", "must be a Python identifier"),
        ({"enabled": 1}, "enabled", "must be a boolean, got int"),
        ({"enabled": "yes"}, "enabled", "must be a boolean, got str"),
        ({"revision": True}, "revision", "must be an integer, got bool"),
        ({"revision": 1.5}, "revision", "must be an integer, got float"),
        ({"revision": -1}, "revision", "must be >= 0"),
        ({"timeout": True}, "timeout", "got bool"),
        ({"timeout": "5"}, "timeout", "got str"),
        ({"timeout": 0}, "timeout", "positive finite"),
        ({"timeout": -1.0}, "timeout", "positive finite"),
        ({"timeout": float("inf")}, "timeout", "positive finite"),
        ({"timeout": float("nan")}, "timeout", "positive finite"),
        ({"max_concurrency": False}, "max_concurrency", "must be an integer, got bool"),
        ({"max_concurrency": 2.0}, "max_concurrency", "must be an integer, got float"),
        ({"max_concurrency": 0}, "max_concurrency", "must be >= 1"),
        ({"createdAt": "2024-01-01"}, "createdAt", "must be a date, got str"),
        ({"updatedAt": 1700000000}, "updatedAt", "must be a date, got int"),
        ({"meta": [1, 2]}, "meta", "must be a document, got list"),
        ({"signature": b"sig"}, "signature", "must be a string, got bytes"),
    ],
)
def test_invalid_field_is_named(fields: dict[str, Any], field: str, reason: str) -> None:
    """Each invalid field raises RecordError naming the record and that field."""
    with pytest.raises(RecordError) as info:
        parse_record(doc(**fields))
    assert info.value.name == "greet"
    assert info.value.field == field
    assert reason in info.value.reason
    assert str(info.value).startswith(f"record 'greet': field {field!r}: ")


def test_oversize_source_is_rejected_by_utf8_size() -> None:
    """The size limit counts UTF-8 bytes, not characters."""
    source = "# " + "é" * 10 + "\n"  # 12 characters, 22 bytes (plus the newline)
    assert parse_record(doc(source=source), max_source_bytes=23).source == source
    with pytest.raises(RecordError) as info:
        parse_record(doc(source=source), max_source_bytes=22)
    assert info.value.field == "source"
    assert "23 bytes" in info.value.reason
    assert "limit of 22 bytes" in info.value.reason


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", "...", "a/b", "../etc", "a\\b", "a b", "naïve", "x" * 129, "a\n", "$x"],
)
def test_invalid_names_are_rejected(name: str) -> None:
    """Names with path or other characters, empty, dot-only or too long are rejected."""
    assert not is_valid_name(name)
    with pytest.raises(RecordError) as info:
        parse_record(doc(_id=name))
    assert info.value.field == "_id"
    assert info.value.name is None
    assert str(info.value).startswith("record <unnamed>: field '_id': invalid plugin name")


@pytest.mark.parametrize("name", ["greet", "my-function", "a.b_c-D9", ".hidden", "x" * 128])
def test_valid_names_are_accepted(name: str) -> None:
    """Letters, digits, '_', '.', '-' up to 128 characters are valid names."""
    assert is_valid_name(name)
    assert parse_record(doc(_id=name)).name == name


@pytest.mark.parametrize(("value", "reason"), [(None, "is required"), (7, "got int")])
def test_missing_or_non_string_id_is_rejected(value: object, reason: str) -> None:
    """A missing or non-string _id is an error on field '_id'."""
    with pytest.raises(RecordError) as info:
        parse_record(doc(_id=value))
    assert info.value.field == "_id"
    assert reason in info.value.reason


def test_version_and_content_hash() -> None:
    """version is name@rN:hash with a revision and name:hash without one."""
    record = parse_record(doc(revision=7))
    assert len(record.content_hash) == 8
    int(record.content_hash, 16)
    assert record.version == f"greet@r7:{record.content_hash}"
    assert parse_record(doc()).version == f"greet:{record.content_hash}"


def test_content_hash_covers_source_and_entrypoint_only() -> None:
    """The hash changes with source or entrypoint, not with revision or metadata."""
    base = parse_record(doc())
    assert parse_record(doc(revision=9, meta={"a": 1})).content_hash == base.content_hash
    assert parse_record(doc(source=SOURCE + "\n")).content_hash != base.content_hash
    assert parse_record(doc(entrypoint="other")).content_hash != base.content_hash


def test_record_is_immutable_and_replace_recomputes_version() -> None:
    """Records are frozen; dataclasses.replace derives a fresh version."""
    record = parse_record(doc(revision=1))
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.source = "x"  # type: ignore[misc]
    newer = dataclasses.replace(record, revision=2)
    assert newer.version.startswith("greet@r2:")
    assert newer != record
    assert hash(newer) == hash(dataclasses.replace(record, revision=2))


def test_meta_is_a_read_only_copy() -> None:
    """meta is copied at parse time and cannot be mutated through the record."""
    meta = {"k": "v"}
    record = parse_record(doc(meta=meta))
    meta["k"] = "changed"
    assert record.meta["k"] == "v"
    with pytest.raises(TypeError):
        record.meta["k"] = "x"  # type: ignore[index]
