"""Catalog and index commands: databases, collections, views and their indexes.

Each handler checks the command's shape and leaves the change itself to
:class:`~.storage.Storage`, which journals it (catalog changes that cannot be undone are
journaled before they are applied).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bson.binary import Binary
from bson.int64 import Int64

from .body import doc_field, int_field, name_field
from .capped import check_capped_options
from .errors import CommandError
from .indexes import filter_applies
from .storage import SYSTEM_DATABASES
from .views import check_view_options

if TYPE_CHECKING:
    from .commands import Handler, Session
    from .cursors import CursorManager
    from .server import EmbeddedMongo

Reply = dict[str, Any]


class CatalogCommands:
    """The catalog and index handlers of one server."""

    def __init__(self, server: EmbeddedMongo, cursors: CursorManager) -> None:
        self.server = server
        self.storage = server.storage
        self.cursors = cursors

    def table(self) -> dict[str, Handler]:
        """The commands this class answers, by name (aliases included)."""
        return {
            "listDatabases": self.list_databases,
            "listCollections": self.list_collections,
            "create": self.create,
            "collMod": self.coll_mod,
            "drop": self.drop,
            "dropDatabase": self.drop_database,
            "renameCollection": self.rename_collection,
            "dbStats": self.db_stats,
            "createIndexes": self.create_indexes,
            "listIndexes": self.list_indexes,
            "dropIndexes": self.drop_indexes,
            "deleteIndexes": self.drop_indexes,
        }

    # -- catalog -----------------------------------------------------------------------

    def list_databases(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """listDatabases."""
        entries = []
        flt = doc_field(body, "filter")
        for name in self.storage.databases():
            size = (
                sum(
                    len(self.storage.raw(name, c).find_one() or {})
                    for c, _ in self.storage.collections(name)
                )
                * 256
            )
            entry: Reply = {"name": name, "sizeOnDisk": float(max(size, 8192)), "empty": False}
            if flt and not filter_applies(flt, entry):
                continue
            entries.append({"name": name} if body.get("nameOnly") else entry)
        total = float(sum(float(e["sizeOnDisk"]) for e in entries if "sizeOnDisk" in e))
        return {
            "databases": entries,
            "totalSize": total,
            "totalSizeMb": Int64(int(total) >> 20),
            "ok": 1.0,
        }

    def list_collections(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """listCollections, with filter and nameOnly."""
        flt = doc_field(body, "filter")
        out = []
        for name, info in self.storage.collections(db):
            kind = "view" if "viewOn" in info.options else "collection"
            entry: Reply = {
                "name": name,
                "type": kind,
                "options": dict(info.options),
                "info": {"readOnly": kind == "view", "uuid": Binary.from_uuid(info.uuid)},
            }
            if kind == "collection":
                entry["idIndex"] = {"v": 2, "key": {"_id": 1}, "name": "_id_"}
            else:
                del entry["info"]["uuid"]  # views have no UUID
            if flt and not filter_applies(flt, entry):
                continue
            out.append({"name": name, "type": kind} if body.get("nameOnly") else entry)
        batch = int_field(doc_field(body, "cursor") or {}, "batchSize")
        return {**self.cursors.first_batch(f"{db}.$cmd.listCollections", out, batch), "ok": 1.0}

    _CREATE_GENERIC = frozenset(
        {
            "create",
            "$db",
            "lsid",
            "$clusterTime",
            "$readPreference",
            "writeConcern",
            "comment",
            "txnNumber",
            "apiVersion",
            "apiStrict",
            "apiDeprecationErrors",
            "maxTimeMS",
        }
    )

    def create(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """create, including ``changeStreamPreAndPostImages``."""
        name = name_field(body["create"])
        options = {k: v for k, v in body.items() if k not in self._CREATE_GENERIC}
        if "viewOn" in options:
            check_view_options(options)
        if options.get("capped"):
            check_capped_options(options)
        for unsupported in ("timeseries", "clusteredIndex", "encryptedFields"):
            if options.get(unsupported):
                raise CommandError(
                    238, f"not supported by the embedded server: create with '{unsupported}'"
                )
        self.storage.create_collection(db, name, options)
        return {"ok": 1.0}

    def coll_mod(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """collMod: ``changeStreamPreAndPostImages`` (other options are accepted and stored)."""
        name = name_field(body["collMod"])
        options = {k: v for k, v in body.items() if k not in self._CREATE_GENERIC | {"collMod"}}
        self.storage.coll_mod(db, name, options)
        return {"ok": 1.0}

    def drop(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """drop: ``{ns, nIndexesWas}``; a missing collection is not an error (7.0)."""
        name = name_field(body["drop"])
        n_indexes = self.storage.drop_collection(db, name)
        if n_indexes is None:
            return {"ok": 1.0}
        return {"nIndexesWas": n_indexes, "ns": f"{db}.{name}", "ok": 1.0}

    def drop_database(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """dropDatabase: drop events per collection, then dropDatabase."""
        if db in SYSTEM_DATABASES and db != "config":
            raise CommandError(20, f"Dropping the '{db}' database is prohibited.")
        if not self.storage.collections(db):
            return {"ok": 1.0}
        self.storage.drop_database(db)
        return {"dropped": db, "ok": 1.0}

    def rename_collection(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """renameCollection (admin only): ``{renameCollection: "db.a", to: "db.b"}``."""
        if db != "admin":
            raise CommandError(13, "renameCollection may only be run against the admin database.")
        src, dst = body.get("renameCollection"), body.get("to")
        if not isinstance(src, str) or "." not in src or not isinstance(dst, str) or "." not in dst:
            raise CommandError(
                73, "renameCollection and to must be full namespaces 'db.collection'"
            )
        src_db, src_coll = src.split(".", 1)
        dst_db, dst_coll = dst.split(".", 1)
        self.storage.rename_collection(
            src_db, src_coll, dst_db, dst_coll, drop_target=bool(body.get("dropTarget", False))
        )
        return {"ok": 1.0}

    def db_stats(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """dbStats (approximate sizes)."""
        colls = self.storage.collections(db)
        objects = sum(self.storage.raw(db, c).count_documents({}) for c, _ in colls)
        indexes = sum(len(self.storage.raw(db, c).index_information()) for c, _ in colls)
        return {
            "db": db,
            "collections": len(colls),
            "views": 0,
            "objects": objects,
            "avgObjSize": 0.0,
            "dataSize": 0.0,
            "storageSize": 0.0,
            "indexes": indexes,
            "indexSize": 0.0,
            "totalSize": 0.0,
            "scaleFactor": 1,
            "ok": 1.0,
        }

    # -- indexes -----------------------------------------------------------------------

    def create_indexes(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """createIndexes: ``{numIndexesBefore, numIndexesAfter, createdCollection...}``."""
        coll = name_field(body["createIndexes"])
        specs = body.get("indexes")
        if not isinstance(specs, list) or not specs:
            raise CommandError(2, "Must specify at least one index to create")
        before, after, created = self.storage.create_indexes(db, coll, specs)
        reply: Reply = {
            "numIndexesBefore": before,
            "numIndexesAfter": after,
            "createdCollectionAutomatically": created,
        }
        if before == after:
            reply["note"] = "all indexes already exist"
        reply["ok"] = 1.0
        return reply

    def list_indexes(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """listIndexes; error 26 on a missing collection."""
        coll = name_field(body["listIndexes"])
        specs = self.storage.index_specs(db, coll)
        batch = int_field(doc_field(body, "cursor") or {}, "batchSize")
        return {**self.cursors.first_batch(f"{db}.{coll}", specs, batch), "ok": 1.0}

    def drop_indexes(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """dropIndexes: ``{nIndexesWas}``."""
        coll = name_field(body[next(iter(body))])
        before = self.storage.drop_indexes(db, coll, body.get("index"))
        return {"nIndexesWas": before, "ok": 1.0}
