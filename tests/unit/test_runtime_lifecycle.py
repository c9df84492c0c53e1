"""Start order, readiness, start failures, drain timeout, reverse close, frozen set."""
from __future__ import annotations

import asyncio
import time

import pytest

from pipeline import Runtime, StartError, configure_logging

FAKES = "runtime_fakes"
PROBE = f"{FAKES}:LifecycleProbe"


def chain(**sink_settings: object) -> dict[str, dict[str, object]]:
    return {
        "src": {"type": f"{FAKES}:ProbeSource", "outputs": ["proc"]},
        "proc": {"type": f"{FAKES}:ProbeProcessor", "outputs": ["a", "b"]},
        "a": {"type": PROBE},
        "b": {"type": PROBE, **sink_settings},
        "dlq": {"type": PROBE},
    }


async def test_start_in_dependency_order_close_in_reverse(make_runtime, probe_events) -> None:
    rt = make_runtime(chain())
    assert rt.order == ["dlq", "a", "b", "proc", "src"]
    report = await rt.run()
    assert report.ok
    starts = [n for e, n in probe_events if e == "start"]
    closes = [n for e, n in probe_events if e == "close"]
    assert starts == ["dlq", "a", "b", "proc", "src"], "consumers start before producers"
    assert closes == list(reversed(starts))


async def test_start_failure_closes_the_started_ones_and_names_handler_and_cause(
        make_runtime, probe_events) -> None:
    rt = make_runtime(chain(fail_start=True))
    with pytest.raises(StartError) as info:
        await rt.run()
    assert str(info.value) == (f"handler 'b' ({PROBE}) failed to start: ConnectionRefusedError: "
                               "cannot reach the server of b")
    assert info.value.handler == "b"
    assert probe_events == [("start", "dlq"), ("start", "a"), ("start", "b"),
                            ("close", "a"), ("close", "dlq")], \
        "b failed: a and dlq are closed in reverse order, proc and src never start"
    assert rt.phase == {"a": "closed", "b": "failed", "dlq": "closed", "proc": "created",
                        "src": "created"}


async def test_every_cleanup_error_is_reported(make_runtime, probe_events) -> None:
    handlers = chain()
    handlers["a"] = {"type": PROBE, "fail_close": True}
    handlers["dlq"] = {"type": PROBE, "fail_close": True}
    rt = make_runtime(handlers)
    report = await rt.run()
    assert not report.ok
    assert report.errors == ["handler 'a' close: RuntimeError: a close exploded",
                             "handler 'dlq' close: RuntimeError: dlq close exploded"]
    assert [n for e, n in probe_events if e == "close"] == ["src", "proc", "b", "a", "dlq"]


async def test_start_failure_also_reports_cleanup_errors(make_runtime, probe_events) -> None:
    handlers = chain(fail_start=True)
    handlers["a"] = {"type": PROBE, "fail_close": True}
    rt = make_runtime(handlers)
    with pytest.raises(StartError) as info:
        await rt.run()
    assert info.value.cleanup_errors == ["handler 'a' close: RuntimeError: a close exploded"]
    assert "while closing the others: handler 'a' close" in str(info.value)


async def test_start_timeout_is_a_start_failure(make_runtime, probe_events) -> None:
    rt = make_runtime(chain(start_delay=5.0), runtime={"start_timeout": 0.1})
    t0 = time.monotonic()
    with pytest.raises(StartError, match=r"handler 'b' \(.*\) failed to start: timed out"):
        await rt.run()
    assert time.monotonic() - t0 < 2


async def test_readiness_waits_for_every_handler_and_connection(
        make_runtime, probe_events) -> None:
    rt = make_runtime(chain(start_delay=0.3))
    task = asyncio.create_task(rt.run())
    await asyncio.sleep(0.1)
    ready, waiting = rt.readiness()
    assert not ready and waiting["b"] == "starting" and waiting["src"] == "created"
    await asyncio.wait_for(task, 5)
    assert rt.readiness() == (False, {n: "closed" for n in rt.order})


