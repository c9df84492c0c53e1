"""cassandra_sink on the real server (127.0.0.1:9042, `python -m stack up cassandra`).

Each test works in its own keyspace (a per-run id in its name), dropped at the end.
A server that is not up fails the test with the command that starts it.
"""
from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy
from cassandra.query import BatchStatement, BoundStatement

from handlers.cassandra_sink import CassandraSink
from pipeline import Runtime, StartError
from pipeline.log import configure_logging

pytestmark = pytest.mark.integration

RUN = uuid.uuid4().hex[:8]


class SpyCassandraSink(CassandraSink):
    """The real sink, remembering every statement it hands to the driver."""

    executed: list[Any] = []  # noqa: RUF012 - shared on purpose: the test reads it

    def _execute(self, statement: Any) -> Any:
        SpyCassandraSink.executed.append(statement)
        return super()._execute(statement)


@pytest.fixture(autouse=True)
def _logs() -> None:
    configure_logging("info")


@pytest.fixture
def cassandra_port(stack_service: Callable[[str], Any], stack_cfg: Any) -> int:
    stack_service("cassandra")
    return int(stack_cfg.svc("cassandra")["port"])


@pytest.fixture
def session(cassandra_port: int) -> Iterator[Any]:
    """A plain driver session for the test's own checks (blocking calls are fine here)."""
    profile = ExecutionProfile(load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy()),
                               request_timeout=30)
    cluster = Cluster(["127.0.0.1"], port=cassandra_port, protocol_version=5,
                      execution_profiles={EXEC_PROFILE_DEFAULT: profile})
    try:
        yield cluster.connect()
    finally:
        cluster.shutdown()


@pytest.fixture
def keyspace(session: Any) -> Iterator[str]:
    name = f"it_cass_{RUN}_{uuid.uuid4().hex[:6]}"
    yield name
    session.execute(f'DROP KEYSPACE IF EXISTS "{name}"')


def sample_rows(recordings: list[str], n: int) -> list[dict[str, Any]]:
    out = []
    for rec in recordings:
        for s in range(n):
            row = {"recording": rec, "seq": s, "time": s / 100, "device": f"insole-{rec}"}
            row.update({f"{side}{i}": float(s % 7 + i) for side in "LR" for i in range(1, 9)})
            row.update({"L": 36.0, "R": 36.0})
            out.append(row)
    return out


def sink_cfg(port: int, keyspace: str, **extra: Any) -> dict[str, Any]:
    return {"type": "cassandra_sink", "port": port, "keyspace": keyspace, "table": "samples",
            "contract": "samples", "on_failure": "dead_letter",
            "retry": {"max_attempts": 3, "backoff": 0.2}, **extra}


def pipeline(runtimes: Any, rows: list[dict[str, Any]], sink: dict[str, Any],
             batch_size: int = 250) -> Runtime:
    return runtimes({"src": {"type": "memory_source", "rows": rows, "batch_size": batch_size,
                             "outputs": ["cass"], "on_failure": "stop"}, "cass": sink})


def count(session: Any, keyspace: str, table: str = "samples") -> int:
    return session.execute(f'SELECT count(*) FROM "{keyspace}"."{table}"').one()[0]


# -- tests --------------------------------------------------------------------------------

async def test_creates_keyspace_and_table_and_upserts_each_row_once(
        cassandra_port: int, session: Any, keyspace: str, runtimes: Any) -> None:
    rows = sample_rows(["GaCo01_01", "GaPt03_02"], 600)
    first = pipeline(runtimes, rows, sink_cfg(cassandra_port, keyspace))
    report = await first.run()
    assert report.ok and report.unacked == 0
    session.cluster.refresh_schema_metadata()   # created by another client
    ks_meta = session.cluster.metadata.keyspaces[keyspace]
    assert ks_meta.replication_strategy.replication_factor == 1
    table = ks_meta.tables["samples"]
    assert [c.name for c in table.partition_key] == ["recording"]
    assert [c.name for c in table.clustering_key] == ["seq"]
    assert table.columns["L1"].cql_type == "double"        # case kept (quoted identifiers)
    assert count(session, keyspace) == 1200
    # the same rows again (a replay) and a changed value: upserts, still one row per key
    rows[5]["time"] = 99.0
    second = pipeline(runtimes, rows, sink_cfg(cassandra_port, keyspace))
    assert (await second.run()).ok
    assert count(session, keyspace) == 1200
    row = session.execute(f'SELECT "time", "L1", device FROM "{keyspace}".samples '
                          "WHERE recording = %s AND seq = %s", ("GaCo01_01", 5)).one()
    assert (row.time, row.L1, row.device) == (99.0, float(5 % 7 + 1), "insole-GaCo01_01")


