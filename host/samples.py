"""Sample data that ``plugin-host dev`` seeds, so the example plugins have something to read.

* ``users``: 13 Smiths (greet's "13 with the same last name as you") and a few others.
* ``sales``: orders by region and product, for the ``sales_report`` aggregation.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

__all__ = ("SALES", "USERS", "seed")

_SMITHS = (
    "Blain",
    "Ada",
    "Grace",
    "Alan",
    "Barbara",
    "Edsger",
    "Frances",
    "John",
    "Katherine",
    "Linus",
    "Margaret",
    "Niklaus",
    "Radia",
)
_OTHERS = (
    ("Ada", "Lovelace"),
    ("Grace", "Hopper"),
    ("Alan", "Turing"),
    ("Edsger", "Dijkstra"),
    ("Barbara", "Liskov"),
)

USERS: tuple[dict[str, Any], ...] = tuple(
    {"_id": f"user-{i:02d}", "firstName": first, "lastName": last}
    for i, (first, last) in enumerate(
        [(first, "Smith") for first in _SMITHS] + list(_OTHERS), start=1
    )
)
"""18 users, 13 of them called Smith."""

_REGIONS = ("emea", "amer", "apac")
_PRODUCTS = (("widget", 12.5), ("gadget", 40.0), ("gizmo", 99.0))

SALES: tuple[dict[str, Any], ...] = tuple(
    {
        "_id": f"sale-{i:03d}",
        "region": _REGIONS[i % 3],
        "product": _PRODUCTS[i // 3 % 3][0],
        "quantity": 1 + i * 7 % 5,
        "amount": round(_PRODUCTS[i // 3 % 3][1] * (1 + i * 7 % 5), 2),
        "at": datetime(2026, 1 + i % 12, 1 + i % 28, tzinfo=UTC),
    }
    for i in range(60)
)
"""60 sales across three regions and three products."""


async def seed(db: Any) -> dict[str, int]:
    """Insert the sample data into collections that are still empty (idempotent).

    Args:
        db: A PyMongo ``AsyncDatabase`` (or a Motor database).

    Returns:
        Documents inserted per collection (0 where the collection already had data).
    """
    inserted: dict[str, int] = {}
    for name, docs in (("users", USERS), ("sales", SALES)):
        coll = db[name]
        if await coll.estimated_document_count() == 0:
            await coll.insert_many([dict(doc) for doc in docs])
            inserted[name] = len(docs)
        else:
            inserted[name] = 0
    return inserted
