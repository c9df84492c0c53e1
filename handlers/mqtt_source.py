"""mqtt_source: insole samples from an MQTT broker, acknowledged only once stored.

Reads the payloads the devices (and ``stack/replay.py``) publish and emits raw
sample batches (handlers/README.md §1) on ``default`` and recording-end events
(§2) on the optional ``events`` output. Invalid messages go to the dead-letter
target with the reason and never reach a sink.

Payloads
    ``sample``: one JSON object per sample, as the original tutorial sent them:
    ``{"Patient": "GaCo01_01", "time": 0.01, "L1": ..., "R8": ..., "L": ..., "R": ...}``
    (optional ``"device"`` and ``"seq"``); without ``"seq"``, ``seq = round(time * 100)``.
    A clock slightly faster than 100 Hz (gaitpdb's is: 0.0099993 s per sample) makes
    two consecutive samples round to the same seq about every 70 s; the second one is
    dead-lettered ("sequence number collision") rather than silently overwriting the
    first. Devices that send ``"seq"`` avoid it.
    ``batch``: ``{"device": ..., "recording": ..., "seq": <first seq>, "rows": [[19 numbers], ...]}``
    with the columns ``time, L1..L8, R1..R8, L, R``; row ``i`` has ``seq + i``.
    ``end``: ``{"device": ..., "recording": ..., "end": true, "rows_total": n}`` becomes a
    one-row batch (``recording``, ``rows_total``) with ``meta["event"] == "recording_end"``
    on ``events`` (unwired: acknowledged at once).

Validation (each failure is one dead letter: the reason, the topic, the raw payload)
    over ``max_payload_bytes`` (the dead letter keeps the first 4 KiB); not UTF-8;
    not JSON; not an object or an unknown shape; missing or unexpected fields; a row
    without exactly 19 values; a non-numeric value (strings, booleans, null); NaN or
    an infinite value; a negative force; negative time; time not increasing within
    the message; time going backwards across messages of a recording (see below);
    a missing or unsafe id (recording/device must match ``[A-Za-z0-9_.-]{1,64}``
    without ``..``: no ``/``, no control characters, nothing over 64 characters).

    Across messages, a small per-recording state (newest ``seq`` and its time)
    rejects a message whose time is more than ``reorder_tolerance`` seconds behind
    the newest sample seen (a reset device clock would otherwise overwrite stored
    samples), or whose seq moves forward while its time does not. Within the
    tolerance, older messages are accepted: redeliveries, duplicates and reordered
    neighbours are harmless because every sink upserts by ``(recording, seq)``. The
    state is per process, forgotten on reconnect (the broker then redelivers what
    was not acknowledged) and at a recording's end marker.

Delivery (at least once; effectively once with the idempotent sinks)
    QoS 1 subscriptions in a persistent session: a fixed ``client_id`` (default
    ``gaitflow-<handler name>``), ``clean_start = false`` with a session expiry
    (MQTT 5) or ``clean_session = false`` (3.1.1), so the broker queues messages
    while the pipeline is down. Acknowledgement is manual: a PUBACK is sent only
    after every sink downstream committed the rows of that message (the runtime
    calls ``commit`` in order; PUBACKs go out in the order the messages arrived).
    A crash or a lost connection before that means the broker redelivers.
    QoS 2 is not offered: with a manual acknowledgement the QoS 2 handshake
    (PUBREC at receipt) would let a crash lose the message.

Batching
    Consecutive valid sample messages are coalesced into one columnar batch (NumPy
    then Arrow, no per-row dicts) of up to ``batch_rows`` rows, waiting at most
    ``linger_ms`` for more; the batch carries the acknowledgement of every message
    in it. An invalid message or an end marker first flushes the batch, so
    acknowledgements stay in arrival order.

Backpressure
    At most ``max_inflight`` messages are read and not yet acknowledged; when the
    window is full the source stops reading (and emitting blocks while a target's
    channel is full). With MQTT 5 the window is also sent as the CONNECT Receive
    Maximum, so the broker limits what it pushes. (Mosquitto 2.0.11 refills a
    whole window after each PUBACK, so the client library's own queue may hold
    more than ``max_inflight`` messages; the pipeline never does.) A buffering
    sink must commit before the window fills: with ``lake_sink`` keep
    ``roll_interval > 0``; one-sample messages then flow at most at about
    ``max_inflight / roll_interval`` messages per second.

    Memory: a message waiting to be handled costs its payload and about 100 bytes
    (the source keeps payload, topic, mid and QoS, not the client library's
    message object, which is about 6 kB more), so a full window of 100-sample JSON
    messages (about 11 kB each) at the default ``max_inflight`` is about 220 MB.

Scale-out
    ``shared_group`` subscribes as ``$share/<group>/<topic>`` (MQTT 5 shared
    subscription): the broker spreads messages over every source of the group.
    Give each instance its own ``client_id``. Messages of one recording then
    reach several instances, so put a per-recording stage (Kafka keyed by
    recording) before a buffering sink such as ``lake_sink``.

Connection
    ``username``/``password`` (a secret: ``"${MQTT_PASSWORD}"``), TLS with
    ``tls = true`` (``ca_file``, optional client ``cert_file``/``key_file``).
    ``start`` connects and subscribes (a refused login or certificate fails the
    start with the broker's reason); afterwards a lost connection is retried with
    exponential backoff (``reconnect_backoff`` .. ``reconnect_max_backoff``) while
    ``set_connected(False)`` makes ``/readyz`` report it.

Metrics: ``mqtt_messages``, ``mqtt_acked_messages``, ``mqtt_invalid_messages``,
``mqtt_end_markers``, ``mqtt_reconnects``, ``mqtt_stale_acks``, gauge ``mqtt_inflight``.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import math
import random
import re
import ssl
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any, ClassVar, Literal

import aiomqtt
import numpy as np
import pyarrow as pa
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from pipeline import Secret, Source, setting

__all__ = ["COLUMNS", "END_SCHEMA", "SAMPLE_SCHEMA", "EndMarker", "InvalidPayload",
           "MqttSource", "MqttSourceSettings", "Samples", "Timelines", "check_id",
           "parse_payload", "samples_batch"]

#: the 19 numbers of one sample, in payload order
COLUMNS = ["time", *(f"L{i}" for i in range(1, 9)), *(f"R{i}" for i in range(1, 9)), "L", "R"]
SAMPLE_SCHEMA = pa.schema(
    [pa.field("recording", pa.string(), nullable=False), pa.field("seq", pa.int64(), False)]
    + [pa.field(c, pa.float64(), False) for c in COLUMNS]
    + [pa.field("device", pa.string(), nullable=False)])
END_SCHEMA = pa.schema([pa.field("recording", pa.string(), nullable=False),
                        pa.field("rows_total", pa.int64(), nullable=False)])

SAMPLE_HZ = 100
MAX_TIME = 1e9          # seconds; keeps seq = round(time * 100) far inside int64
DEAD_LETTER_PREFIX = 4096
_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SAMPLE_KEYS = frozenset({"Patient", "device", "seq", *COLUMNS})
_BATCH_KEYS = frozenset({"device", "recording", "seq", "rows"})
_END_KEYS = frozenset({"device", "recording", "end", "rows_total"})
_NUMBER = frozenset({int, float})


# --------------------------------------------------------------------------- payloads
class InvalidPayload(Exception):
    """The message cannot be accepted; ``reason`` says why (goes to dead letter)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(slots=True)