async def test_only_prepared_statements_reach_the_server(
        cassandra_port: int, session: Any, keyspace: str, runtimes: Any) -> None:
    SpyCassandraSink.executed = []
    sink = sink_cfg(cassandra_port, keyspace, type="test_cassandra_sink:SpyCassandraSink")
    assert (await pipeline(runtimes, sample_rows(["GaCo02_01"], 300), sink).run()).ok
    assert SpyCassandraSink.executed
    for stmt in SpyCassandraSink.executed:
        assert isinstance(stmt, (BoundStatement, BatchStatement)), type(stmt)
        if isinstance(stmt, BatchStatement):    # (is_prepared, query id, bound values)
            assert all(member[0] for member in stmt._statements_and_parameters)
    # and the server knows it as a prepared statement, with bind markers only
    prepared = [r.query_string for r in session.execute(
        "SELECT query_string FROM system.prepared_statements")]
    ours = [q for q in prepared if f'"{keyspace}"."samples"' in q]
    assert ours, prepared[:5]
    assert all(q.startswith(f'INSERT INTO "{keyspace}"."samples" ("recording", "seq"')
               and q.endswith("?)") and "GaCo02_01" not in q for q in ours)


async def test_features_contract_table(cassandra_port: int, session: Any, keyspace: str,
                                       runtimes: Any) -> None:
    from ml.features import FEATURE_NAMES

    n = 12
    data = {"recording": ["GaPt03_01"] * n, "window": np.arange(n, dtype=np.int64),
            "window_key": [f"GaPt03_01:{w}" for w in range(n)],
            "seq_first": np.arange(n, dtype=np.int64) * 500,
            "seq_last": np.arange(n, dtype=np.int64) * 500 + 999}
    data.update({name: np.full(n, i / 10.0) for i, name in enumerate(FEATURE_NAMES)})
    data["cadence"][3] = np.nan                           # an undefined feature: stored as NaN
    table = pa.table(data)
    rt = runtimes({"src": {"type": "memory_source", "rows": table.to_pylist(), "key": "window_key",
                           "outputs": ["cass"], "on_failure": "stop"},
                   "cass": {"type": "cassandra_sink", "port": cassandra_port,
                            "keyspace": keyspace, "table": "features", "contract": "features",
                            "on_failure": "stop"}})
    assert (await rt.run()).ok
    assert count(session, keyspace, "features") == n
    row = session.execute(f'SELECT window_key, cadence, "L_mean" FROM "{keyspace}".features '
                          "WHERE recording = %s AND window = %s", ("GaPt03_01", 3)).one()
    assert row.window_key == "GaPt03_01:3" and np.isnan(row.cadence)
    assert row.L_mean == FEATURE_NAMES.index("L_mean") / 10.0


async def test_an_existing_table_with_another_schema_fails_start_with_the_difference(
        cassandra_port: int, session: Any, keyspace: str, runtimes: Any) -> None:
    session.execute(f'CREATE KEYSPACE "{keyspace}" WITH replication = '
                    "{'class': 'SimpleStrategy', 'replication_factor': 1}")
    session.execute(f'CREATE TABLE "{keyspace}".samples (recording text, seq int, '
                    'time text, PRIMARY KEY ((recording, seq)))')
    rt = pipeline(runtimes, sample_rows(["A"], 1), sink_cfg(cassandra_port, keyspace))
    with pytest.raises(StartError) as err:
        await rt.run()
    text = str(err.value)
    assert text.startswith(f"handler 'cass' (cassandra_sink) failed to start: SchemaMismatch: "
                           f"table {keyspace}.samples does not match the configured schema: ")
    assert "column 'seq': expected bigint, found int" in text
    assert "column 'time': expected double, found text" in text
    assert "column 'L1': expected double, missing from the table" in text
    assert ("primary key: expected ((recording), seq), found ((recording, seq))") in text


async def test_bad_rows_are_dead_lettered_and_the_rest_written(
        cassandra_port: int, session: Any, keyspace: str, runtimes: Any) -> None:
    rows = sample_rows(["GaCo03_01"], 40)
    rows[3]["recording"] = None                           # no partition key
    rows[7]["recording"] = "x" * 70_000                   # key over 64 KiB: server refuses it
    rt = pipeline(runtimes, rows, sink_cfg(cassandra_port, keyspace))
    report = await rt.run()
    assert report.ok and report.unacked == 0
    assert count(session, keyspace) == 38
    dead = sorted(rt.handlers["dlq"].rows(), key=lambda d: d["reason"])
    assert [d["reason"].split(":")[0] for d in dead] == ["null primary key column(s)",
                                                        "rejected by Cassandra"]
    assert "Key length of 70000 is longer than maximum of 65535" in dead[1]["reason"]
    assert '"seq": 3' in dead[0]["payload"]


async def test_asyncio_reactor_works_too(cassandra_port: int, session: Any, keyspace: str,
                                         runtimes: Any) -> None:
    rt = pipeline(runtimes, sample_rows(["SiPt01_01"], 200),
                  sink_cfg(cassandra_port, keyspace, connection_class="asyncio"))
    assert (await rt.run()).ok
    assert count(session, keyspace) == 200


async def test_unreachable_cluster_fails_start_clearly(runtimes: Any, keyspace: str) -> None:
    rt = pipeline(runtimes, sample_rows(["A"], 1), {
        "type": "cassandra_sink", "port": 1, "keyspace": keyspace, "table": "samples",
        "contract": "samples", "connect_timeout": 1.0, "on_failure": "stop",
        "connect_retry": {"max_attempts": 2, "backoff": 0.1}})
    with pytest.raises(StartError, match=r"failed to start: NoHostAvailable: .*127\.0\.0\.1:1"):
        await rt.run()
