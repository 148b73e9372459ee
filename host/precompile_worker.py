"""The compiler process, and the rule for top levels that may run on the event loop.

This module uses the standard library only: ``host.precompile`` starts it as a script
(``python -I -S .../precompile_worker.py``), so the child starts in milliseconds and
imports nothing of the host. Each request on stdin is a length-prefixed ``marshal`` of
``(filename, source)``; each reply on stdout is a length-prefixed ``marshal`` of

* ``("ok", code, imports)``: the compiled module code object, and the imports its top
  level needs if it is otherwise declarative (None if it is not; see
  :func:`declarative_imports`). The parent checks those imports against its own
  ``sys.modules``, which is what decides whether importing runs any code there;
* ``("syntax", message, lineno, formatted)``: a ``SyntaxError`` (or ``ValueError``);
* ``("error", message)``: anything else compile raised (``RecursionError``,
  ``MemoryError``).

``marshal`` round-trips code objects between processes of the same interpreter, which
the parent guarantees by starting the child with its own ``sys.executable``. The child
first writes an empty message: it is ready, so its start-up never counts against the
compile bound.
"""

from __future__ import annotations

import ast
import marshal
import struct
import sys
import traceback
from typing import IO, Any

HEADER = struct.Struct("<I")
"""Every message is this 4-byte little-endian length, then that many bytes."""

Imports = list[tuple[str, tuple[str, ...] | None]]
"""``(module, names)`` per import: ``names`` of ``from module import names``, None for
``import module``."""


def is_declarative(tree: ast.Module, modules: Any = None) -> bool:
    """Whether running ``tree``'s top level is provably short and side-effect free.

    Declarative means every top-level statement is one of:

    * a docstring or other constant expression, or ``pass``;
    * ``import a.b`` / ``from a import b`` of modules already in ``sys.modules`` and
      fully initialised, taking names their namespace already holds (a dict lookup: no
      import machinery runs);
    * ``def`` / ``async def`` without decorators, whose defaults are literals and whose
      annotations (when evaluated, i.e. without ``from __future__ import annotations``)
      are constants, names, or subscripts and ``|`` unions of those;
    * an assignment of a literal (:func:`ast.literal_eval`'s grammar) to names.

    Each such statement costs time proportional to its own source text, and none calls
    user code, so executing the whole top level takes microseconds and cannot block: the
    loader runs it on the event loop instead of paying a worker-thread hop. Anything else
    (a class, a decorator, a call, a loop, an import that would load a module) is not
    declarative and runs in a worker thread under the CPU-time bound.

    Args:
        tree: The parsed module.
        modules: The module table imports are checked against (``sys.modules``).

    Returns:
        True if the top level is declarative.
    """
    imports = declarative_imports(tree)
    return imports is not None and imports_loaded(imports, modules)


def declarative_imports(tree: ast.Module) -> Imports | None:
    """The imports of a top level that is declarative apart from them, else None."""
    lazy = any(
        isinstance(node, ast.ImportFrom)
        and node.module == "__future__"
        and any(alias.name == "annotations" for alias in node.names)
        for node in tree.body
    )
    imports: Imports = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            imports.extend((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level or node.module is None or any(a.name == "*" for a in node.names):
                return None
            imports.append((node.module, tuple(alias.name for alias in node.names)))
        elif not _statement(node, lazy):
            return None
    return imports


def imports_loaded(imports: Imports, modules: Any = None) -> bool:
    """Whether every import is a lookup: modules loaded and initialised, names present."""
    table = sys.modules if modules is None else modules
    for module_name, names in imports:
        if not _loaded(table, module_name):
            return False
        if names is not None:
            namespace = vars(table[module_name])
            if not all(name in namespace for name in names):
                return False
    return True


def _statement(node: ast.stmt, lazy: bool) -> bool:
    if isinstance(node, ast.Pass):
        return True
    if isinstance(node, ast.Expr):
        return isinstance(node.value, ast.Constant)
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        return _function(node, lazy)
    if isinstance(node, ast.Assign):
        return all(_names(target) for target in node.targets) and _literal(node.value)
    if isinstance(node, ast.AnnAssign):
        return (
            isinstance(node.target, ast.Name)
            and (node.value is None or _literal(node.value))
            and (lazy or _annotation(node.annotation))
        )
    return False


def _loaded(modules: Any, name: str) -> bool:
    module = modules.get(name)
    if module is None:
        return False
    spec = getattr(module, "__spec__", None)
    return not getattr(spec, "_initializing", False)


def _function(node: ast.FunctionDef | ast.AsyncFunctionDef, lazy: bool) -> bool:
    if node.decorator_list:
        return False
    args = node.args
    defaults = [*args.defaults, *(d for d in args.kw_defaults if d is not None)]
    if not all(_literal(default) for default in defaults):
        return False
    if lazy:
        return True
    every = [*args.posonlyargs, *args.args, *args.kwonlyargs]
    every += [a for a in (args.vararg, args.kwarg) if a is not None]
    annotations = [a.annotation for a in every if a.annotation is not None]
    if node.returns is not None:
        annotations.append(node.returns)
    return all(_annotation(a) for a in annotations)


def _annotation(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant | ast.Name):
        return True
    if isinstance(node, ast.Subscript):
        return _annotation(node.value) and _annotation(node.slice)
    if isinstance(node, ast.Tuple):
        return all(_annotation(e) for e in node.elts)
    if isinstance(node, ast.BinOp):
        return isinstance(node.op, ast.BitOr) and _annotation(node.left) and _annotation(node.right)
    return False


def _names(target: ast.expr) -> bool:
    if isinstance(target, ast.Name):
        return True
    if isinstance(target, ast.Tuple | ast.List):
        return all(_names(e) for e in target.elts)
    return False


def _literal(node: ast.expr) -> bool:
    try:
        ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False
    return True


def compile_source(filename: str, source: str) -> tuple[Any, ...]:
    """Compile ``source``; the reply tuple described in the module docstring."""
    try:
        tree = ast.parse(source, filename)
        code = compile(source, filename, "exec", dont_inherit=True)  # faster than from tree
    except SyntaxError as exc:
        formatted = "".join(traceback.format_exception_only(exc))
        return ("syntax", str(exc.msg), exc.lineno, formatted)
    except ValueError as exc:  # e.g. source code string cannot contain null bytes
        return ("syntax", f"ValueError: {exc}", None, "")
    except (RecursionError, MemoryError) as exc:
        return ("error", f"{type(exc).__name__}: {exc}")
    return ("ok", code, declarative_imports(tree))


def _read(stream: IO[bytes]) -> bytes | None:
    head = stream.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    (size,) = HEADER.unpack(head)
    body = stream.read(size)
    return body if len(body) == size else None


def main() -> None:
    """Say it is ready (an empty message), then serve compile requests until stdin closes."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    stdout.write(HEADER.pack(0))
    stdout.flush()
    while True:
        request = _read(stdin)
        if request is None:
            return
        filename, source = marshal.loads(request)
        reply = marshal.dumps(compile_source(filename, source))
        stdout.write(HEADER.pack(len(reply)) + reply)
        stdout.flush()


if __name__ == "__main__":
    main()
