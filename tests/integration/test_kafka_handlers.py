"""kafka_sink and kafka_source on the real broker (127.0.0.1:9092, `python -m stack up kafka`).

Every test uses its own topics and consumer groups (a per-run id in their names)
and deletes its topics at the end. A broker that is not up fails the test with
the command that starts it (conftest ``stack_service``).
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from handlers import arrow_codec
from pipeline import Runtime, Source, setting
from pipeline.log import configure_logging

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
RUN = uuid.uuid4().hex[:10]


# -- a source of raw samples (handlers/README.md §1 shape, the columns that matter) ----------

@dataclasses.dataclass(frozen=True)
class RecordingSourceSettings:
    recordings: list[str] = setting(["GaCo01_01", "GaPt03_02", "SiCo05_01"], doc="ids")
    first: int = setting(0, doc="first seq", min=0)
    last: int = setting(999, doc="last seq (inclusive)", min=0)
    batch_size: int = setting(100, doc="rows per batch and recording", min=1)
    interval: float = setting(0.0, doc="seconds between batches", min=0)


class RecordingSource(Source):
    """Emits each recording's samples ``first..last`` in seq order, recordings interleaved."""

    Settings: ClassVar[type] = RecordingSourceSettings

    def __init__(self, name: str, settings: Any = None) -> None:
        super().__init__(name, settings)
        self.committed: list[Any] = []

    async def run(self) -> None:
        s = self.settings
        for start in range(s.first, s.last + 1, s.batch_size):
            seq = np.arange(start, min(start + s.batch_size, s.last + 1), dtype=np.int64)
            for rec in s.recordings:
                batch = pa.record_batch({
                    "recording": pa.array([rec] * len(seq)),
                    "seq": pa.array(seq),
                    "time": pa.array(seq / 100.0),
                    "L": pa.array(seq * 0.5),
                    "device": pa.array([f"insole-{rec}"] * len(seq)),
                })
                await self.emit(batch, key="seq", meta={"origin": "it", "recording": rec},
                                token=(rec, int(seq[0])))
            if s.interval:
                await asyncio.sleep(s.interval)

    async def commit(self, tokens: list[Any]) -> None:
        self.committed.extend(tokens)


# -- fixtures and helpers -----------------------------------------------------------------

@pytest.fixture(autouse=True)
def _logs() -> None:
    configure_logging("info")


@pytest.fixture
def kafka(stack_service: Callable[[str], Any]) -> str:
    return stack_service("kafka").address()


@pytest.fixture
async def topics(kafka: str) -> AsyncIterator[Callable[..., str]]:
    """``topics("name")`` -> a unique topic name; every one is deleted at the end."""
    made: list[str] = []

    def make(name: str) -> str:
        topic = f"it-kafka-{RUN}-{name}-{uuid.uuid4().hex[:6]}"
        made.append(topic)
        return topic

    yield make
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        gone = [t for t in made if t in existing]
        if gone:
            await admin.delete_topics(gone)
    finally:
        await admin.close()


@pytest.fixture
def runtime_settings() -> dict[str, Any]:
    """What ``runtimes`` (conftest.py) builds drains for 10 s at the most."""
    return {"admin_enabled": False, "drain_timeout": 10.0}


async def create_topic(kafka: str, topic: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


async def produce(kafka: str, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key) for key, value in messages]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def encoded(recording: str, first: int, n: int) -> bytes:
    seq = np.arange(first, first + n, dtype=np.int64)
    return arrow_codec.encode(pa.record_batch({"recording": [recording] * n, "seq": seq}),
                              key="seq")


