"""An embedded MongoDB-compatible server: a single-node replica set with change streams."""

from __future__ import annotations

from .server import EmbeddedMongo as EmbeddedMongo
from .server import EmbeddedMongoThread as EmbeddedMongoThread

__all__ = ("EmbeddedMongo", "EmbeddedMongoThread")
