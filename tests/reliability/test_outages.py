"""Outages: each server the pipeline writes to is stopped for ``RELIABILITY_OUTAGE_SECONDS``
(30) while data flows. The pipeline backs off, ``/readyz`` turns 503 and then 200
again, nothing is lost or dead-lettered, and the same process carries on (no restart).

These stop SHARED services of the local stack (other test runs see the outage too):
one at a time, and the service is always started again (``reliability_support.outage``,
in a ``finally``) and checked with ``python -m stack status``.

Ingest tier (Kafka, the HDFS NameNode): settings.toml's pipeline, recordings replayed
over MQTT in real time, the Spark job held back (``INGEST_ONLY``); the lake and Kafka
must end up with every sample once.

Processing tier (Cassandra, Elasticsearch, FerretDB, the model server): settings.toml's
feature_store, diagnose, diagnoses_mongo and diagnoses_es sections, fed by
``feature_replay`` with the window features the Spark job would emit for the same
recordings (a Spark job per test would cost minutes on two cores); Cassandra must end
up with every window once, MongoDB and Elasticsearch with one diagnosis per recording.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import reliability_support as rs
from audit import RunNames

from stack.service import Service

pytestmark = [pytest.mark.reliability, pytest.mark.integration, pytest.mark.outage]

OUTAGE_S = float(os.environ.get("RELIABILITY_OUTAGE_SECONDS", "30"))


def controls(target: str, stack_service: Callable[[str], Service],
             model_server: rs.ModelServer) -> tuple[Callable[[], Any], Callable[[], Any],
                                                     Callable[[], bool], str]:
    """(stop, start, ready, stack service name) of an outage target."""
    if target == "model_server":
        async def start() -> None:
            await model_server.start()

        async def ready() -> bool:
            return model_server.alive

        return model_server.stop, start, ready, ""
    if target == "namenode":
        hdfs = stack_service("hdfs")
        return hdfs.stop_namenode, hdfs.start_namenode, hdfs.ready, "hdfs"
    svc = stack_service(target)
    return svc.stop, svc.start, svc.ready, target


async def ride_out(pipeline: rs.PipelineProcess, target: str, stop: Callable[[], Any],
                   start: Callable[[], Any], ready: Callable[[], bool],
                   begin: Callable[[], Any] | None = None) -> dict[str, float]:
    """Stop the target for OUTAGE_S; /readyz must turn 503 during it and 200 after it."""

    async def not_ready() -> bool:
        return not await pipeline.ready()

    async with rs.outage(stop, start, ready, target) as times:
        if begin is not None:
            begin()
        times["readyz_503_after"] = await rs.wait_until(
            not_ready, OUTAGE_S + 30, f"/readyz 503 while {target} is down", interval=0.2)
        code, body = await pipeline.readyz()
        print(f"{target} down: /readyz {code} {json.dumps(body.get('not_ready'))[:300]}")
        left = OUTAGE_S - (time.monotonic() - times["stopped_at"])
        if left > 0:
            await asyncio.sleep(left)
        assert pipeline.alive, f"the pipeline died during the {target} outage\n{pipeline.tail()}"
    t = time.monotonic()
    times["readyz_200_after_restart"] = await rs.wait_until(
        pipeline.ready, 180, f"/readyz 200 after {target} is back")
    times["readyz_200_after_ready"] = time.monotonic() - t
    print(f"{target}: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()
                                   if k != "stopped_at"))
    return times


def check_stack(service: str) -> None:
    if not service:
        return
    status = rs.stack_status()
    line = next((ln for ln in status.splitlines() if ln.startswith(service)), "")
    assert "running, ready" in line, f"after the outage:\n{status}"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("target", ["kafka", "namenode"])
async def test_ingest_outage_backs_off_and_loses_nothing(
        target: str, whole_stack: dict[str, Service], stack_service: Callable[[str], Service],
        recordings: dict[str, np.ndarray], model_server: rs.ModelServer, run_names: RunNames,
        tmp_path: Path, pipelines: list[rs.PipelineProcess]) -> None:
    stop, start, ready, service = controls(target, stack_service, model_server)
    names = run_names
    pipeline = await rs.start_ingest_tier(names, model_server, tmp_path, pipelines)
    schedule = rs.schedule_recordings(recordings, names.mqtt_topic)
    publisher = rs.Publisher()
    replay = asyncio.create_task(publisher.publish(schedule, speed=1.0))
    try:
        await rs.wait_until(lambda: publisher.sent >= len(schedule) // 5, 60, "replay started")
        await ride_out(pipeline, target, stop, start, ready)
        await replay
    finally:
        if not replay.done():
            replay.cancel()
        check_stack(service)
    waited = await rs.wait_raw_complete(names, recordings, pipeline)
    print(f"every sample stored {waited:.1f} s after /readyz recovered")
    assert pipeline.starts == 1 and pipeline.alive, "the pipeline was restarted"
    pipeline.stop()
    result = await rs.audit_stores(names, recordings, derived=False)
    print(result)
    dead = pipeline.dead_letter_records()
    assert not dead, (f"{len(dead)} dead letters during the {target} outage, e.g. "
                      f"{[(d['handler'], d['reason'][:200]) for d in dead[:3]]}")
    assert result.ok, f"stores differ from what was sent:\n{result}\n{pipeline.tail()}"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("target", ["cassandra", "elasticsearch", "ferretdb", "model_server"])
async def test_processing_outage_backs_off_and_loses_nothing(
        target: str, whole_stack: dict[str, Service], stack_service: Callable[[str], Service],
        recordings: dict[str, np.ndarray], model_server: rs.ModelServer, run_names: RunNames,
        tmp_path: Path, pipelines: list[rs.PipelineProcess]) -> None:
    stop, start, ready, service = controls(target, stack_service, model_server)
    names = run_names
    start_file, ack_log = tmp_path / "go", tmp_path / "acks.jsonl"
    settings = rs.processing_tier_settings(
        tmp_path / "processing.toml", recordings=list(recordings), seconds=rs.SECONDS,
        start_file=start_file, ack_log=ack_log, interval=2.0)
    pipeline = rs.PipelineProcess(names, model_url=model_server.url,
                                  dead_letters=tmp_path / "dead.jsonl",
                                  log=tmp_path / "pipeline.log", settings=settings)
    pipelines.append(pipeline)
    pipeline.start()
    await pipeline.wait_ready()
    try:
        await ride_out(pipeline, target, stop, start, ready, begin=start_file.touch)
    finally:
        start_file.touch()
        check_stack(service)

    def acked() -> set[str]:
        return {json.loads(line)["recording"] for line in ack_log.read_text().splitlines()} \
            if ack_log.exists() else set()

    t = time.monotonic()
    try:
        await rs.wait_until(lambda: acked() >= set(recordings), 240,
                            "every feature batch acknowledged")
    except AssertionError:
        raise AssertionError(f"acknowledged: {sorted(acked())}; dead letters: "
                             f"{[(d['handler'], d['reason'][:200]) for d in pipeline.dead_letter_records()[:4]]}"
                             f"\n{pipeline.tail()}") from None
    print(f"every batch acknowledged {time.monotonic() - t:.1f} s after /readyz recovered")
    assert pipeline.starts == 1 and pipeline.alive, "the pipeline was restarted"
    rc = pipeline.stop()
    dead = pipeline.dead_letter_records()
    assert not dead, (f"{len(dead)} dead letters during the {target} outage, e.g. "
                      f"{[(d['handler'], d['reason'][:200]) for d in dead[:3]]}")
    result = await rs.audit_stores(names, recordings, raw=False)
    print(result)
    assert result.ok, f"stores differ from what was sent:\n{result}\n{pipeline.tail()}"
    assert rc == 0, f"exit status {rc}\n{pipeline.tail()}"