class Samples:
    """Valid rows of one message: ``values`` is (n, 19) float64 in ``COLUMNS`` order.

    ``derived``: the seq was computed from the time (a sample payload without ``seq``).
    """

    recording: str
    device: str
    seq: np.ndarray
    values: np.ndarray
    derived: bool = False


@dataclasses.dataclass(slots=True)
class EndMarker:
    recording: str
    device: str
    rows_total: int


def check_id(value: Any, what: str) -> str:
    """``value`` if it is a safe id (``[A-Za-z0-9_.-]{1,64}``, no ``..``), else InvalidPayload."""
    if value is None:
        raise InvalidPayload(f"missing {what} id")
    if not isinstance(value, str):
        raise InvalidPayload(f"{what} id must be a string, got {type(value).__name__}")
    if not _ID.fullmatch(value) or ".." in value:
        shown = json.dumps(value[:80])
        raise InvalidPayload(f"unsafe {what} id {shown}: expected 1 to 64 characters from "
                             "[A-Za-z0-9_.-] and no '..'")
    return value


def parse_payload(payload: bytes, max_bytes: int = 1 << 20) -> Samples | EndMarker:
    """Decode and validate one message (any of the three payload shapes)."""
    if len(payload) > max_bytes:
        raise InvalidPayload(f"oversize payload: {len(payload)} bytes > max_payload_bytes "
                             f"{max_bytes}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidPayload(f"payload is not UTF-8: byte 0x{payload[exc.start]:02x} at "
                             f"position {exc.start}") from None
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidPayload(f"payload is not JSON: {str(exc)[:120]}") from None
    if not isinstance(obj, dict):
        raise InvalidPayload(f"payload is not a JSON object (found {type(obj).__name__})")
    if "end" in obj:
        return _parse_end(obj)
    if "rows" in obj:
        return _parse_batch(obj)
    if "Patient" in obj:
        return _parse_sample(obj)
    raise InvalidPayload("unknown payload: expected a sample {\"Patient\", \"time\", \"L1\"...}, "
                         "a batch {\"recording\", \"seq\", \"rows\"} or an end marker "
                         "{\"recording\", \"end\": true, \"rows_total\"}")


