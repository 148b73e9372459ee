"""Tests for the plugin-host CLI's publishing commands, against the embedded server."""

from __future__ import annotations

import gc
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from pymongo.synchronous.database import Database
from typer.testing import CliRunner, Result

from host.cli import app
from tests.support import Doc

EXAMPLES = Path(__file__).resolve().parent.parent / "plugins_examples"
SOURCE = "async def main(ctx, args):\n    return 'v1'\n"

Invoke = Callable[..., Result]


@pytest.fixture
def cli(mongo_uri: str, sync_db: Database[Doc]) -> Invoke:
    """Run a CLI command against this test's database (URI through the environment)."""
    runner = CliRunner()

    def invoke(*args: str) -> Result:
        return runner.invoke(
            app,
            [*args, "--database", sync_db.name] if args[0] != "call" else list(args),
            env={"PLUGIN_HOST_MONGODB_URI": mongo_uri, "COLUMNS": "200"},
        )

    return invoke


@pytest.fixture
def plugin_file(tmp_path: Path) -> Path:
    """A small plugin file."""
    path = tmp_path / "hello.py"
    path.write_text(SOURCE)
    return path


def assert_clean_error(result: Result, *needles: str) -> None:
    """The command failed with one `error:` line (no traceback) containing ``needles``."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "error: " in result.output
    for needle in needles:
        assert needle in result.output, result.output


def assert_usage_error(result: Result, option: str, *needles: str) -> None:
    """Typer refused ``option`` as a usage error: exit 2, no traceback, naming the option."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert f"Invalid value for '{option}'" in result.output, result.output
    for needle in needles:
        assert needle in result.output, result.output


def test_push_creates_then_reports_unchanged(
    cli: Invoke, plugin_file: Path, sync_db: Database[Doc]
) -> None:
    """push creates revision 1, is a no-op for the same file, and --force makes revision 2."""
    first = cli("push", "hello", str(plugin_file))
    again = cli("push", "hello", str(plugin_file))
    forced = cli("push", "hello", str(plugin_file), "--force")
    assert first.exit_code == 0, first.output
    assert "created hello revision 1" in first.output
    assert "unchanged at revision 1" in again.output
    assert "published hello revision 2" in forced.output
    record = sync_db.functions.find_one({"_id": "hello"})
    assert record is not None
    assert record["revision"] == 2
    assert sync_db.functions_history.count_documents({"name": "hello"}) == 2


def test_push_with_entrypoint(cli: Invoke, tmp_path: Path, sync_db: Database[Doc]) -> None:
    """push --entrypoint stores the entrypoint in the record and the history."""
    path = tmp_path / "h.py"
    path.write_text("def handle(ctx, args):\n    return 1\n")
    result = cli("push", "h", str(path), "--entrypoint", "handle")
    assert result.exit_code == 0, result.output
    assert sync_db.functions.find_one({"_id": "h"})["entrypoint"] == "handle"  # type: ignore[index]


def test_push_errors_are_clear(cli: Invoke, tmp_path: Path) -> None:
    """A missing file, a syntax error or missing arguments each say what to fix."""
    assert_clean_error(cli("push", "x", str(tmp_path / "missing.py")), "does not exist")
    bad = tmp_path / "bad.py"
    bad.write_text("def main(:\n")
    assert_clean_error(cli("push", "bad", str(bad)), "syntax error on line 1")
    assert_clean_error(cli("push", "onlyname"), "NAME and FILE")
    assert_clean_error(cli("push", "--dir", str(tmp_path / "nowhere")), "does not exist")


def test_push_dir_and_list(cli: Invoke, sync_db: Database[Doc]) -> None:
    """push --dir publishes every example; list shows them in a table."""
    pushed = cli("push", "--dir", str(EXAMPLES))
    assert pushed.exit_code == 0, pushed.output
    names = sorted(p.stem for p in EXAMPLES.glob("*.py"))
    assert sorted(d["_id"] for d in sync_db.functions.find({})) == names
    listed = cli("list")
    assert listed.exit_code == 0, listed.output
    for name in names:
        assert name in listed.output
    assert "revision" in listed.output


def test_list_empty(cli: Invoke) -> None:
    """list on an empty collection says how to publish."""
    result = cli("list")
    assert result.exit_code == 0
    assert "no plugins" in result.output


def test_show_prints_source_and_revisions(cli: Invoke, plugin_file: Path) -> None:
    """show prints the current source (plain when piped) or a revision from the history."""
    cli("push", "hello", str(plugin_file))
    plugin_file.write_text(SOURCE.replace("v1", "v2"))
    cli("push", "hello", str(plugin_file))
    assert cli("show", "hello").output == SOURCE.replace("v1", "v2")
    assert cli("show", "hello", "--revision", "1").output == SOURCE
    assert_clean_error(cli("show", "ghost"), "no plugin named 'ghost'", "hint: ")
    assert_clean_error(cli("show", "hello", "--revision", "7"), "no revision 7", "have: 2, 1")


