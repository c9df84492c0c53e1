"""cassandra_sink against a fake cluster whose statements complete on another thread.

Statements are the driver's real PreparedStatement/BoundStatement/BatchStatement
objects (binding and serialisation are the driver's own); only the network is
fake. The real server is exercised by tests/integration/test_cassandra_sink.py.
"""
from __future__ import annotations

import asyncio
import itertools
import re
import threading
import types
from collections.abc import Callable
from typing import Any

import pytest
from cassandra import InvalidRequest, WriteTimeout, cqltypes
from cassandra.cluster import NoHostAvailable
from cassandra.protocol import ColumnMetadata
from cassandra.query import UNSET_VALUE, BatchStatement, BoundStatement, PreparedStatement

from handlers import cassandra_sink as cs
from handlers.cassandra_sink import (
    CassandraSink,
    CassandraSinkSettings,
    TableSpec,
    contract_spec,
    cql_type_ok,
    quote,
    schema_differences,
)
from pipeline import StartError

# -- fake cluster -------------------------------------------------------------------------


def table_meta(columns: dict[str, str], pk: list[str], ck: list[str]) -> Any:
    cols = {n: types.SimpleNamespace(name=n, cql_type=t) for n, t in columns.items()}
    return types.SimpleNamespace(columns=cols, partition_key=[cols[c] for c in pk],
                                 clustering_key=[cols[c] for c in ck])


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "<" or ch == "("
        depth -= ch == ">" or ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [*parts, cur.strip()]


class FakeServer:
    def __init__(self) -> None:
        self.tables: dict[tuple[str, str], Any] = {}
        self.keyspaces: dict[str, str] = {}
        self.rows: dict[tuple[str, str], dict[tuple[Any, ...], dict[str, Any]]] = {}
        self.ddl: list[str] = []
        self.executed: list[Any] = []
        self.fail: Callable[[list[dict[str, Any]]], BaseException | None] | None = None
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.hosts_up = True
        self.listeners: list[Any] = []
        self.prepared: dict[bytes, PreparedStatement] = {}
        # last write wins by the write timestamp the driver gives each statement when it
        # is sent (as Cassandra does), not by the order statements happen to arrive in
        self.clock = itertools.count(1)
        self.written_at: dict[tuple[Any, ...], int] = {}

    def ddl_execute(self, cql: str) -> None:
        self.ddl.append(cql)
        m = re.match(r'CREATE KEYSPACE IF NOT EXISTS "(\w+)" WITH replication = (.*)$', cql)
        if m:
            self.keyspaces.setdefault(m.group(1), m.group(2))
            return
        m = re.match(r'CREATE TABLE IF NOT EXISTS "(\w+)"\."(\w+)" \((.*), PRIMARY KEY '
                     r'\(\((.*?)\)(.*)\)\)$', cql)
        assert m, cql
        ks, name, cols, pk, ck = m.groups()
        columns = {}
        for part in _split_top(cols):
            col, tp = re.fullmatch(r'"(\w+)" (.+)', part).groups()
            columns[col] = tp
        pks = re.findall(r'"(\w+)"', pk)
        cks = re.findall(r'"(\w+)"', ck)
        self.tables.setdefault((ks, name), table_meta(columns, pks, cks))

    def store(self, prepared: PreparedStatement, values: list[Any]) -> dict[str, Any]:
        row = {}
        for col, raw in zip(prepared.column_metadata, values, strict=True):
            if raw is UNSET_VALUE:
                row[col.name] = "<unset>"
            else:
                row[col.name] = None if raw is None else col.type.from_binary(raw, 5)
        return row


SERVER = FakeServer()


def statements_of(stmt: Any) -> list[tuple[PreparedStatement, list[Any]]]:
    """``(prepared, serialized values)`` of a bound statement or of each batch member."""
    if isinstance(stmt, BatchStatement):
        out = []
        for is_prepared, query_id, values in stmt._statements_and_parameters:
            assert is_prepared, "a batch member that is not a prepared statement"
            out.append((SERVER.prepared[query_id], values))
        return out
    return [(stmt.prepared_statement, stmt.values)]