def _unexpected(obj: dict[str, Any], allowed: frozenset[str]) -> None:
    extra = [k for k in obj if k not in allowed]
    if extra:
        raise InvalidPayload("unexpected field(s): " + ", ".join(json.dumps(k) for k in extra[:5]))


def _device(obj: dict[str, Any], recording: str) -> str:
    dev = obj.get("device")
    return f"insole-{recording}" if dev is None else check_id(dev, "device")


def _parse_end(obj: dict[str, Any]) -> EndMarker:
    _unexpected(obj, _END_KEYS)
    if obj["end"] is not True:
        raise InvalidPayload("end marker: \"end\" must be true")
    recording = check_id(obj.get("recording"), "recording")
    total = obj.get("rows_total")
    if type(total) is not int or total < 0:
        raise InvalidPayload("end marker: \"rows_total\" must be an integer >= 0")
    return EndMarker(recording, _device(obj, recording), total)


def _parse_sample(obj: dict[str, Any]) -> Samples:
    recording = check_id(obj["Patient"], "recording")
    missing = [c for c in COLUMNS if c not in obj]
    if missing:
        raise InvalidPayload(f"wrong column count: missing field(s) {', '.join(missing)} "
                             f"(a sample has the {len(COLUMNS)} fields time, L1..L8, R1..R8, L, R)")
    _unexpected(obj, _SAMPLE_KEYS)
    values = [obj[c] for c in COLUMNS]
    if not set(map(type, values)) <= _NUMBER:
        col = next(c for c, v in zip(COLUMNS, values) if type(v) not in _NUMBER)
        raise InvalidPayload(f"non-numeric value for {col!r}: {json.dumps(obj[col])[:40]}")
    # one row: plain Python checks (C loops) are several times cheaper than NumPy's
    try:
        finite = all(map(math.isfinite, values))
    except OverflowError:   # an integer too large for a float
        finite = False
    if not finite or min(values) < 0 or values[0] > MAX_TIME:
        _check_values(_to_array([values]), single=True)   # names the problem
    explicit = obj.get("seq")
    if explicit is None:
        seq = round(values[0] * SAMPLE_HZ)
    elif type(explicit) is int and 0 <= explicit < 2**62:
        seq = explicit
    else:
        raise InvalidPayload("\"seq\" must be an integer >= 0")
    return Samples(recording, _device(obj, recording), np.array([seq], dtype=np.int64),
                   np.array([values], dtype=np.float64), derived=explicit is None)


def _parse_batch(obj: dict[str, Any]) -> Samples:
    _unexpected(obj, _BATCH_KEYS)
    recording = check_id(obj.get("recording"), "recording")
    device = _device(obj, recording)
    seq0 = obj.get("seq")
    if type(seq0) is not int or seq0 < 0:
        raise InvalidPayload("\"seq\" (the first sequence number) must be an integer >= 0")
    rows = obj["rows"]
    if type(rows) is not list or not rows:
        raise InvalidPayload("\"rows\" must be a non-empty list of rows")
    if set(map(type, rows)) != {list}:
        raise InvalidPayload(f"\"rows\" must be a list of lists of {len(COLUMNS)} numbers")
    if set(map(len, rows)) != {len(COLUMNS)}:
        i, n = next((i, len(r)) for i, r in enumerate(rows) if len(r) != len(COLUMNS))
        raise InvalidPayload(f"wrong column count: row {i} has {n} values, expected "
                             f"{len(COLUMNS)} (time, L1..L8, R1..R8, L, R)")
    if not set(map(type, itertools.chain.from_iterable(rows))) <= _NUMBER:
        i, j = next((i, j) for i, r in enumerate(rows) for j, v in enumerate(r)
                    if type(v) not in _NUMBER)
        raise InvalidPayload(f"non-numeric value in row {i} ({COLUMNS[j]}): "
                             f"{json.dumps(rows[i][j])[:40]}")
    arr = _to_array(rows)
    _check_values(arr, single=False)
    if seq0 + len(rows) > 2**62:
        raise InvalidPayload("\"seq\" out of range")
    return Samples(recording, device, np.arange(seq0, seq0 + len(rows), dtype=np.int64), arr)


