"""Names of plugin versions: synthetic filenames, module names, and parsing them back.

A version's code is compiled under a synthetic filename (``<plugin greet@r7>``) and runs
in a module named ``plugin_host.plugins.greet.r7_3f9a1c2e``. Tracebacks
(:func:`format_plugin_traceback`) and the loop watchdog (:func:`identify`) recognise
plugin frames by that filename; this module is the one place that knows the format.
"""

from __future__ import annotations

import traceback
from types import TracebackType

from .records import PluginRecord

__all__ = (
    "format_plugin_traceback",
    "identify",
    "is_plugin_file",
    "module_name",
    "plugin_filename",
)

_PLUGIN_FILE_PREFIX = "<plugin "


def plugin_filename(record: PluginRecord) -> str:
    """Return the synthetic filename of a version, e.g. ``<plugin greet@r7>``."""
    if record.revision is None:
        return f"{_PLUGIN_FILE_PREFIX}{record.name}:{record.content_hash}>"
    return f"{_PLUGIN_FILE_PREFIX}{record.name}@r{record.revision}>"


def module_name(record: PluginRecord) -> str:
    """Return the module ``__name__`` of a version, e.g. ``plugin_host.plugins.greet.r7_3f9a1c2e``.

    ``.`` and ``-`` in plugin names become ``_`` so the name reads as one dotted path; the
    module is never registered in ``sys.modules``, so such collisions are harmless.
    """
    safe = record.name.replace(".", "_").replace("-", "_")
    if record.revision is None:
        tag = record.content_hash
    else:
        tag = f"r{record.revision}_{record.content_hash}"
    return f"plugin_host.plugins.{safe}.{tag}"


def is_plugin_file(filename: str) -> bool:
    """Whether ``filename`` is a plugin version's synthetic filename."""
    return filename.startswith(_PLUGIN_FILE_PREFIX)


def format_plugin_traceback(exc: BaseException) -> str:
    """Format ``exc`` starting at the first plugin frame.

    Host frames above the plugin (dispatcher, worker thread) are noise to a plugin author
    and are dropped; frames below (libraries the plugin called) are kept. May read source
    files through :mod:`linecache`, so call it off the event loop.

    Args:
        exc: The exception raised by plugin code.

    Returns:
        The formatted traceback, including chained exceptions.
    """
    tb: TracebackType | None = exc.__traceback__
    start = tb
    while start is not None and not is_plugin_file(start.tb_frame.f_code.co_filename):
        start = start.tb_next
    return "".join(traceback.format_exception(type(exc), exc, start or tb))


def identify(filename: str, module: str) -> tuple[str, str]:
    """Plugin name and version from a plugin file name and its module's ``__name__``.

    ``<plugin greet@r7>`` with module ``plugin_host.plugins.greet.r7_3f9a1c2e`` is
    ``greet@r7:3f9a1c2e``; ``<plugin greet:3f9a1c2e>`` (no revision) is its own version.
    Names never contain ``@`` or ``:`` (see ``host.records``).

    Args:
        filename: A frame's ``co_filename`` (:func:`is_plugin_file` holds).
        module: The frame's ``__name__`` global.

    Returns:
        ``(name, version)``.
    """
    body = filename[len(_PLUGIN_FILE_PREFIX) : -1]
    if "@r" in body:
        name = body.rsplit("@r", 1)[0]
        tag = module.rsplit(".", 1)[-1]
        digest = tag.split("_", 1)[1] if "_" in tag else ""
        return name, f"{body}:{digest}" if digest else body
    return body.split(":", 1)[0], body