async def read_topic(kafka: str, topic: str) -> list[Any]:
    """Every message of ``topic`` (all partitions), without a consumer group."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await admin.start()
    try:
        (meta,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    if meta["error_code"] != 0:
        raise LookupError(f"topic {topic}: error {meta['error_code']}")
    tps = [TopicPartition(topic, p["partition"]) for p in meta["partitions"]]
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        out: list[Any] = []
        async with asyncio.timeout(60):
            while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
                batch = await consumer.getmany(timeout_ms=500)
                for msgs in batch.values():
                    out.extend(msgs)
        return out
    finally:
        await consumer.stop()


async def committed_offsets(kafka: str, group: str, topic: str,
                            partitions: int) -> dict[int, int | None]:
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka, group_id=group,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        await consumer.stop()


async def end_offsets(kafka: str, topic: str) -> dict[int, int | None]:
    """Partition -> offset after its last message (None for an empty partition)."""
    ends: dict[int, int | None] = {}
    for msg in await read_topic(kafka, topic):
        ends[msg.partition] = max(ends.get(msg.partition) or 0, msg.offset + 1)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await admin.start()
    try:
        (meta,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return {p["partition"]: ends.get(p["partition"]) for p in meta["partitions"]}


def sample_pairs(messages: list[Any]) -> list[tuple[str, int]]:
    pairs = []
    for msg in messages:
        data = arrow_codec.decode(msg.value).data
        pairs += zip(data.column("recording").to_pylist(), data.column("seq").to_pylist(),
                     strict=True)
    return pairs


def rows_of(sink: Any) -> list[tuple[str, int]]:
    return [(r["recording"], r["seq"]) for b in sink.batches
            for r in b.data.select(["recording", "seq"]).to_pylist()]


async def until(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


def source_cfg(kafka: str, topic: str, group: str, **extra: Any) -> dict[str, Any]:
    return {"type": "kafka_source", "bootstrap_servers": [kafka], "topics": [topic],
            "group_id": group, "on_failure": "stop", **extra}


def sink_cfg(kafka: str, topic: str, **extra: Any) -> dict[str, Any]:
    return {"type": "kafka_sink", "bootstrap_servers": [kafka], "topic": topic,
            "on_failure": "stop", **extra}


ALL = {(r, s) for r in ("GaCo01_01", "GaPt03_02", "SiCo05_01") for s in range(1000)}


# -- tests --------------------------------------------------------------------------------

async def test_roundtrip_through_kafka_keeps_rows_key_and_meta(kafka: str, topics: Any,
                                                               runtimes: Any) -> None:
    topic = topics("roundtrip")
    writer = runtimes({
        "src": {"type": "test_kafka_handlers:RecordingSource", "outputs": ["k"],
                "on_failure": "stop"},
        "k": sink_cfg(kafka, topic, partitions=5)})
    report = await writer.run()
    assert report.ok and report.unacked == 0
    assert len(writer.handlers["src"].committed) == 30
    messages = await read_topic(kafka, topic)
    assert len(messages) == 30                       # one message per (batch, recording)
    for msg in messages:
        assert dict(msg.headers)["seq_last"] == str(
            arrow_codec.decode(msg.value).data.column("seq")[-1].as_py()).encode()

    reader = runtimes({
        "ks": source_cfg(kafka, topic, f"g-{topic}", outputs=["out"]),
        "out": {"type": "memory_sink", "on_failure": "stop"}})
    async with reader:
        await until(lambda: reader.handlers["out"].row_count >= 3000, "3000 rows read back")
    got = rows_of(reader.handlers["out"])
    assert len(got) == 3000 and set(got) == ALL
    for rec in ("GaCo01_01", "GaPt03_02", "SiCo05_01"):
        assert [s for r, s in got if r == rec] == list(range(1000))   # in order per recording
    batch = reader.handlers["out"].batches[0]
    assert batch.key == "seq"
    assert batch.schema.names == ["recording", "seq", "time", "L", "device"]
    assert batch.meta["origin"] == "it" and batch.meta["kafka_topic"] == topic
    assert batch.meta["recording"] == batch.meta["kafka_key"]
    offsets = await committed_offsets(kafka, f"g-{topic}", topic, 5)
    assert offsets == await end_offsets(kafka, topic)       # everything acknowledged
    assert len(offsets) == 5                                # the topic the sink created


async def test_offsets_are_committed_only_after_the_downstream_commit(
        kafka: str, topics: Any, runtimes: Any) -> None:
    topic = topics("commit")
    group = f"g-{topic}"
    await create_topic(kafka, topic, 1)
    await produce(kafka, topic, [(b"A", encoded("A", i * 10, 10)) for i in range(20)])
    # a sink so slow that the pipeline is stopped while most messages are in flight
    first = runtimes({"ks": source_cfg(kafka, topic, group, outputs=["slow"]),
                      "slow": {"type": "memory_sink", "delay": 0.5, "on_failure": "stop",
                               "capacity": 1}}, drain_timeout=0.3)
    async with first:
        await until(lambda: len(first.handlers["slow"].batches) >= 2, "two slow writes")
    before = (await committed_offsets(kafka, group, topic, 1))[0]
    seen_first = rows_of(first.handlers["slow"])
    assert before is not None and before >= 2
    assert before <= len(first.handlers["slow"].batches)   # never past what the sink wrote
    assert before < 20                             # the rest was in flight: not committed

    second = runtimes({"ks": source_cfg(kafka, topic, group, outputs=["out"]),
                       "out": {"type": "memory_sink", "on_failure": "stop"}})
    async with second:
        await until(lambda: second.handlers["out"].row_count >= (20 - before) * 10,
                    "the uncommitted rest")
    offsets = [b.meta["kafka_offset"] for b in second.handlers["out"].batches]
    assert offsets == list(range(before, 20))      # re-read exactly from the committed offset
    assert set(seen_first) | set(rows_of(second.handlers["out"])) == {
        ("A", s) for s in range(200)}
    assert (await committed_offsets(kafka, group, topic, 1))[0] == 20


async def test_a_slow_sink_pauses_the_consumer_and_nothing_is_lost(
        kafka: str, topics: Any, runtimes: Any) -> None:
    topic = topics("backpressure")
    await create_topic(kafka, topic, 2)
    await produce(kafka, topic, [(k, encoded(k.decode(), i, 1))
                                 for i in range(100) for k in (b"A", b"B")])
    rt = runtimes({"ks": source_cfg(kafka, topic, f"g-{topic}", outputs=["out"],
                                    max_buffered=4),
                   "out": {"type": "memory_sink", "delay": 0.005, "capacity": 1,
                           "on_failure": "stop"}})
    async with rt:
        await until(lambda: rt.handlers["out"].row_count >= 200, "200 rows")
        paused = rt.metrics.value("kafka_pauses", "ks")
    got = rows_of(rt.handlers["out"])
    assert sorted(got) == sorted((r, s) for r in "AB" for s in range(100))
    assert paused > 0
    assert await committed_offsets(kafka, f"g-{topic}", topic, 2) == await end_offsets(
        kafka, topic)


async def test_two_consumers_in_one_group_rebalance_without_loss(
        kafka: str, topics: Any, runtimes: Any) -> None:
    topic = topics("rebalance")
    group = f"g-{topic}"
    await create_topic(kafka, topic, 4)
    keys = [f"R{i}".encode() for i in range(8)]
    await produce(kafka, topic, [(k, encoded(k.decode(), i, 1)) for i in range(50) for k in keys])

    def member() -> Runtime:
        return runtimes({"ks": source_cfg(kafka, topic, group, outputs=["out"],
                                          heartbeat_interval_ms=300, session_timeout_ms=6000,
                                          max_buffered=8),
                         "out": {"type": "memory_sink", "delay": 0.002, "on_failure": "stop",
                                 "capacity": 2}})

    one, two = member(), member()
    async with one:
        await until(lambda: one.handlers["out"].row_count >= 50, "the first member reading")
        async with two:                             # joins: the group rebalances
            await until(lambda: one.handlers["ks"].assignment and two.handlers["ks"].assignment
                        and len(one.handlers["ks"].assignment
                                | two.handlers["ks"].assignment) == 4, "a shared assignment",
                        timeout=60)
            await produce(kafka, topic, [(k, encoded(k.decode(), i, 1))
                                         for i in range(50, 100) for k in keys])
            await until(lambda: set(rows_of(one.handlers["out"]))
                        | set(rows_of(two.handlers["out"])) >= {
                            (k.decode(), i) for k in keys for i in range(100)},
                        "every message read by one member or the other")
            assert not (one.handlers["ks"].assignment & two.handlers["ks"].assignment)
    got = rows_of(one.handlers["out"]) + rows_of(two.handlers["out"])
    assert set(got) == {(k.decode(), i) for k in keys for i in range(100)}   # no loss
    duplicates = len(got) - len(set(got))
    # at-least-once: a revoke waits for in-flight messages, so duplicates are rare; any are
    # bounded by what one member had in flight (buffer + channel) per rebalance
    assert duplicates <= 2 * (8 + 2 + 1), duplicates


async def test_undecodable_message_goes_to_dead_letter_and_is_committed(
        kafka: str, topics: Any, runtimes: Any) -> None:
    topic = topics("poison")
    await create_topic(kafka, topic, 1)
    await produce(kafka, topic, [(b"A", encoded("A", 0, 5)), (b"A", b"\xff not arrow"),
                                 (b"A", encoded("A", 5, 5))])
    rt = runtimes({"ks": source_cfg(kafka, topic, f"g-{topic}", outputs=["out"],
                                    on_failure="dead_letter"),
                   "out": {"type": "memory_sink", "on_failure": "stop"}})
    async with rt:
        await until(lambda: rt.handlers["out"].row_count >= 10, "the valid rows")
        await until(lambda: len(rt.handlers["dlq"].batches) == 1, "the dead letter")
    dead = rt.handlers["dlq"].rows()[0]
    assert dead["reason"].startswith(f"undecodable Kafka message {topic}[0]@1: not an Arrow")
    assert dead["payload_encoding"] == "base64"
    assert (await committed_offsets(kafka, f"g-{topic}", topic, 1))[0] == 3


async def test_high_water_mark_gives_exactly_once_across_a_restart(
        kafka: str, topics: Any, runtimes: Any) -> None:
    topic = topics("eos")
    first = runtimes({"src": {"type": "test_kafka_handlers:RecordingSource", "last": 599,
                              "outputs": ["k"], "on_failure": "stop"},
                      "k": sink_cfg(kafka, topic)})
    assert (await first.run()).ok
    # the restarted pipeline: upstream redelivers from seq 300 (unacknowledged), then new rows
    second = runtimes({"src": {"type": "test_kafka_handlers:RecordingSource", "first": 300,
                               "batch_size": 70, "outputs": ["k"], "on_failure": "stop"},
                       "k": sink_cfg(kafka, topic)})
    assert (await second.run()).ok
    sink = second.handlers["k"]
    assert sink.high_water == dict.fromkeys(("GaCo01_01", "GaPt03_02", "SiCo05_01"), 999)
    assert second.metrics.value("kafka_rows_already_written", "k") == 3 * 300
    pairs = sample_pairs(await read_topic(kafka, topic))
    assert len(pairs) == len(set(pairs)) == 3000 and set(pairs) == ALL


def _settings_file(tmp: Path, kafka: str, topic: str) -> Path:
    path = tmp / "eos.toml"
    path.write_text(f"""
