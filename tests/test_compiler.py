"""Tests for host.compiler: turning records into isolated, loaded plugin versions."""

from __future__ import annotations

import linecache
import marshal
import sys
import types
from typing import Any

import anyio
import pytest

from host.compiler import _LOAD_THREADS, _SLOW_LOADS, compile_plugin, load_now
from host.errors import CompileError
from host.naming import format_plugin_traceback, plugin_filename
from host.plugin import Phase, Plugin
from host.precompile import INLINE_SOURCE_BYTES, Precompiled, precompile_now
from host.records import PluginRecord
from tests.support import PROBE, loop_ticks


def record(
    source: str, *, name: str = "greet", revision: int | None = 7, **kw: Any
) -> PluginRecord:
    """Build a record directly (validation is tested in test_records)."""
    return PluginRecord(name=name, source=source, revision=revision, **kw)


async def load(rec: PluginRecord, **kw: Any) -> Plugin:
    """compile_plugin with a generous default load bound (busy CI machines)."""
    kw.setdefault("exec_timeout", 30.0)
    return await compile_plugin(rec, **kw)


async def load_error(source: str, **kw: Any) -> CompileError:
    """Compile ``source`` and return the CompileError it must raise."""
    with pytest.raises(CompileError) as info:
        await load(record(source), **kw)
    return info.value


@pytest.mark.anyio
async def test_each_version_gets_a_fresh_private_module() -> None:
    """Two compiles of one record never share a module, and neither is in sys.modules."""
    source = (
        "COUNTER = []\ndef main(ctx, args):\n    COUNTER.append(args)\n    return len(COUNTER)\n"
    )
    first = await load(record(source))
    second = await load(record(source))
    assert first.module is not second.module
    assert first.module.__name__ == f"plugin_host.plugins.greet.r7_{first.record.content_hash}"
    assert first.module.__name__ not in sys.modules
    assert "greet" not in sys.modules
    assert first.entrypoint(None, "x") == 1
    assert second.entrypoint(None, "y") == 1  # its own COUNTER
    assert first.phase is Phase.LOADED
    assert first.compile_ms >= 0.0


@pytest.mark.anyio
async def test_names_without_revision_use_the_content_hash() -> None:
    """Without a revision the filename and module name carry the content hash."""
    plugin = await load(record("def main(ctx, a): pass\n", name="my-fn", revision=None))
    digest = plugin.record.content_hash
    assert plugin.filename == f"<plugin my-fn:{digest}>"
    assert plugin.module.__name__ == f"plugin_host.plugins.my_fn.{digest}"
    assert plugin.version == f"my-fn:{digest}"


@pytest.mark.anyio
async def test_traceback_shows_plugin_filename_and_source_line() -> None:
    """A failure inside plugin code formats with <plugin greet@r7> and the source text."""
    source = "def main(ctx, args):\n    value = args['missing']  # the failing line\n"
    plugin = await load(record(source))
    with pytest.raises(KeyError) as info:
        plugin.entrypoint(None, {})
    text = format_plugin_traceback(info.value)
    assert 'File "<plugin greet@r7>", line 2, in main' in text
    assert "value = args['missing']  # the failing line" in text
    assert "test_compiler.py" not in text  # host frames above the plugin are trimmed


@pytest.mark.anyio
async def test_syntax_error_reports_stage_and_line() -> None:
    """A syntax error fails with stage 'syntax' and the line number in the message."""
    error = await load_error("def main(ctx, args):\n    return 1\n\nx = (\n")
    assert error.stage == "syntax"
    assert "line 4" in str(error)
    assert "greet@r7" in str(error)
    assert "x = (" in error.traceback


@pytest.mark.anyio
async def test_import_of_missing_module_fails_at_import() -> None:
    """Importing a module that does not exist fails with stage 'import' and its line."""
    error = await load_error("import plugin_host_no_such_module_xyz\n")
    assert error.stage == "import"
    assert "ModuleNotFoundError" in str(error)
    assert 'File "<plugin greet@r7>", line 1' in error.traceback
    assert "import plugin_host_no_such_module_xyz" in error.traceback


@pytest.mark.anyio
async def test_exception_at_import_carries_plugin_traceback() -> None:
    """An exception in top-level code fails with stage 'import' and its cause."""
    error = await load_error("X = 1\nraise RuntimeError('bad config')\n")
    assert error.stage == "import"
    assert "RuntimeError: bad config" in str(error)
    assert "raise RuntimeError('bad config')" in error.traceback
    assert isinstance(error.__cause__, RuntimeError)


