"""BSON comparison order for the engine: the types and numbers mongomock cannot compare.

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

Numbers. MongoDB compares int, long, double and decimal by numeric value, across types
(``{v: 1}`` matches ``Decimal128("1")``), with NaN equal to NaN and below every other
number (NaN < -Infinity < finite < +Infinity). mongomock ranks ``numbers.Number`` only
(``Decimal128`` is not one) and compares with Python's operators, which do not mix
``Decimal128`` with int or float (``Decimal128("1") == 1`` is False, ``<`` raises) and
never equate two NaNs. So this module also ranks ``Decimal128`` with the numbers and
compares a pair of numbers through :func:`numeric_key` whenever one of them is a
``Decimal128`` or a NaN; other pairs take mongomock's code unchanged. The key is exact:
``decimal.Decimal`` compares exactly with int and float, as mongod's
``compareDecimalToDouble`` does (https://github.com/mongodb/mongo/blob/master/src/mongo/base/compare_numbers.h).

Design note: the narrowest hooks, all in ``mongomock.filtering`` (module globals and the
matcher's operator table, looked up at call time; no mongomock code is copied):

* ``_get_compare_type`` -> :func:`compare_rank` (type ranks: Decimal128 is a number);
* ``bson_compare`` -> :func:`bson_compare` (range operators, ``find().sort``,
  ``$sort``, ``$expr`` comparisons, hinted index order, distinct's order; mongomock's
  own recursion into arrays and documents comes back through the global). Two ints or
  two strings skip mongomock's type lookups, which ends in the same ``op(a, b)``;
* distinct: the server collects and orders the values itself
  (:func:`distinct_values`), since mongomock's set cannot hold a Decimal128;
* ``aggregate._Parser._handle_comparison_operator`` -> :func:`_expr_compare` for the
  aggregation ``$eq``/``$ne`` (``$expr``, ``$project``), which mongomock evaluates with
  ``==``; its ``$lt``... already go through ``bson_compare``;
* the ``$eq``, ``$ne``, ``$in`` and ``$nin`` entries of the matcher's operator table ->
  numeric-aware versions, built with mongomock's own ``_list_expand``;
* ``_Filterer.apply`` -> :func:`_apply`: a plain ``{field: number}`` condition is
  matched by ``==`` inside mongomock's ``apply``, out of reach of the table. mongomock
  runs first; only when it says no and a numeric condition could match by value (the
  query or the document holds a Decimal128 or NaN there) are those conditions retried
  as ``{field: {$eq: number}}``, which MongoDB defines as the same query. Widening one
  equality can only turn a no into a yes, so mongomock's yes stands, and documents
  without Decimal128 or NaN cost nothing more when they match. The server's scans
  (``indexes.match``) take :func:`matcher` once per query, which skips the retry at
  the top level of a filter that has no ``{field: number}`` there.

Stored values are never converted: the key is computed per comparison, and documents
come back as stored (a Decimal128 stays a Decimal128).

Installed once, at import (``host.embedded.reads`` imports it).
"""

from __future__ import annotations

import decimal
import functools
import operator
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from bson.decimal128 import Decimal128
from bson.int64 import Int64
from bson.max_key import MaxKey
from bson.min_key import MinKey
from bson.timestamp import Timestamp
from mongomock import aggregate, filtering

__all__ = (
    "MAX_KEY_RANK",
    "MIN_KEY_RANK",
    "NUMBER_RANK",
    "TIMESTAMP_RANK",
    "bson_compare",
    "compare_rank",
    "distinct_values",
    "matcher",
    "numeric_equal",
    "numeric_key",
)

MIN_KEY_RANK = 1
"""Below Null (mongomock's 5): MinKey sorts before every other value."""
NUMBER_RANK = 10
"""mongomock's rank of numbers (int, float, Int64), which Decimal128 joins."""
TIMESTAMP_RANK = 47
"""After Date (45), before Regular Expression (50)."""
MAX_KEY_RANK = 127
"""Above Regular Expression (50): MaxKey sorts after every other value."""

_engine_rank: Callable[[Any], int] = filtering._get_compare_type
_engine_compare: Callable[..., bool] = filtering.bson_compare
_engine_eq: Callable[[Any, Any], bool] = filtering.operator_eq
_engine_in: Callable[[Any, Any], bool] = filtering._in_op
_engine_apply: Callable[[Any, Any, Any], bool] = filtering._Filterer.apply
_engine_expr_compare: Callable[[Any, str, Any], Any] = aggregate._Parser._handle_comparison_operator


