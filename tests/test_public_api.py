"""The public API is exactly what ``__all__`` says."""

from __future__ import annotations

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
        public = {
            name
            for name, value in vars(module).items()
            if not name.startswith("_") and not isinstance(value, types.ModuleType)
        }
        assert public - {"annotations"} == set(module.__all__)


def test_every_public_error_derives_from_the_root() -> None:
    """Each error class the host exports or raises on purpose derives from PluginHostError."""
    import host.daemon
    import host.publish
    import host.trust
    import host.watcher

    modules = (host, host.daemon, host.publish, host.trust, host.watcher)
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
    assert {"WatchFatal", "TrustError", "PublishError", "StartupError"} <= names
    strays = sorted(e.__name__ for e in errors if not issubclass(e, host.PluginHostError))
    assert strays == [], f"errors outside the PluginHostError tree: {strays}"
