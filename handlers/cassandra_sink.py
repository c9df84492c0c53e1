"""cassandra_sink: idempotent upserts of batch rows into a Cassandra table.

Every row becomes one ``INSERT`` of a **prepared** statement (in Cassandra an
INSERT is an upsert: writing the same primary key again replaces the row, so a
replay after a crash never duplicates). Values are always bound, never formatted
into CQL; identifiers (keyspace, table, columns) are checked against
``[A-Za-z_][A-Za-z0-9_]{0,47}`` when the settings load and always double-quoted
(so ``L1`` stays ``L1``), and CQL types against a small grammar.

Settings (``python run.py --describe cassandra_sink`` lists them with types and defaults):

``hosts``, ``port``, ``local_dc``, ``protocol_version``, ``connection_class``,
``username``, ``password`` (a secret: ``"${CASSANDRA_PASSWORD}"``), ``connect_timeout``,
``connect_retry``
    where and how to connect.
``keyspace``, ``table``, ``contract``, ``columns``, ``partition_key``, ``clustering_key``
    the table (below).
``create``, ``replication_strategy``, ``replication_factor``, ``datacenters``
    creation of an absent keyspace and table.
``consistency``, ``request_timeout``, ``max_concurrency``, ``batch_rows``,
``batch_max_bytes``, ``nulls``
    how rows are written (below).

Table schema
    Either a named contract of handlers/README.md (``contract``):

    ``"features"`` (§4)
        ``recording text, window bigint, window_key text, seq_first bigint,
        seq_last bigint`` and one ``double`` per name in ``ml.features.FEATURE_NAMES``;
        primary key ``((recording), window)``.
    ``"baseline_features"`` (§4, spark_job ``features = "baseline"``)
        the same key columns, then one ``double`` per name in
        ``ml.features.BASELINE_NAMES``; primary key ``((recording), window)``.
    ``"samples"`` (§1)
        ``recording text, seq bigint, time double, L1..L8, R1..R8, L, R double,
        device text``; primary key ``((recording), seq)``.

    or explicit ``columns`` (name -> CQL type) with ``partition_key`` and
    ``clustering_key``. With a contract, ``columns`` adds columns (or changes a
    type); ``partition_key`` replaces the contract's whole primary key (with
    ``clustering_key``), ``clustering_key`` alone replaces its clustering columns.
    The derivation is explicit on purpose: the table is fixed by the settings,
    never guessed from the first batch, so a batch with a stray column cannot
    change a table.

    At start the keyspace (``replication_strategy``, ``replication_factor`` or
    ``datacenters``) and the table are created when absent (``create = true``).
    An existing table must have every configured column with the same type and
    the same partition and clustering key columns, else start fails with the
    table, the column, what was expected and what was found; columns the table
    has beyond the configured ones are allowed (left untouched).

Writing
    Batch columns that are not table columns are ignored; table columns the
    batch lacks are not written (an upsert leaves them as they are). A batch
    without every primary-key column is rejected whole. ``nulls = "unset"``
    (default) leaves null values unset instead of writing tombstones.
    Rows of the same partition (e.g. one recording) go together as an
    ``UNLOGGED BATCH`` of up to ``batch_rows`` bound INSERTs and
    ``batch_max_bytes`` of values: a single-partition batch is one atomic
    mutation server-side, several times faster than one request per row. A
    batch never holds the same primary key twice, so when a key repeats in an
    Arrow batch the later row is written later and wins. Statements run
    concurrently, at most ``max_concurrency`` in flight (an asyncio semaphore),
    on the driver's own I/O thread; each result is handed back to the event
    loop with ``loop.call_soon_threadsafe``, so the loop never blocks on the
    driver.

Per-row failures
    A row with a null primary-key value, or whose values cannot be bound to the
    column types, or that Cassandra rejects as invalid (a rejected batch is
    re-run row by row to find it), goes to dead letter at once with the reason; rows that failed for a transient reason (timeout,
    unavailable, connection) are retried by the runtime (``PartialFailure``),
    only them. When every row failed transiently the whole batch is retried.

Connection
    ``Cluster.connect`` (blocking) runs in a worker thread at start, with
    ``connect_retry``. The connection class is chosen explicitly
    (``connection_class``: ``libev``, the driver's C event loop in its own
    thread, default; or ``asyncio``, the driver's asyncio reactor, which runs
    its own loop in its own thread). ``protocol_version`` and the load-balancing
    policy (token aware over DC-aware round robin) are passed explicitly.
    Hosts going down or up (driver listener) and connection errors on write
    drive ``set_connected``; the driver reconnects with exponential backoff.
"""
from __future__ import annotations