class FakeResponseFuture:
    def __init__(self, statement: Any, ts: int) -> None:
        self.statement, self.ts = statement, ts

    def add_callbacks(self, callback: Any, errback: Any, callback_args: tuple[Any, ...] = (),
                      errback_args: tuple[Any, ...] = ()) -> None:
        def complete() -> None:
            stmts = statements_of(self.statement)
            rows = [SERVER.store(p, v) for p, v in stmts]
            try:
                error = SERVER.fail(rows) if SERVER.fail else None
            except Exception as exc:  # noqa: BLE001 - a bug in a test's fail hook
                error = exc
            with SERVER.lock:
                SERVER.in_flight -= 1
                if error is None:
                    for (prepared, _), row in zip(stmts, rows, strict=True):
                        key = tuple(row[c] for c in prepared.key_columns)
                        where = (prepared.keyspace, prepared.table)
                        stored = SERVER.rows.setdefault(where, {}).setdefault(key, {})
                        for col, value in row.items():
                            cell = (*where, key, col)
                            if value != "<unset>" and SERVER.written_at.get(cell, 0) < self.ts:
                                stored[col] = value
                                SERVER.written_at[cell] = self.ts
            if error is None:
                callback([], *callback_args)
            else:
                errback(error, *errback_args)

        threading.Timer(0.001, complete).start()   # the driver's I/O thread, in spirit


class FakeSession:
    def execute(self, cql: str) -> None:
        SERVER.ddl_execute(cql)

    def prepare(self, cql: str) -> PreparedStatement:
        m = re.match(r'INSERT INTO "(\w+)"\."(\w+)" \((.*)\) VALUES \(([?, ]+)\)$', cql)
        assert m, f"not a parameterised INSERT: {cql}"
        ks, table, cols, marks = m.groups()
        names = re.findall(r'"(\w+)"', cols)
        assert marks.count("?") == len(names)
        meta = SERVER.tables[(ks, table)]
        cmeta = [ColumnMetadata(ks, table, n, cqltypes._cqltypes[meta.columns[n].cql_type])
                 for n in names]
        pk = [c.name for c in meta.partition_key]
        query_id = cql.encode()
        prepared = PreparedStatement(cmeta, query_id, [names.index(c) for c in pk], cql, ks, 5,
                                     [], None)
        SERVER.prepared[query_id] = prepared
        prepared.table = table
        prepared.key_columns = pk + [c.name for c in meta.clustering_key]
        return prepared

    def execute_async(self, statement: Any) -> FakeResponseFuture:
        assert isinstance(statement, (BoundStatement, BatchStatement)), statement
        SERVER.executed.append(statement)
        with SERVER.lock:
            SERVER.in_flight += 1
            SERVER.max_in_flight = max(SERVER.max_in_flight, SERVER.in_flight)
            ts = next(SERVER.clock)
        return FakeResponseFuture(statement, ts)


class FakeCluster:
    def __init__(self) -> None:
        self.metadata = types.SimpleNamespace(keyspaces=self)
        self.shut = False

    # cluster.metadata.keyspaces[...] / `in`
    def __contains__(self, ks: str) -> bool:
        return ks in SERVER.keyspaces

    def __getitem__(self, ks: str) -> Any:
        return types.SimpleNamespace(tables={t: m for (k, t), m in SERVER.tables.items()
                                             if k == ks})

    def connect(self) -> FakeSession:
        if not SERVER.hosts_up:
            raise NoHostAvailable("Unable to connect to any servers", {})
        return FakeSession()

    def register_listener(self, listener: Any) -> None:
        SERVER.listeners.append(listener)

    def refresh_keyspace_metadata(self, ks: str) -> None:
        pass

    def refresh_table_metadata(self, ks: str, table: str) -> None:
        pass

    def shutdown(self) -> None:
        self.shut = True


class FakeCassandraSink(CassandraSink):
    def _new_cluster(self) -> Any:
        return FakeCluster()


@pytest.fixture(autouse=True)
def server() -> FakeServer:
    global SERVER
    SERVER = FakeServer()
    return SERVER


def samples(recordings: str = "AB", n: int = 30) -> list[dict[str, Any]]:
    return [{"recording": r, "seq": s, "time": s / 100, "L1": 1.0, "L": 8.0, "device": "d"}
            for r in recordings for s in range(n)]


def pipeline(make_runtime: Any, rows: list[dict[str, Any]], *, batch_size: int = 100,
             **sink: Any) -> Any:
    return make_runtime({
        "src": {"type": "memory_source", "rows": rows, "batch_size": batch_size,
                "outputs": ["cass"], "on_failure": "stop"},
        "cass": {"type": "test_cassandra_sink_unit:FakeCassandraSink", "keyspace": "ks",
                 "table": "samples", "contract": "samples",
                 "retry": {"max_attempts": 3, "backoff": 0.0, "jitter": 0.0}, **sink},
    })


