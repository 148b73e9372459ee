"""A counter kept in the version's state: setup creates it, teardown reports it.

Each version starts from zero (state belongs to one version): edit this file and watch
the count restart and the old version's teardown log its final count.

Args: {"step": 1}
"""

import time


async def setup(ctx):
    ctx.log.info("counter.setup")
    return {"count": 0, "since": time.time()}


async def main(ctx, args):
    step = int((args or {}).get("step", 1))
    ctx.state["count"] += step
    return {"count": ctx.state["count"], "version": ctx.version}


async def teardown(ctx):
    ctx.log.info("counter.teardown", final_count=ctx.state["count"],
                 lived_s=round(time.time() - ctx.state["since"], 1))
