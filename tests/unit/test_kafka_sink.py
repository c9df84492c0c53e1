"""kafka_sink against an in-memory fake broker: grouping, dedupe, failures, topic creation.

The real broker is exercised by tests/integration/test_kafka_handlers.py.
"""
from __future__ import annotations

import asyncio
import dataclasses
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from aiokafka import TopicPartition
from aiokafka import errors as kafka_errors

from handlers import arrow_codec
from handlers.kafka_sink import KafkaSink, KafkaSinkSettings, resolve_compression
from pipeline import StartError

# -- fake broker ------------------------------------------------------------------------


@dataclasses.dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


class FakeBroker:
    def __init__(self) -> None:
        self.topics: dict[str, list[list[Record]]] = {}
        self.fail: Callable[[Record], BaseException | None] | None = None
        self.created: list[tuple[str, int, int]] = []
        self.producers: list[FakeProducer] = []

    def create(self, topic: str, partitions: int) -> None:
        self.topics[topic] = [[] for _ in range(partitions)]

    def partition_of(self, topic: str, key: bytes | None) -> int:
        return zlib.crc32(key or b"") % len(self.topics[topic])

    def append(self, topic: str, key: bytes | None, value: bytes | None,
               headers: list[tuple[str, bytes]]) -> Record:
        p = self.partition_of(topic, key)
        log = self.topics[topic][p]
        rec = Record(topic, p, len(log), key, value, list(headers))
        log.append(rec)
        return rec

    def records(self, topic: str) -> list[Record]:
        return [r for part in self.topics[topic] for r in part]

    def rows(self, topic: str) -> list[dict[str, Any]]:
        return [row for r in self.records(topic)
                for row in arrow_codec.decode(r.value).data.to_pylist()]


BROKER = FakeBroker()


class FakeClient:
    async def fetch_all_metadata(self) -> None:
        return None


class FakeProducer:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.client = FakeClient()
        BROKER.producers.append(self)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def send(self, topic: str, value: bytes, key: bytes | None = None,
                   headers: list[tuple[str, bytes]] | None = None) -> asyncio.Future[Any]:
        fut = asyncio.get_running_loop().create_future()
        probe = Record(topic, -1, -1, key, value, list(headers or []))
        error = BROKER.fail(probe) if BROKER.fail else None
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(BROKER.append(topic, key, value, headers or []))
        return fut


class FakeAdmin:
    def __init__(self, **kwargs: Any) -> None:
        pass

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def list_topics(self) -> list[str]:
        return list(BROKER.topics)

    async def describe_topics(self, topics: list[str]) -> list[dict[str, Any]]:
        out = []
        for t in topics:
            if t in BROKER.topics:
                out.append({"topic": t, "error_code": 0, "partitions": [
                    {"partition": i} for i in range(len(BROKER.topics[t]))]})
            else:
                out.append({"topic": t, "error_code": 3, "partitions": []})
        return out

    async def create_topics(self, new_topics: list[Any]) -> Any:
        for nt in new_topics:
            BROKER.create(nt.name, nt.num_partitions)
            BROKER.created.append((nt.name, nt.num_partitions, nt.replication_factor))

        class Response:
            def to_object(self) -> dict[str, Any]:
                return {"topic_errors": [{"topic": nt.name, "error_code": 0,
                                          "error_message": None} for nt in new_topics]}
        return Response()


class FakeScanConsumer:
    """What the sink uses to read the topic's tail at start."""

    def __init__(self, **kwargs: Any) -> None:
        self.positions: dict[TopicPartition, int] = {}

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def assign(self, tps: list[TopicPartition]) -> None:
        self.positions = {tp: 0 for tp in tps}

    async def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: 0 for tp in tps}

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: len(BROKER.topics[tp.topic][tp.partition]) for tp in tps}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.positions[tp] = offset

    async def position(self, tp: TopicPartition) -> int:
        return self.positions[tp]

    async def getmany(self, *tps: TopicPartition, timeout_ms: int = 0,
                      max_records: int | None = None) -> dict[TopicPartition, list[Record]]:
        out = {}
        for tp in tps:
            log = BROKER.topics[tp.topic][tp.partition]
            got = log[self.positions[tp]:self.positions[tp] + 3]  # small fetches
            if got:
                out[tp] = got
                self.positions[tp] += len(got)
        return out


class FakeKafkaSink(KafkaSink):
    def _new_producer(self, **kwargs: Any) -> Any:
        return FakeProducer(**kwargs)

    def _new_admin(self, **kwargs: Any) -> Any:
        return FakeAdmin(**kwargs)

    def _new_consumer(self, **kwargs: Any) -> Any:
        return FakeScanConsumer(**kwargs)


