"""The runtime: wires handlers with channels, starts them in dependency order, runs
them in a task group, drains on shutdown and closes them in reverse order.

    runtime = Runtime.from_file("settings.toml")
    report = await runtime.run()        # until sources are exhausted or stop is requested

``run`` is also the deterministic mode tests use: with finite sources it returns
once every source is exhausted, every channel is empty and every ack settled.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import time
import types
from collections.abc import Iterable, Mapping
from typing import Any, Self

from .acks import AckTracker
from .batch import Batch
from .channel import Receiver, Sender, open_channel
from .config import PipelineConfig, config_from_dict, load_config
from .delivery import HandlerContext, HandlerFailed
from .graph import Graph
from .handler import Handler, Source
from .log import error_text, get_logger, scrub
from .metrics import HandlerMetrics, MetricsRegistry, register_process_metrics
from .plugins import Registry

__all__ = ["RunReport", "Runtime", "StartError"]

log = get_logger()


class StartError(Exception):
    """A handler could not be constructed or started; the others were closed."""

    def __init__(self, handler: str, type_name: str, cause: BaseException,
                 cleanup_errors: Iterable[str] = (), *, what: str | None = None,
                 phase: str = "start") -> None:  # fmt: skip
        self.handler, self.cause = handler, cause
        self.cleanup_errors = list(cleanup_errors)
        what = what or f"handler {handler!r} ({type_name})"
        failed = "could not be constructed" if phase == "construct" else "failed to start"
        text = f"{what} {failed}: {error_text(cause)}"
        if isinstance(cause, TimeoutError) and not str(cause):
            text = f"{what} {failed}: timed out"
        for err in self.cleanup_errors:
            text += f"\n  while closing the others: {err}"
        super().__init__(scrub(text))


@dataclasses.dataclass
class RunReport:
    ok: bool
    stopped_by: str            # "exhausted", "signal SIGTERM", "failure", "request"...
    errors: list[str]
    drained: bool              # every in-flight batch settled before the drain timeout
    unacked: int               # upstream messages emitted but never acknowledged
    duration: float


class Runtime:
    """One pipeline in one process. Build it, then ``await run()`` once."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.graph = Graph(config).validate()
        self.settings = config.runtime
        self.metrics = MetricsRegistry()
        self.order = self.graph.start_order()
        instances: dict[str, Handler] = {}
        for name in self.order:
            h = config.handlers[name]
            try:
                instances[name] = h.cls(name, h.settings)
            except Exception as exc:
                raise StartError(name, h.type, exc, phase="construct") from exc
        # frozen: the set of handlers never changes once built
        self.handlers: Mapping[str, Handler] = types.MappingProxyType(instances)
        self.state = "created"
        self.phase: dict[str, str] = {name: "created" for name in self.order}
        self.errors: list[str] = []
        self.stopped_by = ""
        self.admin_url: str | None = None
        self._stop_requested = False
        self._stop_event: asyncio.Event | None = None
        self._ready_event: asyncio.Event | None = None
        self._sources_left = 0
        self._sources_done: asyncio.Event | None = None
        self._contexts: dict[str, HandlerContext] = {}
        self._receivers: dict[str, Receiver[Batch]] = {}
        self._trackers: dict[str, AckTracker] = {}
        self._started_at = 0.0
        self._main: asyncio.Task[RunReport] | None = None
        self.report: RunReport | None = None
        self._wire()
        self._register_metrics()

    # -- construction helpers -------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike[str], overrides: Iterable[str] = (), *,
                  registry: Registry | None = None,
                  env: Mapping[str, str] | None = None) -> Runtime:
        return cls(load_config(path, overrides, registry=registry, env=env))

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], *, file: str = "<settings>",
                  overrides: Iterable[str] = (), registry: Registry | None = None,
                  env: Mapping[str, str] | None = None) -> Runtime:
        return cls(config_from_dict(doc, file=file, overrides=overrides, registry=registry,
                                    env=env))

    def _wire(self) -> None:
        """Channels and contexts; pure bookkeeping, the event loop is not touched."""
        base: dict[str, Sender[Batch]] = {}
        for name, h in self.handlers.items():
            if not isinstance(h, Source):
                capacity = self.config.handlers[name].common.capacity or self.settings.capacity
                sender, receiver = open_channel(capacity, name)
                base[name], self._receivers[name] = sender, receiver
        for name, h in self.handlers.items():
            common = self.config.handlers[name].common
            senders = {out: [base[t].clone() for t in targets]
                       for out, targets in self.graph.targets(name).items()}
            dl_target = self.graph.dead_letter_of(name)
            tracker = AckTracker(h.commit) if isinstance(h, Source) else None
            if tracker is not None:
                tracker.on_commit_error = self._commit_error_reporter(name)
                self._trackers[name] = tracker
            ctx = HandlerContext(
                h, metrics=HandlerMetrics(self.metrics, name), senders=senders,
                dead_letter=base[dl_target].clone() if dl_target else None, tracker=tracker,
                policy=common.retry, on_failure=self.graph.on_failure(name),
                timeout=common.timeout, request_stop=self._handler_failed,
                is_stopping=lambda: self._stop_requested)
            self._contexts[name] = ctx
            h._ctx = ctx
        for sender in base.values():
            sender.close()  # only the clones held by producers keep a channel open

    def _commit_error_reporter(self, name: str) -> Any:
        def report(exc: BaseException) -> None:
            self._contexts[name].metrics.errors.inc()
            log.error("source.commit_failed", handler=name, error=error_text(exc))
        return report

    def _register_metrics(self) -> None:
        r = self.metrics

        def channels(attr: str) -> list[tuple[list[str], float]]:
            return [([name], float(getattr(rx.stats, attr))) for name, rx in
                    self._receivers.items()]

        r.family("channel_depth", "Batches waiting in a handler's input channel", "gauge",
                 ["handler"]).set_function(lambda: channels("depth"))
        r.family("channel_capacity", "Capacity of a handler's input channel, in batches",
                 "gauge", ["handler"]).set_function(lambda: channels("capacity"))
        r.family("channel_max_depth", "Highest depth seen in a handler's input channel",
                 "gauge", ["handler"]).set_function(lambda: channels("max_depth"))
        r.family("channel_blocked_seconds", "Time producers waited for room (backpressure)",
                 "counter", ["handler"]).set_function(lambda: channels("blocked_seconds"))
        r.family("ack_pending", "Upstream messages emitted but not yet acknowledged", "gauge",
                 ["handler"]).set_function(
            lambda: [([n], t.pending) for n, t in self._trackers.items()])
        r.family("ack_lag_seconds", "Age of the oldest upstream message not yet acknowledged",
                 "gauge", ["handler"]).set_function(
            lambda: [([n], t.lag_seconds()) for n, t in self._trackers.items()])
        r.family("acked", "Upstream messages acknowledged", "counter", ["handler"]).set_function(
            lambda: [([n], t.committed) for n, t in self._trackers.items()])
        r.family("ack_failed", "Upstream messages that can never be acknowledged (failed)",
                 "counter", ["handler"]).set_function(
            lambda: [([n], t.failed) for n, t in self._trackers.items()])
        r.family("handler_up", "1 when the handler started and reports itself connected",
                 "gauge", ["handler"]).set_function(
            lambda: [([n], float(self.phase[n] == "running" and h.health()[0]))
                     for n, h in self.handlers.items()])
        r.family("ready", "1 when every handler started and is connected", "gauge",
                 []).set_function(lambda: [([], float(self.readiness()[0]))])
        register_process_metrics(r)

    # -- state ------------------------------------------------------------------------
    def readiness(self) -> tuple[bool, dict[str, str]]:
        """``(ready, {handler: why not})``."""
        waiting: dict[str, str] = {}
        for name, h in self.handlers.items():
            if self.phase[name] != "running":
                waiting[name] = self.phase[name]
                continue
            connected, detail = h.health()
            if not connected:
                waiting[name] = f"not connected{': ' + detail if detail else ''}"
        return self.state == "running" and not waiting, waiting

    def status(self) -> dict[str, Any]:
        """Everything ``/api/status`` shows; secrets redacted."""
        ready, waiting = self.readiness()
        handlers = {}
        for name, h in self.handlers.items():
            ctx = self._contexts[name]
            m = self.metrics
            connected, detail = h.health()
            entry: dict[str, Any] = {
                "type": self.config.handlers[name].type,
                "kind": h.kind,
                "phase": self.phase[name],
                "connected": connected,
                "detail": detail,
                "outputs": self.graph.targets(name),
                "dead_letter": self.graph.dead_letter_of(name),
                "batches_in": m.value("batches_in", name),
                "rows_in": m.value("rows_in", name),
                "errors": m.value("errors", name),
                "retries": m.value("retries", name),
                "dead_letters": m.value("dead_letters", name),
                "dead_letter_rows": m.value("dead_letter_rows", name),
                "batches_out": sum(m.value("batches_out", name, o) for o in ctx.declared),
                "rows_out": sum(m.value("rows_out", name, o) for o in ctx.declared),
            }
            if name in self._receivers:
                entry["input"] = self._receivers[name].stats.as_dict()
            if name in self._trackers:
                t = self._trackers[name]
                entry["ack"] = {"opened": t.opened, "committed": t.committed,
                                "pending": t.pending, "failed": t.failed,
                                "lag_seconds": round(t.lag_seconds(), 3)}
            handlers[name] = entry
        return {
            "state": self.state,
            "ready": ready,
            "not_ready": waiting,
            "uptime_seconds": round(time.monotonic() - self._started_at, 3)
            if self._started_at else 0.0,
            "settings_file": self.config.file,
            "errors": list(self.errors),
            "handlers": handlers,
            "settings": self.config.redacted(),
        }

    # -- control ----------------------------------------------------------------------
    def request_stop(self, reason: str = "request") -> None:
        """Begin shutdown: stop intake, drain, close. Safe to call from signal handlers."""
        if self._stop_requested:
            return
        self._stop_requested = True
        self.stopped_by = reason
        log.info("runtime.stop_requested", reason=reason)
        if self._stop_event is not None:
            self._stop_event.set()

    def _handler_failed(self, error: BaseException | None) -> None:
        if error is not None:
            self.errors.append(scrub(str(error)))
        self.request_stop("failure")

    async def wait_ready(self) -> None:
        """Return once every handler started; raise if the run ended instead."""
        assert self._ready_event is not None and self._main is not None
        ready = asyncio.ensure_future(self._ready_event.wait())
        try:
            await asyncio.wait([ready, self._main], return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if not self._ready_event.is_set():
            self._main.result()  # raises the start error
            raise RuntimeError("the runtime stopped before it was ready")

    async def __aenter__(self) -> Self:
        self._ready_event = asyncio.Event()
        self._main = asyncio.create_task(self.run(), name="gaitflow-runtime")
        await self.wait_ready()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.request_stop("context exit")
        assert self._main is not None
        self.report = await self._main

    # -- the run ----------------------------------------------------------------------
    async def run_until_idle(self, timeout: float = 30.0) -> RunReport:
        """The deterministic test mode: ``run()`` for finite sources, bounded in time.

        Returns once every source is exhausted, every channel is empty and every
        acknowledgement settled; raises TimeoutError if that takes over ``timeout``.
        """
        async with asyncio.timeout(timeout):
            return await self.run()

    async def run(self) -> RunReport:
        """Start, run until the sources are exhausted or stop is requested, drain, close."""
        if self.state != "created":
            raise RuntimeError("a Runtime runs once; build a new one")
        self.state = "starting"
        self._started_at = time.monotonic()
        self._stop_event = asyncio.Event()
        if self._ready_event is None:
            self._ready_event = asyncio.Event()
        if self._stop_requested:
            self._stop_event.set()
        log.info("runtime.starting", settings=self.config.file, handlers=len(self.handlers),
                 loop=type(asyncio.get_running_loop()).__module__.split(".")[0])
        admin = None
        if self.settings.admin_enabled:
            from .admin import AdminServer  # aiohttp is only imported when serving
            admin = AdminServer(self, self.settings)
            try:
                await admin.__aenter__()
            except Exception as exc:
                self.state = "stopped"
                where = f"{self.settings.admin_host}:{self.settings.admin_port}"
                raise StartError("admin", "admin", exc,
                                 what=f"the admin server on {where}") from exc
            self.admin_url = admin.url
        try:
            started = await self._start_all()
            try:
                drained = await self._run_started()
            finally:
                self.state = "closing"
                self.errors.extend(await self._close(reversed(started)))
        finally:
            if admin is not None:
                await admin.__aexit__(None, None, None)
        self.state = "stopped"
        unacked = sum(t.pending for t in self._trackers.values())
        report = RunReport(ok=not self.errors, stopped_by=self.stopped_by or "exhausted",
                           errors=list(self.errors), drained=drained, unacked=unacked,
                           duration=time.monotonic() - self._started_at)
        log.info("runtime.stopped", ok=report.ok, stopped_by=report.stopped_by,
                 drained=drained, unacked=unacked, duration_s=round(report.duration, 3))
        self.report = report
        return report

    async def _start_all(self) -> list[str]:
        started: list[str] = []
        for name in self.order:
            if self._stop_requested:
                break
            h = self.handlers[name]
            type_name = self.config.handlers[name].type
            self.phase[name] = "starting"
            t0 = time.monotonic()
            try:
                if not await self._start_one(h):
                    self.phase[name] = "cancelled"
                    log.info("handler.start_cancelled", handler=name, reason=self.stopped_by)
                    break
            except (Exception, asyncio.CancelledError) as exc:
                self.phase[name] = "failed"
                log.error("handler.start_failed", handler=name, type=type_name,
                          error=error_text(exc))
                self.state = "closing"
                cleanup = await self._close(reversed(started))
                self.state = "stopped"
                if isinstance(exc, asyncio.CancelledError):
                    raise
                raise StartError(name, type_name, exc, cleanup) from exc
            self.phase[name] = "running"
            started.append(name)
            log.info("handler.started", handler=name, type=type_name,
                     elapsed_ms=round((time.monotonic() - t0) * 1000, 1))
        return started

    async def _start_one(self, h: Handler) -> bool:
        """Start ``h``; False if a stop was requested meanwhile (the start is cancelled)."""
        assert self._stop_event is not None
        start = asyncio.ensure_future(h.start())
        stop = asyncio.ensure_future(self._stop_event.wait())
        try:
            done, _ = await asyncio.wait([start, stop], timeout=self.settings.start_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not start.done():
                start.cancel()
                await asyncio.gather(start, return_exceptions=True)
        if start in done:
            start.result()  # the handler's own error, if any
            return True
        if self._stop_requested:
            return False
        raise TimeoutError

    async def _run_started(self) -> bool:
        assert self._stop_event is not None and self._ready_event is not None
        if self._stop_requested:
            return True
        self.state = "running"
        self._ready_event.set()
        log.info("runtime.ready", handlers=len(self.handlers),
                 elapsed_ms=round((time.monotonic() - self._started_at) * 1000, 1),
                 admin=self.admin_url)
        sources = [n for n in self.order if isinstance(self.handlers[n], Source)]
        self._sources_left = len(sources)
        self._sources_done = asyncio.Event()
        if not sources:
            self._sources_done.set()
        drained = True
        async with asyncio.TaskGroup() as tg:
            committers = [tg.create_task(t.run(), name=f"commit:{n}")
                          for n, t in self._trackers.items()]
            consumers = [tg.create_task(self._run_consumer(n), name=f"consume:{n}")
                         for n in self.order if n in self._receivers]
            intake = [tg.create_task(self._run_source(n), name=f"source:{n}")
                      for n in reversed(self.order) if n in sources]
            stop_wait = asyncio.ensure_future(self._stop_event.wait())
            done_wait = asyncio.ensure_future(self._sources_done.wait())
            await asyncio.wait([stop_wait, done_wait], return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
            done_wait.cancel()
            self.state = "draining"
            for task in intake:
                task.cancel()
            log.info("drain.started", reason=self.stopped_by or "sources exhausted",
                     timeout_s=self.settings.drain_timeout)
            t0 = time.monotonic()

            async def settle() -> None:
                await asyncio.gather(*intake, *consumers, return_exceptions=True)
                for tracker in self._trackers.values():
                    await tracker.wait_settled()

            settling = asyncio.ensure_future(settle())
            # asyncio.wait does not cancel on timeout: the handlers still hold what they held
            done, _ = await asyncio.wait([settling], timeout=self.settings.drain_timeout)
            if done:
                await settling
                log.info("drain.done", elapsed_ms=round((time.monotonic() - t0) * 1000, 1))
            else:
                drained = False
                in_flight = {n: t.pending for n, t in self._trackers.items() if t.pending}
                log.warning("drain.timeout", timeout_s=self.settings.drain_timeout,
                            unacked=in_flight, holding=self._holding())
                settling.cancel()
                for task in consumers:
                    task.cancel()
                await asyncio.gather(settling, return_exceptions=True)
            for tracker in self._trackers.values():
                tracker.close()
            await asyncio.gather(*committers)
        return drained

    def _holding(self) -> dict[str, str]:
        """Where the unsettled batches are: per handler, the batches queued at its
        input, those it is handling, and the Deferred commits it promised and has not
        made (logged when the drain times out)."""
        out = {}
        for name in self.order:
            parts = []
            receiver = self._receivers.get(name)
            if receiver is not None and receiver.stats.depth:
                parts.append(f"{receiver.stats.depth} queued")
            ctx = self._contexts.get(name)
            if ctx is not None and ctx.active:
                parts.append(f"{ctx.active} in process/write")
            deferred = self.handlers[name]._deferred_open
            if deferred:
                parts.append(f"{deferred} deferred")
            if parts:
                out[name] = ", ".join(parts)
        return out

    async def _run_source(self, name: str) -> None:
        h = self.handlers[name]
        ctx = self._contexts[name]
        try:
            await h.run()  # type: ignore[attr-defined]
            log.info("source.exhausted", handler=name)
        except asyncio.CancelledError:
            if not self._stop_requested and self.state == "running":
                raise
            log.info("source.stopped", handler=name)
        except Exception as exc:  # noqa: BLE001 - a source failure stops the pipeline
            log.error("source.failed", handler=name, error=error_text(exc))
            self._handler_failed(HandlerFailed(name, "run", exc))
        finally:
            ctx.close_outputs()
            self._sources_left -= 1
            if self._sources_left <= 0 and self._sources_done is not None:
                self._sources_done.set()

    async def _run_consumer(self, name: str) -> None:
        h = self.handlers[name]
        ctx = self._contexts[name]
        receiver = self._receivers[name]
        workers = self.config.handlers[name].common.concurrency
        clean = False
        try:
            if workers == 1:
                await ctx.consume(receiver)
            else:
                async with asyncio.TaskGroup() as tg:
                    for i in range(workers):
                        tg.create_task(ctx.consume(receiver), name=f"consume:{name}:{i}")
            self.phase[name] = "draining"
            try:
                await h.drain()
            except Exception as exc:  # noqa: BLE001 - reported; close still runs
                ctx.metrics.errors.inc()
                log.error("handler.drain_failed", handler=name,
                          error=error_text(exc))
                self.errors.append(scrub(f"handler {name!r} drain: {error_text(exc)}"))
            self.phase[name] = "drained"
            clean = True
        except Exception as exc:  # noqa: BLE001 - a bug in the consume loop: stop cleanly
            log.error("handler.crashed", handler=name, error=error_text(exc))
            self._handler_failed(HandlerFailed(name, "consume", exc))
        finally:
            if not clean:
                receiver.close()  # unblock producers instead of deadlocking them
            ctx.close_outputs()

    async def _close(self, names: Iterable[str]) -> list[str]:
        errors = []
        for name in names:
            h = self.handlers[name]
            try:
                async with asyncio.timeout(max(self.settings.drain_timeout, 5.0)):
                    await h.close()
                log.info("handler.closed", handler=name)
            except Exception as exc:  # noqa: BLE001 - every cleanup error is reported
                text = scrub(f"handler {name!r} close: {error_text(exc)}")
                errors.append(text)
                log.error("handler.close_failed", handler=name,
                          error=error_text(exc))
            self.phase[name] = "closed"
        return errors