@pytest.mark.anyio
async def test_system_exit_at_import_does_not_stop_the_host() -> None:
    """sys.exit() in top-level code is a load failure, not a host exit."""
    error = await load_error("import sys\nsys.exit(3)\n")
    assert error.stage == "import"
    assert "SystemExit" in str(error)


@pytest.mark.anyio
async def test_infinite_loop_at_import_is_bounded_and_interrupted(
    probe: types.SimpleNamespace,
) -> None:
    """`while True: pass` at import times out, the loop keeps running, the thread stops."""
    source = (
        f"import {PROBE}\n"
        "try:\n"
        "    while True:\n"
        "        pass\n"
        "finally:\n"
        f"    {PROBE}.stopped.set()\n"
    )
    async with loop_ticks() as ticks:
        error = await load_error(source, exec_timeout=0.2)
    assert error.stage == "timeout"
    assert "0.2 s" in str(error)
    assert ticks.count > 1, "the event loop was blocked while the top level ran"
    stopped = await anyio.to_thread.run_sync(probe.stopped.wait, 30)
    assert stopped, "the runaway thread was not interrupted"


@pytest.mark.anyio
async def test_blocking_c_call_at_import_is_abandoned(probe: types.SimpleNamespace) -> None:
    """A top level blocked in C times out on time; its thread is abandoned, not joined."""
    source = f"import {PROBE}\ntry:\n    {PROBE}.gate.wait()\nfinally:\n    {PROBE}.stopped.set()\n"
    async with loop_ticks() as ticks:
        error = await load_error(source, exec_timeout=0.2)
    assert error.stage == "timeout"
    assert ticks.count > 1
    assert not probe.stopped.is_set(), "the thread is still blocked in C"
    probe.gate.set()
    assert await anyio.to_thread.run_sync(probe.stopped.wait, 30)


@pytest.mark.anyio
async def test_abandoned_load_threads_keep_their_slot(probe: types.SimpleNamespace) -> None:
    """Loads blocked in C hold their load thread until it ends; then loads fail as busy."""
    entered: list[str] = []
    vars(sys.modules[PROBE])["enter"] = entered.append  # list.append is atomic under the GIL
    errors: list[CompileError] = []

    async def one(n: int) -> None:
        source = f"import {PROBE}\n{PROBE}.enter({n!r})\n{PROBE}.gate.wait()\n"
        errors.append(await load_error(source, exec_timeout=0.05))

    slots = _LOAD_THREADS + _SLOW_LOADS  # the load threads, slow records' included
    async with anyio.create_task_group() as tg:
        for n in range(slots + 2):
            tg.start_soon(one, n)
    stages = sorted(error.stage for error in errors)
    assert stages == ["busy"] * 2 + ["timeout"] * slots
    assert len(entered) == slots, f"only the {slots} load threads ever ran top-level code"
    busy = next(error for error in errors if error.stage == "busy")
    assert f"all {slots} worker threads are held by abandoned calls" in busy.reason


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("def other(ctx, args): pass\n", "entrypoint 'main' is not defined"),
        ("main = 42\n", "entrypoint 'main' is not callable (it is a int)"),
        ("def main(ctx, args):\n    yield 1\n", "is a generator function"),
        ("async def main(ctx, args):\n    yield 1\n", "is a generator function"),
        ("def main(ctx, args): pass\nsetup = 'nope'\n", "hook 'setup' is not callable"),
    ],
)
async def test_bad_entrypoint_or_hook_is_rejected(source: str, reason: str) -> None:
    """A missing, non-callable or generator entrypoint, or a bad hook, fails 'entrypoint'."""
    error = await load_error(source)
    assert error.stage == "entrypoint"
    assert reason in str(error)


@pytest.mark.anyio
async def test_custom_entrypoint_name_is_used() -> None:
    """The record's entrypoint names the function that is called."""
    plugin = await load(record("def handle(ctx, args):\n    return 'h'\n", entrypoint="handle"))
    assert plugin.entrypoint(None, None) == "h"


@pytest.mark.anyio
async def test_async_and_sync_entrypoints_and_hooks_are_detected() -> None:
    """async def entrypoints are flagged async; setup/teardown hooks are found."""
    async_plugin = await load(
        record("async def main(ctx, args): pass\nasync def setup(ctx): pass\n")
    )
    sync_plugin = await load(record("def main(ctx, args): pass\ndef teardown(ctx): pass\n"))
    assert async_plugin.is_async is True
    assert async_plugin.setup is not None
    assert async_plugin.teardown is None
    assert sync_plugin.is_async is False
    assert sync_plugin.setup is None
    assert sync_plugin.teardown is not None


