"""kafka_sink: batches to a Kafka topic, one message per (batch, recording), exactly once.

Each batch is split by the ``message_key`` column (``recording``): every group of
rows becomes one Kafka message (several when a group exceeds ``max_message_rows``
or ``max_message_bytes``) whose key is that value and whose value is an Arrow IPC
stream of those rows carrying the batch's key column name and meta
(:mod:`handlers.arrow_codec`). Not one message per row: a 100-row batch of one
recording is one message. The Kafka key keeps a recording in one partition, so
its rows stay in order for every consumer.

Settings (``python run.py --describe kafka_sink`` lists them with their types):

``bootstrap_servers``, ``client_id``, ``security_protocol``, ``sasl_mechanism``,
``sasl_username``, ``sasl_password`` (a secret: ``"${KAFKA_PASSWORD}"``), ``ssl_cafile``
    where and how to connect (shared with ``kafka_source``).
``topic``
    destination (default ``gaitflow.samples``; ``gaitflow.segments`` for the
    "segment committed" events of handlers/README.md §3).
``create_topic``, ``partitions``, ``replication_factor``, ``topic_config``
    the topic is created at start when absent (AIOKafkaAdminClient); an existing
    topic is used as it is.
``message_key``
    the column that keys messages (default ``recording``).
``dedupe``, ``seq_column``, ``dedupe_lookback``
    see *Exactly once* below.
``compression``
    producer compression: ``auto`` picks zstd, then lz4 when aiokafka's codec
    library (cramjam) is installed, else gzip. ``ipc_compression`` compresses
    Arrow buffers inside the value instead (zstd/lz4 are built into pyarrow).
``max_message_rows``, ``max_message_bytes``, ``linger_ms``, ``request_timeout_ms``
    message sizing and producer timing.
``connect_retry``
    attempts and backoff while connecting at start.

Delivery
    The producer is idempotent (``enable_idempotence``, ``acks=all``): broker-side
    retries never duplicate nor reorder within a partition. ``write`` returns only
    once the broker acknowledged every message of the batch, so a committed batch
    (and the upstream acknowledgement that follows) means durable in Kafka. The
    messages of one recording are sent one after the other (each waits for the
    previous acknowledgement); different recordings go concurrently. A failed
    message fails the rest of its recording's rows in that batch, which the
    runtime retries (``PartialFailure``); rows with a null ``message_key`` (or a
    null sequence number) are dead-lettered (``Reject``).

Exactly once (``dedupe``)
    A replay after a crash re-sends batches the topic may already hold. At start
    the sink reads back, per partition, the last ``dedupe_lookback`` messages
    (0 = the whole partition) and learns what is already written:

    ``"seq"`` (default; raw samples)
        per recording, the highest ``seq_column`` written, from each message's
        ``seq_last`` header. On write, rows whose ``(recording, seq)`` is at or
        below that high-water mark are skipped; the rest are sent sorted by seq
        (repeated seq within a batch: the first row is kept). This is valid
        because a recording's rows are written in seq order: one partition,
        messages acknowledged in order, one message in flight per recording.
    ``"key"`` (small event topics such as ``gaitflow.segments``)
        every value of the batch's key column (``Batch.key``, e.g. ``path``) seen
        in the lookback or written since is remembered; rows whose key was
        written are skipped. Memory grows with the number of keys. (Segment
        events can also use ``"seq"`` with ``seq_column = "seq_last"``: a
        recording's segments are committed in seq order.)
    ``"none"``
        at-least-once: a replay may duplicate messages.

    Assumptions and limits of ``"seq"``: (1) upstream delivers each recording's
    rows in increasing seq order, and a replay re-sends rows that are either
    already written or newer than everything written (true for in-order
    acknowledging sources such as mqtt_source); rows arriving late with a seq
    below the mark are skipped as duplicates even if they were never written.
    (2) One writer per recording: two processes writing the same recording to
    the same topic break (1). (3) The handler runs with ``concurrency = 1`` (the
    default), so batches of a recording are written in arrival order. (4) The
    lookback covers the upstream in-flight window: a recording whose last
    message lies further back than ``dedupe_lookback`` messages in its
    partition is not known, and its replayed rows are written again
    (duplicates, never loss). (5) A write cancelled by ``timeout`` may leave a
    message in flight; its retry can duplicate it.

Connection
    ``set_connected(False)`` when a send fails for a connection reason or the
    periodic metadata probe (``health_interval``) fails; ``True`` again on the
    next success. aiokafka reconnects by itself; failed batches are retried by
    the runtime with backoff.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka import codec as kafka_codec
from aiokafka import errors as kafka_errors
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from pipeline import Batch, PartialFailure, Reject, RetryPolicy, Secret, Sink, setting

from . import arrow_codec

__all__ = ["RETRY_ON_CONNECT", "KafkaClientSettings", "KafkaSink", "KafkaSinkSettings",
           "client_options", "resolve_compression"]

#: failures at start worth another attempt (a missing topic or bad settings are not)
RETRY_ON_CONNECT: tuple[type[BaseException], ...] = (
    ConnectionError, OSError, asyncio.TimeoutError, kafka_errors.KafkaError)

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]


async def watch_connection(handler: Any, probe: Any, healthy: Any = lambda: True) -> None:
    """Probe the cluster every ``health_interval`` seconds; feeds ``/readyz``.

    Shared by kafka_sink and kafka_source: ``probe()`` is a metadata request of the
    handler's client; ``healthy()`` may veto "connected" for reasons of its own.
    """
    s = handler.settings
    while True:
        await asyncio.sleep(s.health_interval)
        try:
            async with asyncio.timeout(max(5.0, s.request_timeout_ms / 1000)):
                await probe()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure means "not connected"
            handler.set_connected(False, f"metadata probe failed: {type(exc).__name__}: {exc}")
        else:
            if healthy():
                handler.set_connected(True)


@dataclasses.dataclass(frozen=True)
class KafkaClientSettings:
    """Connection settings shared by kafka_sink and kafka_source."""

    bootstrap_servers: list[str] = setting(["127.0.0.1:9092"], doc="broker host:port list")
    client_id: str | None = setting(None, doc="client id shown in broker logs "
                                              "(default: gaitflow-<handler name>)")
    security_protocol: SecurityProtocol = setting("PLAINTEXT", doc="transport security")
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = setting(
        "PLAIN", doc="SASL mechanism when security_protocol is SASL_*")
    sasl_username: str | None = setting(None, doc="SASL user name")
    sasl_password: Secret | None = setting(None, doc="SASL password (use ${VAR})", secret=True)
    ssl_cafile: Path | None = setting(None, doc="CA bundle to verify the brokers (SSL, SASL_SSL)")
    request_timeout_ms: int = setting(30_000, doc="timeout of one broker request", min=1000)
    connect_retry: RetryPolicy = setting(
        RetryPolicy(max_attempts=3, backoff=1.0, max_backoff=10.0),
        doc="attempts and backoff while connecting at start")
    health_interval: float = setting(
        5.0, doc="seconds between connection probes (cluster metadata) for /readyz; 0 = off",
        min=0)

    def __post_init__(self) -> None:
        if not self.bootstrap_servers:
            raise ValueError("bootstrap_servers must name at least one broker")
        if self.security_protocol.startswith("SASL") and not self.sasl_username:
            raise ValueError(f"security_protocol {self.security_protocol} needs sasl_username")
        if self.sasl_password is not None and not self.sasl_username:
            raise ValueError("sasl_password needs sasl_username")


def client_options(s: KafkaClientSettings, name: str) -> dict[str, Any]:
    """Keyword arguments common to aiokafka's producer, consumer and admin client."""
    opts: dict[str, Any] = {
        "bootstrap_servers": list(s.bootstrap_servers),
        "client_id": s.client_id or f"gaitflow-{name}",
        "request_timeout_ms": s.request_timeout_ms,
        "security_protocol": s.security_protocol,
    }
    if s.security_protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        opts["ssl_context"] = create_ssl_context(
            cafile=str(s.ssl_cafile) if s.ssl_cafile else None)
    if s.security_protocol.startswith("SASL"):
        opts["sasl_mechanism"] = s.sasl_mechanism
        opts["sasl_plain_username"] = s.sasl_username
        opts["sasl_plain_password"] = s.sasl_password.get() if s.sasl_password else None
    return opts