@pytest.fixture(autouse=True)
def broker() -> FakeBroker:
    global BROKER
    BROKER = FakeBroker()
    return BROKER


# -- helpers ------------------------------------------------------------------------------

def sample_rows(recordings: list[str], seqs: range) -> list[dict[str, Any]]:
    return [{"recording": r, "seq": s, "L": float(s)} for s in seqs for r in recordings]


def pipeline(make_runtime: Any, rows: list[dict[str, Any]], *, batch_size: int = 100,
             **sink: Any) -> Any:
    return make_runtime({
        "src": {"type": "memory_source", "rows": rows, "batch_size": batch_size,
                "outputs": ["kafka"], "on_failure": "stop"},
        "kafka": {"type": "test_kafka_sink:FakeKafkaSink", "topic": "t", "health_interval": 0,
                  "retry": {"max_attempts": 3, "backoff": 0.0, "jitter": 0.0}, **sink},
    })


def seq_pairs(broker: FakeBroker, topic: str = "t") -> list[tuple[str, int]]:
    return [(r["recording"], r["seq"]) for r in broker.rows(topic)]


# -- tests --------------------------------------------------------------------------------

async def test_one_message_per_batch_and_recording(make_runtime: Any, broker: FakeBroker) -> None:
    rows = sample_rows(["A", "B"], range(100))          # 200 rows, interleaved
    report = await pipeline(make_runtime, rows, batch_size=50).run()
    assert report.ok and report.unacked == 0
    records = broker.records("t")
    assert len(records) == 8                            # 4 batches x 2 recordings
    for rec in records:
        decoded = arrow_codec.decode(rec.value)
        recs = set(decoded.data.column("recording").to_pylist())
        assert recs == {rec.key.decode()}
        seqs = decoded.data.column("seq").to_pylist()
        assert seqs == sorted(seqs)
        headers = dict(rec.headers)
        assert headers["seq_first"] == str(seqs[0]).encode()
        assert headers["seq_last"] == str(seqs[-1]).encode()
        assert headers["content-type"] == b"application/vnd.apache.arrow.stream"
        assert decoded.key == "seq"
    # a recording's messages share one partition, in seq order
    for name in ("A", "B"):
        parts = {r.partition for r in records if r.key == name.encode()}
        assert len(parts) == 1
    assert sorted(seq_pairs(broker)) == sorted((r["recording"], r["seq"]) for r in rows)


async def test_producer_is_idempotent_with_acks_all(make_runtime: Any,
                                                    broker: FakeBroker) -> None:
    await pipeline(make_runtime, sample_rows(["A"], range(3))).run()
    kwargs = broker.producers[-1].kwargs
    assert kwargs["enable_idempotence"] is True and kwargs["acks"] == "all"
    assert kwargs["compression_type"] == resolve_compression("auto")


async def test_topic_is_created_when_absent_and_reused_when_present(
        make_runtime: Any, broker: FakeBroker) -> None:
    await pipeline(make_runtime, sample_rows(["A"], range(3)), partitions=5,
                   replication_factor=1).run()
    assert broker.created == [("t", 5, 1)]
    await pipeline(make_runtime, sample_rows(["A"], range(3, 6)), partitions=7).run()
    assert broker.created == [("t", 5, 1)]
    assert len(broker.topics["t"]) == 5


async def test_missing_topic_without_create_fails_start(make_runtime: Any) -> None:
    rt = pipeline(make_runtime, sample_rows(["A"], range(3)), create_topic=False)
    with pytest.raises(StartError, match="topic 't' does not exist and create_topic = false"):
        await rt.run()


async def test_replay_after_restart_skips_rows_already_in_the_topic(
        make_runtime: Any, broker: FakeBroker) -> None:
    first = sample_rows(["A", "B", "C"], range(300))
    await pipeline(make_runtime, first).run()
    # the "restarted" pipeline replays from seq 150 (upstream never acknowledged them)
    # and goes on to 500: only 300..499 are new
    replay = sample_rows(["A", "B", "C"], range(150, 500))
    rt = pipeline(make_runtime, replay, dedupe_lookback=0)
    report = await rt.run()
    assert report.ok and report.unacked == 0
    pairs = seq_pairs(broker)
    assert len(pairs) == len(set(pairs)) == 1500
    assert rt.handlers["kafka"].high_water == {"A": 499, "B": 499, "C": 499}
    assert rt.metrics.value("kafka_rows_already_written", "kafka") == 450


