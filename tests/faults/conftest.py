"""Fault-injection fixtures, and ``--soak``: load tests run for 10 minutes, soak-only tests run.

``--soak`` is registered here, so pass it with this folder on the command line:
``pytest tests/faults --soak -s``.
"""

from __future__ import annotations

import os

import pytest

SOAK_SECONDS = 600.0


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add ``--soak``."""
    parser.addoption(
        "--soak",
        action="store_true",
        default=False,
        help="run the fault suite's load tests for 10 minutes and the soak-only tests",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip soak-only tests without ``--soak``; with it, give load tests a long timeout."""
    soak = bool(config.getoption("--soak", default=False))
    for item in items:
        if soak:
            if item.get_closest_marker("soak") or item.get_closest_marker("slow"):
                item.add_marker(pytest.mark.timeout(SOAK_SECONDS + 300))
        elif item.get_closest_marker("soak"):
            item.add_marker(pytest.mark.skip(reason="soak run only: pass --soak"))


@pytest.fixture
def soak(request: pytest.FixtureRequest) -> bool:
    """Whether this is a soak run (``--soak``)."""
    return bool(request.config.getoption("--soak", default=False))


@pytest.fixture
def load_seconds(soak: bool) -> float:
    """How long load tests run: 10 min with ``--soak``, else ``PLUGIN_HOST_LOAD_SECONDS`` (5)."""
    if soak:
        return SOAK_SECONDS
    return float(os.environ.get("PLUGIN_HOST_LOAD_SECONDS", "5"))


@pytest.fixture
def reload_count(soak: bool) -> int:
    """Reloads in the memory test: 10,000 with ``--soak``, else ``PLUGIN_HOST_RELOADS`` (2000)."""
    if soak:
        return 10_000
    return int(os.environ.get("PLUGIN_HOST_RELOADS", "2000"))
