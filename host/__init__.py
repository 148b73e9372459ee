"""plugin-host: a live-reloading Python plugin runtime driven by MongoDB change streams.

The public names load on first access (PEP 562): ``import host`` alone, as the CLI does
for ``plugin-host --help``, imports none of PyMongo, anyio or Starlette.
"""

from __future__ import annotations

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:
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
    from .errors import VersionNotLive as VersionNotLive
    from .events import HostEvent as HostEvent
    from .fleet import StatusReporting as StatusReporting
    from .loader import PluginInfo as PluginInfo
    from .loader import RecordVerifier as RecordVerifier
    from .records import PluginRecord as PluginRecord
    from .records import RolloutPolicy as RolloutPolicy
    from .records import parse_record as parse_record
    from .runtime import PluginHost as PluginHost
    from .trust import TrustedKeys as TrustedKeys
    from .trust import TrustError as TrustError
    from .watcher import WatchFatal as WatchFatal

_EXPORTS = {
    "Limits": ".config",
    "Timeouts": ".config",
    "Context": ".context",
    "CompileError": ".errors",
    "HostClosed": ".errors",
    "PluginBusy": ".errors",
    "PluginError": ".errors",
    "PluginFailed": ".errors",
    "PluginHostError": ".errors",
    "PluginNotFound": ".errors",
    "PluginTimeout": ".errors",
    "RecordError": ".errors",
    "RequireDepthExceeded": ".errors",
    "VersionNotLive": ".errors",
    "HostEvent": ".events",
    "StatusReporting": ".fleet",
    "PluginInfo": ".loader",
    "RecordVerifier": ".loader",
    "PluginRecord": ".records",
    "RolloutPolicy": ".records",
    "parse_record": ".records",
    "PluginHost": ".runtime",
    "TrustedKeys": ".trust",
    "TrustError": ".trust",
    "WatchFatal": ".watcher",
}
"""Public name -> the module (relative to ``host``) that defines it."""

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
    "RolloutPolicy",
    "StatusReporting",
    "Timeouts",
    "TrustError",
    "TrustedKeys",
    "VersionNotLive",
    "WatchFatal",
    "parse_record",
)


def __getattr__(name: str) -> _typing.Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'host' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
