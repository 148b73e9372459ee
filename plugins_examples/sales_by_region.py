"""Totals per region in ``sales_by_region``, kept up to date by a trigger as ``sales`` change.

The trigger (``TRIGGERS`` below is published with the source) runs ``on_change`` for every
insert, update, replace and delete in ``sales``; each version also reconciles once when it
loads (``setup``), so sales that predate the trigger count too. ``main`` reads the totals:

    plugin-host call sales_by_region        # [{"region": "amer", "total": ..., ...}, ...]

At least once means an event can arrive twice (a crash, a lost lease, a retried dead
letter), so the handler is idempotent and never trusts the event's copy of the sale:

* a ledger (``sales_by_region_ledger``) remembers what each sale contributes. An event
  only moves the totals from what the ledger says to what ``sales`` says *now*, so a late,
  repeated or out-of-order event cannot apply stale data.
* a ledger entry is written (compare-and-set on the entry it replaces) with
  ``ctx.event_id`` and the contribution it replaces *before* the totals move, and marked
  done after. Each region document remembers the last event ids applied to it, so moving
  the totals twice for one entry is a no-op. An entry left half-done (a crash, an error)
  is finished by whoever touches that sale next.

Args: none.
"""

import uuid

TRIGGERS = [
    {
        "name": "sales",
        "collection": "sales",
        "operations": ["insert", "update", "replace", "delete"],
        "ordered": "per_key",  # one sale at a time, different sales concurrently
        "max_concurrency": 64,
    }
]

LEDGER = "sales_by_region_ledger"
TOTALS = "sales_by_region"
KEEP_APPLIED = 1024  # event ids remembered per region: far more than can be in flight


def _contribution(sale):
    """What one sale adds to its region's totals (nothing for a deleted sale)."""
    if not sale or sale.get("region") is None:
        return {"region": None, "amount": 0, "orders": 0}
    return {"region": sale["region"], "amount": sale.get("amount") or 0, "orders": 1}


async def _add(ctx, event_id, region, amount, orders):
    """Add to one region's totals, at most once per ledger entry."""
    totals = ctx.db[TOTALS]
    query = {"_id": region, "applied": {"$ne": event_id}}
    change = {
        "$inc": {"total": amount, "orders": orders},
        "$push": {"applied": {"$each": [event_id], "$slice": -KEEP_APPLIED}},
    }
    if (await totals.update_one(query, change)).matched_count:
        return
    try:  # no document for the region yet, or this entry was applied to it already
        await totals.insert_one(
            {"_id": region, "total": amount, "orders": orders, "applied": [event_id]}
        )
    except Exception as exc:
        if getattr(exc, "code", None) != 11000:  # DuplicateKeyError: the region exists
            raise
        await totals.update_one(query, change)


async def _finish(ctx, entry):
    """Move the totals from the entry's ``prev`` contribution to its ``now``; mark it done."""
    deltas = {}
    for part, sign in ((entry["prev"], -1), (entry["now"], 1)):
        if part["region"] is not None:
            amount, orders = deltas.get(part["region"], (0, 0))
            deltas[part["region"]] = (amount + sign * part["amount"], orders + sign * part["orders"])
    for region, (amount, orders) in sorted(deltas.items()):
        if amount or orders:
            await _add(ctx, entry["event"], region, amount, orders)
    await ctx.db[LEDGER].update_one(
        {"_id": entry["_id"], "event": entry["event"]}, {"$set": {"done": True}}
    )


async def sync_sale(ctx, sale_id, event_id):
    """Bring one sale's contribution in line with ``sales``; idempotent per ``event_id``."""
    ledger = ctx.db[LEDGER]
    for _ in range(50):  # compare-and-set on the ledger entry: retry when another writer won
        entry = await ledger.find_one({"_id": sale_id})
        if entry is not None and not entry["done"]:
            await _finish(ctx, entry)  # an earlier attempt stopped half-way
            entry["done"] = True
        if entry is not None and entry["event"] == event_id:
            return  # a repeat of an event that finished
        prev = entry["now"] if entry is not None else _contribution(None)
        now = _contribution(await ctx.db.sales.find_one({"_id": sale_id}))
        if now == prev:
            return  # nothing to move (a repeat, or a change that does not touch totals)
        new = {"_id": sale_id, "event": event_id, "prev": prev, "now": now, "done": False}
        if entry is None:
            try:
                await ledger.insert_one(new)
            except Exception as exc:
                if getattr(exc, "code", None) != 11000:
                    raise
                continue
        elif not (await ledger.replace_one({"_id": sale_id, "event": entry["event"]}, new)).matched_count:
            continue
        await _finish(ctx, new)
        return
    raise RuntimeError(f"sale {sale_id!r}: the ledger entry kept changing under us")


async def on_change(ctx, event):
    await sync_sale(ctx, event["documentKey"]["_id"], ctx.event_id)


async def reconcile(ctx):
    """Sync every sale, and every ledger entry whose sale is gone; returns how many."""
    ids = {doc["_id"] async for doc in ctx.db.sales.find({}, {"_id": 1})}
    ids |= {doc["_id"] async for doc in ctx.db[LEDGER].find({"now.orders": 1}, {"_id": 1})}
    run = uuid.uuid4().hex
    for sale_id in ids:
        await sync_sale(ctx, sale_id, f"reconcile:{run}:{sale_id}")
    ctx.log.info("sales_by_region.reconciled", sales=len(ids))
    return len(ids)


async def setup(ctx):
    ctx.spawn(reconcile, ctx)


async def main(ctx, args):
    rows = await ctx.db[TOTALS].find({"orders": {"$gt": 0}}).sort("_id", 1).to_list(None)
    return [
        {"region": row["_id"], "total": round(row["total"], 2), "orders": row["orders"]}
        for row in rows
    ]