def compare_rank(value: Any) -> int:
    """The rank of ``value``'s type in BSON comparison order (a lower rank sorts first).

    Args:
        value: Any stored or queried value.

    Returns:
        The rank: this module's for Timestamp, MinKey, MaxKey and Decimal128,
        mongomock's otherwise.

    Raises:
        NotImplementedError: A type neither knows (mongomock's message names it).
    """
    if isinstance(value, Decimal128):
        return NUMBER_RANK
    if isinstance(value, Timestamp):
        return TIMESTAMP_RANK
    if isinstance(value, MinKey):
        return MIN_KEY_RANK
    if isinstance(value, MaxKey):
        return MAX_KEY_RANK
    return _engine_rank(value)


_NAN_KEY = (0, 0)
"""The :func:`numeric_key` of every NaN."""


_NUMBER_TYPES = frozenset({int, float, Int64, Decimal128})
"""The exact types of BSON numbers as PyMongo decodes them (``bool`` is not one)."""


_PLAIN_TYPES = frozenset({int, Int64, str})
"""Types whose values of the same type mongomock's ``bson_compare`` compares with ``op``."""


def _is_special(value: Any) -> bool:
    """Whether Python's own operators get ``value`` wrong among numbers (Decimal128, NaN)."""
    kind = type(value)
    return kind is Decimal128 or (kind is float and value != value)


def numeric_key(value: int | float | Decimal128) -> tuple[int, Any]:
    """A key that orders and equates numbers as MongoDB does, across types.

    NaN (double or decimal, any sign) is ``(0, 0)``: equal to every NaN, below every
    other number. Any other number is ``(1, exact value)``, a ``decimal.Decimal`` for a
    Decimal128 (``Decimal`` compares exactly with int and float, infinities included).

    Args:
        value: An int, float, Int64 or Decimal128 (not a bool).

    Returns:
        The key.
    """
    if isinstance(value, Decimal128):
        exact: Any = value.to_decimal()
        return _NAN_KEY if exact.is_nan() else (1, exact)
    if value != value:  # a float NaN
        return _NAN_KEY
    return (1, value)


def bson_compare(
    op: Callable[[Any, Any], bool], a: Any, b: Any, can_compare_types: bool = True
) -> bool:
    """mongomock's ``bson_compare``, with numbers compared by value across types.

    Args:
        op: The comparison (``operator.lt``, ``operator.ge``, ...).
        a: The first operand.
        b: The second operand.
        can_compare_types: False for the query operators (``$gt``...), which never
            match a value of another type (type bracketing).

    Returns:
        ``op`` applied in BSON comparison order.
    """
    kind = type(a)
    if kind is type(b) and kind in _PLAIN_TYPES:
        return op(a, b)  # what mongomock ends with for these, minus its type lookups
    if (_is_special(a) or _is_special(b)) and kind in _NUMBER_TYPES and type(b) in _NUMBER_TYPES:
        key_a, key_b = numeric_key(a), numeric_key(b)
        if not can_compare_types and (key_a == _NAN_KEY) != (key_b == _NAN_KEY):
            # A query's $lt/$lte/$gt/$gte never matches NaN against another number
            # (mongod's ComparisonMatchExpression special-cases NaN); sorts and $expr
            # keep NaN below every number.
            return False
        with decimal.localcontext() as ctx:
            ctx.traps[decimal.FloatOperation] = False  # mixing Decimal and float is exact
            return op(key_a, key_b)
    return _engine_compare(op, a, b, can_compare_types)


def numeric_equal(a: Any, b: Any) -> bool:
    """mongomock's equality (``operator_eq``), with numbers equal by value across types.

    Args:
        a: The document's value (mongomock's NOTHING if the field is missing).
        b: The queried value.

    Returns:
        Whether the query value matches the document value.
    """
    if _engine_eq(a, b):  # by value across types, only more values are equal
        return True
    kind_a, kind_b = type(a), type(b)
    if kind_a is Decimal128 or kind_b is Decimal128:
        return (
            kind_a in _NUMBER_TYPES and kind_b in _NUMBER_TYPES and numeric_key(a) == numeric_key(b)
        )
    return kind_a is float and kind_b is float and a != a and b != b  # NaN equals NaN


def _numeric_in(doc_val: Any, search_val: Any) -> bool:
    """``$in``: mongomock's, then (only if it says no) the numbers by value."""
    if _engine_in(doc_val, search_val):
        return True
    values: Any
    kind = type(doc_val)
    if kind in _NUMBER_TYPES:
        if (
            kind is not Decimal128
            and doc_val == doc_val
            and Decimal128 not in map(type, search_val)
        ):
            return False  # a plain number: == already equated it with plain numbers
        values = (doc_val,)
    elif isinstance(doc_val, list | tuple):
        kinds = set(map(type, doc_val))
        if (
            Decimal128 not in kinds
            and Decimal128 not in map(type, search_val)
            and not (float in kinds and any(_is_special(v) for v in doc_val))
        ):
            return False  # no Decimal128 on either side and no NaN here: == was enough
        values = doc_val
    else:
        return False
    wanted = {numeric_key(v) for v in search_val if type(v) in _NUMBER_TYPES}
    return any(type(v) in _NUMBER_TYPES and numeric_key(v) in wanted for v in values)


