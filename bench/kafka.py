"""kafka_sink and kafka_source throughput, beside one JSON message per row.

    python bench/kafka.py                       # 120 000 rows, batches of 100 and 1000
    python bench/kafka.py --rows 500000 --batch-sizes 100,2000 --compression gzip,none,none/zstd

``--compression`` lists producer compressions (``auto``, ``gzip``, ``none``, ``zstd`` and
``lz4`` when cramjam is installed), each optionally with ``/zstd`` or ``/lz4`` for the
compression of the Arrow buffers inside the value (``ipc_compression``).

Needs Kafka on 127.0.0.1:9092 (``python -m stack up kafka``). Rows are raw
samples (handlers/README.md §1) from the gaitpdb recordings in GAITPDB_DIR when
it is set, else synthetic rows of the same shape. Topics are created with a
unique name and deleted at the end.

Figures, in the same run:

sink
    batches of ``--batch-size`` rows of one recording each into ``kafka_sink``
    (idempotent producer, acks=all, one Arrow IPC message per batch and
    recording, seq high-water dedupe on): rows/s and messages/s from the first
    emit to the last upstream acknowledgement, i.e. every row acknowledged by
    the broker.
source
    the same topic read back by ``kafka_source`` (consumer group, offsets
    committed after the downstream commit) into a sink that only counts: rows/s
    from the pipeline being ready (joining the group included) to the last row.
baseline
    the tutorial's design: one JSON object per row, ``send_and_wait`` each
    (acks=all), on ``--baseline-rows`` rows.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, ClassVar

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

import numpy as np
import pyarrow as pa
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from pipeline import NoSettings, Runtime, Sink, Source
from pipeline.log import configure_logging

_TABLE: pa.Table | None = None
_BATCH_SIZE = 100


class TableSource(Source):
    """Emits the bench table in per-recording slices; remembers first emit and last commit."""

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


class CountSink(Sink):
    """Counts rows; notes when the last expected row arrived."""

    Settings: ClassVar[type] = NoSettings
    rows = 0
    expected = 0
    done = 0.0

    async def write(self, batch: Any) -> None:
        CountSink.rows += batch.num_rows
        if CountSink.rows >= CountSink.expected and not CountSink.done:
            CountSink.done = time.perf_counter()


def sample_table(rows: int) -> tuple[pa.Table, str]:
    """``rows`` raw samples (contract §1): gaitpdb when GAITPDB_DIR is set, else synthetic."""
    sensors = [f"{side}{i}" for side in "LR" for i in range(1, 9)] + ["L", "R"]
    parts, n = [], 0
    if os.environ.get("GAITPDB_DIR"):
        from ml import data

        for _, rec in data.list_recordings().iterrows():
            x = data.load_recording(rec["path"])
            take = min(len(x), rows - n)
            part = {"recording": pa.array([rec["id"]] * take),
                    "seq": pa.array(np.arange(take, dtype=np.int64)), "time": x[:take, 0]}
            part.update({name: x[:take, i + 1] for i, name in enumerate(sensors)})
            part["device"] = pa.array([f"insole-{rec['id']}"] * take)
            parts.append(pa.table(part))
            n += take
            if n >= rows:
                break
        return pa.concat_tables(parts), "gaitpdb"
    rng = np.random.default_rng(7)
    while n < rows:
        take, rid = min(12_000, rows - n), f"SYN{len(parts):04d}_01"
        part = {"recording": pa.array([rid] * take),
                "seq": pa.array(np.arange(take, dtype=np.int64)),
                "time": np.arange(take) / 100.0}
        part.update({name: rng.random(take) * 400.0 for name in sensors})
        part["device"] = pa.array([f"insole-{rid}"] * take)
        parts.append(pa.table(part))
        n += take
    return pa.concat_tables(parts), "synthetic"


async def run_sink(kafka: str, topic: str, compression: str) -> tuple[float, int]:
    producer, _, ipc = compression.partition("/")
    TableSource.committed = 0
    rt = Runtime.from_dict({
        "runtime": {"admin_enabled": False, "capacity": 16, "drain_timeout": 600},
        "handlers": {
            "source": {"type": "__main__:TableSource", "outputs": ["kafka"],
                       "on_failure": "stop"},
            "kafka": {"type": "kafka_sink", "bootstrap_servers": [kafka], "topic": topic,
                      "partitions": 3, "compression": producer,
                      "ipc_compression": ipc or "none", "on_failure": "stop"},
        }}, file="bench")
    report = await rt.run()
    assert report.ok and report.unacked == 0, report
    assert _TABLE is not None and TableSource.committed == _TABLE.num_rows
    messages = int(rt.metrics.value("kafka_messages_sent", "kafka"))
    return TableSource.last_commit - TableSource.first_emit, messages


async def run_source(kafka: str, topic: str, rows: int) -> float:
    CountSink.rows, CountSink.expected, CountSink.done = 0, rows, 0.0
    rt = Runtime.from_dict({
        "runtime": {"admin_enabled": False, "capacity": 16, "drain_timeout": 60},
        "handlers": {
            "kafka": {"type": "kafka_source", "bootstrap_servers": [kafka], "topics": [topic],
                      "group_id": f"bench-{topic}", "outputs": ["count"],
                      "on_failure": "stop"},
            "count": {"type": "__main__:CountSink", "on_failure": "stop"},
        }}, file="bench")
    async with rt:
        ready = time.perf_counter()          # started; the group join is part of the figure
        async with asyncio.timeout(600):
            while not CountSink.done:
                await asyncio.sleep(0.01)
    return CountSink.done - ready


async def run_baseline(kafka: str, topic: str, table: pa.Table) -> float:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 3, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=kafka, acks="all")
    await producer.start()
    try:
        rows = table.to_pylist()
        t0 = time.perf_counter()
        for row in rows:
            await producer.send_and_wait(topic, json.dumps(row).encode(),
                                         key=row["recording"].encode())
        return time.perf_counter() - t0
    finally:
        await producer.stop()


async def delete_topics(kafka: str, topics: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        gone = [t for t in topics if t in existing]
        if gone:
            await admin.delete_topics(gone)
    finally:
        await admin.close()


async def main(args: argparse.Namespace) -> None:
    global _TABLE, _BATCH_SIZE
    _TABLE, origin = sample_table(args.rows)
    # one recording per batch, as an MQTT message of N samples would give
    table = _TABLE
    print(f"kafka bench: {table.num_rows:,} {origin} sample rows ({table.num_columns} columns), "
          f"broker {args.kafka}, Arrow IPC value per (batch, recording)", flush=True)
    made: list[str] = []
    summary: list[tuple[str, float]] = []
    try:
        for batch_size in args.batch_sizes:
            for compression in args.compression:
                _BATCH_SIZE = batch_size
                topic = f"bench-kafka-{uuid.uuid4().hex[:10]}"
                made.append(topic)
                elapsed, messages = await run_sink(args.kafka, topic, compression)
                rate = table.num_rows / elapsed
                label = f"sink, batch {batch_size}, {compression}"
                summary.append((label, rate))
                print(f"  {label:<40} {rate:>10,.0f} rows/s {messages / elapsed:>8,.0f} msg/s "
                      f"({table.num_rows:,} rows, {messages:,} messages in {elapsed:.2f} s)",
                      flush=True)
                elapsed = await run_source(args.kafka, topic, table.num_rows)
                label = f"source, batch {batch_size}, {compression}"
                summary.append((label, table.num_rows / elapsed))
                print(f"  {label:<40} {table.num_rows / elapsed:>10,.0f} rows/s "
                      f"(read back from ready, group join included, offsets committed, "
                      f"in {elapsed:.2f} s)", flush=True)
        topic = f"bench-kafka-json-{uuid.uuid4().hex[:10]}"
        made.append(topic)
        base = table.slice(0, args.baseline_rows)
        elapsed = await run_baseline(args.kafka, topic, base)
        summary.append(("baseline: one JSON message per row", base.num_rows / elapsed))
        print(f"  {'baseline: one JSON message per row':<40} {base.num_rows / elapsed:>10,.0f} "
              f"rows/s (send_and_wait each, acks=all, {base.num_rows:,} rows in "
              f"{elapsed:.2f} s)", flush=True)
    finally:
        await delete_topics(args.kafka, made)
    print("\nsummary (rows/s):")
    for label, rate in summary:
        print(f"  {label:<40} {rate:>10,.0f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=120_000)
    parser.add_argument("--baseline-rows", type=int, default=2_000)
    parser.add_argument("--batch-sizes", type=lambda t: [int(x) for x in t.split(",")],
                        default=[100, 1000])
    parser.add_argument("--compression", type=lambda t: t.split(","),
                        default=["auto", "none", "none/zstd"])
    parser.add_argument("--kafka", default="127.0.0.1:9092")
    parser.add_argument("--log", default="warning")
    args = parser.parse_args()
    configure_logging(args.log)
    asyncio.run(main(args))
