"""The public API is exactly what ``__all__`` says."""

from __future__ import annotations

import subprocess
import sys

import host
import host.embedded


def test_all_names_exist() -> None:
    """Every name in ``host.__all__`` and ``host.embedded.__all__`` is importable."""
    for module in (host, host.embedded):
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name} is in __all__ but missing"


def test_nothing_public_by_accident() -> None:
    """Public attributes of ``host`` and ``host.embedded`` are exactly their ``__all__``."""
    import types

    for module in (host, host.embedded):
        for name in module.__all__:  # load the lazily imported names first
            getattr(module, name)
        public = {
            name
            for name, value in vars(module).items()
            if not name.startswith("_") and not isinstance(value, types.ModuleType)
        }
        assert public - {"annotations"} == set(module.__all__)


def test_every_public_error_derives_from_the_root() -> None:
    """Each error class the host exports or raises on purpose derives from PluginHostError."""
    import host.daemon
    import host.fleetview
    import host.publish
    import host.trust
    import host.watcher

    modules = (host, host.daemon, host.fleetview, host.publish, host.trust, host.watcher)
    errors = {
        value
        for module in modules
        for name, value in vars(module).items()
        if not name.startswith("_")
        and isinstance(value, type)
        and issubclass(value, Exception)
        and value.__module__.startswith("host")  # not what they import from libraries
    }
    names = {error.__name__ for error in errors}
    assert {"WatchFatal", "TrustError", "PublishError", "StartupError", "FleetRefused"} <= names
    strays = sorted(e.__name__ for e in errors if not issubclass(e, host.PluginHostError))
    assert strays == [], f"errors outside the PluginHostError tree: {strays}"


def test_import_host_stays_light() -> None:
    """``import host`` and ``plugin-host --help`` import no database, async or HTTP library.

    The CLI starts on every invocation; ``--help``, ``keygen`` and ``call`` must not pay
    for PyMongo, anyio, Starlette or Uvicorn (the figure is in the bench: ``cli_startup``).
    """
    heavy = ("pymongo", "anyio", "starlette", "uvicorn", "cryptography", "rich")
    probe = f"import sys, host, host.cli; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "", f"imported at start-up: {done.stdout.strip()}"
    helped = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys, runpy; sys.argv = ['plugin-host', '--help']\n"
            f"try:\n    runpy.run_module('host.cli', run_name='__main__')\n"
            f"except SystemExit:\n    pass\n"
            f"print('LOADED:' + ','.join(m for m in {heavy!r}[:5] if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert "Usage: plugin-host" in helped.stdout
    assert helped.stdout.rstrip().endswith("LOADED:"), helped.stdout[-200:]