def _to_array(rows: list[list[Any]]) -> np.ndarray:
    try:
        return np.array(rows, dtype=np.float64)
    except (OverflowError, ValueError) as exc:
        raise InvalidPayload(f"value out of range: {exc}") from None


def _check_values(arr: np.ndarray, single: bool) -> None:
    def where(i: int, j: int) -> str:
        return f"{COLUMNS[j]}" if single else f"row {i} ({COLUMNS[j]})"

    finite = np.isfinite(arr)
    if not finite.all():
        i, j = np.argwhere(~finite)[0]
        raise InvalidPayload(f"NaN or infinite value in {where(i, j)}")
    negative = arr < 0
    if negative.any():
        i, j = np.argwhere(negative)[0]
        what = "negative time" if j == 0 else "negative force"
        raise InvalidPayload(f"{what} in {where(i, j)}: {float(arr[i, j])!r}")
    t = arr[:, 0]
    if t.max() > MAX_TIME:
        raise InvalidPayload(f"time out of range (> {MAX_TIME:g} s)")
    if len(t) > 1:
        step = np.diff(t)
        if (step <= 0).any():
            i = int(np.argmax(step <= 0)) + 1
            raise InvalidPayload(f"time going backwards within the message at row {i}: "
                                 f"{float(t[i])!r} s after {float(t[i - 1])!r} s")


class Timelines:
    """Per recording, the newest ``seq`` seen and its time (cross-message time check)."""

    def __init__(self, tolerance: float, max_recordings: int = 10_000) -> None:
        self.tolerance = tolerance
        self.max_recordings = max_recordings
        self._newest: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def check(self, s: Samples) -> None:
        prev = self._newest.get(s.recording)
        if prev is None:
            return
        seq, t = prev
        t_first, t_last = float(s.values[0, 0]), float(s.values[-1, 0])
        if s.derived and int(s.seq[0]) == seq and t_first > t:
            raise InvalidPayload(
                f"sequence number collision: time {t_first!r} s and the previous sample's "
                f"{t!r} s both give seq {seq} = round(time * {SAMPLE_HZ}) (a device clock "
                "faster than 100 Hz); send \"seq\" in the payload to keep every sample")
        if int(s.seq[0]) > seq and t_first <= t:
            raise InvalidPayload(
                f"time going backwards across messages: sample {int(s.seq[0])} at {t_first!r} s "
                f"follows sample {seq} at {t!r} s")
        if t_last < t - self.tolerance:
            raise InvalidPayload(
                f"time going backwards across messages: {t_last!r} s is more than "
                f"{self.tolerance:g} s behind the recording's newest sample ({t!r} s)")

    def update(self, s: Samples) -> None:
        last = int(s.seq[-1])
        prev = self._newest.get(s.recording)
        if prev is None or last > prev[0]:
            self._newest[s.recording] = (last, float(s.values[-1, 0]))
        self._newest.move_to_end(s.recording)
        while len(self._newest) > self.max_recordings:
            self._newest.popitem(last=False)

    def forget(self, recording: str) -> None:
        self._newest.pop(recording, None)

    def clear(self) -> None:
        self._newest.clear()