async def test_high_water_mark_comes_from_headers_or_from_the_value(
        make_runtime: Any, broker: FakeBroker) -> None:
    broker.create("t", 2)
    batch = pa.record_batch({"recording": ["A", "A"], "seq": pa.array([7, 9], pa.int64())})
    broker.append("t", b"A", arrow_codec.encode(batch, key="seq"), [])  # no seq_last header
    broker.append("t", b"B", b"garbage", [("seq_last", b"41")])
    broker.append("t", b"C", b"garbage", [])  # undecodable, no header: ignored
    rt = pipeline(make_runtime, sample_rows(["A", "B", "C"], range(50)))
    await rt.run()
    sink = rt.handlers["kafka"]
    assert sink.high_water == {"A": 49, "B": 49, "C": 49}
    firsts: dict[bytes, bytes] = {}
    for r in broker.records("t"):  # partition by partition: a key's messages in order
        if "seq_first" in dict(r.headers):
            firsts.setdefault(r.key, dict(r.headers)["seq_first"])
    assert firsts == {b"A": b"10", b"B": b"42", b"C": b"0"}


async def test_lookback_limits_what_is_read_back(make_runtime: Any, broker: FakeBroker) -> None:
    broker.create("t", 1)
    for i in range(10):
        broker.append("t", f"R{i}".encode(), b"x", [("seq_last", b"5")])
    rt = pipeline(make_runtime, sample_rows(["A"], range(1)), dedupe_lookback=4)
    await rt.run()
    assert set(rt.handlers["kafka"].high_water) == {"R6", "R7", "R8", "R9", "A"}


async def test_unsorted_and_repeated_seq_within_a_batch(make_runtime: Any,
                                                        broker: FakeBroker) -> None:
    rows = [{"recording": "A", "seq": s, "L": 1.0} for s in [5, 3, 4, 3, 6, 0]]
    await pipeline(make_runtime, rows).run()
    assert [s for _, s in seq_pairs(broker)] == [0, 3, 4, 5, 6]


async def test_failed_message_fails_the_rest_of_its_recording_then_retry_completes(
        make_runtime: Any, broker: FakeBroker) -> None:
    sent: list[bytes | None] = []

    def fail_second_b(rec: Record) -> BaseException | None:
        sent.append(rec.key)
        if rec.key == b"B" and sent.count(b"B") == 2:
            return kafka_errors.KafkaTimeoutError("no ack")
        return None

    broker.fail = fail_second_b
    rows = sample_rows(["A", "B"], range(40))
    rt = pipeline(make_runtime, rows, batch_size=80, max_message_rows=10)
    report = await rt.run()
    assert report.ok and report.unacked == 0
    pairs = seq_pairs(broker)
    assert sorted(pairs) == sorted((r["recording"], r["seq"]) for r in rows)
    assert len(pairs) == len(set(pairs))            # the retry re-sent only what failed
    assert rt.metrics.value("retries", "kafka") == 1
    # B's messages stayed in order: 0-9, then (after the failure) 10-19, 20-29, 30-39
    b_firsts = [int(dict(r.headers)["seq_first"]) for r in broker.records("t") if r.key == b"B"]
    assert b_firsts == [0, 10, 20, 30]


async def test_connection_errors_mark_the_sink_disconnected(make_runtime: Any,
                                                            broker: FakeBroker) -> None:
    calls = {"n": 0}

    def flaky(rec: Record) -> BaseException | None:
        calls["n"] += 1
        return kafka_errors.KafkaConnectionError("broker down") if calls["n"] == 1 else None

    broker.fail = flaky
    rt = pipeline(make_runtime, sample_rows(["A"], range(5)))
    seen: list[tuple[bool, str]] = []
    sink = rt.handlers["kafka"]
    original = sink.set_connected

    def spy(connected: bool, detail: str = "") -> None:
        seen.append((connected, detail))
        original(connected, detail)

    sink.set_connected = spy  # type: ignore[method-assign]
    report = await rt.run()
    assert report.ok
    assert (False, "KafkaConnectionError: KafkaConnectionError: broker down") in seen
    assert seen[-1][0] is True
    assert len(seq_pairs(broker)) == 5


async def test_rows_without_recording_or_seq_are_dead_lettered(
        make_runtime: Any, broker: FakeBroker) -> None:
    rows = [{"recording": "A", "seq": 0}, {"recording": None, "seq": 1},
            {"recording": "A", "seq": None}, {"recording": "A", "seq": 3}]
    rt = pipeline(make_runtime, rows)
    report = await rt.run()
    assert report.ok and report.unacked == 0
    assert seq_pairs(broker) == [("A", 0), ("A", 3)]
    dead = rt.handlers["dlq"].rows()
    assert len(dead) == 2
    assert dead[0]["reason"] == "null 'recording' or null 'seq'"