async def test_a_disconnected_handler_is_not_ready(make_runtime, probe_events) -> None:
    handlers = chain(connected=False)
    handlers["src"] = {"type": "memory_source", "forever": True, "interval": 0.01,
                       "outputs": ["proc"]}
    async with make_runtime(handlers) as rt:
        ready, waiting = rt.readiness()
        assert not ready and waiting == {"b": "not connected: down"}
        rt.handlers["b"].set_connected(True)
        assert rt.readiness() == (True, {})


async def test_drain_timeout_cancels_and_reports_unacked(make_runtime, capsys) -> None:
    configure_logging("info")  # onto capsys's stderr
    rt = make_runtime({
        "src": {"type": "memory_source", "count": 30, "batch_size": 10, "outputs": ["stuck"]},
        "stuck": {"type": f"{FAKES}:GateSink"},
    }, runtime={"drain_timeout": 0.2})
    t0 = time.monotonic()
    report = await asyncio.wait_for(rt.run(), 5)
    assert time.monotonic() - t0 < 2
    assert not report.drained and report.unacked == 3
    assert rt.handlers["src"].committed == []
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if "event=drain.timeout" in ln]
    # names the source left unacknowledged and where its batches are stuck
    assert r'unacked="{\"src\": 3}"' in line
    assert r'holding="{\"stuck\": \"2 queued, 1 in process/write\"}"' in line


async def test_handler_set_is_frozen_and_a_runtime_runs_once(make_runtime) -> None:
    rt = make_runtime({"src": {"type": "memory_source", "count": 1, "outputs": ["s"]},
                       "s": {"type": "memory_sink"}})
    with pytest.raises(TypeError):
        rt.handlers["extra"] = rt.handlers["s"]  # type: ignore[index]
    assert (await rt.run()).ok
    with pytest.raises(RuntimeError, match="a Runtime runs once"):
        await rt.run()


def test_building_a_runtime_needs_no_event_loop() -> None:
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()
    rt = Runtime.from_dict({
        "runtime": {"admin_enabled": False},
        "handlers": {"src": {"type": "memory_source", "outputs": ["s"], "on_failure": "stop"},
                     "s": {"type": "memory_sink", "on_failure": "stop"}}})
    assert rt.state == "created" and set(rt.handlers) == {"src", "s"}


async def test_constructor_failure_names_the_handler(make_runtime) -> None:
    import runtime_fakes

    def broken(self: object, name: str, settings: object = None) -> None:
        raise ZeroDivisionError("division by zero")

    original = runtime_fakes.GateSink.__init__
    runtime_fakes.GateSink.__init__ = broken  # type: ignore[method-assign]
    try:
        with pytest.raises(StartError, match=r"handler 'bad' \(runtime_fakes:GateSink\) could "
                                             r"not be constructed: ZeroDivisionError: division by "
                                             r"zero"):
            make_runtime({"src": {"type": "memory_source", "outputs": ["bad"]},
                          "bad": {"type": f"{FAKES}:GateSink"}})
    finally:
        runtime_fakes.GateSink.__init__ = original  # type: ignore[method-assign]


async def test_stop_during_a_slow_start_cancels_it(make_runtime, probe_events) -> None:
    rt = make_runtime(chain(start_delay=30.0))
    task = asyncio.create_task(rt.run())
    while ("start", "b") not in probe_events:
        await asyncio.sleep(0.01)
    t0 = time.monotonic()
    rt.request_stop("signal SIGINT")
    report = await asyncio.wait_for(task, 5)
    assert time.monotonic() - t0 < 1
    assert report.ok and report.stopped_by == "signal SIGINT"
    assert probe_events == [("start", "dlq"), ("start", "a"), ("start", "b"),
                            ("close", "a"), ("close", "dlq")]
    assert rt.phase["b"] == "cancelled" and rt.phase["src"] == "created"

