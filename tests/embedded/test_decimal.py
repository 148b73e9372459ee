"""Decimal128 compares as a number, by value across types (host/embedded/bsonorder.py), by PyMongo.

Behaviour tests: under ``MONGODB_URI`` they hold against MongoDB itself.
"""

from __future__ import annotations

from typing import Any

import pytest
from bson.decimal128 import Decimal128
from bson.int64 import Int64
from pymongo import ASCENDING, DESCENDING
from pymongo.asynchronous.database import AsyncDatabase

pytestmark = pytest.mark.anyio

Doc = dict[str, Any]

# _id 2 and 4 are the same number (1) in two types; 1 is 2.5, 3 is 3.0.
NUMBERS: list[Doc] = [
    {"_id": 1, "v": Decimal128("2.5")},
    {"_id": 2, "v": 1},
    {"_id": 3, "v": 3.0},
    {"_id": 4, "v": Decimal128("1")},
]
# Around the numbers: null sorts before them, strings after; NaN below every number.
OTHERS: list[Doc] = [
    {"_id": 5, "v": "a"},
    {"_id": 6, "v": None},
    {"_id": 7, "v": Decimal128("NaN")},
    {"_id": 8, "v": float("nan")},
    {"_id": 9, "v": Decimal128("-Infinity")},
    {"_id": 10, "v": Decimal128("Infinity")},
    {"_id": 11, "v": Int64(2)},
]


async def _ids(db: AsyncDatabase[Doc], query: Doc) -> list[int]:
    return sorted([d["_id"] async for d in db.nums.find(query)])


async def test_equality_matches_numbers_by_value_across_types(db: AsyncDatabase[Doc]) -> None:
    """{v: n}, $eq, $ne, $in and $nin equate 1, 1.0, Int64(1) and Decimal128("1"/"1.0")."""
    await db.nums.insert_many(NUMBERS)
    for one in (1, 1.0, Int64(1), Decimal128("1"), Decimal128("1.00")):
        assert await _ids(db, {"v": one}) == [2, 4], one
        assert await _ids(db, {"v": {"$eq": one}}) == [2, 4], one
        assert await _ids(db, {"v": {"$ne": one}}) == [1, 3], one
    assert await _ids(db, {"v": {"$in": [Decimal128("3"), 2.5]}}) == [1, 3]
    assert await _ids(db, {"v": {"$in": ["1", Decimal128("1.0")]}}) == [2, 4]
    assert await _ids(db, {"v": {"$nin": [1, Decimal128("3.000")]}}) == [1]
    assert await _ids(db, {"$or": [{"v": 2.5}, {"_id": 3}]}) == [1, 3]
    stored = await db.nums.find_one({"v": 2.5})
    assert stored is not None and stored["v"] == Decimal128("2.5")  # returned as stored


async def test_range_operators_compare_decimals_by_value(db: AsyncDatabase[Doc]) -> None:
    """$gt/$gte/$lt/$lte order Decimal128 among ints and doubles by numeric value."""
    await db.nums.insert_many(NUMBERS)
    assert await _ids(db, {"v": {"$gt": 2}}) == [1, 3]
    assert await _ids(db, {"v": {"$lt": Decimal128("3")}}) == [1, 2, 4]
    assert await _ids(db, {"v": {"$gte": Decimal128("2.5")}}) == [1, 3]
    assert await _ids(db, {"v": {"$lte": 1}}) == [2, 4]
    assert await _ids(db, {"v": {"$gt": Decimal128("1"), "$lt": 3.0}}) == [1]
    assert await _ids(db, {"v": {"$gt": "0"}}) == []  # type bracketing: no string matches


async def test_find_and_aggregate_sort_decimals_among_numbers(db: AsyncDatabase[Doc]) -> None:
    """find().sort and $sort order Decimal128 by value among ints and doubles, both ways."""
    await db.nums.insert_many(NUMBERS)
    up = [d["_id"] async for d in db.nums.find().sort([("v", ASCENDING), ("_id", ASCENDING)])]
    assert up == [2, 4, 1, 3]
    first_two = {d["_id"] async for d in db.nums.find().sort("v", ASCENDING).limit(2)}
    assert first_two == {2, 4}  # a tie: 1 and Decimal128("1")
    pipeline: list[Doc] = [
        {"$match": {"v": {"$gte": 1}}},
        {"$sort": {"v": DESCENDING, "_id": ASCENDING}},
        {"$project": {"_id": 1}},
    ]
    assert [d["_id"] async for d in await db.nums.aggregate(pipeline)] == [3, 1, 2, 4]
    matched = await db.nums.aggregate([{"$match": {"v": 1}}, {"$sort": {"_id": ASCENDING}}])
    assert [d["_id"] async for d in matched] == [2, 4]


async def test_mixed_types_nan_and_infinities_sort_in_bson_order(db: AsyncDatabase[Doc]) -> None:
    """null < NaN < -Infinity < numbers by value < +Infinity < strings, in find and $sort."""
    await db.nums.insert_many(NUMBERS + OTHERS)
    expected = [6, 7, 8, 9, 2, 4, 11, 1, 3, 10, 5]
    order = [("v", ASCENDING), ("_id", ASCENDING)]
    assert [d["_id"] async for d in db.nums.find().sort(order)] == expected
    cursor = await db.nums.aggregate([{"$sort": {"v": ASCENDING, "_id": ASCENDING}}])
    assert [d["_id"] async for d in cursor] == expected


