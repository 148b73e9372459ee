"""plugin-host: a live-reloading Python plugin runtime driven by MongoDB change streams."""

from __future__ import annotations

from .config import Limits as Limits
from .config import Timeouts as Timeouts
from .context import Context as Context
from .errors import CompileError as CompileError
from .errors import HostClosed as HostClosed
from .errors import PluginBusy as PluginBusy
from .errors import PluginError as PluginError
from .errors import PluginFailed as PluginFailed
from .errors import PluginHostError as PluginHostError
from .errors import PluginNotFound as PluginNotFound
from .errors import PluginTimeout as PluginTimeout
from .errors import RecordError as RecordError
from .errors import RequireDepthExceeded as RequireDepthExceeded
from .events import HostEvent as HostEvent
from .loader import PluginInfo as PluginInfo
from .loader import RecordVerifier as RecordVerifier
from .records import PluginRecord as PluginRecord
from .records import parse_record as parse_record
from .runtime import PluginHost as PluginHost
from .trust import TrustedKeys as TrustedKeys
from .trust import TrustError as TrustError
from .watcher import WatchFatal as WatchFatal

__all__ = (
    "CompileError",
    "Context",
    "HostClosed",
    "HostEvent",
    "Limits",
    "PluginBusy",
    "PluginError",
    "PluginFailed",
    "PluginHost",
    "PluginHostError",
    "PluginInfo",
    "PluginNotFound",
    "PluginRecord",
    "PluginTimeout",
    "RecordError",
    "RecordVerifier",
    "RequireDepthExceeded",
    "Timeouts",
    "TrustError",
    "TrustedKeys",
    "WatchFatal",
    "parse_record",
)
