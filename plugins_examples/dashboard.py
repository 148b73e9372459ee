"""A welcome dashboard built from two other plugins, reached through ctx.require.

``ctx.require`` is late-bound: every call goes to the version of greet and sales_report
that is current at that moment, so publishing a new greet changes this plugin's output
without republishing it.

Args: {"firstName": "Blain", "lastName": "Smith"}
"""


async def main(ctx, args):
    greet = ctx.require("greet")
    report = ctx.require("sales_report")
    rows = await report({"by": "region"})
    return {
        "greeting": await greet(args),
        "top_region": rows[0] if rows else None,
        "regions": len(rows),
    }