def resolve_compression(choice: str) -> str | None:
    """aiokafka's ``compression_type`` for a setting; checks the codec library is there."""
    available = {"zstd": kafka_codec.has_zstd(), "lz4": kafka_codec.has_lz4(),
                 "snappy": kafka_codec.has_snappy(), "gzip": kafka_codec.has_gzip()}
    if choice == "auto":
        return next(c for c in ("zstd", "lz4", "gzip") if available[c])
    if choice == "none":
        return None
    if not available[choice]:
        raise ValueError(f"compression {choice!r} needs the cramjam package, which is not "
                         "installed; use compression = \"auto\" or \"gzip\"")
    return choice


@dataclasses.dataclass(frozen=True)
class KafkaSinkSettings(KafkaClientSettings):
    topic: str = setting("gaitflow.samples", doc="destination topic")
    create_topic: bool = setting(True, doc="create the topic at start when it does not exist")
    partitions: int = setting(3, doc="partitions of a topic created by the sink", min=1)
    replication_factor: int = setting(1, doc="replication of a topic created by the sink",
                                      min=1, max=32)
    topic_config: dict[str, str] = setting(
        {}, doc="configs of a topic created by the sink, e.g. {\"retention.ms\" = \"604800000\"}")
    message_key: str = setting(
        "recording", doc="column keying the messages: one message per (batch, value)")
    dedupe: Literal["seq", "key", "none"] = setting(
        "seq", doc="skip rows the topic already holds: by (message_key, seq_column) high-water "
                   "mark, by the batch's key column, or not at all (see the module docs)")
    seq_column: str = setting("seq", doc="increasing integer column per message_key (dedupe=seq)")
    dedupe_lookback: int = setting(
        20_000, doc="messages per partition read back at start to learn what is written "
                    "(0 = the whole partition)", min=0)
    compression: Literal["auto", "zstd", "lz4", "gzip", "snappy", "none"] = setting(
        "auto", doc="producer compression (auto: zstd or lz4 when cramjam is installed, else gzip)")
    ipc_compression: Literal["none", "zstd", "lz4"] = setting(
        "none", doc="compression of the Arrow buffers inside each value")
    max_message_rows: int = setting(2048, doc="rows per message at most", min=1)
    max_message_bytes: int = setting(
        900_000, doc="encoded value size above which a message is split (keep under the "
                     "broker's message.max.bytes)", min=1024)
    linger_ms: int = setting(0, doc="producer linger: wait this long to batch requests", min=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dedupe == "seq" and self.seq_column == self.message_key:
            raise ValueError("seq_column and message_key must be different columns")


@dataclasses.dataclass
class _Message:
    value: bytes
    headers: list[tuple[str, bytes]]
    positions: np.ndarray          # row positions in the batch given to write()
    seq_last: int | None
    keys: list[str]                # dedupe="key": the row keys it carries


class KafkaSink(Sink):
    """Writes batches to a Kafka topic; see the module docstring."""

    Settings: ClassVar[type] = KafkaSinkSettings
    settings: KafkaSinkSettings

    def __init__(self, name: str, settings: KafkaSinkSettings | None = None) -> None:
        super().__init__(name, settings)
        self._producer: Any = None
        self._compression: str | None = None
        self._watch: asyncio.Task[None] | None = None
        #: dedupe="seq": highest seq written per message_key value
        self.high_water: dict[str, int] = {}
        #: dedupe="key": keys written
        self.written_keys: set[str] = set()
        self._m: dict[str, Any] = {}

    # -- client factories (unit tests replace them) ----------------------------------
    def _new_producer(self, **kwargs: Any) -> Any:
        return AIOKafkaProducer(**kwargs)

    def _new_admin(self, **kwargs: Any) -> Any:
        return AIOKafkaAdminClient(**kwargs)

    def _new_consumer(self, **kwargs: Any) -> Any:
        return AIOKafkaConsumer(**kwargs)

    # -- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        self._compression = resolve_compression(s.compression)
        self._m = {
            "messages": self.metrics.counter("kafka_messages_sent", "Kafka messages acknowledged"),
            "bytes": self.metrics.counter("kafka_bytes_sent", "Bytes of message values acked"),
            "skipped": self.metrics.counter(
                "kafka_rows_already_written", "Rows skipped: the topic already holds them"),
        }
        try:
            partitions, created = await s.connect_retry.call(
                self._connect, retry_on=RETRY_ON_CONNECT, on_retry=self._log_retry)
            if s.dedupe != "none" and not created:  # a topic we just created holds nothing
                await self._learn_written(partitions)
        except BaseException:
            await self._close_clients()
            raise
        self.set_connected(True)
        if s.health_interval > 0:
            self._watch = asyncio.create_task(self._watch_connection(),
                                              name=f"kafka-health:{self.name}")
        self.log.info("kafka_sink.started", topic=s.topic, partitions=len(partitions),
                      compression=self._compression or "none", dedupe=s.dedupe,
                      known_keys=len(self.high_water) + len(self.written_keys))

    def _log_retry(self, attempt: int, exc: BaseException, pause: float) -> None:
        self.set_connected(False, f"{type(exc).__name__}: {exc}")
        self.log.warning("kafka.connect_retry", attempt=attempt, delay_s=round(pause, 2),
                         error=f"{type(exc).__name__}: {exc}")

    async def _connect(self) -> tuple[list[int], bool]:
        await self._close_clients()
        s = self.settings
        partitions, created = await self._ensure_topic()
        self._producer = self._new_producer(
            **client_options(s, self.name), acks="all", enable_idempotence=True,
            compression_type=self._compression, linger_ms=s.linger_ms,
            max_request_size=max(1_048_576, s.max_message_bytes + 65_536))
        try:
            await self._producer.start()
        except Exception as exc:
            raise ConnectionError(f"cannot connect to Kafka at {', '.join(s.bootstrap_servers)}: "
                                  f"{type(exc).__name__}: {exc}") from exc
        return partitions, created

    async def _ensure_topic(self) -> tuple[list[int], bool]:
        """The topic's partition ids, and whether the sink just created it."""
        s = self.settings
        admin = self._new_admin(**client_options(s, self.name))
        try:
            try:
                await admin.start()
            except Exception as exc:
                raise ConnectionError(
                    f"cannot connect to Kafka at {', '.join(s.bootstrap_servers)}: "
                    f"{type(exc).__name__}: {exc}") from exc
            # list first: a metadata request naming a missing topic would make a broker with
            # auto.create.topics.enable create it with its defaults, not our partitions
            found = await self._describe(admin) if s.topic in await admin.list_topics() else None
            created = False
            if found is None:
                if not s.create_topic:
                    raise RuntimeError(f"topic {s.topic!r} does not exist and create_topic = false")
                response = await admin.create_topics([NewTopic(
                    s.topic, s.partitions, s.replication_factor, topic_configs=dict(s.topic_config))])
                for entry in response.to_object()["topic_errors"]:
                    code = entry["error_code"]
                    if code not in (0, kafka_errors.TopicAlreadyExistsError.errno):
                        err = kafka_errors.for_code(code)
                        raise RuntimeError(f"cannot create topic {s.topic!r}: {err.__name__}: "
                                           f"{entry.get('error_message') or ''}".rstrip(": "))
                created = all(e["error_code"] == 0 for e in response.to_object()["topic_errors"])
                if created:  # else another process created it a moment ago
                    self.log.info("kafka.topic_created", topic=s.topic, partitions=s.partitions,
                                  replication_factor=s.replication_factor)
                for _ in range(50):  # metadata propagates shortly after creation
                    found = await self._describe(admin)
                    if found:
                        break
                    await asyncio.sleep(0.1)
                if not found:
                    raise RuntimeError(f"topic {s.topic!r} was created but has no partitions yet")
            return found, created
        finally:
            await admin.close()

    async def _describe(self, admin: Any) -> list[int] | None:
        topics = await admin.describe_topics([self.settings.topic])
        for t in topics:
            if t["topic"] == self.settings.topic:
                if t["error_code"] == kafka_errors.UnknownTopicOrPartitionError.errno:
                    return None
                if t["error_code"] != 0:
                    err = kafka_errors.for_code(t["error_code"])
                    raise RuntimeError(f"topic {self.settings.topic!r}: {err.__name__}")
                parts = sorted(p["partition"] for p in t["partitions"])
                return parts or None
        return None

    async def _learn_written(self, partitions: Sequence[int]) -> None:
        """Read the tail of every partition: what is already written (dedupe)."""
        s = self.settings
        t0 = time.monotonic()
        consumer = self._new_consumer(**client_options(s, self.name), group_id=None,
                                      enable_auto_commit=False, auto_offset_reset="earliest")
        await consumer.start()
        scanned = 0
        try:
            tps = [TopicPartition(s.topic, p) for p in partitions]
            consumer.assign(tps)
            first = await consumer.beginning_offsets(tps)
            end = await consumer.end_offsets(tps)
            todo = set()
            for tp in tps:
                if end[tp] > first[tp]:
                    start = first[tp] if s.dedupe_lookback == 0 else max(
                        first[tp], end[tp] - s.dedupe_lookback)
                    consumer.seek(tp, start)
                    todo.add(tp)
            while todo:
                records = await consumer.getmany(*todo, timeout_ms=1000, max_records=2000)
                for tp, msgs in records.items():
                    for msg in msgs:
                        self._learn(msg)
                    scanned += len(msgs)
                for tp in list(todo):
                    if await consumer.position(tp) >= end[tp]:
                        todo.discard(tp)
        finally:
            await consumer.stop()
        self.log.info("kafka_sink.read_back", topic=s.topic, messages=scanned,
                      recordings=len(self.high_water), keys=len(self.written_keys),
                      elapsed_ms=round((time.monotonic() - t0) * 1000, 1))

    def _learn(self, msg: Any) -> None:
        if self.settings.dedupe == "seq":
            if msg.key is None:
                return
            group = msg.key.decode("utf-8", errors="replace")
            raw = arrow_codec.header(msg.headers, arrow_codec.HEADER_SEQ_LAST)
            last: int | None = None
            if raw is not None:
                try:
                    last = int(raw)
                except ValueError:
                    last = None
            if last is None:  # written by another producer: look inside
                try:
                    decoded = arrow_codec.decode(msg.value)
                    col = self.settings.seq_column
                    if col in decoded.data.schema.names and decoded.data.num_rows:
                        last = pc.max(decoded.data.column(col)).as_py()
                except arrow_codec.DecodeError:
                    return
            if last is not None and last > self.high_water.get(group, -(2 ** 63)):
                self.high_water[group] = last
        else:
            try:
                decoded = arrow_codec.decode(msg.value)
            except arrow_codec.DecodeError:
                return
            if decoded.key is not None:
                self.written_keys.update(
                    str(k) for k in decoded.data.column(decoded.key).to_pylist() if k is not None)

    async def _watch_connection(self) -> None:
        await watch_connection(self, lambda: self._producer.client.fetch_all_metadata())

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
            self._watch = None
        await self._close_clients()

    async def _close_clients(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    # -- writing ----------------------------------------------------------------------
    async def write(self, batch: Batch) -> None:
        if batch.num_rows == 0:
            return
        groups, rejections = self._plan(batch)
        results = await asyncio.gather(*(self._send_chain(g, msgs) for g, msgs in groups.items()))
        failed = [p for positions, _ in results for p in positions]
        causes = [exc for _, exc in results if exc is not None]
        if rejections and (failed or len(rejections) > 1):
            # dead-letter now: a retry must only see the rows that failed
            for reason, rows in rejections:
                await self.dead_letter(batch, reason=reason, rows=rows)
            rejections = []
        if failed:
            if len(failed) == batch.num_rows:
                raise causes[0]
            raise PartialFailure(sorted(failed), causes[0])
        if rejections:
            reason, rows = rejections[0]
            raise Reject(reason, rows=rows)

    def _plan(self, batch: Batch) -> tuple[dict[str, list[_Message]], list[tuple[str, list[int]]]]:
        """Messages per group (in send order), and rejected rows with the reason."""
        s = self.settings
        data = batch.data
        names = data.schema.names
        if s.message_key not in names:
            raise Reject(f"no column {s.message_key!r} (message_key) in the batch")
        checked = [s.message_key]
        if s.dedupe == "seq":
            if s.seq_column not in names:
                raise Reject(f"no column {s.seq_column!r} (seq_column) in the batch; "
                             "use dedupe = \"key\" or \"none\" for batches without one")
            if not pa.types.is_integer(data.schema.field(s.seq_column).type):
                raise Reject(f"column {s.seq_column!r} must be an integer column, found "
                             f"{data.schema.field(s.seq_column).type}")
            checked.append(s.seq_column)
        elif s.dedupe == "key":
            if batch.key is None or batch.key not in names:
                raise Reject("dedupe = \"key\" needs batches with a key column (Batch.key)")
            checked.append(batch.key)
        n = data.num_rows
        invalid = np.zeros(n, dtype=bool)
        for name in checked:
            col = data.column(name)
            if col.null_count:
                invalid |= np.asarray(pc.is_null(col).to_numpy(zero_copy_only=False), dtype=bool)
        rejected = np.flatnonzero(invalid).tolist()
        rejections = []
        if rejected:
            reason = " or ".join(f"null {c!r}" for c in checked)
            rejections.append((reason, rejected))
        # rows by message key, each group in batch order: one dictionary pass, one stable sort
        column = data.column(s.message_key)
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        encoded = pc.dictionary_encode(column)
        values = encoded.dictionary.to_pylist()
        codes = np.asarray(encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False))
        codes = np.where(invalid, -1, codes)
        groups: dict[str, list[_Message]] = {}
        if len(values) == 1 and not rejected:
            splits = [(0, np.arange(n, dtype=np.int64))]
        else:
            order = np.argsort(codes, kind="stable")
            sorted_codes = codes[order]
            bounds = np.flatnonzero(np.diff(sorted_codes)) + 1
            splits = [(int(codes[part[0]]), part.astype(np.int64))
                      for part in np.split(order, bounds) if len(part)]
        for code, positions in splits:
            if code < 0:
                continue
            group = str(values[code])
            rows = data if len(positions) == n else data.take(pa.array(positions))
            rows, positions = self._new_rows(group, rows, positions, batch.key)
            if len(positions):
                messages = self._messages(rows, positions, batch, rejections)
                if messages:
                    groups[group] = messages
        return groups, rejections

    def _new_rows(self, group: str, rows: pa.Table | pa.RecordBatch, positions: np.ndarray,
                  key: str | None) -> tuple[Any, np.ndarray]:
        """Rows the topic does not hold yet, in send order."""
        s = self.settings
        before = len(positions)
        if s.dedupe == "seq":
            seq = np.asarray(rows.column(s.seq_column).to_numpy(zero_copy_only=False))
            if len(seq) > 1 and not (np.diff(seq) > 0).all():  # not already strictly increasing
                order = np.argsort(seq, kind="stable")
                rows, positions, seq = rows.take(pa.array(order)), positions[order], seq[order]
            keep = np.ones(len(seq), dtype=bool)
            keep[1:] = seq[1:] != seq[:-1]
            mark = self.high_water.get(group)
            if mark is not None:
                keep &= seq > mark
        elif s.dedupe == "key":
            assert key is not None
            seen: set[str] = set()
            keep_list = []
            for k in rows.column(key).to_pylist():
                text = str(k)
                keep_list.append(text not in self.written_keys and text not in seen)
                seen.add(text)
            keep = np.array(keep_list, dtype=bool)
        else:
            return rows, positions
        if not keep.all():
            rows, positions = rows.filter(pa.array(keep)), positions[keep]
            self._m["skipped"].inc(before - len(positions))
        return rows, positions

    def _messages(self, rows: Any, positions: np.ndarray, batch: Batch,
                  rejections: list[tuple[str, list[int]]]) -> list[_Message]:
        s = self.settings
        out: list[_Message] = []
        n = len(positions)
        for first in range(0, n, s.max_message_rows):
            self._encode_into(out, rows.slice(first, s.max_message_rows),
                              positions[first:first + s.max_message_rows], batch, rejections)
        return out

    def _encode_into(self, out: list[_Message], rows: Any, positions: np.ndarray,
                     batch: Batch, rejections: list[tuple[str, list[int]]]) -> None:
        s = self.settings
        value = arrow_codec.encode(rows, key=batch.key, meta=batch.meta,
                                   compression=s.ipc_compression)
        if len(value) > s.max_message_bytes:
            if rows.num_rows > 1:
                half = rows.num_rows // 2
                self._encode_into(out, rows.slice(0, half), positions[:half], batch, rejections)
                self._encode_into(out, rows.slice(half), positions[half:], batch, rejections)
                return
            # a row too large for any message; the rows after it are still sent (a gap in
            # seq is harmless: the high-water mark only grows with what was written)
            why = (f"one row encodes to {len(value)} bytes, above max_message_bytes "
                   f"({s.max_message_bytes})")
            rejections.append((why, positions.tolist()))
            return
        headers = [(arrow_codec.HEADER_CONTENT_TYPE, arrow_codec.CONTENT_TYPE.encode())]
        if batch.key is not None:
            headers.append((arrow_codec.HEADER_KEY, batch.key.encode("utf-8")))
        seq_last = None
        keys: list[str] = []
        if s.dedupe == "seq":
            seq = rows.column(s.seq_column)
            seq_first, seq_last = seq[0].as_py(), seq[-1].as_py()  # sorted
            headers.append((arrow_codec.HEADER_SEQ_FIRST, str(seq_first).encode()))
            headers.append((arrow_codec.HEADER_SEQ_LAST, str(seq_last).encode()))
        elif s.dedupe == "key":
            keys = [str(k) for k in rows.column(batch.key).to_pylist()]
        out.append(_Message(value, headers, positions, seq_last, keys))

    async def _send_chain(self, group: str, messages: list[_Message]) -> tuple[list[int],
                                                                              BaseException | None]:
        """Send a group's messages in order, each after the previous was acknowledged.

        Returns the positions that were not written and the first error.
        """
        key = group.encode("utf-8")
        for i, msg in enumerate(messages):
            try:
                future = await self._producer.send(self.settings.topic, msg.value, key=key,
                                                   headers=msg.headers)
                await future
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reported to the runtime as a failure
                if isinstance(exc, (kafka_errors.KafkaConnectionError,
                                    kafka_errors.KafkaTimeoutError,
                                    kafka_errors.NodeNotReadyError,
                                    kafka_errors.RequestTimedOutError)):
                    self.set_connected(False, f"{type(exc).__name__}: {exc}")
                left = [int(p) for m in messages[i:] for p in m.positions]
                return left, exc
            self.set_connected(True)
            if msg.seq_last is not None:
                self.high_water[group] = max(self.high_water.get(group, msg.seq_last),
                                             msg.seq_last)
            if msg.keys:
                self.written_keys.update(msg.keys)
            self._m["messages"].inc()
            self._m["bytes"].inc(len(msg.value))
        return [], None
