"""mongo_sink: upsert rows into a MongoDB collection, one document per key.

Each row becomes one document whose ``_id`` is the value of the ``key`` column
(default ``recording``: the diagnoses of ``handlers/README.md`` §5), written with
an upsert that replaces the whole document. Writing a batch twice, or replaying
it after a crash, leaves exactly one document per key.

Client: PyMongo's native asyncio ``AsyncMongoClient`` (not Motor).

Settings (``[handlers.<name>]``)
    ``url``               connection string, without the password (default ``mongodb://127.0.0.1:27017/``)
    ``username``          user name, or none
    ``password``          password (a secret: write ``"${MONGO_PASSWORD}"``)
    ``database``          database name (default ``gaitflow``)
    ``collection``        collection name (default ``diagnoses``)
    ``key``               column holding each document's key (default ``recording``)
    ``create_indexes``    create the ``indexes`` below when absent (default true)
    ``indexes``           secondary indexes: ``[{keys = ["label"]}, {keys = ["-diagnosed_at"]},
                          {keys = ["patient"], unique = true, name = "patient_u"}]``
    ``write_mode``        ``"upsert"``: ``update`` commands with ``upsert``; ``"insert_first"``:
                          ``insert`` the chunk, then upsert the keys that already existed;
                          ``"auto"`` (default): ``insert_first`` on FerretDB, ``upsert`` on MongoDB
    ``bulk_size``         documents per write command (default 500)
    ``reject_non_finite`` dead-letter rows holding NaN or ±Infinity (default true)
    ``connect_timeout``   seconds to find the server / open a connection (default 5)
    ``operation_timeout`` seconds one command may take on the socket (default 30)
    ``health_interval``   seconds between pings while disconnected (default 5)
    ``retry_policy``      in-handler retries of connection losses and transient write
                          errors within one ``write`` (default 5 attempts, 0.5 s doubling to 10 s)

Behaviour and guarantees
    * **Idempotent.** ``{"q": {"_id": key}, "u": document, "upsert": true}`` per row,
      unordered, in chunks of ``bulk_size`` (``write_mode = "upsert"``). With
      ``"insert_first"`` a chunk is inserted (unordered) and only the documents
      refused as duplicate keys are then upserted: the same end state, each
      document still written atomically. Several rows of one batch with the
      same key: the last one wins (as writing them in order would); the earlier
      ones count as committed.
    * **Item by item.** A write error names one document. Permanent ones
      (duplicate key on a unique secondary index, validation, an invalid field
      name, a document too large) are dead-lettered with the server's code and
      message; the other rows are committed. Transient ones (not primary,
      interrupted, write conflict, ...) are retried with ``retry_policy``, then
      handed back to the runtime as a ``PartialFailure`` (its ``retry``, then
      dead letter). Nothing is dropped.
    * **Before writing**, rows with a null key, and (``reject_non_finite``) rows
      holding NaN or ±Infinity, are dead-lettered with the reason.
    * **Connection loss** (server down, timeouts): ``set_connected(False)`` so
      ``/readyz`` reports it, retries with backoff; rows still unwritten after
      ``retry_policy`` go back to the runtime (retry, then dead letter). While
      disconnected the server is pinged every ``health_interval`` seconds so
      readiness recovers without traffic.
    * **Indexes** in ``indexes`` are created at start when absent. An existing
      index with the same name but other keys or uniqueness is an error at start
      (the sink never drops an index).
    * **Timestamps** are stored as BSON dates (UTC; naive Arrow timestamps are read as UTC).

FerretDB 1.24 (the local stack's MongoDB-wire server), checked against the server
    * Its ``update`` command stops at the first failing document of an unordered
      batch, reports index 0 whatever the failing position, and omits ``n`` and
      ``nModified`` from the reply: PyMongo 4.20's ``bulk_write`` then raises
      ``KeyError('nModified')`` instead of ``BulkWriteError``. So the sink sends
      the ``update`` command itself (what ``bulk_write([ReplaceOne(..., upsert=True)])``
      sends) and reads the reply tolerantly; when a multi-document command
      reports a write error on FerretDB, the chunk is re-run one document per
      command (upserts are idempotent) so each error lands on its document.
      On MongoDB the reply's indexes are trusted.
    * Every lookup by ``_id`` (``update``, ``find``, ``delete``) scans the
      collection: 8 updates of existing keys in a 5000-document collection take
      about 1 s, and a 1000-update command outlasts a 30 s socket timeout (and
      keeps running on the server after the client gave up). ``insert`` finds
      duplicate ``_id`` through the primary key, about 0.1 ms per document, and
      reports unordered errors correctly. Hence ``write_mode = "auto"``: insert
      first, then upsert only the keys that existed (a replay), in commands of 8.
      New keys cost the same whatever the collection size; overwrites cost a
      scan each (nothing on the wire protocol avoids it).
    * A NaN anywhere in a document makes it close the connection (which would
      look like an outage and retry forever); infinities are refused. Hence
      ``reject_non_finite`` (default true).
    * ``createIndexes`` works (single, compound, unique); ``sparse`` and
      collection validators are not supported, so neither is offered here.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from bson.errors import InvalidDocument
from pymongo import AsyncMongoClient, IndexModel
from pymongo.errors import ConnectionFailure, DocumentTooLarge, OperationFailure, PyMongoError

from pipeline import Batch, PartialFailure, RetryPolicy, Secret, setting

from ._common import DocumentStoreSink, PreparedDocuments

__all__ = ["IndexSpec", "MongoSink", "MongoSinkSettings", "MongoWriteError"]

#: Server error codes worth retrying (MongoDB's retryable-write list, plus lock
#: and write-conflict codes). Every other write error is the document's fault.
TRANSIENT_CODES = frozenset({
    6, 7, 24, 46, 50, 64, 89, 91, 112, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436,
    16500,
})
#: errors of the connection's credentials, not of any document
AUTH_CODES = frozenset({13, 18})
#: pseudo error code for documents the client cannot encode (never sent)
CLIENT_REFUSED = -1
DUPLICATE_KEY = 11000
#: FerretDB 1.24 scans the collection for every update by _id: keep its update
#: commands short, so none outlives the socket timeout (it would keep running)
FERRETDB_UPDATE_CHUNK = 8


class MongoWriteError(Exception):
    """A transient write error the server reported for a document."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"code {code}: {message}")
        self.code = code


