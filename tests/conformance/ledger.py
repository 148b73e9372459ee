"""The conformance ledger: PyMongo test outcomes compared with the known failures.

``expected.toml`` lists the suites (which of PyMongo's test files run) and every
known failure with the key of its cause. A run passes only when its failures are
exactly the listed ones: a new failure is a regression, and a listed failure that now
passes (or is skipped, or no longer exists) must leave the ledger, so the ledger can
only shrink. Skips are PyMongo's own decisions (server version, topology) and are
counted, never compared.
"""

from __future__ import annotations

import json
import tomllib
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Outcome = Literal["pass", "fail", "skip"]
UNCLASSIFIED = "UNCLASSIFIED"


@dataclass(frozen=True, slots=True)
class Result:
    """One test's outcome in a run."""

    test_id: str
    outcome: Outcome
    message: str = ""


@dataclass(slots=True)
class Ledger:
    """The parsed ``expected.toml``."""

    suites: dict[str, list[str]]
    causes: dict[str, str]
    failures: dict[str, str]  # test id -> cause key
    # Tests whose outcome depends on timing (test id -> cause key): counted, not compared.
    unstable: dict[str, str] = field(default_factory=dict)

    def files(self, suite: str) -> list[str]:
        """The test files of ``suite`` (``all`` is every suite's files).

        Raises:
            KeyError: ``suite`` is not in the ledger.
        """
        if suite == "all":
            return [f for files in self.suites.values() for f in files]
        if suite not in self.suites:
            raise KeyError(f"unknown suite {suite!r}; the ledger has {sorted(self.suites)}")
        return list(self.suites[suite])


def load_ledger(path: Path) -> Ledger:
    """Parse and validate the ledger at ``path``.

    Raises:
        ValueError: A failure names no known cause, a cause is unused or unclassified.
    """
    data = tomllib.loads(path.read_text())
    suites = {str(k): [str(f) for f in v] for k, v in data.get("suites", {}).items()}
    causes = {str(k): str(v) for k, v in data.get("causes", {}).items()}
    failures = _tests(data.get("failures", {}))
    unstable = _tests(data.get("unstable", {}))
    problems = [
        f"{test} names cause {cause!r}, which [causes] does not define"
        for test, cause in {**failures, **unstable}.items()
        if cause not in causes
    ]
    used = set(failures.values()) | set(unstable.values())
    problems += [
        f"cause {key!r} is listed in [causes] but no failure uses it"
        for key in causes
        if key not in used
    ]
    problems += [
        f"{test} is listed both as a failure and as unstable"
        for test in set(failures) & set(unstable)
    ]
    problems += [
        f"cause {key!r} is still {UNCLASSIFIED}"
        for key, text in causes.items()
        if text == UNCLASSIFIED
    ]
    if problems:
        raise ValueError(f"invalid ledger {path}:\n  " + "\n  ".join(problems))
    return Ledger(suites, causes, failures, unstable)


def _tests(tables: Mapping[str, Mapping[str, object]]) -> dict[str, str]:
    return {f"{file}::{name}": str(cause) for file, tests in tables.items()
            for name, cause in tests.items()}  # fmt: skip


def _toml_str(value: str) -> str:
    # JSON string escapes are valid TOML basic-string escapes.
    return json.dumps(value, ensure_ascii=False)


def write_ledger(path: Path, ledger: Ledger, header: str) -> None:
    """Write ``ledger`` to ``path`` as TOML (failures grouped by file, sorted)."""
    lines = [header.rstrip(), "", "[suites]"]
    lines += [f"{k} = {_toml_str_list(v)}" for k, v in ledger.suites.items()]
    lines += ["", "[causes]"]
    used = set(ledger.failures.values()) | set(ledger.unstable.values())
    lines += [
        f"{_toml_str(k)} = {_toml_str(v)}" for k, v in sorted(ledger.causes.items()) if k in used
    ]
    for table_name, tests in (("failures", ledger.failures), ("unstable", ledger.unstable)):
        by_file: dict[str, list[tuple[str, str]]] = {}
        for test_id, cause in sorted(tests.items()):
            file, name = test_id.split("::", 1)
            by_file.setdefault(file, []).append((name, cause))
        for file, entries in by_file.items():
            lines += ["", f"[{table_name}.{_toml_str(file)}]"]
            lines += [f"{_toml_str(name)} = {_toml_str(cause)}" for name, cause in entries]
    path.write_text("\n".join(lines) + "\n")


