"""A key fingerprint with PBKDF2: CPU-bound, blocking work, so a plain (sync) ``def main``.

Sync entrypoints run in a worker thread, so they never stall the host's event loop.

Args: {"text": "hello", "salt": "pepper", "iterations": 100000}
"""

import hashlib


def main(ctx, args):
    text = str(args.get("text", ""))
    salt = str(args.get("salt", "plugin-host"))
    iterations = int(args.get("iterations", 100_000))
    if not 1 <= iterations <= 1_000_000:
        raise ValueError("iterations must be between 1 and 1000000")
    digest = hashlib.pbkdf2_hmac("sha256", text.encode(), salt.encode(), iterations)
    return {"fingerprint": digest.hex()[:32], "iterations": iterations, "chars": len(text)}
