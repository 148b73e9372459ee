"""Reading a command's fields, with MongoDB's errors for the wrong type."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import CommandError


def name_field(value: Any, what: str = "collection") -> str:
    """A collection (or other) name: a non-empty string, else 73 InvalidNamespace."""
    if not isinstance(value, str) or not value:
        raise CommandError(73, f"{what} name must be a non-empty string, got {value!r}")
    return value


def int_field(body: Mapping[str, Any], key: str, default: int | None = None) -> int | None:
    """A numeric field as an int (None when absent), else 14 TypeMismatch."""
    value = body.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CommandError(14, f"BSON field '{key}' is the wrong type, expected a number")
    return int(value)


def doc_field(body: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    """An object field as a dict (None when absent), else 14 TypeMismatch."""
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise CommandError(14, f"BSON field '{key}' is the wrong type, expected an object")
    return dict(value)