def samples_batch(items: list[Samples]) -> pa.RecordBatch:
    """One columnar batch (``SAMPLE_SCHEMA``) from the rows of several messages."""
    if len(items) == 1:
        values, seq = items[0].values, items[0].seq
    else:
        values = np.concatenate([s.values for s in items])
        seq = np.concatenate([s.seq for s in items])
    counts = np.fromiter((len(s.seq) for s in items), dtype=np.int64, count=len(items))
    owner = pa.array(np.repeat(np.arange(len(items), dtype=np.int32), counts))
    recording = pa.array([s.recording for s in items], pa.string()).take(owner)
    device = pa.array([s.device for s in items], pa.string()).take(owner)
    cols = np.ascontiguousarray(values.T)
    arrays = [recording, pa.array(seq, pa.int64()), *(pa.array(c) for c in cols), device]
    return pa.RecordBatch.from_arrays(arrays, schema=SAMPLE_SCHEMA)


# --------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class MqttSourceSettings:
    topics: list[str] = setting(doc="topic filters to subscribe to, e.g. [\"gaitflow/insoles/+\"]")
    host: str = setting("127.0.0.1", doc="broker host")
    port: int = setting(1883, doc="broker port (the stack: 1883 open, 8883 password, "
                                  "8884 TLS + password)", min=1, max=65535)
    client_id: str | None = setting(None, doc="fixed MQTT client id: the persistent session's "
                                              "name (default: gaitflow-<handler name>); give "
                                              "each instance its own")
    shared_group: str | None = setting(None, doc="subscribe as $share/<group>/<topic> (MQTT 5 "
                                                 "shared subscription, load spread over the "
                                                 "group's members)")
    qos: Literal[0, 1] = setting(1, doc="subscription QoS; 1 = at least once with PUBACK after "
                                        "commit (0 = no redelivery, for tests only)")
    protocol: Literal["5", "3.1.1"] = setting("5", doc="MQTT protocol version")
    persistent_session: bool = setting(True, doc="keep the session (subscriptions, queued and "
                                                 "unacknowledged messages) across disconnects")
    session_expiry: int = setting(7 * 24 * 3600, doc="MQTT 5: seconds the broker keeps the "
                                                     "session after a disconnect", min=0)
    username: str | None = setting(None, doc="user name")
    password: Secret | None = setting(None, doc="password (use ${ENV_VAR})", secret=True)
    tls: bool = setting(False, doc="connect with TLS")
    ca_file: Path | None = setting(None, doc="CA bundle that signed the broker's certificate "
                                             "(default: the system's)")
    cert_file: Path | None = setting(None, doc="client certificate (mutual TLS)")
    key_file: Path | None = setting(None, doc="client certificate's private key")
    tls_insecure: bool = setting(False, doc="skip the broker host name check (never in "
                                            "production)")
    keepalive: int = setting(30, doc="MQTT keepalive, seconds", min=5)
    connect_timeout: float = setting(10.0, doc="seconds to wait for CONNACK / SUBACK", min=0.1)
    max_inflight: int = setting(20_000, doc="messages read but not yet acknowledged (the "
                                            "backpressure window; MQTT 5 Receive Maximum)",
                                min=1, max=65535)
    batch_rows: int = setting(1000, doc="coalesce consecutive messages into batches of up to "
                                        "this many rows", min=1)
    linger_ms: float = setting(20.0, doc="wait at most this long for more messages before "
                                        "emitting a partial batch", min=0)
    max_payload_bytes: int = setting(1 << 20, doc="larger messages go to dead letter", min=64)
    reorder_tolerance: float = setting(10.0, doc="seconds of recording time a message may lag "
                                                 "behind the newest sample of its recording "
                                                 "before it counts as time going backwards",
                                       min=0)
    reconnect_backoff: float = setting(0.5, doc="first delay before reconnecting, seconds",
                                       min=0)
    reconnect_max_backoff: float = setting(30.0, doc="longest delay between reconnects",
                                           min=0)

    def __post_init__(self) -> None:
        if not self.topics:
            raise ValueError("topics: at least one topic filter is required")
        if self.password and not self.username:
            raise ValueError("password needs username")
        if (self.ca_file or self.cert_file or self.tls_insecure) and not self.tls:
            raise ValueError("ca_file, cert_file and tls_insecure need tls = true")
        if self.key_file and not self.cert_file:
            raise ValueError("key_file needs cert_file")
        if self.shared_group is not None and not re.fullmatch(r"[^/+#$\s]+", self.shared_group):
            raise ValueError(f"shared_group {self.shared_group!r}: no '/', '+', '#', '$' or "
                             "spaces")
        if self.reconnect_max_backoff < self.reconnect_backoff:
            raise ValueError("reconnect_max_backoff must be >= reconnect_backoff")


