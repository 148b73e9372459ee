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
