"""Tests for host.config: frozen limits and timeouts, and how the layers take them."""

from __future__ import annotations

import dataclasses

import pytest
from pymongo import AsyncMongoClient

from host import Limits, PluginHost, Timeouts
from host.config import DAEMON_LIMITS, DAEMON_TIMEOUTS, UNSET, with_overrides


def test_config_objects_are_frozen() -> None:
    """Limits and Timeouts cannot be changed in place; replace() derives a variant."""
    limits = Limits()
    with pytest.raises(dataclasses.FrozenInstanceError):
        limits.max_source_bytes = 1  # type: ignore[misc]
    assert dataclasses.replace(limits, max_source_bytes=1).max_source_bytes == 1
    assert limits.max_source_bytes == 1_048_576


def test_daemon_defaults_differ_only_in_call_timeout_and_concurrency() -> None:
    """The daemon caps calls at 30 s and 64 per version; everything else is shared."""
    assert Timeouts(call=30.0) == DAEMON_TIMEOUTS
    assert Limits(max_concurrency=64) == DAEMON_LIMITS


def test_with_overrides_skips_unset_and_keeps_none() -> None:
    """UNSET keeps the base field; None is a real value (no limit)."""
    base = Timeouts(call=5.0)
    assert with_overrides(base, call=UNSET, top_level=UNSET) is base
    assert with_overrides(base, call=None).call is None
    assert with_overrides(base, top_level=2.0) == Timeouts(call=5.0, top_level=2.0)


def test_plugin_host_keywords_override_the_config_objects() -> None:
    """PluginHost's documented keyword arguments override single fields of limits/timeouts."""
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(
        "mongodb://127.0.0.1:1", connect=False
    )
    host = PluginHost(
        client.app,
        limits=Limits(max_waiting=3, require_depth=4),
        timeouts=Timeouts(call=2.0),
        require_depth=9,
        exec_timeout=0.5,
        default_timeout=None,
    )
    assert host.limits == Limits(max_waiting=3, require_depth=9)
    assert host.timeouts == Timeouts(call=None, top_level=0.5)
    assert host.drain_timeout == host.timeouts.drain
