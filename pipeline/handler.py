"""What users implement: sources, processors and sinks.

A handler is constructed with its instance name and its validated settings
(constructors never touch the event loop), then driven by the runtime:

    start()            connect; returning means "ready" (the readiness handshake)
    run()              sources: read upstream and ``emit`` until exhausted or cancelled
    process(batch)     processors: return derived data (emitted on "default") or None
    write(batch)       sinks: commit the batch, or raise
    commit(tokens)     sources: acknowledge upstream, called in emission order
    drain()            inputs are finished: flush what is buffered
    close()            release resources (called in reverse start order)

Everything a handler needs from the runtime goes through ``self``: ``emit``,
``dead_letter``, ``defer``, ``ack_group`` (sources), ``metrics``, ``log``,
``set_connected``.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from .acks import AckNode
from .batch import Batch, Data
from .log import EventLogger, error_text, get_logger

if TYPE_CHECKING:
    from .metrics import HandlerMetrics

__all__ = [
    "Deferred",
    "Handler",
    "NoSettings",
    "PartialFailure",
    "Processor",
    "Reject",
    "Sink",
    "Source",
]

# the ack node (and batch, if any) whose handling is in progress in this task:
# emits and dead letters made while it is current are derived from it
current_parent: contextvars.ContextVar[tuple[AckNode, Batch | None] | None] = (
    contextvars.ContextVar("gaitflow_current_parent", default=None))

# inside a processor's process() call: a one-item list counting the batches it emitted,
# deferred and dead-lettered during the call (the runtime reads it when process() raises Reject or
# PartialFailure for some rows: a call that produced nothing has not handled the rest)
call_output: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "gaitflow_call_output", default=None)

_INHERIT: Any = object()


def count_output() -> None:
    """One more batch emitted, deferred or dead-lettered by the current processor call."""
    produced = call_output.get()
    if produced is not None:
        produced[0] += 1


class Reject(Exception):
    """Permanent failure: never retried; the rows go straight to dead letter.

    ``rows`` (positions in the batch) limits the rejection to those rows; the
    others count as committed. Without ``rows`` the whole batch is rejected. In a
    processor whose call emitted, deferred and dead-lettered nothing, "the others"
    have not been handled: the runtime calls ``process`` again with them.
    """

    def __init__(self, reason: str, rows: Sequence[int] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.rows = list(rows) if rows is not None else None


class PartialFailure(Exception):
    """Transient failure of some rows: the others are committed, these are retried.

    After the retry policy's last attempt, the remaining rows go to dead letter
    (or stop the flow, per ``on_failure``). In a processor whose call emitted,
    deferred and dead-lettered nothing, the other rows are processed again at once, without these.
    """

    def __init__(self, rows: Sequence[int], cause: BaseException | str) -> None:
        self.rows = list(rows)
        self.cause = cause if isinstance(cause, BaseException) else RuntimeError(cause)
        super().__init__(f"{len(self.rows)} row(s) failed: {self.cause}")


@dataclasses.dataclass(frozen=True)
class NoSettings:
    """The schema of a handler without settings of its own."""


class _Context(Protocol):
    """What the runtime provides to a bound handler (see ``delivery.HandlerContext``)."""

    metrics: HandlerMetrics
    stopping: bool

    async def emit(self, data: Data, output: str, key: Any, meta: Any,
                   parents: Sequence[Batch | Deferred] | None, token: Any) -> None: ...

    async def dead_letter(self, data: Any, reason: str, rows: Sequence[int] | None,
                          error: BaseException | None, attempts: int,
                          parents: Sequence[Batch | Deferred] | None, token: Any) -> None: ...

    def open_root(self, token: Any) -> AckNode: ...

    async def fail_deferred(self, batch: Batch, error: BaseException, reason: str) -> None: ...


class Handler:
    """Base of every handler. Subclass :class:`Source`, :class:`Processor` or :class:`Sink`."""

    kind: ClassVar[str] = ""
    #: the settings schema, a @dataclass (see ``pipeline.setting``)
    Settings: ClassVar[type] = NoSettings
    #: outputs that must be connected in the settings
    outputs: ClassVar[tuple[str, ...]] = ()
    #: outputs that may be left unconnected (emitting there commits immediately)
    optional_outputs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, name: str, settings: Any = None) -> None:
        self.name = name
        self.settings = settings if settings is not None else self.Settings()
        self.log: EventLogger = get_logger(handler=name)
        self._ctx: _Context | None = None
        self._connected = True
        self._health_detail = ""
        self._deferred_open = 0  # Deferred commits promised and not yet made

    # -- lifecycle hooks (override what you need) ----------------------------
    async def start(self) -> None:
        """Connect. Return when ready to work; raise to abort the whole start."""

    async def drain(self) -> None:
        """Every input is finished: flush buffered work (commit deferred batches)."""

    async def close(self) -> None:
        """Release resources. Called once, in reverse start order, even after errors."""

    # -- health ----------------------------------------------------------------
    def set_connected(self, connected: bool, detail: str = "") -> None:
        """Report the connection state; ``/readyz`` is false while any handler is not."""
        if connected != self._connected:
            self.log.info("handler.connected" if connected else "handler.disconnected",
                          detail=detail)
        self._connected = connected
        self._health_detail = detail

    def health(self) -> tuple[bool, str]:
        """``(connected, detail)``; override to probe a client instead."""
        return self._connected, self._health_detail

    # -- runtime services --------------------------------------------------------
    @property
    def context(self) -> _Context:
        if self._ctx is None:
            raise RuntimeError(
                f"handler {self.name!r} is not bound to a runtime: emit, dead_letter, defer "
                "and metrics are available from start() on")
        return self._ctx

    @property
    def metrics(self) -> HandlerMetrics:
        """Per-handler metrics: ``self.metrics.counter("name", "help").inc()``."""
        return self.context.metrics

    @property
    def stopping(self) -> bool:
        """True once shutdown began: sources should stop reading."""
        return self._ctx is not None and self._ctx.stopping

    async def emit(self, data: Data, *, output: str = "default", key: Any = _INHERIT,
                   meta: Any = None,
                   parents: Sequence[Batch | Deferred] | None = None) -> None:
        """Send rows to every target of ``output``; waits while a target is full.

        Inside ``process``/``write`` the new batch derives from the batch being
        handled; elsewhere name its ``parents`` (batches or Deferred) so the
        upstream acknowledgement waits for it.
        """
        await self.context.emit(data, output, key, meta, parents, None)

    async def dead_letter(self, data: Any, *, reason: str, rows: Sequence[int] | None = None,
                          error: BaseException | None = None, attempts: int = 1,
                          parents: Sequence[Batch | Deferred] | None = None) -> None:
        """Send rows (a Batch, a Table, bytes, a str...) to the dead-letter target."""
        await self.context.dead_letter(data, reason, rows, error, attempts, parents, None)

    def defer(self, batch: Batch) -> Deferred:
        """Keep ``batch`` uncommitted after ``write`` returns, until ``Deferred.commit()``."""
        return Deferred(self, batch)


class Deferred:
    """A commit a sink promised to make later (after a buffered flush)."""

    __slots__ = ("_handler", "_open", "batch")

    def __init__(self, handler: Handler, batch: Batch) -> None:
        self._handler = handler
        self.batch = batch
        self._open = True
        handler._deferred_open += 1
        if batch._ack is not None:
            batch._ack.retain()
        count_output()

    @property
    def pending(self) -> bool:
        return self._open

    def commit(self) -> None:
        """The batch is durably written: let its acknowledgement proceed."""
        if self._open:
            self._open = False
            self._handler._deferred_open -= 1
            if self.batch._ack is not None:
                self.batch._ack.release()

    async def fail(self, error: BaseException, reason: str = "") -> None:
        """The batch could not be written: dead-letter it (or stop, per ``on_failure``)."""
        if self._open:
            self._open = False
            self._handler._deferred_open -= 1
            try:
                await self._handler.context.fail_deferred(
                    self.batch, error, reason or error_text(error))
            finally:
                if self.batch._ack is not None:
                    self.batch._ack.release()


class Source(Handler):
    """Reads upstream. Implement ``run``; implement ``commit`` to acknowledge upstream."""

    kind: ClassVar[str] = "source"
    outputs: ClassVar[tuple[str, ...]] = ("default",)

    async def run(self) -> None:
        """Read and ``emit`` until exhausted (return) or cancelled (shutdown)."""
        raise NotImplementedError

    async def commit(self, tokens: list[Any]) -> None:
        """Every batch emitted with these tokens is committed downstream, in order."""

    async def emit(self, data: Data, *, output: str = "default", key: Any = _INHERIT,
                   meta: Any = None, parents: Sequence[Batch | Deferred] | None = None,
                   token: Any = None) -> None:
        """Emit rows read from one upstream message; ``token`` comes back in ``commit``."""
        await self.context.emit(data, output, key, meta, parents, token)

    async def dead_letter(self, data: Any, *, reason: str, rows: Sequence[int] | None = None,
                          error: BaseException | None = None, attempts: int = 1,
                          parents: Sequence[Batch | Deferred] | None = None,
                          token: Any = None) -> None:
        """Dead-letter an invalid upstream message; ``token`` is committed once it is stored."""
        await self.context.dead_letter(data, reason, rows, error, attempts, parents, token)

    @contextlib.asynccontextmanager
    async def ack_group(self, token: Any) -> AsyncIterator[None]:
        """Group several emits and dead letters under one upstream message.

        ``token`` is handed to ``commit`` once everything sent inside the block
        is committed downstream.
        """
        root = self.context.open_root(token)
        reset = current_parent.set((root, None))
        try:
            yield
        except BaseException as exc:
            root.fail(exc)
            raise
        finally:
            current_parent.reset(reset)
            root.release()


class Processor(Handler):
    """Transforms batches: ``process`` returns data for the "default" output, or None."""

    kind: ClassVar[str] = "processor"
    outputs: ClassVar[tuple[str, ...]] = ("default",)

    async def process(self, batch: Batch) -> Data | None:
        raise NotImplementedError


class Sink(Handler):
    """Writes batches: ``write`` returning means committed; raising means failed."""

    kind: ClassVar[str] = "sink"

    async def write(self, batch: Batch) -> None:
        raise NotImplementedError
