"""Data flow through a running pipeline: backpressure, acks, retries, dead letters."""
from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from pipeline import DEAD_LETTER_SCHEMA, Runtime

FAKES = "runtime_fakes"


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.002)


def tokens(n_batches: int, size: int = 10) -> list[tuple[str, int, int]]:
    return [("seq", i * size, size) for i in range(n_batches)]


def dead_letters(rt: Runtime) -> list[dict[str, Any]]:
    return rt.handlers["dlq"].rows()  # type: ignore[attr-defined]


async def test_slow_sink_bounds_memory_and_stops_the_source(make_runtime) -> None:
    rt = make_runtime({
        "src": {"type": "memory_source", "count": 1_000_000, "batch_size": 10,
                "outputs": ["slow"]},
        "slow": {"type": "memory_sink", "delay": 0.005, "capacity": 4},
    })
    async with rt:
        src, slow = rt.handlers["src"], rt.handlers["slow"]
        samples = []
        for _ in range(30):
            await asyncio.sleep(0.01)
            lead = src.emitted - len(slow.batches)
            samples.append(lead)
            # at most: a full channel + the batch being written
            assert lead <= 4 + 1, f"source ran {lead} batches ahead of a slow sink"
            assert rt._trackers["src"].pending <= 4 + 2
        stats = rt.status()["handlers"]["slow"]["input"]
        assert stats["max_depth"] == stats["capacity"] == 4
        assert stats["blocked_seconds"] > 0, "the source must have waited for room"
        assert src.emitted < 200, "the source must be held back, not race to the end"
    report = rt.report
    assert report is not None and report.ok and report.drained
    assert report.stopped_by == "context exit"
    # everything emitted before the stop was written and acknowledged: nothing dropped
    assert slow.row_count == src.emitted * 10
    assert src.committed == tokens(src.emitted)


async def test_nothing_is_acknowledged_when_one_of_two_sinks_fails_mid_batch(
        make_runtime) -> None:
    rt = make_runtime({
        "src": {"type": "memory_source", "count": 50, "batch_size": 10,
                "outputs": ["good", "bad"]},
        "good": {"type": "memory_sink"},
        "bad": {"type": f"{FAKES}:ScriptedSink", "fail_on": [25], "mode": "mid_batch",
                "on_failure": "stop", "retry": {"max_attempts": 2, "backoff": 0}},
    })
    report = await rt.run()
    src, good, bad = rt.handlers["src"], rt.handlers["good"], rt.handlers["bad"]
    assert not report.ok
    assert "handler 'bad' failed in write: OSError: connection lost after 5 rows" in report.errors
    assert bad.half_written[:5] == [20, 21, 22, 23, 24]
    assert any(r["seq"] == 25 for r in good.rows()), "the other sink did commit the batch"
    # ...yet neither that batch nor anything after it was acknowledged upstream
    assert src.committed == tokens(2)
    assert report.unacked >= 1
    assert dead_letters(rt) == []


async def test_no_ack_while_one_sink_is_still_retrying(make_runtime) -> None:
    rt = make_runtime({
        "src": {"type": "memory_source", "count": 10, "batch_size": 10,
                "outputs": ["good", "flaky"]},
        "good": {"type": "memory_sink"},
        "flaky": {"type": f"{FAKES}:ScriptedSink", "fail_on": [3], "failures": 1,
                  "retry": {"max_attempts": 3, "backoff": 0.3, "jitter": 0}},
    })
    task = asyncio.create_task(rt.run())
    await eventually(lambda: rt.handlers["good"].row_count == 10
                     and rt.handlers["flaky"].attempts[0] == 1)
    await asyncio.sleep(0.05)
    assert rt.handlers["src"].committed == []
    report = await asyncio.wait_for(task, 5)
    assert report.ok
    assert rt.handlers["src"].committed == tokens(1)
    assert rt.metrics.value("retries", "flaky") == 1


async def test_upstream_acks_happen_in_emission_order(make_runtime) -> None:
    rt = make_runtime({
        "src": {"type": "memory_source", "count": 40, "batch_size": 10, "outputs": ["sink"]},
        "sink": {"type": f"{FAKES}:ScriptedSink", "concurrency": 4,
                 "delays": {"0": 0.3, "10": 0.0, "20": 0.1, "30": 0.0}},
    })
    task = asyncio.create_task(rt.run())
    sink = rt.handlers["sink"]
    await eventually(lambda: len(sink.completed_batches) == 2)
    assert sorted(sink.completed_batches) == [10, 30]
    await asyncio.sleep(0.01)
    assert rt.handlers["src"].committed == [], "batch 0 is in flight: nothing may be acked"
    report = await asyncio.wait_for(task, 5)
    assert report.ok
    assert sink.completed_batches == [10, 30, 20, 0], "completion really was out of order"
    assert rt.handlers["src"].committed == tokens(4)


