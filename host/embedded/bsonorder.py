"""BSON comparison order for the engine: the types mongomock cannot rank.

Sorting (``find`` with ``sort``, ``$sort``, ``distinct``, hinted index order) and the
comparison operators (``$gt``, ``$lt``...) all rank values through
``mongomock.filtering._get_compare_type``, which raises ``NotImplementedError`` for
``bson.Timestamp``, ``MinKey`` and ``MaxKey``: a sort on a Timestamp field failed with
error 238 (NotImplemented). MongoDB's order of types
(https://www.mongodb.com/docs/manual/reference/bson-type-comparison-order/) is MinKey,
Null, Numbers, Symbol/String, Object, Array, BinData, ObjectId, Boolean, Date,
Timestamp, Regular Expression, MaxKey. This module ranks the three missing types in that
order, around mongomock's own ranks (Null 5 … Date 45, Regex 50), and leaves every other
type to mongomock. Two Timestamps compare by ``(time, inc)``, which is what
``bson.Timestamp``'s own operators do, so values of the same type need nothing more.

Installed once, at import (``host.embedded.reads`` imports it): the rank function is a
module global that ``bson_compare`` looks up on every call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bson.max_key import MaxKey
from bson.min_key import MinKey
from bson.timestamp import Timestamp
from mongomock import filtering

__all__ = ("MAX_KEY_RANK", "MIN_KEY_RANK", "TIMESTAMP_RANK", "compare_rank")

MIN_KEY_RANK = 1
"""Below Null (mongomock's 5): MinKey sorts before every other value."""
TIMESTAMP_RANK = 47
"""After Date (45), before Regular Expression (50)."""
MAX_KEY_RANK = 127
"""Above Regular Expression (50): MaxKey sorts after every other value."""

_engine_rank: Callable[[Any], int] = filtering._get_compare_type


def compare_rank(value: Any) -> int:
    """The rank of ``value``'s type in BSON comparison order (a lower rank sorts first).

    Args:
        value: Any stored or queried value.

    Returns:
        The rank: this module's for Timestamp, MinKey and MaxKey, mongomock's otherwise.

    Raises:
        NotImplementedError: A type neither knows (mongomock's message names it).
    """
    if isinstance(value, Timestamp):
        return TIMESTAMP_RANK
    if isinstance(value, MinKey):
        return MIN_KEY_RANK
    if isinstance(value, MaxKey):
        return MAX_KEY_RANK
    return _engine_rank(value)


filtering._get_compare_type = compare_rank
