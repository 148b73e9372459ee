"""The browser console: static files shipped in the package, served by the daemon.

``GET /`` and ``GET /console`` serve ``index.html``; ``GET /console/<file>`` the modules and
the style sheet next to it. They hold no data, so they stay open when the daemon requires
a token; the page asks for the token once and sends it on every data route (``/functions``,
``/fleet``, ``/stats``, ``/triggers``, ``/events``). No build step and no CDN: plain HTML,
CSS and ES modules, read from the installed package.
"""

from __future__ import annotations

from importlib import resources

import anyio

__all__ = ("CONFIG_PATH", "CONSOLE_PATHS", "SECURITY_HEADERS", "STATIC_FILES", "static_file")

STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "charts.js": "text/javascript; charset=utf-8",
    "panels.js": "text/javascript; charset=utf-8",
    "util.js": "text/javascript; charset=utf-8",
}
"""Every file of the console and its ``Content-Type`` (nothing else is served)."""

CONFIG_PATH = "/console/config.json"
"""Open: ``{"auth_required": bool}``, so the page asks for the token before any data route."""

CONSOLE_PATHS = ("/", "/console", CONFIG_PATH, *(f"/console/{name}" for name in STATIC_FILES))
"""The console's paths: open routes (they hold no data)."""

SECURITY_HEADERS = {
    # Everything comes from this origin; inline SVG is built through the DOM, so no
    # 'unsafe-inline' is needed; the page cannot be framed (clickjacking its buttons).
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
"""Headers sent with every console file."""

_cache: dict[str, bytes] = {}  # read once per process, on the first request (in a thread)


def _read(name: str) -> bytes:
    return resources.files(__name__).joinpath(name).read_bytes()


async def static_file(name: str) -> tuple[bytes, str] | None:
    """The content and ``Content-Type`` of one console file, or None if it is not one.

    Args:
        name: The file name (``app.js``...).

    Returns:
        ``(content, content type)``, or None for a name that is not a console file.
    """
    media = STATIC_FILES.get(name)
    if media is None:
        return None
    content = _cache.get(name)
    if content is None:
        content = _cache[name] = await anyio.to_thread.run_sync(_read, name)
    return content, media
