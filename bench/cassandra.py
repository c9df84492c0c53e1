"""cassandra_sink throughput: rows/s upserted, beside one non-prepared INSERT per row.

    python bench/cassandra.py                     # 60 000 rows, three sink runs
    python bench/cassandra.py --rows 200000 --runs 1:64,20:128,50:128 --batch-size 1000
    python bench/cassandra.py --connection-class asyncio

Needs Cassandra on 127.0.0.1:9042 (``python -m stack up cassandra``). Rows are
raw samples (handlers/README.md §1) from the gaitpdb recordings in GAITPDB_DIR
when it is set, else synthetic rows of the same shape.

Figures, in the same run and the same keyspace (dropped at the end):

sink
    the pipeline path: a source emits batches of ``--batch-size`` rows into a
    ``cassandra_sink`` (contract ``samples``, a prepared INSERT per row, the rows
    of a partition grouped into UNLOGGED batches of ``batch_rows``, at most
    ``max_concurrency`` statements in flight, one run per ``--runs`` entry);
    rows/s from the first emit to the last upstream acknowledgement, i.e.
    every row acknowledged by Cassandra.
baseline
    the naive way: ``session.execute("INSERT ... VALUES (%s, ...)", row)`` for
    one row after the other, the values formatted into the CQL text by the
    driver (not prepared, not concurrent), on ``--baseline-rows`` rows.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, ClassVar

# This file is named like the driver package: never let "import cassandra" find it.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

import numpy as np
import pyarrow as pa

from handlers.cassandra_sink import contract_spec
from pipeline import NoSettings, Runtime, Source
from pipeline.log import configure_logging

_TABLE: pa.Table | None = None
_BATCH_SIZE = 1000


class TableSource(Source):
    """Emits the bench table in slices; remembers when it began and the last commit."""

    Settings: ClassVar[type] = NoSettings
    first_emit = 0.0
    last_commit = 0.0
    committed = 0

    async def run(self) -> None:
        assert _TABLE is not None
        TableSource.first_emit = time.perf_counter()
        for batch in _TABLE.to_batches(max_chunksize=_BATCH_SIZE):
            await self.emit(batch, key="seq", token=batch.num_rows)

    async def commit(self, tokens: list[Any]) -> None:
        TableSource.committed += sum(tokens)
        TableSource.last_commit = time.perf_counter()


def sample_table(rows: int) -> tuple[pa.Table, str]:
    """``rows`` raw samples (contract §1): gaitpdb when GAITPDB_DIR is set, else synthetic."""
    cols = list(contract_spec("samples").columns)
    if os.environ.get("GAITPDB_DIR"):
        from ml import data

        parts, n = [], 0
        for _, rec in data.list_recordings().iterrows():
            x = data.load_recording(rec["path"])
            take = min(len(x), rows - n)
            part = {"recording": pa.array([rec["id"]] * take),
                    "seq": pa.array(np.arange(take, dtype=np.int64))}
            for i, name in enumerate(cols[2:21]):
                part[name] = pa.array(x[:take, i])
            part["device"] = pa.array([f"insole-{rec['id']}"] * take)
            parts.append(pa.table(part))
            n += take
            if n >= rows:
                break
        return pa.concat_tables(parts), "gaitpdb"
    rng = np.random.default_rng(7)
    per = 12_000
    rec = np.arange(rows) // per
    part = {"recording": pa.array([f"SYN{r:04d}_01" for r in rec]),
            "seq": pa.array(np.arange(rows, dtype=np.int64) % per)}
    part["time"] = pa.array((np.arange(rows) % per) / 100.0)
    for name in cols[3:21]:
        part[name] = pa.array(rng.random(rows) * 400.0)
    part["device"] = pa.array([f"insole-SYN{r:04d}_01" for r in rec])
    return pa.table(part), "synthetic"


async def run_sink(keyspace: str, table: str, batch_rows: int, concurrency: int,
                   connection_class: str, port: int) -> float:
    TableSource.committed = 0
    rt = Runtime.from_dict({
        "runtime": {"admin_enabled": False, "capacity": 8, "drain_timeout": 600},
        "handlers": {
            "source": {"type": "__main__:TableSource", "outputs": ["cassandra"],
                       "on_failure": "stop"},
            "cassandra": {"type": "cassandra_sink", "keyspace": keyspace, "table": table,
                          "contract": "samples", "max_concurrency": concurrency,
                          "batch_rows": batch_rows,
                          "connection_class": connection_class, "port": port,
                          "on_failure": "stop"},
        }}, file="bench")
    report = await rt.run()
    assert report.ok and report.unacked == 0, report
    assert _TABLE is not None and TableSource.committed == _TABLE.num_rows
    return TableSource.last_commit - TableSource.first_emit


def run_baseline(keyspace: str, rows: pa.Table, port: int) -> float:
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
    from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy

    profile = ExecutionProfile(
        load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy()), request_timeout=30)
    cluster = Cluster(["127.0.0.1"], port=port, protocol_version=5,
                      execution_profiles={EXEC_PROFILE_DEFAULT: profile})
    try:
        session = cluster.connect()
        spec = contract_spec("samples")
        cols = ", ".join(f'"{c}"' for c in spec.columns)
        session.execute(f'CREATE TABLE IF NOT EXISTS "{keyspace}".samples_plain ('
                        + ", ".join(f'"{c}" {t}' for c, t in spec.columns.items())
                        + ', PRIMARY KEY (("recording"), "seq"))')
        cql = (f'INSERT INTO "{keyspace}".samples_plain ({cols}) VALUES '
               f'({", ".join(["%s"] * len(spec.columns))})')
        values = list(zip(*[rows.column(c).to_pylist() for c in spec.columns], strict=True))
        t0 = time.perf_counter()
        for row in values:
            session.execute(cql, row)
        return time.perf_counter() - t0
    finally:
        cluster.shutdown()


def drop_keyspace(keyspace: str, port: int) -> None:
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
    from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy

    profile = ExecutionProfile(
        load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy()), request_timeout=60)
    cluster = Cluster(["127.0.0.1"], port=port, protocol_version=5,
                      execution_profiles={EXEC_PROFILE_DEFAULT: profile})
    try:
        cluster.connect().execute(f'DROP KEYSPACE IF EXISTS "{keyspace}"')
    finally:
        cluster.shutdown()


async def main(args: argparse.Namespace) -> None:
    global _TABLE, _BATCH_SIZE
    _TABLE, origin = sample_table(args.rows)
    _BATCH_SIZE = args.batch_size
    keyspace = f"bench_{uuid.uuid4().hex[:10]}"
    print(f"cassandra_sink bench: {_TABLE.num_rows:,} {origin} sample rows "
          f"({_TABLE.num_columns} columns), batches of {args.batch_size}, "
          f"connection_class={args.connection_class}, keyspace {keyspace}", flush=True)
    results = []
    try:
        for i, (batch_rows, concurrency) in enumerate(args.runs):
            elapsed = await run_sink(keyspace, f"samples_{i}", batch_rows, concurrency,
                                     args.connection_class, args.port)
            rate = _TABLE.num_rows / elapsed
            results.append((f"sink, batch_rows {batch_rows}, max_concurrency {concurrency}",
                            rate))
            print(f"  sink (prepared, batch_rows {batch_rows:>3}, {concurrency:>4} in flight): "
                  f"{rate:>10,.0f} rows/s ({_TABLE.num_rows:,} rows in {elapsed:.2f} s)",
                  flush=True)
        base = _TABLE.slice(0, args.baseline_rows)
        elapsed = await asyncio.to_thread(run_baseline, keyspace, base, args.port)
        rate = base.num_rows / elapsed
        results.append(("one non-prepared INSERT per row", rate))
        print(f"  baseline (one non-prepared INSERT per row, sequential): {rate:>10,.0f} rows/s "
              f"({base.num_rows:,} rows in {elapsed:.2f} s)", flush=True)
    finally:
        await asyncio.to_thread(drop_keyspace, keyspace, args.port)
    best = max(r for name, r in results if name.startswith("sink"))
    print(f"\nsummary: sink {best:,.0f} rows/s vs baseline {results[-1][1]:,.0f} rows/s "
          f"({best / results[-1][1]:.1f}x)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--baseline-rows", type=int, default=3_000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument(
        "--runs", default=[(1, 64), (20, 64), (20, 256)],
        type=lambda t: [tuple(int(v) for v in x.split(":")) for x in t.split(",")],
        help="sink runs as batch_rows:max_concurrency,... (default 1:64,20:64,20:256)")
    parser.add_argument("--connection-class", choices=["libev", "asyncio"], default="libev")
    parser.add_argument("--port", type=int, default=9042)
    parser.add_argument("--log", default="warning")
    args = parser.parse_args()
    configure_logging(args.log)
    asyncio.run(main(args))