def test_rollback(cli: Invoke, plugin_file: Path, sync_db: Database[Doc]) -> None:
    """rollback republishes the previous source as a new revision; --to picks one."""
    cli("push", "hello", str(plugin_file))
    plugin_file.write_text(SOURCE.replace("v1", "v2"))
    cli("push", "hello", str(plugin_file))
    result = cli("rollback", "hello")
    assert result.exit_code == 0, result.output
    assert "source of revision 1, published as revision 3" in result.output
    record = sync_db.functions.find_one({"_id": "hello"})
    assert record is not None
    assert (record["revision"], record["source"]) == (3, SOURCE)
    to = cli("rollback", "hello", "--to", "2")
    assert "published as revision 4" in to.output
    assert_clean_error(cli("rollback", "hello", "--to", "42"), "no revision 42")
    assert_clean_error(cli("rollback", "ghost"), "no plugin named 'ghost'")


def test_enable_disable_delete(cli: Invoke, plugin_file: Path, sync_db: Database[Doc]) -> None:
    """disable/enable flip the record's flag; delete removes it; unknown names are clear."""
    cli("push", "hello", str(plugin_file))
    assert cli("disable", "hello").exit_code == 0
    assert sync_db.functions.find_one({"_id": "hello"})["enabled"] is False  # type: ignore[index]
    assert cli("enable", "hello").exit_code == 0
    assert sync_db.functions.find_one({"_id": "hello"})["enabled"] is True  # type: ignore[index]
    assert cli("delete", "hello").exit_code == 0
    assert sync_db.functions.find_one({"_id": "hello"}) is None
    for command in ("enable", "disable", "delete"):
        assert_clean_error(cli(command, "hello"), "no plugin named 'hello'", "plugin-host list")


# PyMongo's async monitor can leave the socket of a connect attempt that client.close()
# cancelled to the garbage collector (pymongo/asynchronous/pool.py, not our code): collect
# it here so its ResourceWarning is not blamed on whichever test runs next.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_unreachable_mongodb_is_clear(tmp_path: Path) -> None:
    """A publishing command against a MongoDB that is not there fails with a hint."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = CliRunner().invoke(
        app,
        ["list", "--mongodb-uri", f"mongodb://127.0.0.1:{port}/", "--connect-timeout", "0.2"],
    )
    gc.collect()
    assert_clean_error(result, "is not reachable", "PLUGIN_HOST_MONGODB_URI")


def test_bad_uri_is_clear() -> None:
    """A malformed --mongodb-uri is refused with an example of a good one."""
    result = CliRunner().invoke(app, ["list", "--mongodb-uri", "http://example.com"])
    assert_clean_error(result, "invalid --mongodb-uri", "replicaSet=rs0")


def test_call_errors_are_clear(cli: Invoke) -> None:
    """call refuses bad --args JSON, and says so when no daemon listens at --url."""
    assert_usage_error(cli("call", "greet", "--args", "{nope"), "--args", "not valid JSON")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = cli("call", "greet", "--args", "{}", "--url", f"http://127.0.0.1:{port}")
    assert_clean_error(result, "is not reachable", "plugin-host run")


def test_daemon_option_errors_are_clear(tmp_path: Path) -> None:
    """run and dev refuse a bad --http, --log-format or plugins folder before starting."""
    runner = CliRunner()
    assert_clean_error(runner.invoke(app, ["run", "--http", "localhost"]), "HOST:PORT")
    assert_usage_error(
        runner.invoke(app, ["run", "--log-format", "xml"]), "--log-format", "'json', 'console'"
    )
    missing = str(tmp_path / "none")
    assert_clean_error(runner.invoke(app, ["dev", "--plugins-dir", missing]), "does not exist")


def test_embedded_mongo_command_is_kept() -> None:
    """The embedded-mongo command is still there."""
    result = CliRunner().invoke(app, ["embedded-mongo", "--help"])
    assert result.exit_code == 0
    assert "--data-dir" in result.output


def test_unknown_plugin_is_one_clear_error(cli: Invoke) -> None:
    """show, rollback, enable, disable and delete of a missing plugin name it and suggest list."""
    for args in (("show",), ("rollback",), ("enable",), ("disable",), ("delete",)):
        result = cli(*args, "nope")
        assert_clean_error(result, "no plugin named 'nope'", "plugin-host list")


def test_runtime_failure_exits_1_usage_error_exits_2() -> None:
    """MongoDB unreachable is a runtime failure (exit 1); a bad option is a usage error (2)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    runner = CliRunner()
    down = runner.invoke(
        app,
        ["list", "--mongodb-uri", f"mongodb://127.0.0.1:{port}/", "--connect-timeout", "0.2"],
    )
    assert_clean_error(down, "is not reachable")
    assert down.exit_code == 1
    bad = runner.invoke(app, ["list", "--connect-timeout", "0"])
    assert bad.exit_code == 2
    assert "Invalid value for '--connect-timeout'" in bad.output