@pytest.mark.anyio
async def test_max_concurrency_creates_a_limiter() -> None:
    """A record's max_concurrency (or the default passed in) creates a version limiter."""
    limited = await load(record("def main(ctx, a): pass\n", max_concurrency=3))
    defaulted = await load(record("def main(ctx, a): pass\n"), default_max_concurrency=2)
    unlimited = await load(record("def main(ctx, a): pass\n"))
    assert limited.limiter is not None and limited.limiter.value == 3
    assert defaulted.limiter is not None and defaulted.limiter.value == 2
    assert unlimited.limiter is None


@pytest.mark.anyio
async def test_release_drops_code_and_linecache_entry() -> None:
    """release() forgets the module, hooks, state and the linecache entry."""
    plugin = await load(record("def main(ctx, a): pass\ndef setup(ctx): pass\n"))
    assert linecache.getline(plugin.filename, 1) == "def main(ctx, a): pass\n"
    module = plugin.module
    plugin.state = object()
    plugin.release()
    assert plugin.released
    assert plugin.module is not module
    assert plugin.setup is None and plugin.state is None
    assert plugin.filename not in linecache.cache
    assert plugin.phase is Phase.RETIRED
    await plugin.wait_retired()  # already set: returns at once


@pytest.mark.anyio
async def test_release_keeps_a_newer_versions_linecache_entry() -> None:
    """Retiring an old version never removes lines registered by a newer one."""
    old = await load(record("def main(ctx, a):\n    return 'old'\n"))
    new = await load(record("def main(ctx, a):\n    return 'new'\n"))
    assert old.filename == new.filename
    old.release()
    assert linecache.getline(new.filename, 2) == "    return 'new'\n"
    new.release()
    assert new.filename not in linecache.cache


@pytest.mark.anyio
async def test_failed_load_leaves_no_linecache_entry() -> None:
    """A version that fails to load does not leave its lines registered."""
    with pytest.raises(CompileError):
        await load(record("raise ValueError('x')\n", name="failing-load"))
    assert "<plugin failing-load@r7>" not in linecache.cache


def test_load_now_loads_a_declarative_record_without_an_await() -> None:
    """load_now compiles and runs a declarative top level on the calling thread."""
    rec = record(
        "import math\nLIMIT = 3\nasync def main(ctx, args):\n    return math.floor(2.5)\n",
        max_concurrency=2,
    )
    plugin = load_now(rec)
    assert isinstance(plugin, Plugin)
    assert plugin.phase is Phase.LOADED and plugin.is_async and plugin.setup is None
    assert plugin.module.LIMIT == 3
    assert plugin.limiter is not None and plugin.loaded_at is not None
    assert linecache.getline(plugin.filename, 2) == "LIMIT = 3\n"
    plugin.release()


@pytest.mark.anyio
async def test_load_now_leaves_running_code_and_large_sources_to_compile_plugin() -> None:
    """A top level that runs code comes back compiled, not run; a large source not at all."""
    rec = record("X = sum(range(4))\nasync def main(ctx, args):\n    return X\n")
    pre = load_now(rec)
    assert isinstance(pre, Precompiled) and not pre.declarative and pre.where == "loop"
    plugin = await load(rec, precompiled=pre)
    assert plugin.module.X == 6
    plugin.release()
    large = "# " + "x" * INLINE_SOURCE_BYTES + "\nasync def main(ctx, args):\n    return 1\n"
    assert load_now(record(large)) is None


def test_load_now_raises_the_errors_compile_plugin_raises() -> None:
    """Syntax errors and a missing entrypoint fail as CompileError, leaving nothing behind."""
    with pytest.raises(CompileError) as syntax:
        load_now(record("async def main(ctx, args):\n    return (\n"))
    assert syntax.value.stage == "syntax"
    rec = record("async def other(ctx, args):\n    return 1\n", name="gone")
    with pytest.raises(CompileError) as missing:
        load_now(rec)
    assert missing.value.stage == "entrypoint"
    assert linecache.getline(plugin_filename(rec), 1) == ""


def test_precompile_now_parses_once_and_compiles_the_same_code() -> None:
    """The tree-compiled code object is the one compiling the source gives."""
    source = (
        "from __future__ import annotations\nimport math\n"
        "def area(r: float) -> float:\n    return math.pi * r * r\n"
        "async def main(ctx, args):\n    return [area(x) for x in args]\n"
    )
    pre = precompile_now("greet", "greet@r7", "<plugin greet@r7>", source)
    assert pre.declarative
    expected = compile(source, "<plugin greet@r7>", "exec", dont_inherit=True)
    assert marshal.dumps(pre.code) == marshal.dumps(expected)