@dataclasses.dataclass(frozen=True)
class IndexSpec:
    """A secondary index: fields (``"-field"`` for descending), uniqueness, name."""

    keys: list[str] = setting(doc='indexed fields in order; prefix "-" for descending')
    unique: bool = setting(False, doc="refuse two documents with the same values")
    name: str | None = setting(None, doc='index name (default: MongoDB\'s, e.g. "label_1")')

    def __post_init__(self) -> None:
        if not self.keys or any(not k.lstrip("-") for k in self.keys):
            raise ValueError(f"index keys must be non-empty field names, got {self.keys!r}")

    def key_list(self) -> list[tuple[str, int]]:
        return [(k[1:], -1) if k.startswith("-") else (k, 1) for k in self.keys]

    def index_name(self) -> str:
        return self.name or "_".join(f"{f}_{d}" for f, d in self.key_list())


DEFAULT_INDEXES = [IndexSpec(keys=["label"]), IndexSpec(keys=["model_version"]),
                   IndexSpec(keys=["-diagnosed_at"])]


@dataclasses.dataclass(frozen=True)
class MongoSinkSettings:
    url: str = setting("mongodb://127.0.0.1:27017/",
                       doc="connection string, without the password (use `password`)")
    username: str | None = setting(None, doc="user name")
    password: Secret | None = setting(None, doc="password", secret=True)
    database: str = setting("gaitflow", doc="database name")
    collection: str = setting("diagnoses", doc="collection name")
    key: str = setting("recording", doc="column holding each document's key (stored as _id)")
    create_indexes: bool = setting(True, doc="create the `indexes` when absent")
    indexes: list[IndexSpec] = setting(DEFAULT_INDEXES, doc="secondary indexes")
    write_mode: Literal["auto", "upsert", "insert_first"] = setting(
        "auto", doc='"upsert": update commands with upsert; "insert_first": insert, then '
                    'upsert the keys that existed; "auto": insert_first on FerretDB, else upsert')
    bulk_size: int = setting(500, doc="documents per write command", min=1, max=100_000)
    reject_non_finite: bool = setting(
        True, doc="dead-letter rows holding NaN or ±Infinity (FerretDB cannot store them)")
    connect_timeout: float = setting(5.0, doc="seconds to find the server", min=0.1)
    operation_timeout: float = setting(30.0, doc="seconds one command may take", min=0.1)
    health_interval: float = setting(5.0, doc="seconds between pings while disconnected",
                                     min=0.05)
    retry_policy: RetryPolicy = setting(
        RetryPolicy(max_attempts=5, backoff=0.5, max_backoff=10.0),
        doc="retries of connection losses and transient write errors inside one write")

    def __post_init__(self) -> None:
        if self.password and not self.username:
            raise ValueError("password needs username")
        bad = set('/\\. "$') & set(self.database)
        if not self.database or bad:
            raise ValueError(f"database {self.database!r}: must be non-empty without "
                             f"{''.join(sorted(bad)) or '/ . $ space'}")
        if not self.collection or "$" in self.collection or self.collection.startswith(
                "system."):
            raise ValueError(f"collection {self.collection!r}: must be non-empty, "
                             "without '$', not in system.*")
        names = [i.index_name() for i in self.indexes]
        if len(set(names)) != len(names) or "_id_" in names:
            raise ValueError(f"index names must be unique and not '_id_': {names}")