[runtime]
admin_enabled = false
drain_timeout = 5

[dead_letter]
target = "dlq"

[handlers.src]
type = "test_kafka_handlers:RecordingSource"
last = 2999
batch_size = 20
interval = 0.01
outputs = ["k"]
on_failure = "stop"

[handlers.k]
type = "kafka_sink"
bootstrap_servers = ["{kafka}"]
topic = "{topic}"
on_failure = "stop"

[handlers.dlq]
type = "jsonl_sink"
path = "{tmp / 'dlq.jsonl'}"
""")
    return path


async def test_kill_and_restart_leaves_each_sample_exactly_once(
        kafka: str, topics: Any, tmp_path: Path) -> None:
    topic = topics("kill")
    settings = _settings_file(tmp_path, kafka, topic)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)]),
           "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(ROOT / "run.py"), "--settings", str(settings)]
    log = (tmp_path / "first.log").open("w")
    # a child process we kill -9 mid-stream: Popen on purpose (not a blocking wait)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,  # noqa: ASYNC220
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        written = 0
        while written < 60:                          # mid-stream: some messages written
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the first run wrote nothing"
            await asyncio.sleep(0.2)
            try:
                written = len(await read_topic(kafka, topic))
            except Exception:  # noqa: BLE001 - the topic may not exist yet
                written = 0
        proc.send_signal(signal.SIGKILL)             # no drain, no close: a crash
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
    at_kill = sample_pairs(await read_topic(kafka, topic))
    assert 0 < len(at_kill) < 9000
    # the restart replays the whole stream (an upstream redelivering everything unacknowledged)
    done = await asyncio.to_thread(subprocess.run, cmd, cwd=ROOT, env=env, capture_output=True,
                                   text=True, timeout=100)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    logs = done.stdout + done.stderr
    assert "event=kafka_sink.read_back" in logs and "recordings=3" in logs, logs[-3000:]
    pairs = sample_pairs(await read_topic(kafka, topic))
    expected = {(r, s) for r in ("GaCo01_01", "GaPt03_02", "SiCo05_01") for s in range(3000)}
    assert len(pairs) == len(set(pairs)) == 9000 and set(pairs) == expected