def _toml_str_list(values: Iterable[str]) -> str:
    items = [f"  {_toml_str(v)}," for v in values]
    return "[\n" + "\n".join(items) + "\n]" if items else "[]"


def header_of(path: Path) -> str:
    """The comment block at the top of the ledger file (kept on rewrite)."""
    out = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        out.append(line)
    return "\n".join(out)


def parse_junit(path: Path, file: str) -> list[Result]:
    """Outcomes of one test file from pytest's JUnit XML.

    Test ids are ``file::Class::test`` (PyMongo's tests are unittest classes).
    A failure or an error (in set-up, call or tear-down) counts as ``fail``.
    """
    module = file.removesuffix(".py").replace("/", ".")
    results: dict[str, Result] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        classname = case.get("classname", "")
        name = case.get("name", "")
        cls = classname.removeprefix(module).lstrip(".")
        test_id = f"{file}::{cls}::{name}" if cls else f"{file}::{name}"
        outcome: Outcome = "pass"
        message = ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "fail"
                message = (child.get("message") or child.text or "").strip()
                break
            if child.tag == "skipped":
                outcome = "skip"
                message = (child.get("message") or "").strip()
        previous = results.get(test_id)
        if previous is None or outcome == "fail":
            results[test_id] = Result(test_id, outcome, message)
    return list(results.values())


@dataclass(slots=True)
class Verdict:
    """How a run compares with the ledger."""

    new_failures: list[Result] = field(default_factory=list)
    now_passing: list[Result] = field(default_factory=list)  # listed, but did not fail
    missing: list[str] = field(default_factory=list)  # listed, but not run at all

    @property
    def ok(self) -> bool:
        """The run matches the ledger exactly."""
        return not (self.new_failures or self.now_passing or self.missing)


def compare(results: Iterable[Result], ledger: Ledger, files: Iterable[str]) -> Verdict:
    """Compare a run of ``files`` with the ledger's failures for those files.

    Tests the ledger lists as unstable are not compared.
    """
    wanted = tuple(f"{f}::" for f in files)
    expected = {t for t in ledger.failures if t.startswith(wanted)}
    verdict = Verdict()
    seen = set()
    for result in results:
        seen.add(result.test_id)
        if result.test_id in ledger.unstable:
            continue
        listed = result.test_id in expected
        if result.outcome == "fail" and not listed:
            verdict.new_failures.append(result)
        elif result.outcome != "fail" and listed:
            verdict.now_passing.append(result)
    verdict.missing = sorted(expected - seen)
    return verdict


def table(results: Iterable[Result], files: Iterable[str]) -> str:
    """A Markdown table: file | pass | fail | skip | pass rate of the applicable tests."""
    counts: dict[str, Counter[str]] = {f: Counter() for f in files}
    for result in results:
        counts[result.test_id.split("::", 1)[0]][result.outcome] += 1
    rows = ["| file | pass | fail | skip | pass/applicable |", "|---|---:|---:|---:|---:|"]
    total: Counter[str] = Counter()
    for file, count in counts.items():
        total.update(count)
        rows.append(_row(file, count))
    rows.append(_row("**total**", total))
    return "\n".join(rows)


def _row(label: str, count: Mapping[str, int]) -> str:
    applicable = count.get("pass", 0) + count.get("fail", 0)
    rate = f"{100 * count.get('pass', 0) / applicable:.1f}%" if applicable else "-"
    return (
        f"| {label} | {count.get('pass', 0)} | {count.get('fail', 0)} "
        f"| {count.get('skip', 0)} | {rate} |"
    )


def cause_counts(results: Iterable[Result], ledger: Ledger) -> list[tuple[str, int]]:
    """Failures of this run per ledger cause, most tests broken first."""
    counter: Counter[str] = Counter(
        ledger.failures[r.test_id]
        for r in results
        if r.outcome == "fail" and r.test_id in ledger.failures
    )
    return counter.most_common()
