"""Crashes: kill -9 the pipeline at random moments of a replay, and restart the broker.

settings.toml's whole pipeline (MQTT → lake + Kafka → Spark features → Cassandra,
model server → MongoDB + Elasticsearch) runs as a subprocess pointed at this run's
names. Recordings are replayed in real time by a publisher that survives broker
restarts. Afterwards every store is compared with what was sent: each sample once
in the lake and in Kafka, each window once in Cassandra, one diagnosis per
recording in MongoDB and Elasticsearch, nothing dead-lettered.

CI budget: the first ``RELIABILITY_SECONDS`` (20) s of four recordings; the kill
moments are drawn from a seeded generator (``RELIABILITY_SEED``, printed).
"""
from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import reliability_support as rs
from audit import RunNames

from stack.service import Service

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

KILLS = int(os.environ.get("RELIABILITY_KILLS", "5"))
SEED = int(os.environ.get("RELIABILITY_SEED", "0")) or random.SystemRandom().randrange(1, 10**6)


def snapshot(status: dict) -> str:
    """One line of what the pipeline was doing (printed at each kill)."""
    hs = status.get("handlers") or {}
    parts = []
    for name in ("mqtt", "lake", "raw_kafka", "features", "feature_store", "diagnose",
                 "diagnoses_mongo", "diagnoses_es"):
        h = hs.get(name) or {}
        ack = h.get("ack") or {}
        bits = [f"in={h.get('rows_in', 0):.0f}"]
        if ack:
            bits.append(f"pending={ack.get('pending')}")
        if h.get("detail"):
            bits.append(str(h["detail"])[:40])
        parts.append(f"{name}({' '.join(bits)})")
    return " ".join(parts)


async def spark_running(pipeline: rs.PipelineProcess) -> bool:
    features = ((await pipeline.status()).get("handlers") or {}).get("features") or {}
    return " running" in str(features.get("detail"))


async def finish_and_audit(names: RunNames, recs: dict[str, np.ndarray],
                           pipeline: rs.PipelineProcess, timeout: float = 420) -> None:
    """Wait for every diagnosis, stop with SIGTERM (drain), compare every store."""
    waited = await rs.wait_diagnosed(names, recs, pipeline, timeout=timeout)
    print(f"all diagnoses in {waited:.0f} s after the replay")
    rc = pipeline.stop()
    assert rc == 0, f"SIGTERM: exit status {rc}\n{pipeline.tail()}"
    result = await rs.audit_stores(names, recs)
    print(result)
    dead = pipeline.dead_letter_records()
    assert result.ok, f"stores differ from what was sent:\n{result}\n{pipeline.tail()}"
    assert not dead, f"{len(dead)} dead letters, e.g. {dead[:3]}"


@pytest.mark.timeout(1200)
async def test_kill_9_at_random_moments_loses_and_duplicates_nothing(
        whole_stack: dict[str, Service], recordings: dict[str, np.ndarray],
        model_server: rs.ModelServer, run_names: RunNames, tmp_path: Path,
        pipelines: list[rs.PipelineProcess]) -> None:
    rng = random.Random(SEED)
    print(f"seed {SEED} (RELIABILITY_SEED={SEED} replays these kill moments)")
    names = run_names
    pipeline = rs.PipelineProcess(names, model_url=model_server.url,
                                  dead_letters=tmp_path / "dead.jsonl",
                                  log=tmp_path / "pipeline.log",
                                  sets=rs.one_spark_job(rs.SECONDS + 5))
    pipelines.append(pipeline)
    pipeline.start()
    await pipeline.wait_running()
    schedule = rs.schedule_recordings(recordings, names.mqtt_topic)
    publisher = rs.Publisher()
    t0 = time.monotonic()
    replay = asyncio.create_task(publisher.publish(schedule, speed=1.0))
    try:
        for i in range(KILLS):
            if i == KILLS - 1 and KILLS > 1:
                # the last one during the Spark job: its segments must be recomputed
                await rs.wait_until(lambda: spark_running(pipeline), 300,
                                    "a Spark job running")
                await asyncio.sleep(rng.uniform(1.0, 15.0))
            else:
                await asyncio.sleep(rng.uniform(0.5, 8.0))
            state = snapshot(await pipeline.status())
            pipeline.kill()
            print(f"kill -9 #{i + 1} at {time.monotonic() - t0:5.1f} s "
                  f"(replay {publisher.sent}/{len(schedule)} messages): {state}")
            strays = rs.kill_strays(names.run)  # its orphaned Spark job, as a container would
            if strays:
                print(f"  killed {len(strays)} orphaned Spark process(es) of the pipeline")
            pipeline.start()
            print(f"  restarted, running after {await pipeline.wait_running():.1f} s")
        await replay
    finally:
        if not replay.done():
            replay.cancel()
    print(f"replay done at {time.monotonic() - t0:.1f} s after {KILLS} kills")
    await finish_and_audit(names, recordings, pipeline)


@pytest.mark.outage
@pytest.mark.timeout(600)
async def test_broker_restart_with_persistent_sessions_loses_nothing(
        whole_stack: dict[str, Service], stack_service: Callable[[str], Service],
        recordings: dict[str, np.ndarray], model_server: rs.ModelServer, run_names: RunNames,
        tmp_path: Path, pipelines: list[rs.PipelineProcess]) -> None:
    """Mosquitto stopped (SIGTERM: it saves its persistence) and started mid-replay; the
    pipeline reconnects with its session (clean_start false), the broker delivers what it
    queued meanwhile and redelivers what was not acknowledged. Ingest tier only (the
    broker has no part in what follows the lake)."""
    mosquitto = stack_service("mosquitto")
    names = run_names
    pipeline = await rs.start_ingest_tier(names, model_server, tmp_path, pipelines)
    schedule = rs.schedule_recordings(recordings, names.mqtt_topic)
    publisher = rs.Publisher()
    replay = asyncio.create_task(publisher.publish(schedule, speed=1.0))
    try:
        await rs.wait_until(lambda: publisher.sent > len(schedule) // 3, 60, "a third sent")
        async with rs.outage(mosquitto.stop, mosquitto.start, mosquitto.ready, "mosquitto",
                             ready_timeout=60) as times:
            print(f"mosquitto stopped after {publisher.sent}/{len(schedule)} messages")

            async def not_ready() -> bool:
                return not await pipeline.ready()

            waited = await rs.wait_until(not_ready, 15, "/readyz 503 while the broker is down",
                                         interval=0.2)
            print(f"/readyz 503 {waited:.1f} s after the stop: {await pipeline.readyz()}")
            await asyncio.sleep(2.0)
        print(f"mosquitto back after {times['down_seconds']:.1f} s down, ready "
              f"{times['restart_seconds']:.1f} s after its start")
        waited = await rs.wait_until(pipeline.ready, 90, "/readyz back to 200")
        print(f"/readyz 200 again {waited:.1f} s later")
        await replay
    finally:
        if not replay.done():
            replay.cancel()
    assert publisher.reconnects >= 1
    await rs.wait_raw_complete(names, recordings, pipeline)
    assert pipeline.starts == 1 and pipeline.alive, "the pipeline was restarted"
    pipeline.stop()
    result = await rs.audit_stores(names, recordings, derived=False)
    print(result)
    assert result.ok, f"stores differ from what was sent:\n{result}\n{pipeline.tail()}"
    dead = pipeline.dead_letter_records()
    assert not dead, f"{len(dead)} dead letters, e.g. {dead[:3]}"