import asyncio
import dataclasses
import re
import struct
import threading
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from cassandra import ConsistencyLevel, OperationTimedOut, RequestValidationException
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable
from cassandra.connection import ConnectionException
from cassandra.policies import (
    DCAwareRoundRobinPolicy,
    ExponentialReconnectionPolicy,
    HostStateListener,
    TokenAwarePolicy,
)
from cassandra.protocol import RequestValidationException as ProtocolValidation
from cassandra.query import UNSET_VALUE, BatchStatement, BatchType

from pipeline import Batch, PartialFailure, Reject, RetryPolicy, Secret, Sink, setting

__all__ = ["CassandraSink", "CassandraSinkSettings", "SchemaMismatch", "TableSpec",
           "contract_spec", "cql_type_ok", "quote"]

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,47}")
_DC_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SIMPLE_TYPES = frozenset({
    "ascii", "bigint", "blob", "boolean", "counter", "date", "decimal", "double", "duration",
    "float", "inet", "int", "smallint", "text", "time", "timestamp", "timeuuid", "tinyint",
    "uuid", "varchar", "varint"})
_TYPE_ALIASES = {"varchar": "text"}


def quote(identifier: str) -> str:
    """A validated identifier, double-quoted for CQL."""
    if not IDENTIFIER.fullmatch(identifier):
        raise ValueError(f"invalid CQL identifier {identifier!r}: expected "
                         "[A-Za-z_][A-Za-z0-9_]{0,47}")
    return f'"{identifier}"'


def _split_args(text: str) -> list[str] | None:
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
            if depth < 0:
                return None
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return parts if depth == 0 else None


def normalize_type(cql_type: str) -> str:
    """Lower case, no spaces, aliases resolved: ``varchar`` == ``text``."""
    text = cql_type.replace(" ", "").lower()
    for alias, name in _TYPE_ALIASES.items():
        text = re.sub(rf"\b{alias}\b", name, text)
    return text


def cql_type_ok(cql_type: str) -> bool:
    """True for a simple type or a (frozen) list/set/map/tuple of valid types."""
    text = cql_type.replace(" ", "").lower()
    if text in _SIMPLE_TYPES:
        return True
    m = re.fullmatch(r"(list|set|map|frozen|tuple)<(.+)>", text)
    if not m:
        return False
    args = _split_args(m.group(2))
    if args is None:
        return False
    want = {"list": 1, "set": 1, "frozen": 1, "map": 2}.get(m.group(1))
    if want is not None and len(args) != want:
        return False
    return all(cql_type_ok(a) for a in args)


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """Columns (name -> CQL type, in order) and primary key of a table."""

    columns: dict[str, str]
    partition_key: list[str]
    clustering_key: list[str]

    @property
    def key_columns(self) -> list[str]:
        return [*self.partition_key, *self.clustering_key]

    def primary_key_cql(self) -> str:
        parts = ", ".join(quote(c) for c in self.partition_key)
        rest = "".join(f", {quote(c)}" for c in self.clustering_key)
        return f"(({parts}){rest})"


def contract_spec(contract: str) -> TableSpec:
    """The table of a data contract in handlers/README.md."""
    if contract == "samples":
        cols = {"recording": "text", "seq": "bigint", "time": "double"}
        cols.update({f"{side}{i}": "double" for side in "LR" for i in range(1, 9)})
        cols.update({"L": "double", "R": "double", "device": "text"})
        return TableSpec(cols, ["recording"], ["seq"])
    if contract in ("features", "baseline_features"):
        from ml.features import BASELINE_NAMES, FEATURE_NAMES

        cols = {"recording": "text", "window": "bigint", "window_key": "text",
                "seq_first": "bigint", "seq_last": "bigint"}
        names = FEATURE_NAMES if contract == "features" else BASELINE_NAMES
        cols.update({name: "double" for name in names})
        return TableSpec(cols, ["recording"], ["window"])
    raise ValueError(f"unknown contract {contract!r}: expected 'features', "
                     "'baseline_features' or 'samples'")