async def test_batch_without_the_message_key_column_is_rejected(make_runtime: Any,
                                                                broker: FakeBroker) -> None:
    rt = pipeline(make_runtime, [{"seq": 1}])
    await rt.run()
    assert rt.handlers["dlq"].rows()[0]["reason"] == \
        "no column 'recording' (message_key) in the batch"


async def test_dedupe_key_skips_keys_already_written(make_runtime: Any,
                                                     broker: FakeBroker) -> None:
    segments = [{"path": f"/lake/A/part-{i}", "recording": "A", "rows": 10} for i in range(4)]

    def run(rows: list[dict[str, Any]]) -> Any:
        return make_runtime({
            "src": {"type": "memory_source", "rows": rows, "key": "path", "outputs": ["k"],
                    "on_failure": "stop"},
            "k": {"type": "test_kafka_sink:FakeKafkaSink", "topic": "segs", "dedupe": "key",
                  "health_interval": 0, "on_failure": "stop"}})

    await run(segments[:3]).run()
    rt = run(segments)                                  # a replay with one new segment
    await rt.run()
    paths = [r["path"] for r in broker.rows("segs")]
    assert paths == [s["path"] for s in segments]
    assert arrow_codec.decode(broker.records("segs")[0].value).key == "path"


async def test_dedupe_none_writes_replays_again(make_runtime: Any, broker: FakeBroker) -> None:
    rows = sample_rows(["A"], range(10))
    await pipeline(make_runtime, rows, dedupe="none").run()
    await pipeline(make_runtime, rows, dedupe="none").run()
    assert len(seq_pairs(broker)) == 20


async def test_large_groups_are_split_by_rows_and_bytes(make_runtime: Any,
                                                        broker: FakeBroker) -> None:
    rows = [{"recording": "A", "seq": i, "blob": "x" * 500} for i in range(100)]
    await pipeline(make_runtime, rows, max_message_rows=30, max_message_bytes=4096).run()
    records = broker.records("t")
    assert all(len(r.value) <= 4096 for r in records)
    assert len(records) > 4
    assert [s for _, s in seq_pairs(broker)] == list(range(100))


async def test_a_row_too_large_for_any_message_is_rejected_alone(
        make_runtime: Any, broker: FakeBroker) -> None:
    rows = [{"recording": "A", "seq": i, "blob": "x" * (5000 if i == 1 else 10)}
            for i in range(3)]
    rt = pipeline(make_runtime, rows, max_message_bytes=2048)
    await rt.run()
    assert [s for _, s in seq_pairs(broker)] == [0, 2]
    assert "above max_message_bytes (2048)" in rt.handlers["dlq"].rows()[0]["reason"]


def test_settings_refuse_seq_column_equal_to_message_key() -> None:
    with pytest.raises(ValueError, match="must be different"):
        KafkaSinkSettings(seq_column="recording")


def test_settings_refuse_sasl_without_user() -> None:
    with pytest.raises(ValueError, match="needs sasl_username"):
        KafkaSinkSettings(security_protocol="SASL_PLAINTEXT")


def test_compression_auto_falls_back_to_gzip_without_cramjam(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from aiokafka import codec

    monkeypatch.setattr(codec, "has_zstd", lambda: False)
    monkeypatch.setattr(codec, "has_lz4", lambda: False)
    monkeypatch.setattr(codec, "has_snappy", lambda: False)
    assert resolve_compression("auto") == "gzip"
    assert resolve_compression("none") is None
    with pytest.raises(ValueError, match="needs the cramjam package"):
        resolve_compression("zstd")
    monkeypatch.setattr(codec, "has_zstd", lambda: True)
    assert resolve_compression("auto") == "zstd"


def test_plan_keeps_numpy_positions_consistent() -> None:
    # positions survive sort + filter: rows go back to the right place on failure
    sink = KafkaSink("k", KafkaSinkSettings())
    sink.high_water = {"A": 2}
    sink._m = {"skipped": type("C", (), {"inc": lambda self, n=1: None})()}
    rows = pa.table({"recording": ["A"] * 5, "seq": pa.array([4, 1, 3, 0, 2], pa.int64())})
    out, positions = sink._new_rows("A", rows, np.arange(5, dtype=np.int64), "seq")
    assert out.column("seq").to_pylist() == [3, 4]
    assert positions.tolist() == [2, 0]
