"""Sleep for a while, then answer: try a timeout (?timeout=0.5) or a graceful drain.

Args: {"seconds": 2}
"""

import asyncio


async def main(ctx, args):
    seconds = float((args or {}).get("seconds", 1))
    await asyncio.sleep(seconds)
    return {"slept": seconds}