class MongoSink(DocumentStoreSink):
    """Upserts rows as documents keyed by ``key`` (``_id``); see the module docstring."""

    Settings: ClassVar[type] = MongoSinkSettings
    settings: MongoSinkSettings
    store: ClassVar[str] = "MongoDB"
    event: ClassVar[str] = "mongo"
    ping_errors: ClassVar[tuple[type[BaseException], ...]] = (PyMongoError,)

    def __init__(self, name: str, settings: MongoSinkSettings | None = None) -> None:
        super().__init__(name, settings)
        self._client: AsyncMongoClient[dict[str, Any]] | None = None
        self._db: Any = None
        self.server = ""            # "MongoDB 7.0.1" or "FerretDB v1.24.2"
        self.ferretdb = False
        self.insert_first = False
        self._watch: asyncio.Task[None] | None = None
        self._written: Any = None   # metrics, from start() on
        self._refused: Any = None

    # -- lifecycle ------------------------------------------------------------------
    def _make_client(self) -> AsyncMongoClient[dict[str, Any]]:
        s = self.settings
        return AsyncMongoClient(
            s.url, username=s.username, password=s.password.get() if s.password else None,
            serverSelectionTimeoutMS=int(s.connect_timeout * 1000),
            connectTimeoutMS=int(s.connect_timeout * 1000),
            socketTimeoutMS=int(s.operation_timeout * 1000),
            appname="gaitflow", tz_aware=True)

    async def start(self) -> None:
        s = self.settings
        self._client = self._make_client()
        try:
            info = await s.retry_policy.call(self._build_info, retry_on=(ConnectionFailure,),
                                             on_retry=self._on_retry)
            self.ferretdb = "ferretdbVersion" in info
            self.server = (f"FerretDB {info['ferretdbVersion']}" if self.ferretdb
                           else f"MongoDB {info.get('version', '?')}")
            self._db = self._client[s.database]
            self.insert_first = s.write_mode == "insert_first" or (
                s.write_mode == "auto" and self.ferretdb)
            if s.create_indexes and s.indexes:
                await self._ensure_indexes()
        except BaseException:
            await self._client.close()
            self._client = None
            raise
        self._watch_from_now("documents upserted into MongoDB")
        self.log.info("mongo.connected", server=self.server, database=s.database,
                      collection=s.collection,
                      write_mode="insert_first" if self.insert_first else "upsert")

    async def _build_info(self) -> dict[str, Any]:
        assert self._client is not None
        return await self._client.admin.command("buildInfo")

    async def _ping(self) -> None:
        assert self._client is not None
        await self._client.admin.command("ping")

    async def _ensure_indexes(self) -> None:
        s = self.settings
        coll = self._db[s.collection]
        existing = await coll.index_information()
        missing = []
        for spec in s.indexes:
            name = spec.index_name()
            have = existing.get(name)
            if have is None:
                missing.append(IndexModel(spec.key_list(), name=name, unique=spec.unique))
                continue
            have_keys = [(f, int(d)) for f, d in have["key"]]
            if have_keys != spec.key_list() or bool(have.get("unique")) != spec.unique:
                raise ValueError(
                    f"index {name!r} on {s.database}.{s.collection} exists with keys "
                    f"{have_keys} unique={bool(have.get('unique'))}, but the settings ask for "
                    f"{spec.key_list()} unique={spec.unique}: drop or rename one of them")
        if missing:
            created = await coll.create_indexes(missing)
            self.log.info("mongo.indexes_created", indexes=created)

    # -- writing ----------------------------------------------------------------------
    async def write(self, batch: Batch) -> None:
        prepared = await self._prepare(batch, id_field="_id")
        retry_rows, cause, refused = await self.upsert(prepared)
        await self._refuse(batch, refused)
        if retry_rows:
            raise PartialFailure(retry_rows, cause or RuntimeError("write failed"))

    async def upsert(self, prepared: PreparedDocuments,
                     ) -> tuple[list[int], BaseException | None, list[tuple[int, str]]]:
        """Write ``prepared.docs``; retry what fails transiently.

        Returns ``(rows still failing, their cause, [(row, reason) refused for good])``,
        rows as batch positions.
        """
        docs, positions = prepared.docs, prepared.positions
        pending, cause, refused = await self._retry_rounds(lambda p: self._round(docs, p),
                                                           list(range(len(docs))))
        return ([int(positions[i]) for i in pending], cause,
                [(int(positions[i]), reason) for i, reason in refused])

    async def _round(self, docs: list[dict[str, Any]], pending: list[int],
                     ) -> tuple[list[int], BaseException | None, list[tuple[int, str]]]:
        """One pass over ``pending`` documents: ``(transient failures, cause, refused)``."""
        size = self.settings.bulk_size
        if self.ferretdb and not self.insert_first:
            size = min(size, FERRETDB_UPDATE_CHUNK)
        transient: list[int] = []
        refused: list[tuple[int, str]] = []
        cause: BaseException | None = None
        lost = False
        for first in range(0, len(pending), size):
            chunk = pending[first:first + size]
            if lost:  # the server is gone: do not hammer it with the rest of the batch
                transient.extend(chunk)
                continue
            try:
                errors = await self._write_chunk([docs[i] for i in chunk])
            except ConnectionFailure as exc:
                self._lost(exc)
                cause, lost = exc, True
                transient.extend(chunk)
                continue
            self.set_connected(True)
            failed = set()
            for j, code, message in errors:
                failed.add(j)
                if code in TRANSIENT_CODES:
                    transient.append(chunk[j])
                    cause = MongoWriteError(code, message)
                else:
                    reason = f"MongoDB refused the document (code {code}): {message}"
                    refused.append((chunk[j], reason))
            self._written.inc(len(chunk) - len(failed))
        return transient, cause, refused

    async def _write_chunk(self, docs: Sequence[dict[str, Any]]) -> list[tuple[int, int, str]]:
        """Write ``docs``: ``[(index in docs, code, message)]`` of the failures.

        Raises ``ConnectionFailure`` when the server cannot be reached.
        """
        if self.insert_first:
            return await self._insert_then_replace(docs)
        return await self._upsert_chunk(docs)

    async def _insert_then_replace(self, docs: Sequence[dict[str, Any]],
                                   ) -> list[tuple[int, int, str]]:
        """``insert`` (fast on FerretDB), then upsert the documents that already existed."""
        try:
            reply = await self._db.command("insert", self.settings.collection,
                                           documents=list(docs), ordered=False)
        except (InvalidDocument, DocumentTooLarge, OverflowError, OperationFailure):
            return await self._upsert_chunk(docs)   # it sorts out who is to blame
        errors = self._reply_errors(reply, len(docs))
        existing = [j for j, code, _ in errors if code == DUPLICATE_KEY]
        failed = [e for e in errors if e[1] != DUPLICATE_KEY]
        size = FERRETDB_UPDATE_CHUNK if self.ferretdb else self.settings.bulk_size
        for first in range(0, len(existing), size):
            part = existing[first:first + size]
            failed += [(part[j], code, message) for j, code, message
                       in await self._upsert_chunk([docs[i] for i in part])]
        return failed

    async def _upsert_chunk(self, docs: Sequence[dict[str, Any]]) -> list[tuple[int, int, str]]:
        """Upsert ``docs`` in one ``update`` command; see ``_write_chunk``."""
        updates = [{"q": {"_id": d["_id"]}, "u": d, "upsert": True} for d in docs]
        try:
            reply = await self._db.command("update", self.settings.collection,
                                           updates=updates, ordered=False)
        except (InvalidDocument, DocumentTooLarge, OverflowError) as exc:
            # the client refused to encode the command: find the culprit(s)
            if len(docs) == 1:
                return [(0, CLIENT_REFUSED, f"{type(exc).__name__}: {exc}")]
            return await self._one_by_one(docs)
        except OperationFailure as exc:
            code = exc.code if exc.code is not None else CLIENT_REFUSED
            if code in AUTH_CODES:
                raise
            if code in TRANSIENT_CODES or len(docs) == 1:
                return [(j, code, str(exc.details.get("errmsg", exc)) if exc.details else
                         str(exc)) for j in range(len(docs))]
            return await self._one_by_one(docs)
        errors = self._reply_errors(reply, len(docs))
        if errors and len(docs) > 1 and self.ferretdb:
            # FerretDB 1.24 stops at the first error and misreports its index
            return await self._one_by_one(docs)
        return errors

    @staticmethod
    def _reply_errors(reply: dict[str, Any], n: int) -> list[tuple[int, int, str]]:
        """``[(index, code, message)]`` from a write command's reply (tolerant of gaps)."""
        errors = [(int(e.get("index", 0)), int(e.get("code", CLIENT_REFUSED)),
                   str(e.get("errmsg", "write error"))) for e in reply.get("writeErrors") or ()]
        concern = reply.get("writeConcernError")
        if concern:  # applied, but not as durably as asked: write again later
            failed = {j for j, _, _ in errors}
            errors += [(j, int(concern.get("code", 64)),
                        str(concern.get("errmsg", "write concern error")))
                       for j in range(n) if j not in failed]
        return errors

    async def _one_by_one(self, docs: Sequence[dict[str, Any]]) -> list[tuple[int, int, str]]:
        started = time.perf_counter()
        errors = []
        for j, doc in enumerate(docs):
            errors += [(j, code, msg) for _, code, msg in await self._upsert_chunk([doc])]
        self.log.info("mongo.item_by_item", documents=len(docs), errors=len(errors),
                      elapsed_ms=round((time.perf_counter() - started) * 1000, 1))
        return errors
