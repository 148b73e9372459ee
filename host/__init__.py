"""plugin-host: a live-reloading Python plugin runtime driven by MongoDB change streams."""

from __future__ import annotations

__all__: tuple[str, ...] = ()