async def test_retry_then_dead_letter_with_reason(make_runtime) -> None:
    rt = make_runtime({
        "src": {"type": "memory_source", "count": 50, "batch_size": 10, "outputs": ["sink"]},
        "sink": {"type": f"{FAKES}:ScriptedSink", "fail_on": [13],
                 "retry": {"max_attempts": 3, "backoff": 0.001}},
    })
    report = await rt.run()
    assert report.ok, report.errors
    sink = rt.handlers["sink"]
    assert sink.attempts[10] == 3
    assert 13 not in sink.committed and len(sink.committed) == 40
    letters = dead_letters(rt)
    assert [json.loads(d["payload"])["seq"] for d in letters] == list(range(10, 20))
    first = letters[0]
    assert first["handler"] == "sink" and first["source"] == "src"
    assert first["reason"] == "failed after 3 attempts: ValueError: cannot write seq 13"
    assert first["exception"] == "ValueError: cannot write seq 13"
    assert first["attempts"] == 3 and first["key"] == "10"
    assert first["payload_encoding"] == "json"
    assert rt.handlers["dlq"].batches[0].schema.equals(DEAD_LETTER_SCHEMA)
    assert rt.metrics.value("retries", "sink") == 2
    assert rt.metrics.value("errors", "sink") == 3
    assert rt.metrics.value("dead_letters", "sink") == 1
    assert rt.metrics.value("dead_letter_rows", "sink") == 10
    # the dead-lettered batch is safely stored: it is acknowledged, in order
    assert rt.handlers["src"].committed == tokens(5)


async def test_a_poison_message_does_not_block_later_ones(make_runtime) -> None:
    rt = make_runtime({
        "src": {"type": "memory_source", "count": 100, "batch_size": 10, "outputs": ["sink"]},
        "sink": {"type": f"{FAKES}:ScriptedSink", "fail_on": [3, 47], "mode": "reject",
                 "retry": {"max_attempts": 5, "backoff": 10}},
    })
    report = await asyncio.wait_for(rt.run(), 5)  # a retry would take 10 s: Reject skips it
    assert report.ok
    sink = rt.handlers["sink"]
    assert sink.committed == [s for s in range(100) if s not in (3, 47)]
    assert sink.attempts[0] == 1 and sink.attempts[40] == 1
    letters = dead_letters(rt)
    assert [(d["key"], d["reason"], d["attempts"]) for d in letters] == [
        ("3", "poison row(s) [3]", 1), ("47", "poison row(s) [47]", 1)]
    assert rt.handlers["src"].committed == tokens(10)


async def test_partial_failure_retries_only_the_failed_rows(make_runtime) -> None:
    rt = make_runtime({
        "src": {"type": "memory_source", "count": 20, "batch_size": 10, "outputs": ["sink"]},
        "sink": {"type": f"{FAKES}:ScriptedSink", "fail_on": [5, 15], "failures": 1,
                 "mode": "partial", "retry": {"max_attempts": 3, "backoff": 0}},
    })
    report = await rt.run()
    assert report.ok
    sink = rt.handlers["sink"]
    assert sorted(sink.committed) == list(range(20))
    assert sink.row_attempts[5] == 2 and sink.row_attempts[4] == 1
    assert dead_letters(rt) == []


async def test_partial_failure_exhausted_dead_letters_only_those_rows(make_runtime) -> None:
    rt = make_runtime({
        "src": {"type": "memory_source", "count": 10, "batch_size": 10, "outputs": ["sink"]},
        "sink": {"type": f"{FAKES}:ScriptedSink", "fail_on": [5], "mode": "partial",
                 "retry": {"max_attempts": 2, "backoff": 0}},
    })
    assert (await rt.run()).ok
    letters = dead_letters(rt)
    assert [d["key"] for d in letters] == ["5"]
    assert letters[0]["reason"] == "failed after 2 attempts: ConnectionError: item failed"
    assert sorted(rt.handlers["sink"].committed) == [s for s in range(10) if s != 5]
    assert rt.handlers["src"].committed == tokens(1)


async def test_processor_named_outputs_and_rejects(make_runtime) -> None:
    rt = make_runtime({
        "src": {"type": "memory_source", "rows": [{"x": 1}], "count": 30, "batch_size": 10,
                "outputs": ["split"]},
        "split": {"type": f"{FAKES}:SplitProcessor",
                  "outputs": {"default": ["even"], "odd": ["odd"]}},
        "even": {"type": "memory_sink"},
        "odd": {"type": "memory_sink"},
    })
    assert (await rt.run()).ok
    even = [r["seq"] for r in rt.handlers["even"].rows()]
    odd = [r["seq"] for r in rt.handlers["odd"].rows()]
    assert even == list(range(0, 30, 2)) and odd == list(range(1, 30, 2))
    assert rt.handlers["even"].batches[0].source == "split"
    letters = dead_letters(rt)
    assert len(letters) == 1 and letters[0]["reason"] == "no seq column"
    assert json.loads(letters[0]["payload"]) == {"x": 1}
    assert letters[0]["handler"] == "split" and letters[0]["source"] == "src"
    assert len(rt.handlers["src"].committed) == 4


