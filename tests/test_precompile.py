"""Tests for host.precompile: compiling off the loop, declarative top levels on it."""

from __future__ import annotations

import ast
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from pymongo.asynchronous.database import AsyncDatabase

from host import PluginHost
from host.compiler import _gate, compile_plugin, compile_plugins
from host.errors import CompileError
from host.precompile import (
    INLINE_MAX_BRACES,
    INLINE_SOURCE_BYTES,
    CompilerProcesses,
    compiles_inline,
    precompile,
)
from host.precompile_worker import is_declarative
from host.records import PluginRecord
from tests.support import loop_ticks, next_event

pytestmark = pytest.mark.anyio

SLOW_FSTRING = 'x = 1\ns = f"' + "{x}" * 150_000 + '"\n'  # ~450 KB: seconds of compile()


def record(source: str, *, name: str = "p", revision: int = 1) -> PluginRecord:
    """A record built directly (validation is tested in test_records)."""
    return PluginRecord(name=name, source=source, revision=revision)


@pytest.fixture
async def processes() -> AsyncIterator[CompilerProcesses]:
    """Compiler processes with a short compile bound, stopped after the test."""
    pool = CompilerProcesses(compile_timeout=1.0)
    try:
        yield pool
    finally:
        await pool.aclose()


DECLARATIVE = [
    '"""Docstring."""\nasync def main(ctx, args):\n    return 1\n',
    "import json\nfrom os import path\nLIMIT = 5\nNAMES = ('a', {'b': [1, -2.5]})\n"
    "def main(ctx, args, n=3, *, k=None):\n    return json.dumps(args)\n",
    "from __future__ import annotations\ndef main(ctx, args: whatever.Thing = 1) -> X[Y]:\n"
    "    pass\n",
    "def main(ctx: dict[str, int] | None, args: 'Any') -> int:\n    return 0\nx: int = 3\n",
    "pass\n",
]
NOT_DECLARATIVE = [
    "print('hi')\ndef main(ctx, args):\n    return 1\n",  # a call
    "import some_module_that_is_not_loaded_xyz\ndef main(ctx, args):\n    pass\n",
    "from os import not_a_name_in_os\ndef main(ctx, args):\n    pass\n",
    "from json import *\n",  # star import
    "from . import sibling\n",  # relative import
    "@staticmethod\ndef main(ctx, args):\n    pass\n",  # a decorator runs code
    "def main(ctx, args=make()):\n    pass\n",  # a default runs code
    "def main(ctx, args: typing.Any):\n    pass\n",  # an attribute lookup may run code
    "class A:\n    pass\n",  # a class body runs code
    "X = [i for i in range(10)]\n",  # a comprehension runs code
    "X = 10 ** 9\n",  # arithmetic is not a literal
    "while True:\n    pass\n",
    "obj.attr = 1\n",  # an attribute store runs code
]


@pytest.mark.parametrize("source", DECLARATIVE)
def test_declarative_top_levels_are_recognised(source: str) -> None:
    """Docstrings, loaded imports, plain defs and literal assignments are declarative."""
    assert is_declarative(ast.parse(source))


@pytest.mark.parametrize("source", NOT_DECLARATIVE)
def test_top_levels_that_run_code_are_not_declarative(source: str) -> None:
    """Calls, decorators, classes, loops and imports that would load run in a thread."""
    assert not is_declarative(ast.parse(source))


def test_inline_bound_is_size_and_braces() -> None:
    """Only small sources with few braces compile on the loop."""
    assert compiles_inline("x = 1\n")
    assert not compiles_inline("#" * (INLINE_SOURCE_BYTES + 1))
    assert not compiles_inline("{" * (INLINE_MAX_BRACES + 1))


async def test_declarative_version_loads_without_a_thread_hop(
    processes: CompilerProcesses,
) -> None:
    """With every load slot held, a declarative version still loads: no thread is needed."""
    gate = _gate()
    for _ in range(gate.value):
        await gate.acquire()
    try:
        with anyio.fail_after(5):
            plugin = await compile_plugin(
                record("import json\nasync def main(ctx, args):\n    return json.dumps(args)\n"),
                processes=processes,
            )
        assert await plugin.entrypoint(None, [1]) == "[1]"
        with anyio.move_on_after(0.2) as blocked:
            await compile_plugin(
                record("print()\ndef main(ctx, args):\n    pass\n"), processes=processes
            )
        assert blocked.cancelled_caught, "a top level that runs code waited for no thread"
    finally:
        for _ in range(4):
            gate.release()