@dataclasses.dataclass(frozen=True)
class CassandraSinkSettings:
    table: str = setting(doc="table to upsert into")
    keyspace: str = setting("gaitflow", doc="keyspace of the table")
    contract: Literal["features", "baseline_features", "samples"] | None = setting(
        None, doc="derive the table from a contract of handlers/README.md (§4 features, "
                  "baseline_features for spark_job features = \"baseline\", §1 samples); "
                  "else give columns and partition_key")
    columns: dict[str, str] = setting(
        {}, doc="column name -> CQL type (e.g. {cadence = \"double\"}); with a contract: "
                "extra columns or type changes")
    partition_key: list[str] = setting([], doc="partition key columns (default: the contract's)")
    clustering_key: list[str] = setting([], doc="clustering columns (default: the contract's)")
    hosts: list[str] = setting(["127.0.0.1"], doc="contact points")
    port: int = setting(9042, doc="native protocol port", min=1, max=65535)
    local_dc: str | None = setting(
        None, doc="local datacenter for load balancing (default: the first contact point's)")
    protocol_version: int = setting(5, doc="native protocol version", min=3, max=5)
    connection_class: Literal["libev", "asyncio"] = setting(
        "libev", doc="driver I/O reactor: libev (C, own thread) or asyncio (own loop thread)")
    username: str | None = setting(None, doc="user name (PasswordAuthenticator)")
    password: Secret | None = setting(None, doc="password (use ${VAR})", secret=True)
    create: bool = setting(True, doc="create the keyspace and the table when absent")
    replication_strategy: Literal["SimpleStrategy", "NetworkTopologyStrategy"] = setting(
        "SimpleStrategy", doc="replication of a keyspace created by the sink")
    replication_factor: int = setting(1, doc="replicas (SimpleStrategy)", min=1, max=32)
    datacenters: dict[str, int] = setting(
        {}, doc="replicas per datacenter (NetworkTopologyStrategy), e.g. {dc1 = 3}")
    consistency: Literal["ONE", "LOCAL_ONE", "QUORUM", "LOCAL_QUORUM", "EACH_QUORUM", "ALL"] = (
        setting("LOCAL_QUORUM", doc="write consistency level"))
    nulls: Literal["unset", "null"] = setting(
        "unset", doc="null values: leave the column unset (no tombstone) or write null")
    max_concurrency: int = setting(64, doc="statements in flight at most", min=1, max=4096)
    batch_rows: int = setting(
        20, doc="rows of one partition sent as one UNLOGGED batch at most (1 = no batches)",
        min=1, max=1000)
    batch_max_bytes: int = setting(
        4096, doc="bound values per batch at most (keep under the server's "
                  "batch_size_warn_threshold, 5 KiB by default)", min=256)
    request_timeout: float = setting(10.0, doc="seconds per statement", min=0.1)
    connect_timeout: float = setting(10.0, doc="seconds to open a connection", min=0.1)
    connect_retry: RetryPolicy = setting(
        RetryPolicy(max_attempts=3, backoff=1.0, max_backoff=10.0),
        doc="attempts and backoff while connecting at start")

    def __post_init__(self) -> None:
        problems = []
        for what, name in [("keyspace", self.keyspace), ("table", self.table),
                           *(("columns", c) for c in self.columns),
                           *(("partition_key", c) for c in self.partition_key),
                           *(("clustering_key", c) for c in self.clustering_key)]:
            if not IDENTIFIER.fullmatch(name):
                problems.append(f"{what}: {name!r} is not a valid identifier "
                                "([A-Za-z_][A-Za-z0-9_]{0,47})")
        for col, tp in self.columns.items():
            if not cql_type_ok(tp):
                problems.append(f"columns.{col}: {tp!r} is not a CQL type (e.g. text, bigint, "
                                "double, boolean, timestamp, list<double>)")
        for dc in self.datacenters:
            if not _DC_NAME.fullmatch(dc):
                problems.append(f"datacenters: {dc!r} is not a datacenter name")
        if self.contract is None and not self.columns:
            problems.append("give a contract (\"features\" or \"samples\") or columns")
        if self.contract is None and self.columns and not self.partition_key:
            problems.append("partition_key is required with explicit columns")
        if self.replication_strategy == "NetworkTopologyStrategy" and not self.datacenters:
            problems.append("NetworkTopologyStrategy needs datacenters = {name = replicas}")
        if self.password is not None and not self.username:
            problems.append("password needs username")
        if problems:
            raise ValueError("; ".join(problems))
        spec = self.spec()
        missing = [c for c in spec.key_columns if c not in spec.columns]
        if missing:
            raise ValueError(f"key column(s) {', '.join(missing)} not among the columns")
        if len(set(spec.key_columns)) != len(spec.key_columns):
            raise ValueError("a column appears twice in the primary key")

    def spec(self) -> TableSpec:
        """The configured table: the contract's, amended by columns and keys."""
        base = contract_spec(self.contract) if self.contract else TableSpec({}, [], [])
        columns = {**base.columns, **self.columns}
        return TableSpec(columns, list(self.partition_key or base.partition_key),
                         list(self.clustering_key if (self.partition_key or self.clustering_key)
                              else base.clustering_key))


