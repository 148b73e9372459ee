"""Run PyMongo's own test suite against the embedded server and compare with the ledger.

``python -m tests.conformance.run`` (``make conformance``):

1. reads the PyMongo version pinned in ``uv.lock``, downloads that sdist with
   ``pip download --no-deps --no-binary :all:`` (checked against the lock's sha256)
   and caches it, with an isolated virtualenv holding that PyMongo and the test
   requirements the sdist itself declares (``requirements/test.txt``), pinned by
   ``constraints.txt`` here;
2. unpacks the sdist's ``test/`` directory and ``pyproject.toml`` (PyMongo's pytest
   configuration: markers, filters, asyncio loop scope);
3. for each test file, starts a fresh ``plugin-host embedded-mongo --port 0`` and runs
   the file with PyMongo's documented harness variables ``DB_IP`` and ``DB_PORT``;
4. compares each test id's outcome with ``expected.toml`` (see :mod:`.ledger`);
   tests that differ are run once more, alone, on a fresh server, and the second
   outcome decides (the report names them as unstable).

The cache is ``$PLUGIN_HOST_CACHE`` or ``~/.cache/plugin-host``, under ``conformance/``.
Exit status: 0 when the run matches the ledger, 1 when it does not, 2 on a harness error.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import tomllib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tests.conformance.ledger import (
    UNCLASSIFIED,
    Ledger,
    Result,
    Verdict,
    cause_counts,
    compare,
    header_of,
    load_ledger,
    parse_junit,
    table,
    write_ledger,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
LEDGER = HERE / "expected.toml"
CONSTRAINTS = HERE / "constraints.txt"
SERVER_START_TIMEOUT = 60.0
# Servers started and not yet stopped: a SIGTERM to the runner stops them too.
_SERVERS: set[subprocess.Popen[str]] = set()


class HarnessError(Exception):
    """The harness itself failed (download, venv, server start), not a test."""


@dataclass(frozen=True, slots=True)
class Pinned:
    """PyMongo as ``uv.lock`` pins it."""

    version: str
    sha256: str


def pinned_pymongo(lock: Path) -> Pinned:
    """The PyMongo version and sdist hash in ``lock``.

    Raises:
        HarnessError: The lock has no PyMongo package with an sdist.
    """
    for package in tomllib.loads(lock.read_text()).get("package", []):
        if package.get("name") == "pymongo":
            sdist = package.get("sdist", {})
            digest = str(sdist.get("hash", ""))
            if not digest.startswith("sha256:"):
                raise HarnessError(f"{lock}: pymongo has no sdist sha256")
            return Pinned(str(package["version"]), digest.removeprefix("sha256:"))
    raise HarnessError(f"{lock}: no pymongo package")


def cache_root() -> Path:
    """Where sdists, venvs and the last run's logs are kept."""
    base = os.environ.get("PLUGIN_HOST_CACHE") or str(Path.home() / ".cache" / "plugin-host")
    return Path(base) / "conformance"