async def test_nan_equals_nan_and_never_matches_a_range(db: AsyncDatabase[Doc]) -> None:
    """A double or decimal NaN matches both NaNs; $lt/$gt never match NaN against numbers."""
    await db.nums.insert_many(NUMBERS + OTHERS)
    assert await _ids(db, {"v": float("nan")}) == [7, 8]
    assert await _ids(db, {"v": Decimal128("NaN")}) == [7, 8]
    assert await _ids(db, {"v": {"$in": [Decimal128("-NaN")]}}) == [7, 8]
    assert await _ids(db, {"v": {"$lt": 0}}) == [9]
    assert await _ids(db, {"v": {"$gte": Decimal128("-Infinity")}}) == [1, 2, 3, 4, 9, 10, 11]
    assert await _ids(db, {"v": {"$lte": float("nan")}}) == [7, 8]
    assert await _ids(db, {"v": {"$gt": float("nan")}}) == []
    assert await _ids(db, {"v": {"$gt": 3}}) == [10]


async def test_decimals_in_arrays_and_nested_fields(db: AsyncDatabase[Doc]) -> None:
    """Array elements and dotted paths holding Decimal128 match and sort by value."""
    await db.arr.insert_many(
        [
            {"_id": 1, "a": [Decimal128("5"), "x"], "d": {"n": Decimal128("0.5")}},
            {"_id": 2, "a": [2, 9], "d": {"n": 0.25}},
        ]
    )
    assert [d["_id"] async for d in db.arr.find({"a": 5})] == [1]
    assert [d["_id"] async for d in db.arr.find({"a": {"$gt": Decimal128("8")}})] == [2]
    assert [d["_id"] async for d in db.arr.find({"d.n": 0.5})] == [1]
    by_n = db.arr.find().sort("d.n", DESCENDING)
    assert [d["_id"] async for d in by_n] == [1, 2]
    # An ascending sort on an array uses its smallest element: 2 < Decimal128("5").
    assert [d["_id"] async for d in db.arr.find().sort("a", ASCENDING)] == [2, 1]


async def test_update_and_delete_filters_match_decimals_by_value(db: AsyncDatabase[Doc]) -> None:
    """Write filters use the same matching: {v: 1} updates and deletes Decimal128("1")."""
    await db.nums.insert_many(NUMBERS)
    result = await db.nums.update_many({"v": 1}, {"$set": {"one": True}})
    assert result.modified_count == 2
    assert await _ids(db, {"one": True}) == [2, 4]
    deleted = await db.nums.delete_many({"v": {"$lt": Decimal128("3")}})
    assert deleted.deleted_count == 3
    assert await _ids(db, {}) == [3]


async def test_distinct_returns_decimals_in_bson_order(db: AsyncDatabase[Doc]) -> None:
    """distinct accepts Decimal128 values and returns every value once, in BSON order."""
    await db.nums.insert_many(
        [
            {"_id": 1, "v": Decimal128("2.5")},
            {"_id": 2, "v": "b"},
            {"_id": 3, "v": Decimal128("2.5")},
            {"_id": 4, "v": 3},
        ]
    )
    assert await db.nums.distinct("v") == [Decimal128("2.5"), 3, "b"]
    assert await db.nums.distinct("v", {"v": {"$lt": 3}}) == [Decimal128("2.5")]


async def test_indexed_field_matches_and_orders_decimals_by_value(db: AsyncDatabase[Doc]) -> None:
    """With an index on the field, equality still finds Decimal128 and a hint orders by value."""
    await db.nums.create_index("v")
    await db.nums.insert_many(NUMBERS)
    assert await _ids(db, {"v": 1}) == [2, 4]
    assert await _ids(db, {"v": {"$in": [Decimal128("3"), 7]}}) == [3]
    hinted = db.nums.find({}, {"_id": 1}).hint([("v", ASCENDING)])
    assert [d["_id"] async for d in hinted] == [2, 4, 1, 3]


async def test_in_on_array_fields_matches_decimals_and_nan(db: AsyncDatabase[Doc]) -> None:
    """$in and $nin on an array field match an element by value, NaN by NaN."""
    await db.arr.insert_many(
        [
            {"_id": 1, "a": ["x", Decimal128("4")]},
            {"_id": 2, "a": [1.5, float("nan")]},
            {"_id": 3, "a": ["y", 4]},
        ]
    )
    found = db.arr.find({"a": {"$in": [4.0, "z"]}}).sort("_id", ASCENDING)
    assert [d["_id"] async for d in found] == [1, 3]
    found = db.arr.find({"a": {"$in": [Decimal128("NaN")]}})
    assert [d["_id"] async for d in found] == [2]
    found = db.arr.find({"a": {"$nin": [Decimal128("1.50"), "y"]}})
    assert [d["_id"] async for d in found] == [1]


async def test_expression_eq_and_comparisons_use_numeric_value(db: AsyncDatabase[Doc]) -> None:
    """$expr and $project's $eq/$ne/$gt compare Decimal128 with ints and doubles by value."""
    await db.nums.insert_many(NUMBERS)
    assert await _ids(db, {"$expr": {"$eq": ["$v", 1]}}) == [2, 4]
    assert await _ids(db, {"$expr": {"$ne": ["$v", Decimal128("1.0")]}}) == [1, 3]
    assert await _ids(db, {"$expr": {"$gt": ["$v", Decimal128("2")]}}) == [1, 3]
    pipeline: list[Doc] = [
        {"$sort": {"_id": ASCENDING}},
        {"$project": {"one": {"$eq": ["$v", 1.0]}}},
    ]
    flags = [d["one"] async for d in await db.nums.aggregate(pipeline)]
    assert flags == [False, True, False, True]
