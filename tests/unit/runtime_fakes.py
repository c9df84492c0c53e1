"""Handlers for the runtime tests, loaded as ``type = "runtime_fakes:Class"``.

The test directory is on ``sys.path`` under pytest; subprocess tests add it
through ``PYTHONPATH``.
"""
from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from typing import Any, ClassVar, Literal

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import (
    Batch,
    Deferred,
    PartialFailure,
    Processor,
    Reject,
    Secret,
    Sink,
    Source,
    setting,
)
from pipeline.builtin import JsonlSink, JsonlSinkSettings

#: lifecycle events of LifecycleProbe instances, in order: ("start", name), ("close", name)...
EVENTS: list[tuple[str, str]] = []


def seqs_of(batch: Batch) -> list[int]:
    return batch.data.column("seq").to_pylist()


@dataclasses.dataclass(frozen=True)
class ScriptedSettings:
    fail_on: list[int] = setting([], doc="batches holding any of these seq values fail")
    failures: int = setting(-1, doc="times each such row fails before it succeeds; -1: always")
    mode: Literal["raise", "partial", "reject", "mid_batch"] = setting("raise")
    delay: float = setting(0.0, min=0)
    delays: dict[str, float] = setting({}, doc="per first-seq delays (as strings)")


class ScriptedSink(Sink):
    """Fails on chosen rows in chosen ways; records what it committed."""

    Settings: ClassVar[type] = ScriptedSettings

    def __init__(self, name: str, settings: Any = None) -> None:
        super().__init__(name, settings)
        self.committed: list[int] = []      # seq values committed, in commit order
        self.half_written: list[int] = []   # rows written by a batch that then failed
        self.attempts: Counter[int] = Counter()      # by first seq of the batch written
        self.row_attempts: Counter[int] = Counter()  # by seq
        self.completed_batches: list[int] = []   # first seq of each committed batch

    async def write(self, batch: Batch) -> None:
        s = self.settings
        seqs = seqs_of(batch)
        first = seqs[0] if seqs else -1
        self.attempts[first] += 1
        self.row_attempts.update(seqs)
        delay = s.delays.get(str(first), s.delay)
        if delay:
            await asyncio.sleep(delay)
        bad = [i for i, v in enumerate(seqs) if v in s.fail_on
               and (s.failures < 0 or self.row_attempts[v] <= s.failures)]
        if bad:
            if s.mode == "reject":
                self.committed.extend(v for i, v in enumerate(seqs) if i not in bad)
                raise Reject(f"poison row(s) {[seqs[i] for i in bad]}", rows=bad)
            if s.mode == "partial":
                self.committed.extend(v for i, v in enumerate(seqs) if i not in bad)
                raise PartialFailure(bad, ConnectionError("item failed"))
            if s.mode == "mid_batch":
                self.half_written.extend(seqs[: len(seqs) // 2])
                raise OSError(f"connection lost after {len(seqs) // 2} rows")
            raise ValueError(f"cannot write seq {seqs[bad[0]]}")
        self.committed.extend(seqs)
        self.completed_batches.append(first)


class GateSink(Sink):
    """Blocks in write() until ``gate`` is opened by the test."""

    def __init__(self, name: str, settings: Any = None) -> None:
        super().__init__(name, settings)
        self.gate: asyncio.Event | None = None
        self.received = 0

    async def start(self) -> None:
        self.gate = asyncio.Event()

    async def write(self, batch: Batch) -> None:
        assert self.gate is not None
        self.received += 1
        await self.gate.wait()


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
    fail_start: bool = setting(False)
    fail_close: bool = setting(False)
    start_delay: float = setting(0.0)
    connected: bool = setting(True)


class LifecycleProbe(Sink):
    """Records start/close into EVENTS; can fail either."""

    Settings: ClassVar[type] = ProbeSettings

    def __init__(self, name: str, settings: Any = None) -> None:
        super().__init__(name, settings)
        self.start_gate: asyncio.Event | None = None

    async def start(self) -> None:
        EVENTS.append(("start", self.name))
        if self.settings.start_delay:
            await asyncio.sleep(self.settings.start_delay)
        if self.settings.fail_start:
            raise ConnectionRefusedError(f"cannot reach the server of {self.name}")
        self.set_connected(self.settings.connected, "" if self.settings.connected else "down")

    async def write(self, batch: Batch) -> None:
        pass

    async def close(self) -> None:
        EVENTS.append(("close", self.name))
        if self.settings.fail_close:
            raise RuntimeError(f"{self.name} close exploded")


class ProbeProcessor(Processor):
    async def start(self) -> None:
        EVENTS.append(("start", self.name))

    async def process(self, batch: Batch) -> Batch:
        return batch

    async def close(self) -> None:
        EVENTS.append(("close", self.name))


class ProbeSource(Source):
    async def start(self) -> None:
        EVENTS.append(("start", self.name))

    async def run(self) -> None:
        await self.emit(pa.table({"seq": [1, 2]}), token="only")

    async def close(self) -> None:
        EVENTS.append(("close", self.name))


@dataclasses.dataclass(frozen=True)
class SecretSettings:
    password: Secret = setting(doc="the service password")
    user: str = setting("svc")
    api_token: str = setting("", secret=True)


class SecretSink(Sink):
    """Its failures echo the password, as careless drivers do."""

    Settings: ClassVar[type] = SecretSettings

    async def start(self) -> None:
        self.log.info("connecting", user=self.settings.user, password=self.settings.password)

    async def write(self, batch: Batch) -> None:
        raise PermissionError(f"login failed for svc:{self.settings.password.get()}@db")


@dataclasses.dataclass(frozen=True)
class SegmentSettings:
    roll_batches: int = setting(2, min=1)
    fail_flush: bool = setting(False)


class SegmentSink(Sink):
    """Buffers batches, 'writes' them every ``roll_batches``, emits a segment event."""

    Settings: ClassVar[type] = SegmentSettings
    optional_outputs = ("segments",)

    def __init__(self, name: str, settings: Any = None) -> None:
        super().__init__(name, settings)
        self.buffer: list[Batch] = []
        self.pending: list[Deferred] = []
        self.flushed: list[list[int]] = []

    async def write(self, batch: Batch) -> None:
        self.buffer.append(batch)
        self.pending.append(self.defer(batch))
        if len(self.buffer) >= self.settings.roll_batches:
            await self.flush()

    async def flush(self) -> None:
        if not self.buffer:
            return
        seqs = [v for b in self.buffer for v in seqs_of(b)]
        pending, self.buffer, self.pending = self.pending, [], []
        if self.settings.fail_flush:
            for d in pending:
                await d.fail(OSError("disk full"))
            return
        self.flushed.append(seqs)
        await self.emit([{"segment": len(self.flushed), "first": min(seqs), "last": max(seqs),
                          "rows": len(seqs)}], output="segments", parents=pending)
        for d in pending:
            d.commit()

    async def drain(self) -> None:
        await self.flush()


class SplitProcessor(Processor):
    """Even seq to "default", odd seq to "odd"; invalid input rejected."""

    optional_outputs = ("odd",)

    async def process(self, batch: Batch) -> pa.Table | pa.RecordBatch:
        if "seq" not in batch.schema.names:
            raise Reject("no seq column")
        odd = pc.equal(pc.bit_wise_and(batch.data.column("seq"), 1), 1)
        await self.emit(batch.data.filter(odd), output="odd")
        return batch.data.filter(pc.invert(odd))


@dataclasses.dataclass(frozen=True)
class ScriptedProcessorSettings:
    fail_on: list[int] = setting([], doc="rows with these seq values fail")
    failures: int = setting(-1, doc="times each such row fails before it succeeds; -1: always")
    mode: Literal["partial", "reject"] = setting("reject")
    emit_first: bool = setting(False, doc="emit the good rows before raising for the bad")


class ScriptedProcessor(Processor):
    """Passes batches on; rows in ``fail_on`` make it raise Reject or PartialFailure."""

    Settings: ClassVar[type] = ScriptedProcessorSettings

    def __init__(self, name: str, settings: Any = None) -> None:
        super().__init__(name, settings)
        self.row_attempts: Counter[int] = Counter()
        self.calls: list[list[int]] = []

    async def process(self, batch: Batch) -> pa.Table:
        s = self.settings
        seqs = seqs_of(batch)
        self.calls.append(seqs)
        self.row_attempts.update(seqs)
        bad = [i for i, v in enumerate(seqs) if v in s.fail_on
               and (s.failures < 0 or self.row_attempts[v] <= s.failures)]
        if not bad:
            return batch.data
        if s.emit_first:
            await self.emit(batch.data.take([i for i in range(len(seqs)) if i not in bad]))
        if s.mode == "reject":
            raise Reject(f"poison row(s) {[seqs[i] for i in bad]}", rows=bad)
        raise PartialFailure(bad, ConnectionError("item failed"))


@dataclasses.dataclass(frozen=True)
class SlowJsonlSettings(JsonlSinkSettings):
    delay: float = setting(0.0, min=0)


class SlowJsonlSink(JsonlSink):
    """jsonl_sink that takes ``delay`` seconds per batch before writing."""

    Settings: ClassVar[type] = SlowJsonlSettings

    async def write(self, batch: Batch) -> None:
        await asyncio.sleep(self.settings.delay)
        await super().write(batch)


class FailingSource(Source):
    async def run(self) -> None:
        await self.emit(pa.table({"seq": [0]}), token=0)
        raise RuntimeError("upstream connection reset")


# -- helpers for the sink tests ---------------------------------------------------------------
async def run_into_sink(make_runtime: Any, name: str, data: list[dict[str, Any]],
                        sink: dict[str, Any]) -> Any:
    """Run ``data`` (rows keyed by ``recording``) from a memory source into the sink
    ``name`` (``sink``: its settings; it retries fast unless they say otherwise) and
    return the finished Runtime, asserting its report is ok."""
    rt = make_runtime({
        "src": {"type": "memory_source", "rows": data, "batch_size": 100, "key": "recording",
                "outputs": [name]},
        name: {"retry_policy": {"max_attempts": 3, "backoff": 0.001, "jitter": 0.0},
               "retry": {"max_attempts": 2, "backoff": 0.001}, **sink},
    })
    report = await rt.run()
    assert report.ok, report.errors
    return rt


def dead_reasons(rt: Any) -> dict[str, str]:
    """``{key: reason}`` of what the runtime dead-lettered into its ``dlq`` memory sink."""
    return {r["key"]: r["reason"] for r in rt.handlers["dlq"].table().to_pylist()}