def stored(table: str = "samples") -> dict[tuple[Any, ...], dict[str, Any]]:
    return SERVER.rows.get(("ks", table), {})


# -- identifiers, types, settings ---------------------------------------------------------

def test_identifiers_are_validated_and_quoted() -> None:
    assert quote("L1") == '"L1"'
    for bad in ["1abc", "a-b", 'x"; DROP TABLE t; --', "", "a" * 49, "é"]:
        with pytest.raises(ValueError, match="invalid CQL identifier"):
            quote(bad)


@pytest.mark.parametrize(("tp", "ok"), [
    ("double", True), ("TEXT", True), ("list<double>", True), ("map<text, bigint>", True),
    ("frozen<list<double>>", True), ("tuple<int, text, double>", True),
    ("map<text>", False), ("list<double", False), ("double); DROP", False), ("vector", False),
])
def test_cql_type_grammar(tp: str, ok: bool) -> None:
    assert cql_type_ok(tp) is ok


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"table": "t-1", "contract": "samples"}, "table: 't-1' is not a valid identifier"),
    ({"table": "t", "keyspace": "1ks", "contract": "samples"}, "keyspace: '1ks'"),
    ({"table": "t", "columns": {"a b": "text"}, "partition_key": ["a b"]}, "columns: 'a b'"),
    ({"table": "t", "columns": {"a": "text; x"}, "partition_key": ["a"]}, "is not a CQL type"),
    ({"table": "t"}, "give a contract"),
    ({"table": "t", "columns": {"a": "text"}}, "partition_key is required"),
    ({"table": "t", "columns": {"a": "text"}, "partition_key": ["b"]}, "key column(s) b not"),
    ({"table": "t", "contract": "samples", "replication_strategy": "NetworkTopologyStrategy"},
     "needs datacenters"),
    ({"table": "t", "contract": "samples", "datacenters": {"dc'1": 3}}, "not a datacenter"),
])
def test_settings_are_checked(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        CassandraSinkSettings(**kwargs)


def test_contracts_follow_the_handlers_readme() -> None:
    samples_spec = contract_spec("samples")
    assert list(samples_spec.columns)[:3] == ["recording", "seq", "time"]
    assert list(samples_spec.columns)[-3:] == ["L", "R", "device"]
    assert len(samples_spec.columns) == 22
    assert (samples_spec.partition_key, samples_spec.clustering_key) == (["recording"], ["seq"])
    from ml.features import FEATURE_NAMES

    features = contract_spec("features")
    assert list(features.columns) == ["recording", "window", "window_key", "seq_first",
                                      "seq_last", *FEATURE_NAMES]
    assert all(features.columns[n] == "double" for n in FEATURE_NAMES)
    assert (features.partition_key, features.clustering_key) == (["recording"], ["window"])
    from ml.features import BASELINE_NAMES

    baseline = contract_spec("baseline_features")
    assert list(baseline.columns)[5:] == list(BASELINE_NAMES)


def test_contract_can_be_amended() -> None:
    s = CassandraSinkSettings(table="t", contract="samples", columns={"site": "text"},
                              clustering_key=["seq", "site"])
    spec = s.spec()
    assert spec.columns["site"] == "text"
    assert spec.partition_key == ["recording"] and spec.clustering_key == ["seq", "site"]


def test_schema_differences_name_column_expected_and_found() -> None:
    spec = TableSpec({"recording": "text", "window": "bigint", "cadence": "double",
                      "extra": "int"}, ["recording"], ["window"])
    meta = table_meta({"recording": "varchar", "window": "int", "cadence": "double",
                       "other": "text"}, ["recording", "window"], [])
    assert schema_differences(spec, meta) == [
        "column 'window': expected bigint, found int",
        "column 'extra': expected int, missing from the table",
        "primary key: expected ((recording), window), found ((recording, window))"]
    same = table_meta({**spec.columns, "more": "text"}, ["recording"], ["window"])
    assert schema_differences(spec, same) == []   # extra table columns are fine


# -- lifecycle and writes -----------------------------------------------------------------

async def test_creates_keyspace_and_table_then_upserts(make_runtime: Any,
                                                       server: FakeServer) -> None:
    rt = pipeline(make_runtime, samples())
    report = await rt.run()
    assert report.ok and report.unacked == 0
    assert server.ddl[0] == ('CREATE KEYSPACE IF NOT EXISTS "ks" WITH replication = '
                             "{'class': 'SimpleStrategy', 'replication_factor': 1}")
    assert server.ddl[1].startswith('CREATE TABLE IF NOT EXISTS "ks"."samples" ("recording" '
                                    'text, "seq" bigint, "time" double, "L1" double')
    assert server.ddl[1].endswith('"device" text, PRIMARY KEY (("recording"), "seq"))')
    assert len(stored()) == 60
    assert stored()[("A", 3)]["time"] == 0.03
    await pipeline(make_runtime, samples()).run()          # a replay: upserts, no duplicates
    assert len(stored()) == 60


async def test_network_topology_replication(make_runtime: Any, server: FakeServer) -> None:
    await pipeline(make_runtime, samples(n=1), replication_strategy="NetworkTopologyStrategy",
                   datacenters={"dc1": 3, "dc2": 2}).run()
    assert server.ddl[0].endswith(
        "{'class': 'NetworkTopologyStrategy', 'dc1': 3, 'dc2': 2}")


async def test_existing_table_with_another_schema_fails_start_clearly(
        make_runtime: Any, server: FakeServer) -> None:
    server.keyspaces["ks"] = "..."
    spec = contract_spec("samples")
    server.tables[("ks", "samples")] = table_meta({**spec.columns, "time": "text"},
                                                  ["recording"], ["seq"])
    with pytest.raises(StartError) as err:
        await pipeline(make_runtime, samples()).run()
    assert str(err.value) == (
        "handler 'cass' (test_cassandra_sink_unit:FakeCassandraSink) failed to start: SchemaMismatch: "
        "table ks.samples does not match the configured schema: column 'time': expected double,"
        " found text (alter or drop the table, or change the settings)")
    assert server.ddl == []


async def test_only_prepared_statements_are_executed(make_runtime: Any,
                                                     server: FakeServer) -> None:
    await pipeline(make_runtime, samples("ABC", 50)).run()
    assert server.executed
    for stmt in server.executed:
        assert isinstance(stmt, (BoundStatement, BatchStatement))
        for prepared, _ in statements_of(stmt):       # asserts every member is prepared
            assert prepared.query_string.startswith('INSERT INTO "ks"."samples" (')
    batches = [s for s in server.executed if isinstance(s, BatchStatement)]
    assert batches and all(len(statements_of(b)) <= 20 for b in batches)


async def test_in_flight_statements_are_bounded(make_runtime: Any, server: FakeServer) -> None:
    await pipeline(make_runtime, samples("AB", 100), max_concurrency=3, batch_rows=1).run()
    assert len(stored()) == 200
    assert 1 < server.max_in_flight <= 3


async def test_batches_stay_in_one_partition_and_under_the_byte_budget(
        make_runtime: Any, server: FakeServer) -> None:
    await pipeline(make_runtime, samples("ABCD", 25), batch_rows=10, batch_max_bytes=400).run()
    for stmt in server.executed:
        if isinstance(stmt, BatchStatement):
            members = statements_of(stmt)
            assert len({v[0] for _, v in members}) == 1   # one recording: one partition
            assert sum(len(x) for _, v in members for x in v
                       if isinstance(x, bytes)) <= 400
    assert len(stored()) == 100


async def test_null_keys_and_unbindable_values_go_to_dead_letter(
        make_runtime: Any, server: FakeServer) -> None:
    rows = [{"recording": "A", "seq": 0, "n": 1}, {"recording": None, "seq": 1, "n": 1},
            {"recording": "A", "seq": 2, "n": 2**40}, {"recording": "A", "seq": 3, "n": 3}]
    rt = make_runtime({
        "src": {"type": "memory_source", "rows": rows, "outputs": ["cass"], "on_failure": "stop"},
        "cass": {"type": "test_cassandra_sink_unit:FakeCassandraSink", "keyspace": "ks",
                 "table": "t", "columns": {"recording": "text", "seq": "bigint", "n": "int"},
                 "partition_key": ["recording"], "clustering_key": ["seq"]}})
    report = await rt.run()
    assert report.ok and report.unacked == 0
    assert sorted(stored("t")) == [("A", 0), ("A", 3)]
    reasons = sorted(d["reason"] for d in rt.handlers["dlq"].rows())
    assert reasons[0] == "null primary key column(s): recording"
    assert reasons[1].startswith("value does not fit the column types: ")


async def test_an_invalid_row_inside_a_batch_is_isolated(make_runtime: Any,
                                                         server: FakeServer) -> None:
    def reject_13(rows: list[dict[str, Any]]) -> BaseException | None:
        if any(r["seq"] == 13 for r in rows):
            return InvalidRequest("Error from server: code=2200 [Invalid query] bad value")
        return None

    server.fail = reject_13
    rt = pipeline(make_runtime, samples("A", 30))
    await rt.run()
    assert sorted(s for _, s in stored()) == [s for s in range(30) if s != 13]
    dead = rt.handlers["dlq"].rows()
    assert len(dead) == 1 and '"seq": 13' in dead[0]["payload"]
    assert dead[0]["reason"].startswith("rejected by Cassandra: InvalidRequest: ")


async def test_transient_failures_retry_only_the_failed_rows(make_runtime: Any,
                                                             server: FakeServer) -> None:
    failed_once: set[str] = set()

    def timeout_b_once(rows: list[dict[str, Any]]) -> BaseException | None:
        if rows[0]["recording"] == "B" and "B" not in failed_once:
            failed_once.add("B")
            return WriteTimeout("Operation timed out - received only 0 responses.")
        return None

    server.fail = timeout_b_once
    rt = pipeline(make_runtime, samples("AB", 30))
    report = await rt.run()
    assert report.ok and report.unacked == 0
    assert len(stored()) == 60
    assert rt.metrics.value("retries", "cass") == 1
    assert rt.handlers["dlq"].rows() == []


async def test_every_row_unreachable_marks_disconnected_then_recovers(
        make_runtime: Any, server: FakeServer) -> None:
    calls = {"n": 0}

    def down_first(rows: list[dict[str, Any]]) -> BaseException | None:
        calls["n"] += 1
        return NoHostAvailable("no host", {}) if calls["n"] <= 3 else None

    server.fail = down_first
    rt = pipeline(make_runtime, samples("A", 30))
    seen: list[bool] = []
    sink = rt.handlers["cass"]
    original = sink.set_connected
    sink.set_connected = lambda c, d="": (seen.append(c), original(c, d))  # type: ignore
    report = await rt.run()
    assert report.ok
    assert False in seen and seen[-1] is True
    assert len(stored()) == 30


async def test_connect_failure_is_retried_then_reported(make_runtime: Any,
                                                        server: FakeServer) -> None:
    server.hosts_up = False
    rt = pipeline(make_runtime, samples("A", 1),
                  connect_retry={"max_attempts": 2, "backoff": 0.01, "jitter": 0})
    with pytest.raises(StartError, match="NoHostAvailable"):
        await rt.run()


async def test_nulls_are_left_unset_unless_asked(make_runtime: Any, server: FakeServer) -> None:
    rows = [{"recording": "A", "seq": 0, "time": None, "L": 1.0}]
    await pipeline(make_runtime, rows).run()
    stmt = server.executed[-1]
    assert UNSET_VALUE in stmt.values and None not in stmt.values
    await pipeline(make_runtime, rows, nulls="null", table="samples_null").run()
    assert None in server.executed[-1].values


async def test_a_repeated_key_goes_in_a_later_statement(make_runtime: Any,
                                                        server: FakeServer) -> None:
    rows = [{"recording": "A", "seq": 1, "time": 1.0}, {"recording": "A", "seq": 2, "time": 2.0},
            {"recording": "A", "seq": 1, "time": 9.0}]
    await pipeline(make_runtime, rows).run()
    assert len(server.executed) == 2          # [seq 1, seq 2] then [seq 1 again]
    assert stored()[("A", 1)]["time"] == 9.0


async def test_host_events_drive_readiness(make_runtime: Any, server: FakeServer) -> None:
    rt = pipeline(make_runtime, samples("A", 1))
    sink = rt.handlers["cass"]
    sink._loop = asyncio.get_running_loop()
    sink._cluster = types.SimpleNamespace(metadata=types.SimpleNamespace(
        all_hosts=lambda: [types.SimpleNamespace(is_up=server.hosts_up)]))
    listener = cs._HostListener(sink)
    server.hosts_up = False
    await asyncio.to_thread(listener.on_down, None)
    await asyncio.sleep(0.01)
    assert sink.health() == (False, "every Cassandra host is down")
    server.hosts_up = True
    await asyncio.to_thread(listener.on_up, None)
    await asyncio.sleep(0.01)
    assert sink.health()[0] is True


async def test_results_for_a_closed_loop_are_dropped_quietly() -> None:
    loop = asyncio.new_event_loop()
    fut = loop.create_future()
    loop.close()
    cs._deliver("result", loop, fut, True)     # no exception from the driver thread
    assert not fut.done()
