"""Tests for README.md: its Python examples run, so they cannot rot."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from pymongo import AsyncMongoClient

from host import PluginHost
from host.embedded import EmbeddedMongoThread
from host.publish import publish

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


@pytest.fixture(scope="module")
def readme_uri() -> Iterator[str]:
    """A private embedded server: README examples use the `app` database freely."""
    with EmbeddedMongoThread(port=0) as server:
        yield server.uri


def test_readme_has_python_examples() -> None:
    """The README carries runnable Python examples (scripts and at least one plugin)."""
    assert sum("asyncio.run(" in block for block in BLOCKS) >= 3
    assert any("asyncio.run(" not in block for block in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index: int, readme_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each ```python block runs: scripts against MONGODB_URI, plugins through a real host."""
    block = BLOCKS[index]
    monkeypatch.setenv("MONGODB_URI", readme_uri)
    if "asyncio.run(" in block:
        code = compile(block, f"<README.md python block {index}>", "exec")
        exec(code, {"__name__": f"readme_{index}"})
        return

    async def as_plugin() -> None:
        client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(readme_uri)
        try:
            db = client[f"readme_plugin_{index}"]
            await publish(db, "example", block)
            async with PluginHost(db) as host:
                assert host.plugin("example").status == "serving"  # type: ignore[union-attr]
                await host.call("example", {"firstName": "Ada", "lastName": "Lovelace"})
            await client.drop_database(db.name)
        finally:
            await client.close()

    asyncio.run(as_plugin())


COMMANDS = re.findall(r"^\$ plugin-host (.+)$", README.read_text(), flags=re.M)


def _parse_command_line(line: str) -> None:
    """Parse ``plugin-host LINE`` as the CLI would, without running it (raises if wrong)."""
    import shlex

    import typer.core
    import typer.main

    from host.cli import app

    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    args = shlex.split(line, comments=True)
    name, command, rest = group.resolve_command(typer.Context(group), args)
    assert command is not None and name is not None, line
    command.make_context(name, rest)


def test_readme_cli_commands_parse() -> None:
    """Every `$ plugin-host ...` line of the README names a real command and real options."""
    assert len(COMMANDS) >= 8
    for line in COMMANDS:
        _parse_command_line(line)
    with pytest.raises(Exception, match="No such option: --stepz"):  # the check can fail
        _parse_command_line("rollout greet --stepz 5,25")