@pytest.mark.parametrize("emit_first", [False, True], ids=["raises first", "emits first"])
async def test_processor_rejecting_some_rows_loses_none_of_the_others(make_runtime,
                                                                    emit_first) -> None:
    # raising before emitting: the runtime processes the other rows again; emitting
    # the good rows first: they count as handled and are not processed twice
    rt = make_runtime({
        "src": {"type": "memory_source", "count": 30, "batch_size": 10, "outputs": ["proc"]},
        "proc": {"type": f"{FAKES}:ScriptedProcessor", "fail_on": [3, 4, 17], "mode": "reject",
                 "emit_first": emit_first, "outputs": ["sink"],
                 "retry": {"max_attempts": 5, "backoff": 10}},
        "sink": {"type": "memory_sink"},
    })
    report = await asyncio.wait_for(rt.run(), 5)  # Reject never waits for a retry
    assert report.ok and report.drained
    got = [r["seq"] for r in rt.handlers["sink"].rows()]
    assert sorted(got) == [s for s in range(30) if s not in (3, 4, 17)]
    assert len(got) == len(set(got)), "a row reached the sink twice"
    letters = dead_letters(rt)
    assert sorted((d["key"], d["reason"]) for d in letters) == [
        ("17", "poison row(s) [17]"), ("3", "poison row(s) [3, 4]"),
        ("4", "poison row(s) [3, 4]")]
    calls = rt.handlers["proc"].calls
    if emit_first:
        assert len(calls) == 3
    else:  # each failing batch once more, without its rejected rows
        assert [0, 1, 2, 5, 6, 7, 8, 9] in calls and [10, 11, 12, 13, 14, 15, 16, 18, 19] in calls
        assert len(calls) == 5
    assert rt.handlers["src"].committed == tokens(3)


@pytest.mark.parametrize("emit_first", [False, True], ids=["raises first", "emits first"])
async def test_processor_partial_failure_retries_those_rows_and_passes_the_rest(
        make_runtime, emit_first) -> None:
    rt = make_runtime({
        "src": {"type": "memory_source", "count": 20, "batch_size": 10, "outputs": ["proc"]},
        "proc": {"type": f"{FAKES}:ScriptedProcessor", "fail_on": [5, 15], "failures": 1,
                 "mode": "partial", "emit_first": emit_first, "outputs": ["sink"],
                 "retry": {"max_attempts": 3, "backoff": 0}},
        "sink": {"type": "memory_sink"},
    })
    report = await rt.run()
    assert report.ok and report.drained
    got = [r["seq"] for r in rt.handlers["sink"].rows()]
    assert sorted(got) == list(range(20)), "every row once: the failed ones after a retry"
    proc = rt.handlers["proc"]
    assert proc.row_attempts[5] == 2 and proc.row_attempts[15] == 2
    assert proc.row_attempts[4] == (1 if emit_first else 2)
    assert dead_letters(rt) == []
    assert rt.handlers["src"].committed == tokens(2)


async def test_fan_in_from_two_sources(make_runtime) -> None:
    rt = make_runtime({
        "a": {"type": "memory_source", "count": 30, "batch_size": 10, "outputs": ["sink"]},
        "b": {"type": "memory_source", "count": 20, "start": 1000, "batch_size": 10,
              "outputs": ["sink"]},
        "sink": {"type": "memory_sink"},
    })
    assert (await rt.run()).ok
    rows = sorted(r["seq"] for r in rt.handlers["sink"].rows())
    assert rows == [*range(30), *range(1000, 1020)]
    assert {b.source for b in rt.handlers["sink"].batches} == {"a", "b"}
    assert len(rt.handlers["a"].committed) == 3 and len(rt.handlers["b"].committed) == 2


async def test_deferred_commit_waits_for_flush_and_derived_events(make_runtime) -> None:
    rt = make_runtime({
        "src": {"type": "memory_source", "count": 50, "batch_size": 10, "outputs": ["lake"]},
        "lake": {"type": f"{FAKES}:SegmentSink", "roll_batches": 2,
                 "outputs": {"segments": ["events"]}},
        "events": {"type": f"{FAKES}:GateSink"},
    })
    task = asyncio.create_task(rt.run())
    events = rt.handlers["events"]
    await eventually(lambda: events.received >= 1)
    await asyncio.sleep(0.02)
    lake = rt.handlers["lake"]
    assert lake.flushed[0] == list(range(20))
    assert rt.handlers["src"].committed == [], \
        "flushed, but the segment event is not committed yet: no upstream ack"
    assert events.gate is not None
    events.gate.set()
    report = await asyncio.wait_for(task, 5)
    assert report.ok
    assert [len(s) for s in lake.flushed] == [20, 20, 10], "drain() flushed the remainder"
    assert rt.handlers["src"].committed == tokens(5)
    assert rt.metrics.value("batches_out", "lake", "segments") == 3


