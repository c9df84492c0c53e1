"""One handler's connection to the runtime: emitting, dead-lettering, and the
consume loop that applies the retry policy and the failure policy to every batch."""
from __future__ import annotations

import asyncio
import time
import types
from collections.abc import Callable, Sequence
from typing import Any

from .acks import AckNode, AckTracker
from .batch import Batch, Data, to_arrow
from .channel import ChannelClosed, Receiver, Sender
from .deadletter import dead_letter_records
from .handler import (
    _INHERIT,
    Deferred,
    Handler,
    PartialFailure,
    Processor,
    Reject,
    Sink,
    call_output,
    count_output,
    current_parent,
)
from .log import error_text
from .metrics import HandlerMetrics
from .retry import RetryPolicy

__all__ = ["HandlerContext", "HandlerFailed"]


class HandlerFailed(Exception):
    """A handler failed in a way its settings say must stop the pipeline."""

    def __init__(self, handler: str, phase: str, cause: BaseException) -> None:
        self.handler, self.phase, self.cause = handler, phase, cause
        super().__init__(f"handler {handler!r} failed in {phase}: {error_text(cause)}")


class HandlerContext:
    """Built by the runtime for each handler before ``start``; the handler's ``_ctx``."""

    def __init__(
        self,
        handler: Handler,
        *,
        metrics: HandlerMetrics,
        senders: dict[str, list[Sender[Batch]]],
        dead_letter: Sender[Batch] | None,
        tracker: AckTracker | None,
        policy: RetryPolicy,
        on_failure: str,
        timeout: float | None,
        request_stop: Callable[[BaseException | None], None],
        is_stopping: Callable[[], bool],
    ) -> None:
        self.handler = handler
        self.name = handler.name
        self.metrics = metrics
        self.declared = (*handler.outputs, *handler.optional_outputs)
        self.senders = senders
        self.dead_letter_sender = dead_letter
        self.tracker = tracker
        self.policy = policy
        self.on_failure = on_failure
        self.timeout = timeout
        self._request_stop = request_stop
        self._is_stopping = is_stopping
        self.outputs_closed = False
        self.active = 0  # batches being handled (process/write, retries included)
        self.log = handler.log

    @property
    def stopping(self) -> bool:
        return self._is_stopping()

    # -- ack lineage ------------------------------------------------------------
    def open_root(self, token: Any) -> AckNode:
        if self.tracker is None:
            raise RuntimeError(f"handler {self.name!r}: only sources open upstream messages")
        return self.tracker.open(token)

    def _lineage(self, parents: Sequence[Batch | Deferred] | None,
                 token: Any) -> tuple[AckNode, Batch | None, bool]:
        """``(node to derive from or root, parent batch, is_root)``."""
        if parents is not None:
            batches = [p.batch if isinstance(p, Deferred) else p for p in parents]
            nodes = [b._ack for b in batches if b._ack is not None]
            return AckNode(nodes), (batches[0] if batches else None), False
        current = current_parent.get()
        if current is not None:
            return AckNode([current[0]]), current[1], False
        if self.tracker is not None:
            return self.tracker.open(token), None, True
        raise RuntimeError(
            f"handler {self.name!r}: emit or dead_letter outside process()/write() needs "
            "parents=[...] (the batches or Deferred it derives from)")

    async def _send(self, targets: Sequence[Sender[Batch]], batch: Batch) -> None:
        node = batch._ack
        assert node is not None
        node.retain(len(targets))
        try:
            for sender in targets:
                await sender.send(batch)
        except BaseException as exc:
            # not every target got it: it can never be fully committed
            node.fail(exc)
            raise
        finally:
            node.release()  # the creator's hold

    # -- emitting -----------------------------------------------------------------
    async def emit(self, data: Data, output: str, key: Any, meta: Any,
                   parents: Sequence[Batch | Deferred] | None, token: Any) -> None:
        if output not in self.declared:
            raise ValueError(f"handler {self.name!r} has no output {output!r}; declared: "
                             f"{', '.join(self.declared) or 'none'}")
        if self.outputs_closed:
            raise ChannelClosed(f"handler {self.name!r}: emit after its outputs were closed")
        table = to_arrow(data)
        node, parent, _ = self._lineage(parents, token)
        base = data if isinstance(data, Batch) else parent
        if key is _INHERIT:
            key = base.key if base is not None and base.key in table.schema.names else None
        merged = {**(base.meta if base is not None else {}), **(meta or {})}
        batch = Batch(table, source=self.name, key=key, meta=types.MappingProxyType(merged),
                      created=base.created if base is not None else time.monotonic(), _ack=node)
        count_output()
        await self._send(self.senders.get(output, ()), batch)
        self.metrics.out(output, table.num_rows)

    async def dead_letter(self, data: Any, reason: str, rows: Sequence[int] | None,
                          error: BaseException | None, attempts: int,
                          parents: Sequence[Batch | Deferred] | None, token: Any) -> None:
        node, parent, _ = self._lineage(parents, token)
        count_output()
        if self.dead_letter_sender is None:
            problem = RuntimeError(f"handler {self.name!r} has no dead-letter target "
                                   f"(dead-lettering: {reason})")
            node.fail(problem)
            raise problem
        table = dead_letter_records(data, handler=self.name, reason=reason, error=error,
                                    attempts=attempts, rows=rows,
                                    source=parent.source if parent is not None else self.name)
        batch = Batch(table, source=self.name, key="key", _ack=node,
                      created=parent.created if parent is not None else time.monotonic())
        self.log.warning("dead_letter", reason=reason, rows=table.num_rows, attempts=attempts,
                         error=error_text(error) if error else None)
        self.metrics.dead_letters.inc()
        self.metrics.dead_letter_rows.inc(table.num_rows)
        await self._send([self.dead_letter_sender], batch)

    def close_outputs(self) -> None:
        self.outputs_closed = True
        for senders in self.senders.values():
            for sender in senders:
                sender.close()
        if self.dead_letter_sender is not None:
            self.dead_letter_sender.close()

    # -- failure policy -----------------------------------------------------------
    async def give_up(self, batch: Batch, error: BaseException, attempts: int,
                      reason: str | None = None) -> None:
        """The retry budget is spent: dead-letter the rows, or fail and stop."""
        reason = reason or (error_text(error) if attempts <= 1 else
                            f"failed after {attempts} attempts: {error_text(error)}")
        if self.on_failure == "dead_letter" and self.dead_letter_sender is not None:
            try:
                await self.dead_letter(batch, reason, None, error, attempts, [batch], None)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - then the batch cannot be saved at all
                error = exc
        if batch._ack is not None:
            batch._ack.fail(error)
        self.log.error("handler.failed", reason=reason, attempts=attempts, policy="stop")
        self._request_stop(HandlerFailed(self.name, "write" if isinstance(
            self.handler, Sink) else "process", error))

    async def fail_deferred(self, batch: Batch, error: BaseException, reason: str) -> None:
        self.metrics.errors.inc()
        await self.give_up(batch, error, 1, reason)

    # -- consuming ----------------------------------------------------------------
    async def consume(self, receiver: Receiver[Batch]) -> None:
        async for batch in receiver:
            await self.deliver(batch)

    async def deliver(self, batch: Batch) -> None:
        self.metrics.batches_in.inc()
        self.metrics.rows_in.inc(batch.num_rows)
        node = batch._ack
        reset = current_parent.set((node, batch)) if node is not None else None
        self.active += 1
        try:
            await self._attempts(batch)
        except BaseException as exc:
            if node is not None:
                node.fail(exc)
            raise
        finally:
            self.active -= 1
            if reset is not None:
                current_parent.reset(reset)
            if node is not None:
                node.release()  # this delivery is finished

    async def _call(self, batch: Batch, produced: list[int]) -> None:
        handler = self.handler
        if isinstance(handler, Processor):
            reset = call_output.set(produced)
            try:
                result = await handler.process(batch)
            finally:
                call_output.reset(reset)
            if result is not None:
                await self.emit(result, "default", _INHERIT, None, None, None)
        else:
            await handler.write(batch)  # type: ignore[attr-defined]

    def _unhandled_rest(self, pending: Batch, rows: list[int], produced: list[int]) -> Batch | None:
        """The rows a processor's call left unhandled when it raised for ``rows``: the
        others, if the call emitted, deferred and dead-lettered nothing (its return
        value is lost when it raises)."""
        if not isinstance(self.handler, Processor) or produced[0] or not rows:
            return None
        named = set(rows)
        rest = [i for i in range(pending.num_rows) if i not in named]
        return pending.take(rest) if rest else None

    async def _attempts(self, batch: Batch) -> None:
        policy, metrics = self.policy, self.metrics
        pending, attempt = batch, 0
        while True:
            attempt += 1
            started = time.perf_counter()
            produced = [0]
            limit = asyncio.timeout(self.timeout)
            try:
                async with limit:
                    await self._call(pending, produced)
                metrics.latency.observe(time.perf_counter() - started)
                return
            except Reject as exc:
                metrics.latency.observe(time.perf_counter() - started)
                rejected = pending if exc.rows is None else pending.take(exc.rows)
                rest = None if exc.rows is None else self._unhandled_rest(pending, exc.rows, produced)
                await self.give_up(rejected, exc, attempt, reason=exc.reason)
                if rest is not None:
                    await self._attempts(rest)
                return
            except PartialFailure as exc:
                error: BaseException = exc.cause
                failed = pending.take(exc.rows)
                rest = self._unhandled_rest(pending, exc.rows, produced)
                if rest is not None:
                    await self._attempts(rest)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure goes through the policy
                error, failed = exc, pending
                if isinstance(exc, TimeoutError) and limit.expired():
                    call = "process" if isinstance(self.handler, Processor) else "write"
                    error = TimeoutError(f"{call}() took longer than timeout = {self.timeout} s")
            metrics.errors.inc()
            metrics.latency.observe(time.perf_counter() - started)
            if attempt >= policy.max_attempts:
                await self.give_up(failed, error, attempt)
                return
            pause = policy.delay(attempt)
            metrics.retries.inc()
            self.log.warning("retry", attempt=attempt, of=policy.max_attempts,
                             delay_s=round(pause, 3), rows=failed.num_rows,
                             error=error_text(error))
            await asyncio.sleep(pause)
            pending = failed
