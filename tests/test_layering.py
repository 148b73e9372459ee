"""The layering rule: the runtime never imports the surfaces built on top of it.

Why: ``PluginHost`` is a library first. An application embeds it with its own MongoDB
client, its own logging and its own web framework, so the runtime must not pull in the
daemon (Uvicorn, signal handling), the HTTP API (Starlette), the CLI (Typer, rich, logging
set-up) or the publishing tools. Keeping these edges one-way also keeps ``import host``
cheap and lets each surface change without touching the core: the surfaces depend on the
runtime, never the reverse.
"""

from __future__ import annotations

import ast
from pathlib import Path

import host

HOST = Path(host.__file__).parent

SURFACES = frozenset({"cli", "daemon", "http", "metrics", "publish", "devsync", "samples"})
"""Modules (and packages) built on the runtime: they may import it, never the reverse."""

FORBIDDEN = frozenset({"cli", "daemon", "http", "publish"})
"""What no runtime module may import (the issue's rule; metrics/devsync sit on top too)."""


def _runtime_modules() -> list[Path]:
    """The ``host/*.py`` modules that are not surfaces (``host/embedded`` is a separate server)."""
    return sorted(
        path for path in HOST.glob("*.py") if path.stem not in SURFACES and path.stem != "__main__"
    )


def _imported_host_modules(path: Path) -> set[str]:
    """First component under ``host`` of every import in ``path``, lazy ones included."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.level == 0 and node.module and node.module.startswith("host."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("host."):
                    found.add(alias.name.split(".")[1])
    return found


def test_runtime_never_imports_the_surfaces() -> None:
    """No runtime module imports cli, daemon, http or publish, even lazily in a function."""
    modules = _runtime_modules()
    assert {path.stem for path in modules} >= {"runtime", "registry", "dispatch", "compiler"}
    offenders = {
        path.stem: sorted(_imported_host_modules(path) & FORBIDDEN)
        for path in modules
        if _imported_host_modules(path) & FORBIDDEN
    }
    assert offenders == {}, f"runtime modules importing surfaces: {offenders}"


def test_the_rule_sees_an_offending_import(tmp_path: Path) -> None:
    """The checker finds both top-level and lazy imports of a surface (it can fail)."""
    module = tmp_path / "bad.py"
    module.write_text("from .http import create_app\n\ndef f():\n    from .cli import app\n")
    assert _imported_host_modules(module) & FORBIDDEN == {"http", "cli"}
