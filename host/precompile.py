"""Source to code object without stalling the event loop: inline when provably cheap,
else in a compiler process.

Design note. ``compile()`` holds the GIL for its whole run and cannot be interrupted,
and CPython's compile time grows quadratically with the placeholders of one f-string (a
450 KB one took 17 s). Compiling in a worker *thread* does not help: the loop waits for
the GIL all that time. So:

* A source of at most :data:`INLINE_SOURCE_BYTES` with at most :data:`INLINE_MAX_BRACES`
  ``{`` characters compiles on the loop: the quadratic case needs many placeholders in
  one literal, and below both marks a compile takes well under a millisecond. The loop
  then pays no hop at all, which is what keeps a reload ahead of busy callers (each hop
  costs event-loop turns, and each turn one step of every runnable caller).
* Anything else compiles in a compiler process (:class:`CompilerProcesses`, started from
  ``host/precompile_worker.py`` with this interpreter, stdlib only), which sends the code
  object back with :mod:`marshal`. A compile that overruns ``compile_timeout`` fails that
  record with ``stage="compile"``; its process is killed (the only way to stop
  ``compile()``) and a fresh one serves the next request.

Either way the result says whether the top level is *declarative*
(:func:`host.precompile_worker.is_declarative`): imports of loaded modules, plain
``def`` s and literal assignments. Such a top level runs on the loop in microseconds; any
other runs in a worker thread under the CPU-time bound (``host.compiler``).
"""

from __future__ import annotations

import ast
import marshal
import subprocess
import sys
import time
import traceback
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from .errors import CompileError
from .precompile_worker import HEADER, imports_loaded, is_declarative

__all__ = (
    "INLINE_MAX_BRACES",
    "INLINE_SOURCE_BYTES",
    "CompilerProcesses",
    "Precompiled",
    "compiles_inline",
    "precompile",
    "precompile_now",
    "syntax_error",
)

INLINE_SOURCE_BYTES = 4096
"""Largest source (in characters) compiled on the event loop."""
INLINE_MAX_BRACES = 64
"""Most ``{`` characters a source compiled on the event loop may hold."""

_WORKER = Path(__file__).with_name("precompile_worker.py")
_START_TIMEOUT = 30.0  # a compiler process must say it is ready within this (busy machines)


@dataclass(frozen=True, slots=True)
class Precompiled:
    """A compiled source.

    Attributes:
        code: The module's code object.
        declarative: Its top level may run on the event loop (see the module docstring).
        where: ``"loop"`` or ``"process"``: where it was compiled.
        seconds: Wall time the compile took, as the loader saw it.
    """

    code: types.CodeType
    declarative: bool
    where: str
    seconds: float


def compiles_inline(source: str) -> bool:
    """Whether ``source`` is small and simple enough to compile on the event loop."""
    return len(source) <= INLINE_SOURCE_BYTES and source.count("{") <= INLINE_MAX_BRACES


def syntax_error(name: str, version: str, exc: SyntaxError) -> CompileError:
    """The ``stage="syntax"`` error for ``exc``: its line, message and excerpt."""
    where = f"line {exc.lineno}: " if exc.lineno is not None else ""
    return CompileError(
        name,
        version,
        "syntax",
        f"{where}{exc.msg}",
        "".join(traceback.format_exception_only(exc)),
    )


async def precompile(
    name: str,
    version: str,
    filename: str,
    source: str,
    processes: CompilerProcesses | None,
) -> Precompiled:
    """Compile ``source`` on the loop if :func:`compiles_inline`, else in a process.

    Args:
        name: The plugin name (for errors).
        version: The version string (for errors).
        filename: The synthetic filename the code object carries.
        source: The source.
        processes: The compiler processes; None compiles everything on the loop (only
            for callers that run off the loop, such as tests of the compiler itself).

    Returns:
        The code object and whether its top level is declarative.

    Raises:
        CompileError: ``stage="syntax"`` for invalid source, ``stage="compile"`` when
            compiling overran its bound or the compiler process failed.
    """
    if processes is None or compiles_inline(source):
        return precompile_now(name, version, filename, source)
    started = time.perf_counter()
    reply = await processes.run(name, version, filename, source)
    kind = reply[0]
    if kind == "ok":
        code, imports = reply[1], reply[2]
        declarative = imports is not None and imports_loaded(imports)
        return Precompiled(code, declarative, "process", time.perf_counter() - started)
    if kind == "syntax":
        _, message, lineno, formatted = reply
        where = f"line {lineno}: " if lineno is not None else ""
        raise CompileError(name, version, "syntax", f"{where}{message}", str(formatted or ""))
    raise CompileError(name, version, "syntax", str(reply[1]))


