"""mqtt_source's read loop on the runtime, against an in-memory fake broker.

The fake keeps a persistent session: unacknowledged messages are redelivered on
every (re)connection, PUBACKs are recorded in the order they arrive.
"""
from __future__ import annotations

import asyncio
import gc
import json
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from typing import Any, Self

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from handlers.mqtt_source import COLUMNS, MqttSource, _Received
from pipeline import Runtime, StartError

_DROP = object()


class FakeBroker:
    def __init__(self) -> None:
        self.session: dict[int, bytes] = {}     # unacknowledged, in publish order
        self.acks: list[int] = []
        self.conn: FakeClient | None = None
        self.connects = 0
        self.refuse = 0
        self._mid = 0

    def publish(self, payload: bytes | dict[str, Any]) -> int:
        if isinstance(payload, dict):
            payload = json.dumps(payload).encode()
        self._mid += 1
        self.session[self._mid] = payload
        if self.conn is not None:
            self.conn.deliver(self._mid, payload)
        return self._mid

    def drop(self) -> None:
        assert self.conn is not None
        self.conn.queue.put_nowait(_DROP)
        self.conn = None


class _Paho:
    def __init__(self, client: FakeClient) -> None:
        self.client = client

    def ack(self, mid: int, qos: int) -> int:
        broker = self.client.broker
        if broker.conn is self.client and mid in broker.session:
            del broker.session[mid]
            broker.acks.append(mid)
        return 0


class FakeClient:
    def __init__(self, broker: FakeBroker) -> None:
        self.broker = broker
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self._client = _Paho(self)

    def deliver(self, mid: int, payload: bytes) -> None:
        props = Properties(PacketTypes.PUBLISH)  # as paho gives every MQTT 5 message
        self.queue.put_nowait(aiomqtt.Message("gait/x", payload, 1, False, mid, props))

    async def __aenter__(self) -> Self:
        if self.broker.refuse:
            self.broker.refuse -= 1
            raise aiomqtt.MqttError("[code:135] Not authorized")
        self.broker.connects += 1
        self.broker.conn = self
        for mid, payload in self.broker.session.items():
            self.deliver(mid, payload)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.broker.conn is self:
            self.broker.conn = None

    async def subscribe(self, topics: list[tuple[str, int]]) -> list[int]:
        return [qos for _, qos in topics]

    @property
    def messages(self) -> AsyncIterator[aiomqtt.Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[aiomqtt.Message]:
        while True:
            item = await self.queue.get()
            if item is _DROP:
                raise aiomqtt.MqttError("Disconnected during message iteration")
            yield item


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeBroker]:
    b = FakeBroker()
    monkeypatch.setattr(MqttSource, "_client", lambda self: FakeClient(b))
    yield b


def sample(rec: str, seq: int) -> dict[str, Any]:
    return {"Patient": rec, "time": seq / 100, **{c: 1.0 for c in COLUMNS[1:]}}


def runtime(mqtt: dict[str, Any] | None = None, sink: dict[str, Any] | None = None) -> Runtime:
    return Runtime.from_dict({
        "runtime": {"admin_enabled": False, "drain_timeout": 5},
        "dead_letter": {"target": "dlq"},
        "handlers": {
            "mqtt": {"type": "mqtt_source", "topics": ["gait/+"], "linger_ms": 30,
                     "reconnect_backoff": 0.01, "outputs": {"default": ["sink"],
                                                            "events": ["ends"]},
                     **(mqtt or {})},
            "sink": {"type": "memory_sink", **(sink or {})},
            "ends": {"type": "memory_sink"},
            "dlq": {"type": "memory_sink"},
        }})