async def test_deferred_failure_goes_to_dead_letter_then_acks(make_runtime) -> None:
    rt = make_runtime({
        "src": {"type": "memory_source", "count": 20, "batch_size": 10, "outputs": ["lake"]},
        "lake": {"type": f"{FAKES}:SegmentSink", "roll_batches": 2, "fail_flush": True},
    })
    assert (await rt.run()).ok
    letters = dead_letters(rt)
    assert len(letters) == 20
    assert {d["reason"] for d in letters} == {"OSError: disk full"}
    assert rt.handlers["src"].committed == tokens(2)


async def test_source_failure_stops_the_pipeline_after_draining(make_runtime) -> None:
    rt = make_runtime({
        "src": {"type": f"{FAKES}:FailingSource", "outputs": ["sink"]},
        "sink": {"type": "memory_sink"},
    })
    report = await rt.run()
    assert not report.ok and report.stopped_by == "failure"
    assert report.errors == [("handler 'src' failed in run: RuntimeError: upstream connection "
                             "reset")]
    assert rt.handlers["sink"].row_count == 1, "what was emitted before the failure drains"


async def test_dead_letter_target_failure_stops_and_redacts(make_runtime) -> None:
    rt = make_runtime({
        "src": {"type": "memory_source", "count": 10, "outputs": ["sink"]},
        "sink": {"type": f"{FAKES}:ScriptedSink", "fail_on": [1], "mode": "reject"},
        "dlq": {"type": f"{FAKES}:SecretSink", "password": "hunter2-secret",
                "retry": {"max_attempts": 2, "backoff": 0}},
    })
    report = await rt.run()
    assert not report.ok
    assert report.errors == [("handler 'dlq' failed in write: PermissionError: login failed "
                             "for svc:***@db")]
    assert rt.handlers["src"].committed == []


async def test_run_until_idle_is_deterministic(make_runtime) -> None:
    def build() -> Runtime:
        return make_runtime({
            "a": {"type": "memory_source", "count": 95, "batch_size": 7, "outputs": ["split"]},
            "b": {"type": "memory_source", "count": 40, "start": 500, "batch_size": 3,
                  "outputs": ["split"]},
            "split": {"type": f"{FAKES}:SplitProcessor",
                      "outputs": {"default": ["even", "all"], "odd": ["all"]}},
            "even": {"type": "memory_sink"},
            "all": {"type": "memory_sink"},
        })

    outputs = []
    for _ in range(2):
        rt = build()
        report = await rt.run_until_idle(timeout=10)
        assert report.ok and report.drained and report.unacked == 0
        outputs.append(([r["seq"] for r in rt.handlers["all"].rows()],
                        [r["seq"] for r in rt.handlers["even"].rows()]))
        assert all(rx.stats.depth == 0 for rx in rt._receivers.values())
    assert outputs[0] == outputs[1]
    assert sorted(outputs[0][0]) == [*range(95), *range(500, 540)]


async def test_timeout_makes_a_stuck_write_a_failed_attempt(make_runtime) -> None:
    rt = make_runtime({
        "src": {"type": "memory_source", "count": 10, "outputs": ["sink"]},
        "sink": {"type": f"{FAKES}:ScriptedSink", "delay": 5, "timeout": 0.05,
                 "retry": {"max_attempts": 2, "backoff": 0}},
    })
    report = await asyncio.wait_for(rt.run(), 5)
    assert report.ok
    letters = dead_letters(rt)
    expected = "TimeoutError: write() took longer than timeout = 0.05 s"
    assert len(letters) == 10
    assert letters[0]["reason"] == f"failed after 2 attempts: {expected}"
    assert letters[0]["exception"] == expected


@pytest.mark.parametrize("concurrency", [1, 3])
async def test_dead_letter_records_keep_original_payload(make_runtime, concurrency: int) -> None:
    rt = make_runtime({
        "src": {"type": "memory_source", "rows": [{"seq": 1, "v": float("nan"), "s": "é"}],
                "outputs": ["sink"]},
        "sink": {"type": f"{FAKES}:ScriptedSink", "fail_on": [1], "mode": "reject",
                 "concurrency": concurrency},
    })
    assert (await rt.run()).ok
    (letter,) = dead_letters(rt)
    assert json.loads(letter["payload"]) == {"seq": 1, "v": "nan", "s": "é"}