def precompile_now(name: str, version: str, filename: str, source: str) -> Precompiled:
    """Compile ``source`` on the calling thread (the loop): for :func:`compiles_inline`
    sources, which compile in well under a millisecond.

    Args:
        name: The plugin name (for errors).
        version: The version string (for errors).
        filename: The synthetic filename the code object carries.
        source: The source.

    Returns:
        The code object and whether its top level is declarative.

    Raises:
        CompileError: ``stage="syntax"`` for invalid source.
    """
    started = time.perf_counter()
    try:
        # Parsed once: the tree serves the declarative check and the compile. Measured
        # on CPython 3.11 (best of 7, interleaved): parse + compile(tree) 32 us against
        # parse + compile(source) 39 us for a two-line plugin, 683 against 799 us at
        # 1.2 KB, even at 3.5 KB; the code objects are identical (marshal), and so are
        # the compiler's SyntaxErrors. Large sources compile in the worker process.
        tree = ast.parse(source, filename)
        code = compile(tree, filename, "exec", dont_inherit=True)
    except SyntaxError as exc:
        raise syntax_error(name, version, exc) from exc
    except (ValueError, RecursionError, MemoryError) as exc:
        raise CompileError(name, version, "syntax", f"{type(exc).__name__}: {exc}") from exc
    return Precompiled(code, is_declarative(tree), "loop", time.perf_counter() - started)


class _Worker:
    """One compiler process and its pipes."""

    def __init__(self, process: Process) -> None:
        self.process = process
        assert process.stdin is not None and process.stdout is not None
        self.stdin = process.stdin
        self.stdout = BufferedByteReceiveStream(process.stdout)

    async def request(self, filename: str, source: str) -> tuple[Any, ...]:
        payload = marshal.dumps((filename, source))
        await self.stdin.send(HEADER.pack(len(payload)) + payload)
        (size,) = HEADER.unpack(await self.stdout.receive_exactly(HEADER.size))
        reply = marshal.loads(await self.stdout.receive_exactly(size))
        assert isinstance(reply, tuple)
        return reply

    async def kill(self) -> None:
        with anyio.CancelScope(shield=True):
            if self.process.returncode is None:
                self.process.kill()
            await self.process.wait()
            await self.process.aclose()


class CompilerProcesses:
    """Up to ``max_processes`` compiler processes, started on first use.

    Invariant: a process is in ``_idle`` only between requests, with nothing unread on
    its pipes; a process whose request did not complete (overrun, cancellation, a crash)
    is killed and never reused. ``_slots`` bounds the processes alive at once.

    Args:
        compile_timeout: Seconds one compile may take before its process is killed.
        max_processes: Compiler processes alive at most.
    """

    def __init__(self, *, compile_timeout: float = 10.0, max_processes: int = 2) -> None:
        if compile_timeout <= 0:
            raise ValueError(f"compile_timeout must be > 0, got {compile_timeout}")
        self.compile_timeout = compile_timeout
        self._slots = anyio.Semaphore(max_processes)
        self._idle: list[_Worker] = []
        self._closed = False
        self.started = 0
        """Processes started so far (a killed one is replaced by a new start)."""

    async def run(self, name: str, version: str, filename: str, source: str) -> tuple[Any, ...]:
        """Compile in a process; the worker's reply tuple (see ``precompile_worker``).

        Raises:
            CompileError: ``stage="compile"`` if the compile overran ``compile_timeout``
                or the process failed.
        """
        async with self._slots:
            if self._closed:
                raise CompileError(name, version, "compile", "the host is closing")
            if self._idle:
                worker = self._idle.pop()
            else:
                try:
                    worker = await self._start()
                except Exception as exc:
                    raise CompileError(
                        name,
                        version,
                        "compile",
                        f"cannot start a compiler process ({type(exc).__name__}: {exc})",
                    ) from exc
            try:
                with anyio.move_on_after(self.compile_timeout) as scope:
                    reply = await worker.request(filename, source)
            except BaseException as exc:
                await worker.kill()
                if isinstance(exc, Exception):
                    raise CompileError(
                        name,
                        version,
                        "compile",
                        f"the compiler process failed ({type(exc).__name__}: {exc}; "
                        f"exit status {worker.process.returncode})",
                    ) from exc
                raise
            if scope.cancelled_caught:
                await worker.kill()
                raise CompileError(
                    name,
                    version,
                    "compile",
                    f"compiling the source did not finish within {self.compile_timeout:g} s "
                    "(compile_timeout; its compiler process was stopped)",
                )
            if self.closed:  # closed while this compile ran
                await worker.kill()
            else:
                self._idle.append(worker)
            return reply

    @property
    def closed(self) -> bool:
        """:meth:`aclose` was called."""
        return self._closed

    async def _start(self) -> _Worker:
        process = await anyio.open_process(
            [sys.executable, "-I", "-S", str(_WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.started += 1
        worker = _Worker(process)
        try:
            with anyio.fail_after(_START_TIMEOUT):
                (size,) = HEADER.unpack(await worker.stdout.receive_exactly(HEADER.size))
            if size != 0:
                raise RuntimeError(f"the compiler process said {size!r} instead of ready")
        except BaseException:
            await worker.kill()
            raise
        return worker

    async def aclose(self) -> None:
        """Stop every idle process; busy ones stop when their request ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        for worker in idle:
            with anyio.CancelScope(shield=True):
                await worker.stdin.aclose()
            await worker.kill()