async def until(cond: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


async def test_coalesces_messages_and_acks_them_in_order_after_commit(broker: FakeBroker) -> None:
    mids = [broker.publish(sample("A", i)) for i in range(10)]
    mids.append(broker.publish({"recording": "A", "end": True, "rows_total": 10}))
    async with runtime() as rt:
        await until(lambda: len(broker.acks) == 11)
        sink, ends = rt.handlers["sink"], rt.handlers["ends"]
        assert [b.num_rows for b in sink.batches] == [10]        # one batch for 10 messages
        b = sink.batches[0]
        assert b.key == "seq" and b.data.column("seq").to_pylist() == list(range(10))
        assert ends.batches[0].meta["event"] == "recording_end"
        assert ends.rows() == [{"recording": "A", "rows_total": 10}]
    assert broker.acks == mids


async def test_invalid_message_is_dead_lettered_between_batches(broker: FakeBroker) -> None:
    for i in range(3):
        broker.publish(sample("A", i))
    bad = broker.publish(b"\xff not utf-8")
    for i in range(3, 5):
        broker.publish(sample("A", i))
    async with runtime() as rt:
        await until(lambda: len(broker.acks) == 6)
        assert [b.num_rows for b in rt.handlers["sink"].batches] == [3, 2]
        (dl,) = rt.handlers["dlq"].rows()
        assert "not UTF-8" in dl["reason"] and "gait/x" in dl["reason"]
        assert dl["payload_encoding"] == "base64" and dl["handler"] == "mqtt"
    assert broker.acks == [1, 2, 3, bad, 5, 6]


async def test_no_puback_before_the_sink_commits(broker: FakeBroker) -> None:
    for i in range(5):
        broker.publish(sample("A", i))
    async with runtime(sink={"delay": 0.5}) as rt:
        await until(lambda: rt.handlers["mqtt"]._inflight == 5)
        await asyncio.sleep(0.2)
        assert broker.acks == []                 # the sink is still writing
        await until(lambda: len(broker.acks) == 5)


class WindowProbe(MqttSource):
    """Records the highest number of messages read and not yet acknowledged."""

    high = 0

    async def _handle(self, *args: Any) -> None:
        await super()._handle(*args)
        self.high = max(self.high, self._inflight)


async def test_inflight_window_bounds_unacknowledged_messages(broker: FakeBroker) -> None:
    for i in range(40):
        broker.publish(sample("A", i))
    mqtt = {"type": "test_mqtt_source_unit:WindowProbe", "max_inflight": 4,
            "batch_rows": 2, "linger_ms": 0}
    async with runtime(mqtt, sink={"delay": 0.01}) as rt:
        await until(lambda: len(broker.acks) == 40)
        assert rt.handlers["sink"].row_count == 40
        assert rt.handlers["mqtt"].high == 4


async def test_a_backlog_in_the_inbox_keeps_payloads_not_paho_messages(
        broker: FakeBroker) -> None:
    # downstream is slow, so read messages wait in the inbox: each keeps its payload,
    # topic, mid and QoS, not the aiomqtt message and its paho Properties (~6 kB each)
    for i in range(40):
        broker.publish(sample("A", i))
    async with runtime({"batch_rows": 1, "linger_ms": 0}, sink={"delay": 0.1}) as rt:
        src = rt.handlers["mqtt"]
        await until(lambda: len(src._inbox) >= 20)
        entry = src._inbox[-1]
        assert not any(isinstance(o, (aiomqtt.Message, Properties))
                       for o in gc.get_referents(entry))
        assert entry.topic == "gait/x" and entry.qos == 1
        assert json.loads(entry.payload) == sample("A", entry.mid - 1)
        await until(lambda: len(broker.acks) == 40)
        assert sorted(r["seq"] for r in rt.handlers["sink"].rows()) == list(range(40))

    # what an inbox entry costs beyond its payload
    msgs = [aiomqtt.Message("gait/x", b"{}", 1, False, i, Properties(PacketTypes.PUBLISH))
            for i in range(200)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [_Received(m) for m in msgs]
        per_entry = (tracemalloc.get_traced_memory()[0] - before) / len(kept)
    finally:
        tracemalloc.stop()
    assert per_entry < 300, per_entry


async def test_reconnect_redelivers_and_never_acks_on_a_dead_connection(
        broker: FakeBroker) -> None:
    for i in range(6):
        broker.publish(sample("A", i))
    async with runtime({"batch_rows": 2, "linger_ms": 0}, sink={"delay": 0.2}) as rt:
        src = rt.handlers["mqtt"]
        await until(lambda: rt.handlers["sink"].row_count >= 2)
        broker.drop()
        await until(lambda: not src.health()[0] or broker.connects == 2)
        await until(lambda: len(broker.acks) == 6)
        assert broker.connects == 2 and src.health()[0]
        seqs = [r["seq"] for r in rt.handlers["sink"].rows()]
        assert set(seqs) == set(range(6))        # some twice: redelivered
    assert sorted(broker.acks) == [1, 2, 3, 4, 5, 6]
    assert rt.metrics.value("mqtt_stale_acks", "mqtt") >= 1


async def test_reconnect_backs_off_while_the_broker_refuses(broker: FakeBroker) -> None:
    broker.publish(sample("A", 0))
    async with runtime() as rt:
        await until(lambda: len(broker.acks) == 1)
        broker.refuse = 3
        broker.drop()
        await until(lambda: not rt.handlers["mqtt"].health()[0])
        broker.publish(sample("A", 1))
        await until(lambda: len(broker.acks) == 2)
        assert rt.handlers["mqtt"].health()[0]


async def test_start_fails_with_the_brokers_reason(broker: FakeBroker) -> None:
    broker.refuse = 1
    with pytest.raises(StartError, match=r"cannot connect to mqtt://127.0.0.1:1883.*"
                                         r"Not authorized"):
        await runtime().run()
