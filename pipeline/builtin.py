"""Built-in utility handlers, registered through the ``gaitflow.handlers`` entry-point
group exactly as a third-party plugin is (see pyproject.toml).

memory_source     emits given rows, or generated ``seq``/``value`` rows
passthrough       forwards batches unchanged (optionally after a delay)
memory_sink       keeps every batch in memory (tests, benchmarks)
log_sink          logs one line per batch
jsonl_sink        appends rows as JSON lines to a file
file_dead_letter  jsonl_sink with a dead-letter default path
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from .batch import Batch
from .deadletter import json_safe
from .handler import Processor, Sink, Source
from .settings import setting

__all__ = ["FileDeadLetter", "JsonlSink", "LogSink", "MemorySink", "MemorySource",
           "Passthrough"]


@dataclasses.dataclass(frozen=True)
class MemorySourceSettings:
    rows: list[dict[str, Any]] = setting([], doc="rows to emit, in order")
    count: int = setting(0, doc="generated rows to emit after `rows` (seq, value)", min=0)
    forever: bool = setting(False, doc="keep generating rows until the pipeline stops")
    batch_size: int = setting(100, doc="rows per batch", min=1)
    interval: float = setting(0.0, doc="seconds to wait between batches", min=0)
    key: str = setting("seq", doc="the id column of generated rows")
    start: int = setting(0, doc="first generated sequence number", min=0)
    ack_log: Path | None = setting(None, doc="append one JSON line per acknowledged batch")


class MemorySource(Source):
    """Emits ``rows``, then ``count`` generated rows; tracks what was acknowledged."""

    Settings: ClassVar[type] = MemorySourceSettings
    settings: MemorySourceSettings

    def __init__(self, name: str, settings: MemorySourceSettings | None = None) -> None:
        super().__init__(name, settings)
        self.emitted = 0          # batches
        self.committed: list[Any] = []
        self._ack_file: Any = None

    async def start(self) -> None:
        if self.settings.ack_log is not None:
            self._ack_file = await asyncio.to_thread(open, self.settings.ack_log, "a",
                                                   encoding="utf-8")

    async def run(self) -> None:
        s = self.settings
        rows = s.rows
        for first in range(0, len(rows), s.batch_size):
            chunk = rows[first:first + s.batch_size]
            await self.emit(pa.Table.from_pylist(chunk), key=s.key if s.key in chunk[0] else None,
                            token=("rows", first, len(chunk)))
            self.emitted += 1
            if s.interval:
                await asyncio.sleep(s.interval)
        seq, end = s.start, s.start + s.count
        schema = pa.schema([(s.key, pa.int64()), ("value", pa.float64())])
        while s.forever or seq < end:
            n = s.batch_size if s.forever else min(s.batch_size, end - seq)
            ids = np.arange(seq, seq + n, dtype=np.int64)
            batch = pa.RecordBatch.from_arrays([pa.array(ids), pa.array(ids * 0.5)],
                                               schema=schema)
            await self.emit(batch, key=s.key, token=("seq", seq, n))
            self.emitted += 1
            seq += n
            if s.interval:
                await asyncio.sleep(s.interval)
            elif self.emitted % 64 == 0:
                await asyncio.sleep(0)  # a fast source must not starve the loop

    async def commit(self, tokens: list[Any]) -> None:
        self.committed.extend(tokens)
        if self._ack_file is not None:
            for kind, first, n in tokens:
                self._ack_file.write(json.dumps({"kind": kind, "first": first, "n": n}) + "\n")
            self._ack_file.flush()

    async def close(self) -> None:
        if self._ack_file is not None:
            self._ack_file.close()


@dataclasses.dataclass(frozen=True)
class PassthroughSettings:
    delay: float = setting(0.0, doc="seconds to wait per batch", min=0)


class Passthrough(Processor):
    """Forwards every batch unchanged."""

    Settings: ClassVar[type] = PassthroughSettings

    async def process(self, batch: Batch) -> Batch:
        if self.settings.delay:
            await asyncio.sleep(self.settings.delay)
        return batch


@dataclasses.dataclass(frozen=True)
class MemorySinkSettings:
    delay: float = setting(0.0, doc="seconds to wait per batch (simulates a slow sink)", min=0)
    keep: bool = setting(True, doc="keep the batches (false: only count them)")


class MemorySink(Sink):
    """Collects batches in memory: ``.batches``, ``.rows()``, ``.row_count``."""

    Settings: ClassVar[type] = MemorySinkSettings

    def __init__(self, name: str, settings: MemorySinkSettings | None = None) -> None:
        super().__init__(name, settings)
        self.batches: list[Batch] = []
        self.row_count = 0

    async def write(self, batch: Batch) -> None:
        if self.settings.delay:
            await asyncio.sleep(self.settings.delay)
        if self.settings.keep:
            self.batches.append(batch)
        self.row_count += batch.num_rows

    def rows(self) -> list[dict[str, Any]]:
        return [row for b in self.batches for row in b.to_pylist()]

    def table(self) -> pa.Table:
        return pa.concat_tables([b.to_table() for b in self.batches]) if self.batches else \
            pa.table({})


@dataclasses.dataclass(frozen=True)
class LogSinkSettings:
    show_rows: int = setting(3, doc="rows to include in each line", min=0)


class LogSink(Sink):
    """Logs one line per batch (rows, source, the first few rows)."""

    Settings: ClassVar[type] = LogSinkSettings

    async def write(self, batch: Batch) -> None:
        n = self.settings.show_rows
        sample = batch.data.slice(0, n).to_pylist() if n else []
        self.log.info("batch", source=batch.source, rows=batch.num_rows,
                      sample=json.dumps(json_safe(sample), default=str))


@dataclasses.dataclass(frozen=True)
class JsonlSinkSettings:
    path: Path = setting(doc="file to append JSON lines to; its directory is created")
    fsync: bool = setting(False, doc="fsync after each batch before committing it")


class JsonlSink(Sink):
    """Appends each row as one JSON object per line; a batch commits once flushed."""

    Settings: ClassVar[type] = JsonlSinkSettings

    def __init__(self, name: str, settings: Any = None) -> None:
        super().__init__(name, settings)
        self._file: Any = None

    async def start(self) -> None:
        path = Path(self.settings.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = await asyncio.to_thread(open, path, "a", encoding="utf-8")

    async def write(self, batch: Batch) -> None:
        lines = "".join(json.dumps(json_safe(row), default=str, ensure_ascii=False) + "\n"
                        for row in batch.to_pylist())
        self._file.write(lines)
        self._file.flush()
        if self.settings.fsync:
            await asyncio.to_thread(os.fsync, self._file.fileno())

    async def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclasses.dataclass(frozen=True)
class FileDeadLetterSettings:
    path: Path = setting(Path("dead_letters.jsonl"), doc="file to append dead letters to")
    fsync: bool = setting(True, doc="fsync after each batch before committing it")


class FileDeadLetter(JsonlSink):
    """Dead letters as JSON lines (reason, handler, exception, attempts, payload...)."""

    Settings: ClassVar[type] = FileDeadLetterSettings
