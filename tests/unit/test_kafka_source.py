"""kafka_source against a fake group consumer: commits, dead letters, pause/resume, rebalances.

The real broker is exercised by tests/integration/test_kafka_handlers.py.
"""
from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pytest
from aiokafka import TopicPartition
from aiokafka import errors as kafka_errors

from handlers import arrow_codec
from handlers.kafka_source import KafkaSource, KafkaSourceSettings

TOPIC = "t"
P0, P1 = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)


@dataclasses.dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = dataclasses.field(default_factory=list)


class Cluster:
    """Partition logs and the group's committed offsets."""

    def __init__(self) -> None:
        self.logs: dict[TopicPartition, list[Record]] = {P0: [], P1: []}
        self.committed: dict[TopicPartition, int] = {}
        self.commit_log: list[dict[TopicPartition, int]] = []
        self.consumers: list[FakeGroupConsumer] = []
        self.fail_commit: BaseException | None = None

    def produce(self, tp: TopicPartition, value: bytes | None, key: bytes | None = b"A") -> None:
        log = self.logs[tp]
        log.append(Record(tp.topic, tp.partition, len(log), key, value))


CLUSTER = Cluster()


class FakeGroupConsumer:
    def __init__(self, *topics: str, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.listener: Any = None
        self.assigned: set[TopicPartition] = set()
        self.paused_set: set[TopicPartition] = set()
        self.positions: dict[TopicPartition, int] = {}
        self.joined = False
        self.polls = 0
        self.polls_while_paused = 0
        self.pause_calls = 0
        self.stopped = False
        CLUSTER.consumers.append(self)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        self.stopped = True

    async def topics(self) -> set[str]:
        return {TOPIC}

    def subscribe(self, topics: list[str], listener: Any) -> None:
        self.listener = listener

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def pause(self, *tps: TopicPartition) -> None:
        assert set(tps) <= self.assigned
        self.pause_calls += 1
        self.paused_set |= set(tps)

    def resume(self, *tps: TopicPartition) -> None:
        assert set(tps) <= self.assigned
        self.paused_set -= set(tps)

    async def rebalance(self, assignment: set[TopicPartition]) -> None:
        await self.listener.on_partitions_revoked(set(self.assigned))
        self.assigned = set(assignment)
        self.paused_set.clear()
        self.positions = {tp: CLUSTER.committed.get(tp, 0) for tp in assignment}
        await self.listener.on_partitions_assigned(set(assignment))

    async def getmany(self, *tps: TopicPartition, timeout_ms: int = 0,
                      max_records: int | None = None) -> dict[TopicPartition, list[Record]]:
        self.polls += 1
        if self.paused_set:
            self.polls_while_paused += 1
        if not self.joined:
            self.joined = True
            await self.rebalance({P0, P1})
        out = {}
        for tp in sorted(self.assigned - self.paused_set):
            log = CLUSTER.logs[tp]
            got = log[self.positions[tp]:self.positions[tp] + (max_records or 500)]
            if got:
                out[tp] = got
                self.positions[tp] += len(got)
        if not out and timeout_ms:
            await asyncio.sleep(min(timeout_ms, 20) / 1000)
        return out

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if CLUSTER.fail_commit is not None:
            raise CLUSTER.fail_commit
        for tp in offsets:
            if tp not in self.assigned:
                raise kafka_errors.IllegalStateError(f"Partition {tp} is not assigned")
        CLUSTER.commit_log.append(dict(offsets))
        CLUSTER.committed.update(offsets)


class FakeKafkaSource(KafkaSource):
    def _new_consumer(self, *topics: str, **kwargs: Any) -> Any:
        return FakeGroupConsumer(*topics, **kwargs)


@pytest.fixture(autouse=True)
def cluster() -> Cluster:
    global CLUSTER
    CLUSTER = Cluster()
    return CLUSTER


def message(recording: str, first: int, n: int = 10) -> bytes:
    batch = pa.record_batch({"recording": [recording] * n,
                             "seq": pa.array(range(first, first + n), pa.int64())})
    return arrow_codec.encode(batch, key="seq", meta={"origin": "test"})


def fill(cluster: Cluster, per_partition: int, n: int = 10) -> None:
    for i in range(per_partition):
        cluster.produce(P0, message("A", i * n, n), b"A")
        cluster.produce(P1, message("B", i * n, n), b"B")


def pipeline(make_runtime: Any, *, sink: dict[str, Any] | None = None,
             capacity: int | None = None, **source: Any) -> Any:
    src = {"type": "test_kafka_source:FakeKafkaSource", "topics": [TOPIC],
           "poll_timeout_ms": 20, "health_interval": 0, "outputs": ["out"],
           "on_failure": "stop", **source}
    out = {"type": "memory_sink", "on_failure": "stop", **(sink or {})}
    if capacity is not None:
        out["capacity"] = capacity
    return make_runtime({"kafka": src, "out": out})


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def rows(rt: Any) -> list[tuple[str, int]]:
    return [(r["recording"], r["seq"]) for r in rt.handlers["out"].rows()]


# -- tests --------------------------------------------------------------------------------

async def test_messages_become_batches_and_offsets_commit_after_the_sink(
        make_runtime: Any, cluster: Cluster) -> None:
    fill(cluster, 5)
    rt = pipeline(make_runtime)
    async with rt:
        await until(lambda: cluster.committed == {P0: 5, P1: 5})
    assert rt.report.ok
    assert sorted(rows(rt)) == sorted([("A", s) for s in range(50)] + [("B", s) for s in range(50)])
    batch = rt.handlers["out"].batches[0]
    assert batch.key == "seq"
    assert batch.meta["origin"] == "test"
    assert {batch.meta["kafka_topic"], batch.meta["kafka_key"]} <= {TOPIC, "A", "B"}
    assert batch.meta["kafka_partition"] in (0, 1) and batch.meta["kafka_offset"] >= 0
    consumer = cluster.consumers[0]
    assert consumer.kwargs["enable_auto_commit"] is False
    assert consumer.kwargs["auto_offset_reset"] == "earliest"
    assert consumer.kwargs["metadata_max_age_ms"] == 10000  # a topic created later: seconds, not 5 min
    # committed offsets only ever grow, one past the last message handled
    for p in (P0, P1):
        seen = [c[p] for c in cluster.commit_log if p in c]
        assert seen == sorted(seen) and seen[-1] == 5


async def test_restart_resumes_from_the_committed_offset(make_runtime: Any,
                                                         cluster: Cluster) -> None:
    fill(cluster, 3)
    cluster.committed = {P0: 2, P1: 1}       # a previous run committed these
    rt = pipeline(make_runtime)
    async with rt:
        await until(lambda: cluster.committed == {P0: 3, P1: 3})
    assert sorted(rows(rt)) == sorted([("A", s) for s in range(20, 30)]
                                      + [("B", s) for s in range(10, 30)])


async def test_undecodable_message_is_dead_lettered_then_committed(
        make_runtime: Any, cluster: Cluster) -> None:
    cluster.produce(P0, message("A", 0))
    cluster.produce(P0, b"\xff\xfe garbage")
    cluster.produce(P0, None)
    cluster.produce(P0, message("A", 10))
    rt = pipeline(make_runtime)
    async with rt:
        await until(lambda: cluster.committed.get(P0) == 4)
    assert [s for _, s in rows(rt)] == list(range(20))
    dead = rt.handlers["dlq"].rows()
    assert len(dead) == 2
    assert dead[0]["reason"].startswith(
        "undecodable Kafka message t[0]@1: not an Arrow IPC stream: ")
    assert dead[1]["reason"] == ("undecodable Kafka message t[0]@2: empty message (no value): "
                                 "expected an Arrow IPC stream")
    assert dead[0]["payload_encoding"] == "base64"
    assert rt.metrics.value("kafka_invalid_messages", "kafka") == 2


async def test_a_slow_sink_pauses_the_partitions_and_nothing_is_lost(
        make_runtime: Any, cluster: Cluster) -> None:
    fill(cluster, 30, n=2)
    rt = pipeline(make_runtime, sink={"delay": 0.01}, capacity=1, max_buffered=4)
    async with rt:
        await until(lambda: cluster.committed == {P0: 30, P1: 30}, timeout=30)
    consumer = cluster.consumers[0]
    assert consumer.pause_calls > 0
    assert consumer.polls_while_paused > 0          # kept polling: the group sees it alive
    assert rt.metrics.value("kafka_pauses", "kafka") > 0
    got = rows(rt)
    assert len(got) == len(set(got)) == 120
    for rec in ("A", "B"):                           # per partition, in order
        seqs = [s for r, s in got if r == rec]
        assert seqs == sorted(seqs)


async def test_revoke_waits_for_in_flight_messages_then_never_commits_them_again(
        make_runtime: Any, cluster: Cluster) -> None:
    fill(cluster, 20, n=1)
    rt = pipeline(make_runtime, sink={"delay": 0.02}, capacity=2, max_buffered=2,
                  revoke_timeout=10)
    async with rt:
        consumer = cluster.consumers[0]
        await until(lambda: cluster.committed.get(P0, 0) >= 3)
        await consumer.rebalance({P1})                   # P0 goes to another member
        handled_p0 = max(r["seq"] for r in rt.handlers["out"].rows() if r["recording"] == "A")
        # every message emitted from P0 was committed before the revoke returned
        assert cluster.committed[P0] == handled_p0 + 1
        commits_at_revoke = len(cluster.commit_log)
        await until(lambda: cluster.committed.get(P1) == 20)
    assert all(P0 not in c for c in cluster.commit_log[commits_at_revoke:])
    a_rows = [s for r, s in rows(rt) if r == "A"]
    assert a_rows == list(range(handled_p0 + 1))    # nothing from P0 after the revoke


async def test_revoke_timeout_abandons_in_flight_offsets(make_runtime: Any,
                                                         cluster: Cluster) -> None:
    fill(cluster, 6, n=1)
    rt = pipeline(make_runtime, sink={"delay": 0.1}, capacity=4, max_buffered=4,
                  revoke_timeout=0)
    async with rt:
        consumer = cluster.consumers[0]
        await until(lambda: len(rt.handlers["out"].batches) >= 1)
        await consumer.rebalance(set())                  # everything revoked, at once
        revoked_at = len(cluster.commit_log)
        committed_then = dict(cluster.committed)
        await asyncio.sleep(0.6)                         # in-flight batches finish downstream
        assert cluster.commit_log[revoked_at:] == []     # ...but their offsets are not committed
        assert cluster.committed == committed_then
        # the next owner (here: us again) resumes from the committed offsets
        await consumer.rebalance({P0, P1})
        await until(lambda: cluster.committed == {P0: 6, P1: 6}, timeout=20)
    got = rows(rt)
    assert set(got) == {(r, s) for r in "AB" for s in range(6)}    # nothing lost
    assert len(got) > 12                                            # re-read: at-least-once


async def test_a_failed_commit_is_reported_and_the_next_one_catches_up(
        make_runtime: Any, cluster: Cluster) -> None:
    cluster.fail_commit = kafka_errors.CommitFailedError("group rebalanced")
    fill(cluster, 2)
    rt = pipeline(make_runtime)
    async with rt:
        await until(lambda: len(rt.handlers["out"].batches) == 4)
        await asyncio.sleep(0.1)
        assert cluster.committed == {}
        cluster.fail_commit = None
        fill(cluster, 1)
        await until(lambda: cluster.committed == {P0: 3, P1: 3})
    assert rt.report.ok


def test_settings_checks() -> None:
    with pytest.raises(ValueError, match="topics must name at least one topic"):
        KafkaSourceSettings(topics=[])
    with pytest.raises(ValueError, match="heartbeat_interval_ms must be below"):
        KafkaSourceSettings(heartbeat_interval_ms=20_000)
    with pytest.raises(ValueError, match="poll_timeout_ms must be below"):
        KafkaSourceSettings(poll_timeout_ms=400_000)
