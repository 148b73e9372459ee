"""Sales totals per region (or per product), biggest first, through an aggregation pipeline.

Args (all optional): {"by": "region" | "product", "region": "emea"}
"""

import inspect


async def main(ctx, args):
    args = args or {}
    by = args.get("by", "region")
    if by not in ("region", "product"):
        raise ValueError(f"'by' must be 'region' or 'product', got {by!r}")
    pipeline = []
    if "region" in args:
        pipeline.append({"$match": {"region": args["region"]}})
    pipeline += [
        {
            "$group": {
                "_id": f"${by}",
                "total": {"$sum": "$amount"},
                "units": {"$sum": "$quantity"},
                "orders": {"$sum": 1},
            }
        },
        {"$sort": {"total": -1, "_id": 1}},
    ]
    cursor = ctx.db.sales.aggregate(pipeline)
    if inspect.isawaitable(cursor):  # PyMongo async returns a coroutine; Motor a cursor
        cursor = await cursor
    rows = await cursor.to_list(None)
    return [
        {by: row["_id"], "total": round(row["total"], 2), "units": row["units"],
         "orders": row["orders"]}
        for row in rows
    ]
