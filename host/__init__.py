"""plugin-host: a live-reloading Python plugin runtime driven by MongoDB change streams."""

from __future__ import annotations

from .context import Context as Context
from .errors import CompileError as CompileError
from .errors import HostClosed as HostClosed
from .errors import PluginBusy as PluginBusy
from .errors import PluginError as PluginError
from .errors import PluginFailed as PluginFailed
from .errors import PluginNotFound as PluginNotFound
from .errors import PluginTimeout as PluginTimeout
from .errors import RecordError as RecordError
from .errors import RequireDepthExceeded as RequireDepthExceeded
from .events import HostEvent as HostEvent
from .fleet import StatusReporting as StatusReporting
from .loader import PluginInfo as PluginInfo
from .records import PluginRecord as PluginRecord
from .records import parse_record as parse_record
from .runtime import PluginHost as PluginHost
from .watcher import WatchFatal as WatchFatal

__all__ = (
    "CompileError",
    "Context",
    "HostClosed",
    "HostEvent",
    "PluginBusy",
    "PluginError",
    "PluginFailed",
    "PluginHost",
    "PluginInfo",
    "PluginNotFound",
    "PluginRecord",
    "PluginTimeout",
    "RecordError",
    "RequireDepthExceeded",
    "StatusReporting",
    "WatchFatal",
    "parse_record",
)