class SchemaMismatch(RuntimeError):
    """An existing table differs from the configured schema."""


#: errors that mean "Cassandra is unreachable" (connected = false)
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    NoHostAvailable, ConnectionException, OperationTimedOut, ConnectionError)


def is_permanent(exc: BaseException) -> bool:
    """True when retrying the same row cannot succeed (invalid request, bad value)."""
    return isinstance(exc, (RequestValidationException, ProtocolValidation))


_BIND_ERRORS = (TypeError, ValueError, struct.error, OverflowError, KeyError)


def _deliver(value: Any, loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any],
             ok: bool) -> None:
    """From a driver thread: resolve ``fut`` with the result or the error, on its loop."""
    def settle() -> None:
        if not fut.done():
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)
    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the loop is closed: nobody waits for this result any more
        pass


class CassandraSink(Sink):
    """Upserts rows into a Cassandra table; see the module docstring."""

    Settings: ClassVar[type] = CassandraSinkSettings
    settings: CassandraSinkSettings

    def __init__(self, name: str, settings: CassandraSinkSettings | None = None) -> None:
        super().__init__(name, settings)
        self.spec = self.settings.spec()
        self._cluster: Any = None
        self._session: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._prepared: dict[tuple[str, ...], Any] = {}
        self._prepare_lock: asyncio.Lock | None = None
        self._ignored_reported: set[tuple[str, ...]] = set()
        self._m: dict[str, Any] = {}

    @property
    def prepared_statements(self) -> dict[tuple[str, ...], Any]:
        """The prepared INSERTs, by column tuple (the only statements ``write`` runs)."""
        return dict(self._prepared)

    # -- lifecycle --------------------------------------------------------------------
    def _new_cluster(self) -> Any:
        s = self.settings
        if s.connection_class == "libev":
            from cassandra.io.libevreactor import LibevConnection as connection_class
        else:
            from cassandra.io.asyncioreactor import AsyncioConnection as connection_class
        profile = ExecutionProfile(
            load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy(local_dc=s.local_dc)),
            consistency_level=getattr(ConsistencyLevel, s.consistency),
            request_timeout=s.request_timeout)
        auth = (PlainTextAuthProvider(username=s.username,
                                      password=s.password.get() if s.password else None)
                if s.username else None)
        return Cluster(list(s.hosts), port=s.port, protocol_version=s.protocol_version,
                       connection_class=connection_class, auth_provider=auth,
                       execution_profiles={EXEC_PROFILE_DEFAULT: profile},
                       connect_timeout=s.connect_timeout, control_connection_timeout=s.connect_timeout,
                       reconnection_policy=ExponentialReconnectionPolicy(0.5, 30.0))

    async def start(self) -> None:
        s = self.settings
        self._loop = asyncio.get_running_loop()
        self._semaphore = asyncio.Semaphore(s.max_concurrency)
        self._prepare_lock = asyncio.Lock()
        self._m = {
            "rows": self.metrics.counter("cassandra_rows_written", "Rows upserted"),
            "in_flight": self.metrics.gauge("cassandra_in_flight", "Statements in flight"),
        }
        try:
            await s.connect_retry.call(self._connect, retry_on=CONNECTION_ERRORS,
                                       on_retry=self._log_retry)
            await asyncio.to_thread(self._ensure_schema)
            await self._statement(tuple(self.spec.columns))
        except BaseException:
            await self._shutdown()
            raise
        self.set_connected(True)
        self.log.info("cassandra_sink.started", keyspace=s.keyspace, table=s.table,
                      columns=len(self.spec.columns), connection_class=s.connection_class,
                      protocol_version=s.protocol_version)

    def _log_retry(self, attempt: int, exc: BaseException, pause: float) -> None:
        self.set_connected(False, f"{type(exc).__name__}: {exc}")
        self.log.warning("cassandra.connect_retry", attempt=attempt, delay_s=round(pause, 2),
                         error=f"{type(exc).__name__}: {exc}")

    async def _connect(self) -> None:
        await self._shutdown()
        self._cluster = self._new_cluster()
        self._session = await asyncio.to_thread(self._cluster.connect)
        self._cluster.register_listener(_HostListener(self))

    async def close(self) -> None:
        await self._shutdown()

    async def _shutdown(self) -> None:
        cluster, self._cluster, self._session = self._cluster, None, None
        self._prepared.clear()
        if cluster is not None:
            await asyncio.to_thread(cluster.shutdown)

    def _host_changed(self) -> None:
        """Driver thread: a host went up or down."""
        cluster, loop = self._cluster, self._loop
        if cluster is None or loop is None:
            return
        up = [h for h in cluster.metadata.all_hosts() if h.is_up]
        try:
            loop.call_soon_threadsafe(self.set_connected, bool(up),
                                      "" if up else "every Cassandra host is down")
        except RuntimeError:
            pass

    # -- schema (runs in a worker thread) -----------------------------------------------
    def _ensure_schema(self) -> None:
        s, spec, session, cluster = self.settings, self.spec, self._session, self._cluster
        ks, table = quote(s.keyspace), quote(s.table)
        if s.keyspace not in cluster.metadata.keyspaces:
            if not s.create:
                raise SchemaMismatch(f"keyspace {s.keyspace!r} does not exist (create = false)")
            session.execute(f"CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = "
                            f"{self._replication_cql()}")
            cluster.refresh_keyspace_metadata(s.keyspace)
            self.log.info("cassandra.keyspace_created", keyspace=s.keyspace,
                          replication=self._replication_cql())
        meta = cluster.metadata.keyspaces[s.keyspace].tables.get(s.table)
        if meta is None:
            if not s.create:
                raise SchemaMismatch(f"table {s.keyspace}.{s.table} does not exist (create = false)")
            columns = ", ".join(f"{quote(c)} {t}" for c, t in spec.columns.items())
            session.execute(f"CREATE TABLE IF NOT EXISTS {ks}.{table} ({columns}, "
                            f"PRIMARY KEY {spec.primary_key_cql()})")
            cluster.refresh_table_metadata(s.keyspace, s.table)
            meta = cluster.metadata.keyspaces[s.keyspace].tables.get(s.table)
            self.log.info("cassandra.table_created", keyspace=s.keyspace, table=s.table,
                          columns=len(spec.columns), primary_key=spec.primary_key_cql())
            if meta is None:
                raise SchemaMismatch(f"table {s.keyspace}.{s.table} was created but is not in "
                                     "the cluster metadata")
        problems = schema_differences(spec, meta)
        if problems:
            raise SchemaMismatch(
                f"table {s.keyspace}.{s.table} does not match the configured schema: "
                + "; ".join(problems) + " (alter or drop the table, or change the settings)")

    def _replication_cql(self) -> str:
        s = self.settings
        if s.replication_strategy == "SimpleStrategy":
            return f"{{'class': 'SimpleStrategy', 'replication_factor': {int(s.replication_factor)}}}"
        dcs = "".join(f", '{dc}': {int(n)}" for dc, n in s.datacenters.items())
        return f"{{'class': 'NetworkTopologyStrategy'{dcs}}}"

    async def _statement(self, columns: tuple[str, ...]) -> Any:
        stmt = self._prepared.get(columns)
        if stmt is not None:
            return stmt
        assert self._prepare_lock is not None
        async with self._prepare_lock:
            stmt = self._prepared.get(columns)
            if stmt is None:
                s = self.settings
                cql = (f"INSERT INTO {quote(s.keyspace)}.{quote(s.table)} "
                       f"({', '.join(quote(c) for c in columns)}) "
                       f"VALUES ({', '.join('?' for _ in columns)})")
                stmt = await asyncio.to_thread(self._session.prepare, cql)
                stmt.is_idempotent = True  # an upsert: the driver may retry it safely
                self._prepared[columns] = stmt
        return stmt

    # -- writing ----------------------------------------------------------------------
    def _execute(self, statement: Any) -> asyncio.Future[Any]:
        """Run ``statement`` on the driver; the returned future resolves on this loop."""
        assert self._loop is not None
        fut: asyncio.Future[Any] = self._loop.create_future()
        try:
            response = self._session.execute_async(statement)
        except Exception as exc:  # noqa: BLE001 - reported through the future
            fut.set_exception(exc)
            return fut
        response.add_callbacks(_deliver, _deliver,
                               callback_args=(self._loop, fut, True),
                               errback_args=(self._loop, fut, False))
        return fut

    async def write(self, batch: Batch) -> None:
        if batch.num_rows == 0:
            return
        if self._session is None:
            raise ConnectionError("not connected to Cassandra")
        spec, data = self.spec, batch.data
        names = set(data.schema.names)
        absent_keys = [c for c in spec.key_columns if c not in names]
        if absent_keys:
            raise Reject(f"batch lacks primary key column(s) {', '.join(absent_keys)} of "
                         f"{self.settings.keyspace}.{self.settings.table}")
        columns = tuple(c for c in spec.columns if c in names)
        self._report_ignored(tuple(c for c in data.schema.names if c not in spec.columns))
        statement = await self._statement(columns)
        key_at = [columns.index(c) for c in spec.key_columns]
        part_at = key_at[:len(spec.partition_key)]
        values = [self._column_values(data, c, c in spec.key_columns) for c in columns]
        invalid: dict[str, list[int]] = {}
        groups = _Grouper(self.settings.batch_rows, self.settings.batch_max_bytes)
        for pos, row in enumerate(zip(*values, strict=True)):
            null_keys = [spec.key_columns[i] for i, at in enumerate(key_at) if row[at] is None]
            if null_keys:
                invalid.setdefault(f"null primary key column(s): {', '.join(null_keys)}",
                                   []).append(pos)
                continue
            try:
                bound = statement.bind(row)
            except _BIND_ERRORS as exc:
                invalid.setdefault(f"value does not fit the column types: "
                                   f"{type(exc).__name__}: {exc}", []).append(pos)
                continue
            groups.add(pos, bound, tuple(row[i] for i in part_at), tuple(row[i] for i in key_at))
        retry: list[int] = []
        cause: BaseException | None = None
        written = 0
        todo = groups.finish()
        while todo:
            results = await self._run([stmt for _, stmt in todo])
            isolate: list[tuple[list[int], Any]] = []
            for (rows, stmt), result in zip(todo, results, strict=True):
                if not isinstance(result, BaseException):
                    written += len(rows)
                elif not is_permanent(result):
                    retry.extend(rows)
                    cause = cause or result
                elif len(rows) > 1:  # one bad row fails its whole batch: find it
                    isolate.extend(([r], s) for r, s in zip(rows, stmt.bound, strict=True))
                else:
                    invalid.setdefault(f"rejected by Cassandra: {type(result).__name__}: "
                                       f"{result}", []).extend(rows)
            todo = isolate
        self._m["rows"].inc(written)
        if written:
            self.set_connected(True)
        elif cause is not None and isinstance(cause, CONNECTION_ERRORS):
            self.set_connected(False, f"{type(cause).__name__}: {cause}")
        await self._settle(batch, invalid, sorted(retry), cause)

    async def _run(self, statements: Sequence[Any]) -> list[Any]:
        """Execute ``statements`` with bounded concurrency; results or exceptions, in order."""
        semaphore = self._semaphore
        assert semaphore is not None
        in_flight = self._m["in_flight"]
        pending: list[asyncio.Future[Any]] = []

        def release(_: asyncio.Future[Any]) -> None:
            semaphore.release()
            in_flight.dec()

        try:
            for stmt in statements:
                await semaphore.acquire()
                in_flight.inc()
                fut = self._execute(stmt.statement if isinstance(stmt, _Group) else stmt)
                fut.add_done_callback(release)
                pending.append(fut)
            return await asyncio.gather(*pending, return_exceptions=True)
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise

    async def _settle(self, batch: Batch, invalid: dict[str, list[int]], retry: list[int],
                      cause: BaseException | None) -> None:
        if retry:
            assert cause is not None
            for reason, rows in invalid.items():
                await self.dead_letter(batch, reason=reason, rows=rows)
            if len(retry) == batch.num_rows:
                raise cause
            raise PartialFailure(retry, cause)
        if len(invalid) == 1:
            ((reason, rows),) = invalid.items()
            raise Reject(reason, rows=rows)
        for reason, rows in invalid.items():
            await self.dead_letter(batch, reason=reason, rows=rows)

    def _column_values(self, data: Any, column: str, is_key: bool) -> list[Any]:
        col = data.column(column)
        values = col.to_pylist()
        if not is_key and col.null_count and self.settings.nulls == "unset":
            values = [UNSET_VALUE if v is None else v for v in values]
        return values

    def _report_ignored(self, ignored: tuple[str, ...]) -> None:
        if ignored and ignored not in self._ignored_reported:
            self._ignored_reported.add(ignored)
            self.log.warning("cassandra_sink.columns_ignored", columns=list(ignored),
                             detail=f"not columns of {self.settings.keyspace}.{self.settings.table}")


