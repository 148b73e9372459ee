"""``python -m bench`` (``make bench``): the benchmark suite, with baselines, in one run.

Writes a Markdown table to stdout and ``bench/results/latest.md``, JSON to
``bench/results/latest.json`` and the latency plot to ``bench/results/latency.png``.
``--quick`` takes about a minute; the full run takes under ten minutes on 2 cores.

Where the server runs (see ``bench/common.py``): by default the embedded server is a
subprocess (``plugin-host embedded-mongo --port 0``), so it has its own GIL and the host
and the server use two cores, as they would against ``mongod``. ``--server-thread`` runs
it in a background thread of this process instead: the server and the host then share
one process and one GIL. With ``MONGODB_URI`` set, every group also runs against that
deployment (``--no-uri`` skips it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from . import (
    coldstart,
    fleet,
    http,
    latency,
    reload_http,
    report,
    rollout,
    startup,
    swap,
    throughput,
    triggers,
)
from .common import Config, Target, configure_logging, embedded_server, machine_info
from .readme_section import update_readme

GROUPS: dict[str, Callable[[Target, Config], Awaitable[dict[str, Any]]]] = {
    "throughput": throughput.run,
    "latency": latency.run,
    "coldstart": coldstart.run,
    "swap": swap.run,
    "startup": startup.run,
    "http": http.run,
    "reload_http": reload_http.run,
    "fleet": fleet.run,
    "rollout": rollout.run,
    "triggers": triggers.run,
}

NOTES = """\
Notes. Every figure above was measured in this run; nothing is carried over from
earlier runs. *change-to-live* runs from the moment `await update_one(...)` returns to
the first call that the new version serves (a caller loop calls the plugin, yielding to
the event loop between calls). The polling reloader re-reads the collection every second
and recompiles changed records; its updates run 25 at a time on distinct plugins at
random phases of the poll period. *Seed-style hot-require* runs `find_one` + `compile` +
`exec` on every call, so it always serves the latest record but pays a round trip and a
compile per call. *Overhead* is `host.call` minus a direct `await main(ctx, args)` of the
same function object, per call (best of interleaved batches; medians in the JSON); sync
plugins run in a worker thread in the host, so their figure is dominated by the thread
hand-off (shown against `anyio.to_thread.run_sync` of the same function). Cold start runs in a fresh
process (records inserted first): from `PluginHost.__aenter__` until `ready()`, and RSS
before/after (psutil). Reload events are logged as the daemon logs them (JSON lines, to
/dev/null here), so their cost is included. The embedded server runs as a subprocess by
default (its own GIL, on the second core, as a real `mongod` would); `--server-thread`
runs it in this process, sharing the host's GIL. Other work on the machine shows up in
the tails: see the load average above. *HTTP* runs wrk (one thread, POSTs of a small JSON
body) against a real `plugin-host run` process and against a bare Starlette echo app on
Uvicorn started the same way (same event loop, HTTP parser and listening socket), one after
the other in the same run; wrk itself shares the two cores with the server it measures."""


def _targets(server: str, use_uri: bool) -> list[tuple[str, str]]:
    targets = [("embedded", server)]
    if use_uri and os.environ.get("MONGODB_URI"):
        targets.append(("mongodb", "uri"))
    return targets


async def _run_groups(target: Target, cfg: Config, groups: Sequence[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in groups:
        started = time.perf_counter()
        print(f"[bench] {target.label}: {name} ...", file=sys.stderr, flush=True)
        try:
            results[name] = await GROUPS[name](target, cfg)
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(
            f"[bench] {target.label}: {name} done in {time.perf_counter() - started:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    return results


def _run_target(
    label: str, server: str, cfg: Config, groups: Sequence[str]
) -> tuple[Target, dict[str, Any]]:
    if server == "uri":
        target = Target(label, os.environ["MONGODB_URI"], server)
        return target, asyncio.run(_run_groups(target, cfg, groups))
    with embedded_server(server) as uri:
        target = Target(label, uri, server)
        return target, asyncio.run(_run_groups(target, cfg, groups))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite; return 1 if a group failed."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the ~1-minute variant")
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--server-process",
        dest="server",
        action="store_const",
        const="process",
        help="embedded server as a subprocess (default): its own GIL, a second core",
    )
    where.add_argument(
        "--server-thread",
        dest="server",
        action="store_const",
        const="thread",
        help="embedded server in a background thread: shares this process's GIL",
    )
    parser.add_argument("--no-uri", action="store_true", help="ignore MONGODB_URI")
    parser.add_argument(
        "--only", action="append", choices=sorted(GROUPS), help="run only these groups"
    )
    parser.add_argument(
        "--results-dir", type=Path, default=report.RESULTS_DIR, help="where results go"
    )
    parser.add_argument(
        "--update-readme",
        action="store_true",
        help="also regenerate README.md's benchmark section from latest.md",
    )
    ns = parser.parse_args(argv)
    server: str = ns.server or "process"
    cfg = Config.make(ns.quick)
    groups = [g for g in GROUPS if ns.only is None or g in ns.only]
    configure_logging()

    machine = machine_info()
    machine["load_avg_start"] = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    targets: dict[str, Any] = {}
    failed = False
    for label, mode in _targets(server, not ns.no_uri):
        target, results = _run_target(label, mode, cfg, groups)
        failed |= any(isinstance(r, dict) and "error" in r for r in results.values())
        targets[label] = {
            "server": target.server,
            "description": target.description,
            "results": results,
            "goals": report.evaluate(results),
        }
    machine["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    command = " ".join(["python -m bench", *(sys.argv[1:] if argv is None else argv)])
    data: dict[str, Any] = {
        "command": command,
        "machine": machine,
        "config": {k: getattr(cfg, k) for k in cfg.__slots__},
        "elapsed_s": time.perf_counter() - started,
        "targets": targets,
        "notes": NOTES,
    }
    out_dir: Path = ns.results_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    text = report.markdown(data)
    (out_dir / "latest.md").write_text(text)
    report.write_json(data, out_dir / "latest.json")
    report.plot(data, out_dir / "latency.png")
    sys.stdout.write(text)
    if ns.update_readme:
        update_readme(out_dir / "latest.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