def distinct_values(key: str, docs: Iterable[Mapping[str, Any]]) -> list[Any]:
    """The distinct values of ``key`` in ``docs`` (array elements each count), in BSON order.

    Values equal in BSON order are one value, the first met, as in mongod's ordered set
    of values: 1, 1.0 and ``Decimal128("1")`` are one number (as 1 and 1.0 already were
    here), while ``True`` and 1 stay apart (their types differ). mongomock's own
    distinct collects values in a Python set, which rejects Decimal128 (unhashable) and
    merges ``True`` into 1.

    Args:
        key: The field, dotted paths allowed.
        docs: The matching documents, in scan order.

    Returns:
        The values as stored, sorted.
    """
    found: list[Any] = []
    for doc in docs:
        for value in filtering.iter_key_candidates(key, doc):  # type: ignore[no-untyped-call]
            if value is filtering.NOTHING:  # type: ignore[attr-defined]
                continue
            found.extend(value if isinstance(value, list | tuple) else [value])
    out: list[Any] = []
    for value in sorted(found, key=filtering.BsonComparable):  # stable: first met first
        if not out or bson_compare(operator.lt, out[-1], value):
            out.append(value)
    return out


def _could_widen(search: Any, document: Any, key: str) -> bool:
    """Whether ``{key: search}`` (a number) can match ``document`` by value but not by ``==``."""
    if _is_special(search):
        return True
    if "." not in key and type(document) is dict:
        candidates: Any = (document.get(key),)
    elif key.startswith("$"):
        return False
    else:
        candidates = filtering.iter_key_candidates(key, document)  # type: ignore[no-untyped-call]
    for value in candidates:
        kind = type(value)
        if kind is Decimal128 or (kind is list and Decimal128 in map(type, value)):
            return True
    return False


def _apply(self: Any, search_filter: Any, document: Any) -> bool:
    """mongomock's ``_Filterer.apply``, with ``{field: number}`` matching by value."""
    if _engine_apply(self, search_filter, document):
        return True
    if type(search_filter) is not dict:
        return False
    widened: dict[str, Any] | None = None
    for key, search in search_filter.items():
        kind = type(search)
        if kind not in _NUMBER_TYPES:
            continue
        if kind is int and "." not in key and type(document) is dict:  # the usual case, inline
            found = type(document.get(key))
            if found is not Decimal128 and found is not list:
                continue
        if _could_widen(search, document, key):
            if widened is None:
                widened = dict(search_filter)
            widened[key] = {"$eq": search}
    return widened is not None and _engine_apply(self, widened, document)


def _expr_compare(self: Any, operator: str, values: Any) -> Any:
    """mongomock's aggregation ``$eq``/``$ne`` (also inside ``$expr``), by numeric value."""
    if operator in ("$eq", "$ne") and isinstance(values, list) and len(values) == 2:
        same = numeric_equal(self.parse(values[0]), self.parse(values[1]))
        return same if operator == "$eq" else not same
    return _engine_expr_compare(self, operator, values)


def matcher(spec: Any) -> Callable[[Any, Any], bool]:
    """The function that matches ``spec`` against a document: ``filter_applies``'s.

    A filter with no ``{field: number}`` at its top level gets mongomock's ``apply``
    itself there (the widening retry could never fire); its nested filters still
    widen. Decide once per query, call once per document.

    Args:
        spec: The query filter.

    Returns:
        A function of ``(spec, document)``.
    """
    if type(spec) is dict and not any(type(v) in _NUMBER_TYPES for v in spec.values()):
        return functools.partial(_engine_apply, filtering._filterer_inst)
    return filtering.filter_applies


filtering._get_compare_type = compare_rank
filtering.bson_compare = bson_compare
filtering._Filterer.apply = _apply  # type: ignore[method-assign]
aggregate._Parser._handle_comparison_operator = _expr_compare  # type: ignore[method-assign]
# The matcher's operator table (one instance, ``filtering._filterer_inst``, serves every
# match). Invariant: its equality entries ($eq, $ne, $in, $nin) go through
# numeric_equal / _numeric_in, so every spelling of an equality compares numbers alike.
_table: dict[str, Any] = filtering._filterer_inst._operator_map
_expand: Callable[..., Callable[[Any, Any], bool]] = filtering._list_expand
_table["$eq"] = _expand(numeric_equal)
_table["$ne"] = _expand(lambda dv, sv: not numeric_equal(dv, sv), negative=True)
_table["$in"] = _numeric_in
_table["$nin"] = lambda dv, sv: not _numeric_in(dv, sv)