# --------------------------------------------------------------------------- the source
@dataclasses.dataclass(frozen=True, slots=True)
class _Token:
    """What ``commit`` acknowledges: the (mid, qos) of each message, on connection ``gen``."""

    gen: int
    acks: tuple[tuple[int, int], ...]


class _Received:
    """What the source keeps of a message read and not handled yet (the inbox).

    Not the ``aiomqtt.Message``: its paho ``Properties`` object alone costs about 6 kB
    of Python objects per message, and a backlog of ``max_inflight`` messages can sit
    in the inbox while downstream is slow.
    """

    __slots__ = ("mid", "payload", "qos", "topic")

    def __init__(self, msg: aiomqtt.Message) -> None:
        p = msg.payload
        self.payload = p if isinstance(p, bytes) else str(p).encode()
        self.topic = str(msg.topic)
        self.mid, self.qos = msg.mid, msg.qos


class _Pending:
    """Valid messages read and not yet emitted (the coalescing buffer)."""

    __slots__ = ("acks", "deadline", "items", "rows")

    def __init__(self) -> None:
        self.items: list[Samples] = []
        self.acks: list[tuple[int, int]] = []
        self.rows = 0
        self.deadline = 0.0

    def __len__(self) -> int:
        return len(self.acks)


class MqttSource(Source):
    """Subscribes, validates, coalesces and emits samples; PUBACK after downstream commit."""

    Settings: ClassVar[type] = MqttSourceSettings
    settings: MqttSourceSettings
    outputs: ClassVar[tuple[str, ...]] = ("default",)
    optional_outputs: ClassVar[tuple[str, ...]] = ("events",)

    def __init__(self, name: str, settings: MqttSourceSettings | None = None) -> None:
        super().__init__(name, settings)
        s = self.settings
        self.client_id = s.client_id or f"gaitflow-{name}"
        scheme = "mqtts" if s.tls else "mqtt"
        self.url = f"{scheme}://{s.host}:{s.port}"
        self.subscriptions = [f"$share/{s.shared_group}/{t}" if s.shared_group else t
                              for t in s.topics]
        self._timelines = Timelines(s.reorder_tolerance)
        self._conn: aiomqtt.Client | None = None
        self._gen = 0
        self._inbox: deque[_Received] = deque()
        self._pump_error: BaseException | None = None
        self._arrived: asyncio.Event | None = None
        self._room: asyncio.Event | None = None
        self._inflight = 0
        self._tls: ssl.SSLContext | None = None
        self._m: dict[str, Any] = {}

    # -- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        self._arrived, self._room = asyncio.Event(), asyncio.Event()
        m = self.metrics
        self._m = {
            "messages": m.counter("mqtt_messages", "MQTT messages read"),
            "invalid": m.counter("mqtt_invalid_messages", "MQTT messages sent to dead letter"),
            "ends": m.counter("mqtt_end_markers", "Recording end markers received"),
            "reconnects": m.counter("mqtt_reconnects", "Reconnections to the broker"),
            "acked": m.counter("mqtt_acked_messages", "Messages acknowledged upstream "
                                                       "(PUBACK sent) after downstream commit"),
            "stale": m.counter("mqtt_stale_acks", "Acknowledgements dropped because their "
                                                  "connection was gone (the broker redelivers)"),
            "inflight": m.gauge("mqtt_inflight", "Messages read and not yet acknowledged"),
        }
        self._conn = await self._connect()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._disconnect(conn)

    # -- connection ----------------------------------------------------------------
    def _client(self) -> aiomqtt.Client:
        s = self.settings
        kwargs: dict[str, Any] = {}
        if s.protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = s.session_expiry if s.persistent_session else 0
            props.ReceiveMaximum = s.max_inflight
            kwargs.update(protocol=aiomqtt.ProtocolVersion.V5, properties=props,
                          clean_start=not s.persistent_session)
        else:
            kwargs.update(protocol=aiomqtt.ProtocolVersion.V311,
                          clean_session=not s.persistent_session)
        if self._tls is not None:
            kwargs["tls_context"] = self._tls
        client = aiomqtt.Client(
            s.host, s.port, identifier=self.client_id, username=s.username,
            password=s.password.get() if s.password else None, keepalive=s.keepalive,
            timeout=s.connect_timeout, **kwargs)
        # aiomqtt 2.5 has no manual-ack option: switch paho's on, so a PUBACK leaves
        # only when ``commit`` says every sink stored the message
        client._client.manual_ack_set(True)
        return client

    def _tls_context(self) -> ssl.SSLContext:
        s = self.settings
        ctx = ssl.create_default_context(cafile=str(s.ca_file) if s.ca_file else None)
        if s.cert_file:
            ctx.load_cert_chain(str(s.cert_file), str(s.key_file) if s.key_file else None)
        ctx.check_hostname = not s.tls_insecure
        return ctx

    async def _tls_handshake(self, who: str) -> None:
        """Try the TLS handshake first: paho 2.2 leaks the socket of a failed one, and
        this gives the clearer error."""
        s = self.settings
        try:
            async with asyncio.timeout(s.connect_timeout):
                _, writer = await asyncio.open_connection(s.host, s.port, ssl=self._tls)
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        except (OSError, TimeoutError) as exc:
            raise ConnectionError(f"cannot connect to {self.url}{who} (client id "
                                  f"{self.client_id!r}): TLS: {exc or 'timed out'}") from None

    async def _connect(self) -> aiomqtt.Client:
        s = self.settings
        who = f" as {s.username!r}" if s.username else ""
        if s.tls:
            if self._tls is None:
                try:
                    self._tls = await asyncio.to_thread(self._tls_context)
                except (OSError, ssl.SSLError) as exc:
                    raise ConnectionError(f"{self.url}: TLS files: {exc}") from None
            await self._tls_handshake(who)
        client = self._client()
        try:
            await client.__aenter__()
        except aiomqtt.MqttError as exc:
            raise ConnectionError(f"cannot connect to {self.url}{who} (client id "
                                  f"{self.client_id!r}): {exc}") from None
        try:
            granted = await client.subscribe([(t, s.qos) for t in self.subscriptions])
            refused = [t for t, g in zip(self.subscriptions, granted, strict=False)
                       if (g.is_failure if hasattr(g, "is_failure") else int(g) >= 0x80)]
            if refused:
                raise ConnectionError(f"{self.url}: subscription refused for "
                                      f"{', '.join(refused)}: {granted}")
        except BaseException as exc:
            await self._disconnect(client)
            if isinstance(exc, aiomqtt.MqttError):
                raise ConnectionError(f"{self.url}: subscribe failed: {exc}") from None
            raise
        self._gen += 1
        self._timelines.clear()
        self.set_connected(True)
        self.log.info("mqtt.connected", broker=self.url, client_id=self.client_id,
                      topics=self.subscriptions, qos=s.qos, protocol=s.protocol,
                      persistent=s.persistent_session)
        return client

    async def _disconnect(self, client: aiomqtt.Client) -> None:
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                await client.__aexit__(None, None, None)
        except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
            self.log.debug("mqtt.disconnect_error", error=f"{type(exc).__name__}: {exc}")

    # -- reading -------------------------------------------------------------------
    async def run(self) -> None:
        s = self.settings
        delay = s.reconnect_backoff
        while True:
            if self._conn is None:
                try:
                    self._conn = await self._connect()
                except (ConnectionError, aiomqtt.MqttError, OSError) as exc:
                    self.set_connected(False, f"reconnecting: {exc}")
                    pause = delay * (0.5 + random.random() / 2)
                    self.log.warning("mqtt.reconnect_failed", error=str(exc),
                                     retry_in_s=round(pause, 2))
                    await asyncio.sleep(pause)
                    delay = min(max(delay * 2, 0.1), s.reconnect_max_backoff)
                    continue
                self._m["reconnects"].inc()
                delay = s.reconnect_backoff
            try:
                await self._consume(self._conn)
            except aiomqtt.MqttError as exc:
                self.set_connected(False, f"connection lost: {exc}")
                self.log.warning("mqtt.connection_lost", broker=self.url, error=str(exc))
                conn, self._conn = self._conn, None
                if conn is not None:
                    await self._disconnect(conn)

    async def _pump(self, conn: aiomqtt.Client) -> None:
        assert self._arrived is not None
        try:
            async for msg in conn.messages:
                self._inbox.append(_Received(msg))
                self._arrived.set()
        except aiomqtt.MqttError as exc:
            self._pump_error = exc
            self._arrived.set()

    async def _wait_arrival(self, timeout: float | None) -> bool:
        assert self._arrived is not None
        self._arrived.clear()
        if self._inbox or self._pump_error is not None:
            return True
        try:
            async with asyncio.timeout(timeout):
                await self._arrived.wait()
        except TimeoutError:
            return False
        return True

    async def _wait_room(self) -> None:
        assert self._room is not None
        while self._inflight >= self.settings.max_inflight:
            self._room.clear()
            await self._room.wait()

    async def _consume(self, conn: aiomqtt.Client) -> None:
        s = self.settings
        gen = self._gen
        loop = asyncio.get_running_loop()
        linger = s.linger_ms / 1000.0
        self._pump_error = None
        self._inbox.clear()
        pending = _Pending()
        pump = asyncio.create_task(self._pump(conn), name=f"mqtt-pump:{self.name}")
        handled = 0
        try:
            while True:
                if self._pump_error is not None and not self._inbox:
                    raise self._pump_error
                if not self._inbox:
                    if pending:
                        left = pending.deadline - loop.time()
                        if left <= 0 or not await self._wait_arrival(left):
                            await self._flush(pending, gen)
                    else:
                        await self._wait_arrival(None)
                    continue
                if self._inflight >= s.max_inflight:
                    await self._flush(pending, gen)
                    await self._wait_room()
                    continue
                msg = self._inbox.popleft()
                self._inflight += 1
                await self._handle(msg, pending, gen)
                if pending.rows >= s.batch_rows:
                    await self._flush(pending, gen)
                elif len(pending) == 1:
                    pending.deadline = loop.time() + linger
                handled += 1
                if handled % 256 == 0:
                    self._m["inflight"].set(self._inflight)
                    await asyncio.sleep(0)  # a busy inbox must not starve the loop
        finally:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
            # read but never emitted: not acknowledged, so the broker redelivers them
            self._inflight -= len(pending)
            self._inbox.clear()

    async def _handle(self, msg: _Received, pending: _Pending, gen: int) -> None:
        self._m["messages"].inc()
        payload = msg.payload
        ack = (msg.mid, msg.qos)
        try:
            item = parse_payload(payload, self.settings.max_payload_bytes)
            if isinstance(item, Samples):
                self._timelines.check(item)
        except InvalidPayload as exc:
            await self._flush(pending, gen)
            self._m["invalid"].inc()
            raw = payload
            reason = f"{exc.reason} (topic {msg.topic})"
            if len(payload) > DEAD_LETTER_PREFIX:
                raw = payload[:DEAD_LETTER_PREFIX]
                reason += f"; payload truncated to its first {DEAD_LETTER_PREFIX} bytes"
            await self.dead_letter(raw, reason=reason, token=_Token(gen, (ack,)))
            return
        if isinstance(item, EndMarker):
            await self._flush(pending, gen)
            self._m["ends"].inc()
            self._timelines.forget(item.recording)
            event = pa.table({"recording": [item.recording], "rows_total": [item.rows_total]},
                             schema=END_SCHEMA)
            await self.emit(event, output="events", key="recording",
                            meta={"event": "recording_end", "recording": item.recording,
                                  "device": item.device, "topic": str(msg.topic)},
                            token=_Token(gen, (ack,)))
            return
        self._timelines.update(item)
        pending.items.append(item)
        pending.acks.append(ack)
        pending.rows += len(item.seq)

    async def _flush(self, pending: _Pending, gen: int) -> None:
        if not pending:
            return
        batch = samples_batch(pending.items)
        token = _Token(gen, tuple(pending.acks))
        pending.items, pending.acks, pending.rows = [], [], 0
        await self.emit(batch, key="seq", token=token)

    # -- acknowledging -------------------------------------------------------------
    async def commit(self, tokens: list[Any]) -> None:
        conn = self._conn
        paho = conn._client if conn is not None else None
        stale = acked = 0
        for token in tokens:
            if paho is not None and token.gen == self._gen:
                for mid, qos in token.acks:
                    if qos:
                        paho.ack(mid, qos)
                acked += len(token.acks)
            else:
                stale += len(token.acks)
            self._inflight -= len(token.acks)
        self._m["acked"].inc(acked)
        if stale:
            self._m["stale"].inc(stale)
        self._m["inflight"].set(self._inflight)
        if self._room is not None:
            self._room.set()
