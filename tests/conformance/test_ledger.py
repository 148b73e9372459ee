"""The conformance ledger: JUnit parsing, validation and the only-shrinks comparison."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conformance.ledger import (
    Ledger,
    compare,
    header_of,
    load_ledger,
    parse_junit,
    table,
    write_ledger,
)

SAMPLE = """
import unittest

class TestThing(unittest.TestCase):
    def test_passes(self):
        self.assertEqual(1, 1)

    def test_fails(self):
        self.assertEqual(1, 2)

    @unittest.skip("server too old")
    def test_skipped(self):
        pass

class TestBroken(unittest.TestCase):
    def setUp(self):
        raise RuntimeError("set-up failed")

    def test_never_runs(self):
        pass
"""


@pytest.fixture(scope="module")
def junit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """JUnit XML written by a real pytest run of a small unittest file under ``test/``."""
    root = tmp_path_factory.mktemp("suite")
    (root / "test").mkdir()
    (root / "test" / "__init__.py").write_text("")
    (root / "test" / "test_sample.py").write_text(SAMPLE)
    xml = root / "out.xml"
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:anyio",
         f"--junitxml={xml}", "test/test_sample.py"],
        cwd=root, capture_output=True, check=False,
    )  # fmt: skip
    return xml


def test_junit_outcomes_per_test_id(junit: Path) -> None:
    """Each test gets a file::Class::name id; failures and set-up errors both count as fail."""
    results = {r.test_id: r for r in parse_junit(junit, "test/test_sample.py")}
    assert {k: r.outcome for k, r in results.items()} == {
        "test/test_sample.py::TestThing::test_passes": "pass",
        "test/test_sample.py::TestThing::test_fails": "fail",
        "test/test_sample.py::TestThing::test_skipped": "skip",
        "test/test_sample.py::TestBroken::test_never_runs": "fail",
    }
    assert "set-up failed" in results["test/test_sample.py::TestBroken::test_never_runs"].message


def _ledger(failures: dict[str, str]) -> Ledger:
    return Ledger({"ci": ["test/test_sample.py"]}, {"a": "cause a"}, failures)


def test_compare_flags_new_failures_and_listed_passes(junit: Path) -> None:
    """A failure not listed is new; a listed test that passes, skips or is gone must leave."""
    results = parse_junit(junit, "test/test_sample.py")
    ledger = _ledger(
        {
            "test/test_sample.py::TestThing::test_fails": "a",
            "test/test_sample.py::TestThing::test_passes": "a",
            "test/test_sample.py::TestThing::test_skipped": "a",
            "test/test_sample.py::TestThing::test_renamed": "a",
        }
    )
    verdict = compare(results, ledger, ["test/test_sample.py"])
    assert [r.test_id for r in verdict.new_failures] == [
        "test/test_sample.py::TestBroken::test_never_runs"
    ]
    assert sorted(r.test_id for r in verdict.now_passing) == [
        "test/test_sample.py::TestThing::test_passes",
        "test/test_sample.py::TestThing::test_skipped",
    ]
    assert verdict.missing == ["test/test_sample.py::TestThing::test_renamed"]
    assert not verdict.ok


def test_compare_matches_exact_ledger(junit: Path) -> None:
    """The run is OK when its failures are exactly the listed ones (other files ignored)."""
    results = parse_junit(junit, "test/test_sample.py")
    ledger = _ledger(
        {
            "test/test_sample.py::TestThing::test_fails": "a",
            "test/test_sample.py::TestBroken::test_never_runs": "a",
            "test/test_other.py::TestX::test_y": "a",
        }
    )
    assert compare(results, ledger, ["test/test_sample.py"]).ok


def test_table_counts_and_rate(junit: Path) -> None:
    """The table has one row per file with pass/fail/skip and the applicable pass rate."""
    rendered = table(parse_junit(junit, "test/test_sample.py"), ["test/test_sample.py"])
    assert "| test/test_sample.py | 1 | 2 | 1 | 33.3% |" in rendered


def test_ledger_round_trip_and_validation(tmp_path: Path) -> None:
    """write_ledger output loads back; unknown or unused causes are refused with their names."""
    path = tmp_path / "expected.toml"
    path.write_text("# header line\n")
    ledger = Ledger(
        {"ci": ["test/test_a.py"]},
        {"a": 'cause "quoted" $x'},
        {"test/test_a.py::TestA::test_x[1]": "a"},
    )
    write_ledger(path, ledger, header_of(path))
    loaded = load_ledger(path)
    assert loaded.failures == ledger.failures
    assert loaded.causes == ledger.causes
    assert path.read_text().startswith("# header line\n")

    path.write_text('[causes]\nused = "x"\nspare = "y"\n[failures."t.py"]\n"T::t" = "nope"\n')
    with pytest.raises(ValueError, match=r"'nope'(.|\n)*'used'") as info:
        load_ledger(path)
    assert "'spare'" in str(info.value)


def test_unstable_tests_are_counted_not_compared(junit: Path, tmp_path: Path) -> None:
    """A test listed as unstable may pass or fail; listing it twice is refused."""
    results = parse_junit(junit, "test/test_sample.py")
    ledger = Ledger(
        {"ci": ["test/test_sample.py"]},
        {"a": "cause a", "t": "timing"},
        {"test/test_sample.py::TestThing::test_fails": "a"},
        {"test/test_sample.py::TestBroken::test_never_runs": "t",
         "test/test_sample.py::TestThing::test_passes": "t"},
    )  # fmt: skip
    assert compare(results, ledger, ["test/test_sample.py"]).ok
    path = tmp_path / "expected.toml"
    ledger.unstable["test/test_sample.py::TestThing::test_fails"] = "t"
    write_ledger(path, ledger, "# h")
    with pytest.raises(ValueError, match="both as a failure and as unstable"):
        load_ledger(path)