async def test_large_source_compiles_in_a_process_and_loads(processes: CompilerProcesses) -> None:
    """A source past the inline bound compiles in a compiler process, then serves."""
    padding = "".join(f"K{i} = {{'k': {i}}}\n" for i in range(INLINE_MAX_BRACES + 10))
    source = padding + "async def main(ctx, args):\n    return K3['k'] + K70['k']\n"
    assert not compiles_inline(source)
    pre = await precompile("p", "p@r1", "<plugin p@r1>", source, processes)
    assert (pre.where, pre.declarative) == ("process", True)
    assert pre.code.co_filename == "<plugin p@r1>"
    plugin = await compile_plugin(record(source), processes=processes)
    assert await plugin.entrypoint(None, None) == 73


async def test_syntax_error_from_the_process_names_the_line(processes: CompilerProcesses) -> None:
    """A syntax error found in the compiler process fails the load at stage syntax."""
    source = "#" * INLINE_SOURCE_BYTES + "\ndef main(ctx, args)\n    pass\n"
    with pytest.raises(CompileError) as info:
        await compile_plugin(record(source), processes=processes)
    assert info.value.stage == "syntax"
    assert "line 2" in str(info.value)


async def test_slow_compile_is_stopped_and_the_loop_keeps_running(
    processes: CompilerProcesses,
) -> None:
    """A 450 KB one-f-string source fails at its compile bound; the loop never stalls."""
    async with loop_ticks() as ticks:
        with pytest.raises(CompileError) as info:
            await compile_plugin(record(SLOW_FSTRING), processes=processes)
    assert info.value.stage == "compile"
    assert "within 1 s (compile_timeout" in str(info.value)
    assert ticks.count > 10, "the event loop stalled while the source compiled"
    # The killed process is replaced: the next large source compiles in a new one.
    source = "#" * INLINE_SOURCE_BYTES + "\ndef main(ctx, args):\n    return 2\n"
    plugin = await compile_plugin(record(source), processes=processes)
    assert plugin.entrypoint(None, None) == 2
    assert processes.started == 2


async def test_batch_mixes_inline_process_and_thread_loads(processes: CompilerProcesses) -> None:
    """A batch loads declarative, large and code-running records, and fails each bad one alone."""
    big = "#" * INLINE_SOURCE_BYTES + "\ndef main(ctx, args):\n    return 'big'\n"
    sources: list[Any] = [
        "def main(ctx, args):\n    return 'declarative'\n",
        big,
        "X = sum(range(3))\ndef main(ctx, args):\n    return X\n",
        "def main(ctx, args)\n",
        SLOW_FSTRING,
        "raise ValueError('boom')\n",
    ]
    records = [record(s, name=f"b{i}") for i, s in enumerate(sources)]
    results = await compile_plugins(records, exec_timeout=30.0, processes=processes)
    loaded = [r.entrypoint(None, None) for r in results[:3] if not isinstance(r, CompileError)]
    assert loaded == ["declarative", "big", 3]
    stages = [r.stage for r in results[3:] if isinstance(r, CompileError)]
    assert stages == ["syntax", "compile", "import"]


async def test_host_starts_with_a_slow_compiling_record_in_the_collection(
    db: AsyncDatabase[dict[str, Any]],
) -> None:
    """A record that takes seconds to compile fails alone at start-up; the loop keeps ticking."""
    await db.functions.insert_many(
        [
            {"_id": "huge", "source": SLOW_FSTRING},
            {"_id": "fine", "source": "async def main(ctx, args):\n    return 'ok'\n"},
        ]
    )
    async with (
        loop_ticks() as ticks,
        PluginHost(db, compile_timeout=1.0, wait_ready=False) as host,
        host.events() as events,
    ):
        failed = await next_event(events, "plugin.reload_failed", timeout=30)
        await host.ready(timeout=30)
        assert await host.call("fine") == "ok"
        assert host.current("huge") is None
    assert failed["plugin"] == "huge"
    assert failed["stage"] == "compile"
    assert "within 1 s (compile_timeout" in failed["error"]
    assert ticks.count > 10, "the event loop stalled while the record compiled"
