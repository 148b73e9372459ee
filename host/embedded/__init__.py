"""An embedded MongoDB-compatible server: a single-node replica set with change streams."""

from __future__ import annotations
