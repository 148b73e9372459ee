"""Tests for plugins_examples/: each example does something meaningful through a real host."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from host import PluginFailed, PluginHost, PluginTimeout
from host.publish import Published, publish, publish_dir
from host.samples import SALES, USERS, seed
from tests.support import Doc

from .support import wait_until

pytestmark = pytest.mark.anyio

EXAMPLES = Path(__file__).resolve().parent.parent / "plugins_examples"


@pytest.fixture
async def host(db: AsyncDatabase[Doc]) -> AsyncIterator[PluginHost]:
    """A host serving every example over the seeded sample data."""
    await seed(db)
    outcomes = await publish_dir(db, EXAMPLES)
    assert all(isinstance(o, Published) for o in outcomes), outcomes
    async with PluginHost(db) as plugins:
        yield plugins


async def test_there_are_at_least_five_examples(host: PluginHost) -> None:
    """Every example file loads and serves."""
    infos = host.plugins()
    assert len(infos) >= 5
    assert all(info.status == "serving" for info in infos), infos


async def test_greet_counts_namesakes(host: PluginHost) -> None:
    """greet answers like the blog post: 13 Smiths in the sample users."""
    result = await host.call("greet", {"firstName": "Blain", "lastName": "Smith"})
    assert result == "Hello there, Blain!!! There are 13 with the same last name as you!"
    assert await host.call("greet", {"firstName": "Ada", "lastName": "Lovelace"}) == (
        "Hello there, Ada!!! There are 1 with the same last name as you!"
    )


async def test_sales_report_groups_and_sorts(host: PluginHost) -> None:
    """sales_report sums amounts per region, biggest first, matching the raw data."""
    rows = await host.call("sales_report", {"by": "region"})
    expected: dict[str, float] = {}
    for sale in SALES:
        expected[sale["region"]] = expected.get(sale["region"], 0.0) + sale["amount"]
    assert {r["region"]: r["total"] for r in rows} == {k: round(v, 2) for k, v in expected.items()}
    totals = [r["total"] for r in rows]
    assert totals == sorted(totals, reverse=True)
    assert sum(r["orders"] for r in rows) == len(SALES)
    by_product = await host.call("sales_report", {"by": "product", "region": "emea"})
    assert sum(r["orders"] for r in by_product) == sum(s["region"] == "emea" for s in SALES)
    with pytest.raises(PluginFailed, match="'by' must be"):
        await host.call("sales_report", {"by": "colour"})


async def test_dashboard_requires_other_plugins_late_bound(
    host: PluginHost, db: AsyncDatabase[Doc]
) -> None:
    """dashboard combines greet and sales_report, and sees a new greet without republishing."""
    args = {"firstName": "Blain", "lastName": "Smith"}
    board = await host.call("dashboard", args)
    assert board["greeting"].startswith("Hello there, Blain")
    assert board["regions"] == 3
    assert board["top_region"]["region"] in {"emea", "amer", "apac"}
    await publish(db, "greet", "async def main(ctx, args):\n    return 'hi ' + args['firstName']\n")
    await wait_until(lambda: host.plugin("greet").revision == 2, "greet r2 serves")  # type: ignore[union-attr]
    assert (await host.call("dashboard", args))["greeting"] == "hi Blain"


async def test_fingerprint_is_a_sync_plugin(host: PluginHost) -> None:
    """fingerprint (a plain def, run in a worker thread) is deterministic."""
    first = await host.call("fingerprint", {"text": "hello", "iterations": 1000})
    again = await host.call("fingerprint", {"text": "hello", "iterations": 1000})
    other = await host.call("fingerprint", {"text": "hullo", "iterations": 1000})
    assert first == again
    assert first["fingerprint"] != other["fingerprint"]
    assert len(first["fingerprint"]) == 32


async def test_counter_keeps_state_per_version(host: PluginHost, db: AsyncDatabase[Doc]) -> None:
    """counter's setup state survives calls and restarts with each new version."""
    assert (await host.call("counter"))["count"] == 1
    assert (await host.call("counter", {"step": 5}))["count"] == 6
    source = (EXAMPLES / "counter.py").read_text() + "\n# a new version\n"
    await publish(db, "counter", source)
    await wait_until(lambda: host.plugin("counter").revision == 2, "counter r2 serves")  # type: ignore[union-attr]
    fresh = await host.call("counter")
    assert fresh["count"] == 1
    assert fresh["version"].startswith("counter@r2:")


async def test_slow_sleeps_and_times_out(host: PluginHost) -> None:
    """slow answers after its sleep, and a shorter timeout cancels it."""
    assert await host.call("slow", {"seconds": 0.01}) == {"slept": 0.01}
    with pytest.raises(PluginTimeout):
        await host.call("slow", {"seconds": 30}, timeout=0.05)


def test_sample_data_shape() -> None:
    """The sample users hold 13 Smiths; every sale has a region, product and amount."""
    assert sum(u["lastName"] == "Smith" for u in USERS) == 13
    assert all({"region", "product", "amount", "quantity"} <= set(s) for s in SALES)


def region_totals(sales: list[Doc] | tuple[Doc, ...]) -> list[dict[str, object]]:
    """sales_by_region's answer recomputed from the sales themselves."""
    totals: dict[str, tuple[float, int]] = {}
    for sale in sales:
        amount, orders = totals.get(sale["region"], (0.0, 0))
        totals[sale["region"]] = (amount + sale["amount"], orders + 1)
    return [
        {"region": region, "total": round(amount, 2), "orders": orders}
        for region, (amount, orders) in sorted(totals.items())
    ]


async def test_sales_by_region_reconciles_sales_that_predate_it(host: PluginHost) -> None:
    """On load, sales_by_region counts the seeded sales: its totals equal a recomputation."""
    expected = region_totals(SALES)

    async def settled() -> bool:
        return bool(await host.call("sales_by_region") == expected)

    await wait_until(settled, "sales_by_region matches the seeded sales", timeout=20)


async def test_sales_by_region_follows_inserts_updates_and_deletes(
    host: PluginHost, db: AsyncDatabase[Doc]
) -> None:
    """The trigger keeps sales_by_region equal to a recomputation as sales change."""
    await wait_until(
        lambda: _matches(host, db), "sales_by_region matches the seeded sales", timeout=20
    )
    await db.sales.insert_many(
        [{"_id": f"new-{i}", "region": "mars", "amount": 10 * i} for i in range(1, 6)]
    )
    await db.sales.update_one({"_id": "new-1"}, {"$set": {"region": "emea", "amount": 7}})
    await db.sales.replace_one({"_id": "new-2"}, {"region": "venus", "amount": 1})
    await db.sales.delete_one({"_id": "new-3"})
    await db.sales.delete_many({"region": "apac"})
    await wait_until(lambda: _matches(host, db), "sales_by_region follows the changes", timeout=30)
    regions = {row["region"] for row in await host.call("sales_by_region")}
    assert {"mars", "venus"} <= regions and "apac" not in regions


async def _matches(host: PluginHost, db: AsyncDatabase[Doc]) -> bool:
    """sales_by_region's answer equals a recomputation from the sales collection now."""
    expected = region_totals(await db.sales.find().to_list(None))
    return bool(await host.call("sales_by_region") == expected)
