"""Test support for the store and model-call integration tests (not a test module).

``TcpProxy``   a loopback TCP forwarder in front of a real server: ``cut()`` is an
               outage (listener closed, every connection reset), ``restore()`` ends it.
``FeedSource`` a source handler the test feeds while the runtime runs
               (``type = "stores_support:FeedSource"``; ``feed(name, rows)``).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Self

import pyarrow as pa

from pipeline import Source, setting

_FEEDS: dict[str, asyncio.Queue[Any]] = {}


@dataclasses.dataclass(frozen=True)
class FeedSettings:
    key: str = setting("recording", doc="key column of the emitted batches")


class FeedSource(Source):
    """Emits what the test puts in its queue; ``None`` ends it. Tracks commits."""

    Settings: ClassVar[type] = FeedSettings

    def __init__(self, name: str, settings: Any = None) -> None:
        super().__init__(name, settings)
        self.committed: list[Any] = []
        self.queue: asyncio.Queue[Any] = asyncio.Queue()

    async def start(self) -> None:
        _FEEDS[self.name] = self.queue

    async def run(self) -> None:
        n = 0
        while (item := await self.queue.get()) is not None:
            data, meta = item
            await self.emit(data, key=self.settings.key, meta=meta, token=n)
            n += 1

    async def commit(self, tokens: list[Any]) -> None:
        self.committed.extend(tokens)

    async def close(self) -> None:
        _FEEDS.pop(self.name, None)


def feed(source: str, rows: list[dict[str, Any]] | pa.Table, meta: dict[str, Any] | None = None,
         ) -> None:
    """Queue one batch for the running FeedSource named ``source``."""
    data = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows)
    _FEEDS[source].put_nowait((data, meta))


async def wait_for(check: Callable[[], bool | Awaitable[bool]], timeout: float = 30.0,
                   what: str = "condition") -> None:
    """Poll ``check`` until true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


class TcpProxy:
    """Forward ``127.0.0.1:<port>`` to ``target_host:target_port``."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> Self:
        await self.restore()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.cut()

    async def restore(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port,
                                                      reuse_address=True)
            self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        for writer in list(self._writers):
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            self._writers.discard(writer)
            return
        self._writers.add(up_writer)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.close()


def pipeline_doc(handlers: dict[str, dict[str, Any]], *, dead_letter: str = "dlq",
                 ) -> dict[str, Any]:
    """A runtime settings document: admin off, a ``memory_sink`` dead-letter target."""
    doc: dict[str, Any] = {
        "runtime": {"admin_enabled": False, "drain_timeout": 30.0},
        "dead_letter": {"target": dead_letter},
        "handlers": {dead_letter: {"type": "memory_sink"}, **handlers},
    }
    return doc


def diagnoses(n: int, *, version: str = "v1", first: int = 0) -> list[dict[str, Any]]:
    """``n`` diagnosis rows (handlers/README.md §5) for recordings ``GaPt<first>_01``..."""
    import datetime as dt

    at = dt.datetime(2026, 12, 4, 12, 30, 15, 123000, tzinfo=dt.UTC)
    return [{"recording": f"GaPt{i:02d}_01", "probability": round(0.05 + i / 100, 4),
             "label": "parkinson" if i % 2 else "control", "model_version": version,
             "n_windows": 3, "window_probabilities": [0.25, 0.5, 0.75],
             "diagnosed_at": at + dt.timedelta(seconds=i)} for i in range(first, first + n)]