def _run(cmd: Sequence[str | Path], what: str) -> None:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise HarnessError(f"{what} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def prepare_venv(cache: Path, pinned: Pinned) -> Path:
    """An isolated virtualenv with the pinned PyMongo and pytest (created once, cached)."""
    key = hashlib.sha256(
        f"{pinned.version}|{sys.version_info[:2]}|{CONSTRAINTS.read_text()}".encode()
    ).hexdigest()[:12]
    venv = cache / f"venv-{key}"
    python = venv / "bin" / "python"
    if (venv / ".complete").exists():
        return python
    shutil.rmtree(venv, ignore_errors=True)
    _run([sys.executable, "-m", "venv", venv], "creating the conformance venv")
    _run(
        [
            python,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-c",
            CONSTRAINTS,
            f"pymongo=={pinned.version}",
            "pytest",
            "pytest-asyncio",
            "importlib_metadata",
        ],
        "installing PyMongo's test requirements",
    )
    (venv / ".complete").write_text(pinned.version)
    return python


def fetch_sdist(cache: Path, python: Path, pinned: Pinned) -> Path:
    """The pinned PyMongo sdist, downloaded once with pip and checked against the lock."""
    sdist = cache / f"pymongo-{pinned.version}.tar.gz"
    if sdist.exists() and _sha256(sdist) == pinned.sha256:
        return sdist
    tmp = cache / "download"
    shutil.rmtree(tmp, ignore_errors=True)
    _run(
        [
            python,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"pymongo=={pinned.version}",
            "-d",
            tmp,
        ],
        f"pip download pymongo=={pinned.version}",
    )
    got = tmp / sdist.name
    if not got.exists():
        raise HarnessError(f"pip download did not produce {got.name}: {os.listdir(tmp)}")
    if _sha256(got) != pinned.sha256:
        raise HarnessError(f"{got.name}: sha256 differs from uv.lock's")
    got.replace(sdist)
    shutil.rmtree(tmp, ignore_errors=True)
    return sdist


def unpack_tests(cache: Path, sdist: Path, pinned: Pinned) -> Path:
    """Extract ``test/`` and ``pyproject.toml`` from the sdist; returns the root."""
    root = cache / f"pymongo-{pinned.version}-tests"
    if (root / ".complete").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    prefix = f"pymongo-{pinned.version}/"
    with tarfile.open(sdist) as tar:
        members = []
        for member in tar.getmembers():
            rel = member.name.removeprefix(prefix)
            if rel == "pyproject.toml" or rel.startswith("test/"):
                member.name = rel
                members.append(member)
        tar.extractall(root, members=members, filter="data")
    (root / ".complete").write_text(pinned.version)
    return root


@contextlib.contextmanager
def embedded_server(log_path: Path) -> Iterator[int]:
    """Run ``plugin-host embedded-mongo --port 0`` in a subprocess; yields its port."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "host.cli", "embedded-mongo", "--port", "0", "--log-format", "json"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _SERVERS.add(proc)
    port: list[int] = []
    started = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        with log_path.open("w") as log:
            for line in proc.stdout:
                log.write(line)
                if not started.is_set():
                    with contextlib.suppress(ValueError):
                        event = json.loads(line)
                        if event.get("event") == "embedded.started":
                            port.append(int(event["uri"].rsplit(":", 1)[1].split("/")[0]))
                            started.set()
        started.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        if not started.wait(SERVER_START_TIMEOUT) or not port:
            raise HarnessError(f"the embedded server did not start; see {log_path}")
        yield port[0]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        _SERVERS.discard(proc)
        reader.join(timeout=10)


def run_file(
    python: Path,
    tests_root: Path,
    file: str,
    out: Path,
    timeout: float,
    node_ids: Sequence[str] = (),
) -> tuple[list[Result], float]:
    """Run one PyMongo test file (or some of its tests) on a fresh server."""
    slug = file.replace("/", "_").removesuffix(".py") + ("-rerun" if node_ids else "")
    junit = out / f"{slug}.xml"
    started = time.monotonic()
    with embedded_server(out / f"{slug}.server.log") as port:
        env = {**os.environ, "DB_IP": "127.0.0.1", "DB_PORT": str(port)}
        targets = list(node_ids) or [file]
        with (out / f"{slug}.pytest.log").open("w") as log:
            try:
                subprocess.run(
                    [
                        str(python),
                        "-m",
                        "pytest",
                        "-q",
                        "-p",
                        "no:cacheprovider",
                        f"--junitxml={junit}",
                        *targets,
                    ],
                    cwd=tests_root,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                return [Result(f"{file}::TIMEOUT", "fail", f"over {timeout:.0f} s")], timeout
    if not junit.exists():
        return [Result(f"{file}::COLLECTION", "fail", f"no results; see {slug}.pytest.log")], 0.0
    return parse_junit(junit, file), time.monotonic() - started


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (``--help`` for the options)."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.conformance.run",
        description="Run PyMongo's own tests against the embedded server; compare with the "
        "ledger tests/conformance/expected.toml.",
    )
    parser.add_argument("--suite", default="ci", help="ledger suite: ci, nightly or all")
    parser.add_argument("--file", action="append", default=[], help="run only this test file")
    parser.add_argument("--jobs", type=int, default=2, help="test files run at once")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per test file")
    parser.add_argument("--json", action="store_true", help="print the verdict as JSON")
    parser.add_argument(
        "--no-rerun", action="store_true", help="do not run differing tests a second time"
    )
    parser.add_argument(
        "--update-ledger",
        action="store_true",
        help=f"rewrite the ledger's failures for the files run (new causes: {UNCLASSIFIED})",
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        ledger = load_ledger(LEDGER) if not args.update_ledger else _load_loose(LEDGER)
        files = args.file or ledger.files(args.suite)
        cache = cache_root()
        cache.mkdir(parents=True, exist_ok=True)
        pinned = pinned_pymongo(REPO / "uv.lock")
        python = prepare_venv(cache, pinned)
        tests_root = unpack_tests(cache, fetch_sdist(cache, python, pinned), pinned)
    except (HarnessError, KeyError, ValueError) as exc:
        print(f"conformance: {exc}", file=sys.stderr)
        return 2
    out = cache / "last-run"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    print(
        f"conformance: PyMongo {pinned.version}, {len(files)} files, logs in {out}",
        file=sys.stderr,
        flush=True,
    )
    results: list[Result] = []
    durations: dict[str, float] = {}
    try:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = {
                f: pool.submit(run_file, python, tests_root, f, out, args.timeout) for f in files
            }
            for file, future in futures.items():
                file_results, seconds = future.result()
                results += file_results
                durations[file] = seconds
                print(f"conformance: {file} done in {seconds:.0f} s", file=sys.stderr, flush=True)
        verdict = compare(results, ledger, files)
        unstable = (
            []
            if args.update_ledger or args.no_rerun
            else _rerun_differences(python, tests_root, out, args.timeout, verdict, results)
        )
    except HarnessError as exc:
        print(f"conformance: {exc}", file=sys.stderr)
        return 2
    verdict = compare(results, ledger, files)
    if args.update_ledger:
        _update(ledger, results, files)
        print(f"conformance: ledger rewritten: {LEDGER}", file=sys.stderr)
    _report(results, files, ledger, verdict, unstable, durations, as_json=args.json)
    return 0 if verdict.ok or args.update_ledger else 1


def _terminate(signum: int, frame: object) -> None:
    for proc in list(_SERVERS):
        proc.kill()
    os._exit(128 + signum)


def _load_loose(path: Path) -> Ledger:
    try:
        return load_ledger(path)
    except ValueError:
        data = tomllib.loads(path.read_text())

        def tests(table: str) -> dict[str, str]:
            return {f"{file}::{n}": str(c) for file, entries in data.get(table, {}).items()
                    for n, c in entries.items()}  # fmt: skip

        return Ledger(
            dict(data.get("suites", {})),
            dict(data.get("causes", {})),
            tests("failures"),
            tests("unstable"),
        )


def _rerun_differences(
    python: Path,
    tests_root: Path,
    out: Path,
    timeout: float,
    verdict: Verdict,
    results: list[Result],
) -> list[str]:
    """Run the tests whose outcome differs from the ledger once more; keep that outcome."""
    differing = [
        r.test_id
        for r in verdict.new_failures + verdict.now_passing
        if not r.test_id.endswith(("::TIMEOUT", "::COLLECTION"))
    ]
    if not differing:
        return []
    by_file: dict[str, list[str]] = {}
    for test_id in differing:
        by_file.setdefault(test_id.split("::", 1)[0], []).append(test_id)
    unstable = []
    index = {r.test_id: i for i, r in enumerate(results)}
    for file, ids in by_file.items():
        again, _ = run_file(python, tests_root, file, out, timeout, ids)
        for result in again:
            i = index.get(result.test_id)
            if i is None:
                continue
            if results[i].outcome != result.outcome:
                unstable.append(f"{result.test_id}: {results[i].outcome} then {result.outcome}")
            results[i] = result
    return unstable


def _update(ledger: Ledger, results: list[Result], files: Sequence[str]) -> None:
    prefix = tuple(f"{f}::" for f in files)
    failures = {t: c for t, c in ledger.failures.items() if not t.startswith(prefix)}
    for result in results:
        if result.outcome == "fail" and result.test_id not in ledger.unstable:
            cause = ledger.failures.get(result.test_id, UNCLASSIFIED)
            failures[result.test_id] = cause
            ledger.causes.setdefault(cause, UNCLASSIFIED)
    ledger.failures = failures
    write_ledger(LEDGER, ledger, header_of(LEDGER))


def _report(
    results: list[Result],
    files: Sequence[str],
    ledger: Ledger,
    verdict: Verdict,
    unstable: list[str],
    durations: dict[str, float],
    *,
    as_json: bool,
) -> None:
    if as_json:
        print(
            json.dumps(
                {
                    "ok": verdict.ok,
                    "counts": {
                        f: {
                            o: sum(
                                1
                                for r in results
                                if r.test_id.startswith(f + "::") and r.outcome == o
                            )
                            for o in ("pass", "fail", "skip")
                        }
                        for f in files
                    },
                    "seconds": durations,
                    "new_failures": [
                        {"test": r.test_id, "message": r.message[:500]}
                        for r in verdict.new_failures
                    ],
                    "now_passing": [r.test_id for r in verdict.now_passing],
                    "missing": verdict.missing,
                    "unstable": unstable,
                },
                indent=2,
            )
        )
        return
    print(table(results, files))
    print()
    print("Known failures by cause:")
    for cause, n in cause_counts(results, ledger):
        print(f"  {n:4d}  {cause}: {ledger.causes.get(cause, '?')}")
    for line in unstable:
        print(f"UNSTABLE (outcome changed on the rerun): {line}")
    for r in verdict.new_failures:
        first = r.message.splitlines()[0][:300] if r.message else ""
        print(f"NEW FAILURE: {r.test_id}\n    {first}")
    for r in verdict.now_passing:
        print(f"LISTED BUT {r.outcome.upper()}: {r.test_id} (remove it from the ledger)")
    for test_id in verdict.missing:
        print(f"LISTED BUT NOT RUN: {test_id} (remove it from the ledger)")
    print(
        "conformance: OK, the run matches the ledger"
        if verdict.ok
        else "conformance: FAILED, the run differs from the ledger (see above; with "
        "--update-ledger the ledger now lists this run's failures)"
    )


if __name__ == "__main__":
    sys.exit(main())