class _Group:
    """Rows of one partition sent together as an UNLOGGED batch (or one bound statement)."""

    __slots__ = ("bound", "keys", "nbytes", "rows")

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.bound: list[Any] = []
        self.keys: set[tuple[Any, ...]] = set()
        self.nbytes = 0

    @property
    def statement(self) -> Any:
        if len(self.bound) == 1:
            return self.bound[0]
        batch = BatchStatement(batch_type=BatchType.UNLOGGED)
        for bound in self.bound:
            batch.add(bound)
        batch.is_idempotent = True
        return batch


def _bound_size(bound: Any) -> int:
    return sum(len(v) for v in bound.values if isinstance(v, (bytes, bytearray, memoryview)))


class _Grouper:
    """Groups bound rows by partition: single-partition batches are one mutation server-side.

    A group closes at ``max_rows`` rows or ``max_bytes`` of values, and before a
    primary key repeats: rows of one BATCH share a write timestamp, so two rows
    with the same key must go in successive statements for the later row to win.
    """

    def __init__(self, max_rows: int, max_bytes: int) -> None:
        self.max_rows, self.max_bytes = max_rows, max_bytes
        self.open: dict[tuple[Any, ...], _Group] = {}
        self.done: list[tuple[list[int], _Group]] = []

    def add(self, pos: int, bound: Any, partition: tuple[Any, ...], key: tuple[Any, ...]) -> None:
        size = _bound_size(bound) if self.max_rows > 1 else 0
        group = self.open.get(partition)
        if group is not None and (len(group.rows) >= self.max_rows or key in group.keys
                                  or group.nbytes + size > self.max_bytes):
            self.done.append((group.rows, group))
            group = None
        if group is None:
            group = self.open[partition] = _Group()
        group.rows.append(pos)
        group.bound.append(bound)
        group.keys.add(key)
        group.nbytes += size

    def finish(self) -> list[tuple[list[int], Any]]:
        self.done.extend((g.rows, g) for g in self.open.values())
        self.open.clear()
        return list(self.done)


