"""kafka_source: batches from Kafka topics, offsets committed after downstream commit.

Reads the messages ``kafka_sink`` writes (Arrow IPC stream values, see
:mod:`handlers.arrow_codec`) and emits each one as a batch with the schema, key
column and meta it was written with, plus ``kafka_topic``, ``kafka_partition``,
``kafka_offset`` and ``kafka_key`` in its meta. One message is one upstream
message for the runtime (one acknowledgement token).

Settings (``python run.py --describe kafka_source``):

``bootstrap_servers``, ``client_id``, ``security_protocol``, ``sasl_*``, ``ssl_cafile``,
``request_timeout_ms``, ``connect_retry``, ``health_interval``
    connection, as for kafka_sink.
``topics``, ``group_id``
    what to read, as which consumer group (several processes with the same
    group share the partitions).
``auto_offset_reset``
    where a group without a committed offset starts (default ``earliest``:
    nothing written before the first start is skipped).
``max_buffered``, ``poll_timeout_ms``, ``max_poll_records``
    read-ahead and polling (see *Backpressure*).
``session_timeout_ms``, ``heartbeat_interval_ms``, ``max_poll_interval_ms``
    group membership timing.
``revoke_timeout``
    how long a rebalance waits for the revoked partitions' in-flight messages.
``metadata_max_age_ms``
    how often the cluster metadata is refreshed (default 10 s): a topic that does
    not exist yet at the start (a processing tier started before its ingest tier)
    is consumed within this time of its creation, and added partitions are picked
    up as fast. Kafka clients default to 5 minutes.

Acknowledgement
    Auto-commit is off. The runtime calls ``commit(tokens)`` in emission order
    once every batch derived from a message was committed downstream (or the
    message was dead-lettered); the source then commits ``offset + 1`` of the
    highest such message per partition. A message is therefore never
    acknowledged before the sinks committed it: after a crash the group resumes
    from the last committed offset and re-reads what was in flight
    (at-least-once; idempotent sinks make it effectively once).

Backpressure
    Fetching and emitting are decoupled. Fetched messages wait in a small
    buffer (``max_buffered``); while it is full (because ``emit`` is blocked by
    a full channel downstream) every assigned partition is paused, and resumed
    once the buffer is half empty. The consumer keeps polling while paused
    (paused partitions return nothing), so the group never sees it idle past
    ``max_poll_interval_ms``; heartbeats run in aiokafka's background task.
    Nothing is dropped: records fetched for a partition that is then paused are
    discarded by aiokafka and fetched again from the same position on resume.

Rebalances
    On revoke, emitting from the revoked partitions stops at once (buffered
    messages of those partitions are dropped: they were never emitted); the
    source then waits up to ``revoke_timeout`` seconds for the messages already
    emitted from them to be committed downstream, commits their offsets, and
    from then on never commits an offset for those partitions again (tokens of
    that assignment are ignored). On assign, consumption starts from the
    group's committed offsets (aiokafka resets the positions of a new
    assignment). A message still in flight when the timeout expires is read
    again by the partition's next owner: a duplicate within at-least-once.

Invalid messages
    A value that is not a decodable Arrow IPC stream (or has an invalid key or
    meta) goes to the dead-letter target with the reason and the raw bytes; its
    offset is committed once the dead letter is stored, so it never blocks the
    partition.

Connection
    ``set_connected(False)`` while a periodic metadata probe fails or polling
    raises; aiokafka reconnects by itself and the source resumes.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import time
from typing import Any, ClassVar, Literal

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka import errors as kafka_errors

from pipeline import Source, setting

from . import arrow_codec
from .kafka_sink import RETRY_ON_CONNECT, KafkaClientSettings, client_options, watch_connection

__all__ = ["KafkaSource", "KafkaSourceSettings", "Offset"]


@dataclasses.dataclass(frozen=True)
class KafkaSourceSettings(KafkaClientSettings):
    topics: list[str] = setting(["gaitflow.samples"], doc="topics to consume")
    group_id: str = setting("gaitflow", doc="consumer group id")
    auto_offset_reset: Literal["earliest", "latest"] = setting(
        "earliest", doc="where a group without committed offsets starts")
    max_buffered: int = setting(
        64, doc="fetched messages waiting to be emitted before the partitions are paused", min=1)
    poll_timeout_ms: int = setting(500, doc="longest wait of one poll", min=10)
    max_poll_records: int = setting(500, doc="messages per poll at most", min=1)
    session_timeout_ms: int = setting(10_000, doc="group session timeout", min=1000)
    heartbeat_interval_ms: int = setting(3_000, doc="heartbeat interval", min=100)
    max_poll_interval_ms: int = setting(
        300_000, doc="longest time between polls before the consumer leaves the group",
        min=1000)
    revoke_timeout: float = setting(
        10.0, doc="seconds a rebalance waits for in-flight messages of revoked partitions "
                  "to be committed", min=0)
    metadata_max_age_ms: int = setting(
        10000, doc="cluster metadata refresh period: a topic created after the start is "
                   "consumed within it (Kafka's default, 300000, waits 5 min)", min=1000)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.topics:
            raise ValueError("topics must name at least one topic")
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ValueError("heartbeat_interval_ms must be below session_timeout_ms")
        if self.poll_timeout_ms >= self.max_poll_interval_ms:
            raise ValueError("poll_timeout_ms must be below max_poll_interval_ms")


@dataclasses.dataclass(frozen=True, slots=True)
class Offset:
    """The acknowledgement token of one message: where it is, and which assignment read it."""

    tp: TopicPartition
    offset: int
    epoch: int


class _Listener(ConsumerRebalanceListener):
    def __init__(self, source: KafkaSource) -> None:
        self.source = source

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.source._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.source._on_assigned(set(assigned))


class KafkaSource(Source):
    """Consumes Kafka topics in a consumer group; see the module docstring."""

    Settings: ClassVar[type] = KafkaSourceSettings
    settings: KafkaSourceSettings

    def __init__(self, name: str, settings: KafkaSourceSettings | None = None) -> None:
        super().__init__(name, settings)
        self._consumer: Any = None
        self._buffer: collections.deque[tuple[int, Any]] = collections.deque()
        self._arrived: asyncio.Event | None = None
        self._room: asyncio.Event | None = None
        self._epochs = itertools.count(1)
        self._emitting: dict[TopicPartition, int] = {}   # partitions we may emit from
        self._owned: dict[TopicPartition, int] = {}      # partitions we may commit
        self._emitted: dict[TopicPartition, int] = {}    # highest offset emitted
        self._committed: dict[TopicPartition, int] = {}  # highest offset committed
        self._commit_changed: asyncio.Condition | None = None
        self._paused: set[TopicPartition] = set()
        self._fetch_error: BaseException | None = None
        self._watch: asyncio.Task[None] | None = None
        self._m: dict[str, Any] = {}

    def _new_consumer(self, *topics: str, **kwargs: Any) -> Any:
        return AIOKafkaConsumer(*topics, **kwargs)

    @property
    def assignment(self) -> set[TopicPartition]:
        """Partitions this source currently owns."""
        return set(self._owned)

    @property
    def paused(self) -> set[TopicPartition]:
        """Partitions paused for backpressure."""
        return set(self._paused)

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        self._arrived, self._room = asyncio.Event(), asyncio.Event()
        self._commit_changed = asyncio.Condition()
        m = self.metrics
        self._m = {
            "pauses": m.counter("kafka_pauses", "Times the partitions were paused (backpressure)"),
            "paused": m.gauge("kafka_paused_partitions", "Partitions paused for backpressure"),
            "rebalances": m.counter("kafka_rebalances", "Partition revocations"),
            "invalid": m.counter("kafka_invalid_messages", "Messages that could not be decoded"),
            "commits": m.counter("kafka_offset_commits", "Offset commits"),
            "buffered": m.gauge("kafka_buffered_messages", "Fetched messages not yet emitted"),
        }
        try:
            await s.connect_retry.call(self._connect, retry_on=RETRY_ON_CONNECT,
                                       on_retry=self._log_retry)
        except BaseException:
            await self._stop_consumer()
            raise
        self.set_connected(True)
        if s.health_interval > 0:
            self._watch = asyncio.create_task(self._watch_connection(),
                                              name=f"kafka-health:{self.name}")
        self.log.info("kafka_source.started", topics=s.topics, group=s.group_id)

    def _log_retry(self, attempt: int, exc: BaseException, pause: float) -> None:
        self.set_connected(False, f"{type(exc).__name__}: {exc}")
        self.log.warning("kafka.connect_retry", attempt=attempt, delay_s=round(pause, 2),
                         error=f"{type(exc).__name__}: {exc}")

    async def _connect(self) -> None:
        s = self.settings
        await self._stop_consumer()
        consumer = self._new_consumer(
            **client_options(s, self.name), group_id=s.group_id, enable_auto_commit=False,
            auto_offset_reset=s.auto_offset_reset, max_poll_records=s.max_poll_records,
            session_timeout_ms=s.session_timeout_ms, heartbeat_interval_ms=s.heartbeat_interval_ms,
            max_poll_interval_ms=s.max_poll_interval_ms, metadata_max_age_ms=s.metadata_max_age_ms)
        self._consumer = consumer
        try:
            await consumer.start()
        except Exception as exc:
            raise ConnectionError(f"cannot connect to Kafka at {', '.join(s.bootstrap_servers)}: "
                                  f"{type(exc).__name__}: {exc}") from exc
        existing = await consumer.topics()
        for topic in s.topics:
            if topic not in existing:
                self.log.warning("kafka_source.topic_missing", topic=topic,
                                 detail="consuming once it is created (metadata refreshed every "
                                        f"{s.metadata_max_age_ms} ms)")
        consumer.subscribe(topics=list(s.topics), listener=_Listener(self))

    async def _watch_connection(self) -> None:
        await watch_connection(self, lambda: self._consumer.topics(),
                               healthy=lambda: self._fetch_error is None)

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
            self._watch = None
        await self._stop_consumer()

    async def _stop_consumer(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()  # leaves the group; auto-commit is off, nothing is committed

    # -- reading --------------------------------------------------------------------
    async def run(self) -> None:
        fetcher = asyncio.create_task(self._fetch_loop(), name=f"kafka-fetch:{self.name}")
        try:
            while True:
                epoch, msg = await self._next(fetcher)
                tp = TopicPartition(msg.topic, msg.partition)
                if self._emitting.get(tp) != epoch:
                    continue  # revoked since it was fetched
                # counted as in flight from here: a revoke waits for its commit
                self._emitted[tp] = msg.offset
                await self._emit_message(msg, Offset(tp, msg.offset, epoch))
        finally:
            fetcher.cancel()
            await asyncio.gather(fetcher, return_exceptions=True)

    async def _next(self, fetcher: asyncio.Task[None]) -> tuple[int, Any]:
        assert self._arrived is not None and self._room is not None
        while not self._buffer:
            if fetcher.done():
                fetcher.result()  # re-raise what stopped it
                raise RuntimeError("kafka fetch loop ended")
            self._arrived.clear()
            waiter = asyncio.ensure_future(self._arrived.wait())
            try:
                await asyncio.wait([waiter, fetcher], return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
        item = self._buffer.popleft()
        self._m["buffered"].set(len(self._buffer))
        if len(self._buffer) <= self.settings.max_buffered // 2:
            self._room.set()
        return item

    async def _emit_message(self, msg: Any, token: Offset) -> None:
        where = f"{msg.topic}[{msg.partition}]@{msg.offset}"
        try:
            decoded = arrow_codec.decode(msg.value)
        except arrow_codec.DecodeError as exc:
            self._m["invalid"].inc()
            await self.dead_letter(msg.value if msg.value is not None else b"",
                                   reason=f"undecodable Kafka message {where}: {exc}",
                                   error=exc, token=token)
            return
        meta = {**decoded.meta, "kafka_topic": msg.topic, "kafka_partition": msg.partition,
                "kafka_offset": msg.offset,
                "kafka_key": msg.key.decode("utf-8", errors="replace") if msg.key else None}
        await self.emit(decoded.data, key=decoded.key, meta=meta, token=token)

    async def _fetch_loop(self) -> None:
        assert self._room is not None and self._arrived is not None
        s = self.settings
        consumer = self._consumer
        failures = 0
        while True:
            full = len(self._buffer) >= s.max_buffered
            self._set_paused(full)
            try:
                if full:
                    self._room.clear()
                    try:
                        async with asyncio.timeout(s.poll_timeout_ms / 1000):
                            await self._room.wait()
                    except TimeoutError:
                        pass
                    # poll even while paused: the group must not see this member idle
                    records = await consumer.getmany(timeout_ms=0)
                else:
                    records = await consumer.getmany(timeout_ms=s.poll_timeout_ms,
                                                     max_records=s.max_poll_records)
            except (kafka_errors.ConsumerStoppedError, asyncio.CancelledError):
                raise
            except kafka_errors.KafkaError as exc:
                failures += 1
                self._fetch_error = exc
                self.set_connected(False, f"poll failed: {type(exc).__name__}: {exc}")
                pause = s.connect_retry.delay(min(failures, 10))
                self.log.warning("kafka_source.poll_failed", error=f"{type(exc).__name__}: {exc}",
                                 delay_s=round(pause, 2))
                await asyncio.sleep(pause)
                continue
            if self._fetch_error is not None:
                self._fetch_error = None
                failures = 0
                self.set_connected(True)
            added = 0
            for tp, msgs in records.items():
                epoch = self._emitting.get(tp)
                if epoch is None:
                    continue
                self._buffer.extend((epoch, m) for m in msgs)
                added += len(msgs)
            if added:
                self._m["buffered"].set(len(self._buffer))
                self._arrived.set()

    def _set_paused(self, paused: bool) -> None:
        consumer = self._consumer
        assigned = set(consumer.assignment())
        if paused:
            todo = assigned - self._paused
            if todo:
                consumer.pause(*todo)
                self._paused |= todo
                self._m["pauses"].inc()
                self.log.debug("kafka_source.paused", partitions=len(todo))
        elif self._paused:
            back = self._paused & assigned
            if back:
                consumer.resume(*back)
            self._paused.clear()
            self.log.debug("kafka_source.resumed", partitions=len(back))
        self._m["paused"].set(len(self._paused))

    # -- rebalances -------------------------------------------------------------------
    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        assert self._commit_changed is not None
        if not revoked:
            return
        self._m["rebalances"].inc()
        for tp in revoked:
            self._emitting.pop(tp, None)  # stop emitting at once
        self._buffer = collections.deque(
            item for item in self._buffer
            if TopicPartition(item[1].topic, item[1].partition) not in revoked)
        self._m["buffered"].set(len(self._buffer))

        def in_flight() -> list[TopicPartition]:
            return [tp for tp in revoked if tp in self._owned
                    and self._emitted.get(tp, -1) > self._committed.get(tp, -1)]

        t0 = time.monotonic()
        waiting = in_flight()
        if waiting and self.settings.revoke_timeout > 0:
            try:
                async with asyncio.timeout(self.settings.revoke_timeout):
                    async with self._commit_changed:
                        await self._commit_changed.wait_for(lambda: not in_flight())
            except TimeoutError:
                pass
        abandoned = {f"{tp.topic}[{tp.partition}]": self._emitted[tp] - self._committed.get(tp, -1)
                     for tp in in_flight()}
        for tp in revoked:  # never commit for them again
            self._owned.pop(tp, None)
            self._emitted.pop(tp, None)
            self._committed.pop(tp, None)
            self._paused.discard(tp)
        self.log.info("kafka_source.revoked", partitions=sorted(
            f"{tp.topic}[{tp.partition}]" for tp in revoked), waited_ms=round(
            (time.monotonic() - t0) * 1000, 1), abandoned=abandoned or None)

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        for tp in assigned:
            epoch = next(self._epochs)
            self._emitting[tp] = epoch
            self._owned[tp] = epoch
            self._emitted.pop(tp, None)
            self._committed.pop(tp, None)
        self._paused -= assigned  # a new assignment starts unpaused
        self.log.info("kafka_source.assigned", partitions=sorted(
            f"{tp.topic}[{tp.partition}]" for tp in assigned))

    # -- acknowledgement ----------------------------------------------------------------
    async def commit(self, tokens: list[Any]) -> None:
        assert self._commit_changed is not None
        offsets: dict[TopicPartition, int] = {}
        for token in tokens:
            if self._owned.get(token.tp) == token.epoch:
                offsets[token.tp] = max(offsets.get(token.tp, -1), token.offset)
        if not offsets or self._consumer is None:
            return
        try:
            await self._consumer.commit({tp: off + 1 for tp, off in offsets.items()})
        except (kafka_errors.CommitFailedError, kafka_errors.IllegalStateError) as exc:
            # the group moved on: these partitions belong to another member now, which
            # resumes from the last offset committed (at-least-once)
            self.log.warning("kafka_source.commit_skipped", error=f"{type(exc).__name__}: {exc}",
                             partitions=len(offsets))
            return
        self._m["commits"].inc()
        async with self._commit_changed:
            for tp, off in offsets.items():
                if self._owned.get(tp) is not None:
                    self._committed[tp] = max(self._committed.get(tp, -1), off)
            self._commit_changed.notify_all()