def schema_differences(spec: TableSpec, meta: Any) -> list[str]:
    """What differs between the configured table and cluster metadata (``TableMetadata``)."""
    problems = []
    found_cols = {name: col.cql_type for name, col in meta.columns.items()}
    for name, expected in spec.columns.items():
        if name not in found_cols:
            problems.append(f"column {name!r}: expected {expected}, missing from the table")
        elif normalize_type(found_cols[name]) != normalize_type(expected):
            problems.append(f"column {name!r}: expected {expected}, found {found_cols[name]}")
    found_pk = [c.name for c in meta.partition_key]
    found_ck = [c.name for c in meta.clustering_key]
    if found_pk != spec.partition_key or found_ck != spec.clustering_key:
        problems.append(f"primary key: expected {_pk_text(spec.partition_key, spec.clustering_key)}"
                        f", found {_pk_text(found_pk, found_ck)}")
    return problems


def _pk_text(partition: Sequence[str], clustering: Sequence[str]) -> str:
    return "((" + ", ".join(partition) + ")" + "".join(f", {c}" for c in clustering) + ")"


class _HostListener(HostStateListener):
    """Driver host events (called on driver threads) -> ``set_connected`` on the loop."""

    def __init__(self, sink: CassandraSink) -> None:
        super().__init__()
        self._sink = sink
        self._lock = threading.Lock()

    def _changed(self) -> None:
        with self._lock:
            self._sink._host_changed()

    def on_up(self, host: Any) -> None:
        self._changed()

    def on_down(self, host: Any) -> None:
        self._changed()

    def on_add(self, host: Any) -> None:
        self._changed()

    def on_remove(self, host: Any) -> None:
        self._changed()
