"""spark_job on the real stack: raw segments in the HDFS lake (written here with pyarrow +
WebHDFS, in lake_sink's layout) -> spark-submit on the real local Spark -> features in
Cassandra (cassandra_sink). A run killed mid-way is detected and retried; a job over a
corrupt segment is retried, then its events are dead-lettered with the driver's error.

Each test starts two spark-submit runs (slow on 2 cores: a few tens of seconds each).
Lake paths and the keyspace are unique per run and removed afterwards.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from lake_support import raw_parquet

from handlers.spark_job import SparkJob
from handlers.webhdfs import WebHdfs
from ml import data as mldata
from ml import features as mlf
from pipeline import Runtime
from stack.config import StackConfig

pytestmark = pytest.mark.integration

DATE = "2026-12-04"


class Lake:
    """A unique lake root on the real HDFS: ``raw`` segments and ``features`` outputs."""

    def __init__(self, fs: WebHdfs, root: str, hdfs_url: str, webhdfs_url: str) -> None:
        self.fs, self.root = fs, root
        self.raw, self.features = f"{root}/raw", f"{root}/features"
        self.hdfs_url, self.webhdfs_url = hdfs_url, webhdfs_url

    async def put_recording(self, recording: str, x: np.ndarray, bounds: list[int],
                            final: bool = True) -> list[dict[str, Any]]:
        """Segments ``[bounds[i], bounds[i+1])`` of ``x`` as Parquet; their events (§3)."""
        events = []
        for i, (a, b) in enumerate(itertools.pairwise(bounds)):
            path = (f"{self.raw}/date={DATE}/recording={recording}/"
                    f"part-{a:010d}-{b - 1:010d}.parquet")
            await self.fs.create(path, raw_parquet(recording, x, a, b))
            events.append({"path": path, "recording": recording, "seq_first": a,
                           "seq_last": b - 1, "rows": b - a,
                           "final": final and i == len(bounds) - 2})
        return events


@pytest.fixture
def gaitpdb() -> Callable[[str, int], np.ndarray]:
    """``load(recording_id, rows)``: the first rows of a gaitpdb recording."""
    if not os.environ.get(mldata.ENV_VAR):
        pytest.fail(f"{mldata.ENV_VAR} is not set: export it to the gaitpdb directory",
                    pytrace=False)
    paths = mldata.list_recordings().set_index("id")["path"]
    return lambda rid, n: mldata.load_recording(paths[rid])[:n]


@pytest.fixture
async def lake(stack_service: Callable[[str], Any]) -> AsyncIterator[Lake]:
    hdfs = stack_service("hdfs")
    spark = stack_service("spark")
    if not spark.ready():
        pytest.fail("Spark is not usable (pyspark, spark-submit, Java 17): "
                    "`python -m stack status spark`", pytrace=False)
    root = f"/gaitflow-test/spark-{uuid.uuid4().hex[:12]}"
    async with WebHdfs(hdfs.webhdfs()) as fs:
        try:
            yield Lake(fs, root, hdfs.address(), hdfs.webhdfs())
        finally:
            await fs.delete(root, recursive=True)


@pytest.fixture
def cql(stack_service: Callable[[str], Any], stack_cfg: StackConfig) -> Iterator[Any]:
    """A CQL session (dict rows) and a unique keyspace name, dropped afterwards."""
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
    from cassandra.policies import WhiteListRoundRobinPolicy
    from cassandra.query import dict_factory

    stack_service("cassandra")
    profile = ExecutionProfile(load_balancing_policy=WhiteListRoundRobinPolicy(["127.0.0.1"]),
                               request_timeout=30, row_factory=dict_factory)
    cluster = Cluster(["127.0.0.1"], port=int(stack_cfg.svc("cassandra")["port"]),
                      protocol_version=5, connect_timeout=10,
                      execution_profiles={EXEC_PROFILE_DEFAULT: profile})
    session = cluster.connect()
    keyspace = f"it_spark_{uuid.uuid4().hex[:10]}"
    try:
        yield session, keyspace
    finally:
        session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}")
        cluster.shutdown()


def spark_section(lake: Lake, **overrides: Any) -> dict[str, Any]:
    return {"type": "spark_job", "hdfs_url": lake.hdfs_url, "webhdfs_url": lake.webhdfs_url,
            "features_root": lake.features, "shuffle_partitions": 4, "poll_interval": 0.5,
            "max_wait": 600.0, "trigger_on_final": False,  # one job, started at drain
            "job_retry": {"max_attempts": 2, "backoff": 1.0, "jitter": 0.0}} | overrides


def expected_features(recording: str, x: np.ndarray) -> pd.DataFrame:
    df = pd.DataFrame(x, columns=list(mlf.COLUMNS))
    df.insert(0, "seq", np.arange(len(x), dtype=np.int64))
    df.insert(0, "recording", recording)
    return mlf.features_frame(df, id_col="recording").set_index("key")


@pytest.mark.timeout(600)
async def test_segments_to_cassandra_and_a_killed_run_is_retried(
        lake: Lake, cql: Any, gaitpdb: Callable[[str, int], np.ndarray],
        tmp_path: Path) -> None:
    session, keyspace = cql
    x1, x2 = gaitpdb("GaCo01_01", 3000), gaitpdb("GaPt03_01", 3000)
    # segments as lake_sink rolls them; windows cross the boundaries
    rows = (await lake.put_recording("GaCo01_01", x1, [0, 1000, 2000, 3000])
            + await lake.put_recording("GaPt03_01", x2, [0, 1500, 3000]))
    rt = Runtime.from_dict({
        "runtime": {"admin_enabled": False, "drain_timeout": 500},
        "dead_letter": {"target": "dlq"},
        "handlers": {
            "src": {"type": "memory_source", "rows": rows, "batch_size": 2,
                    "outputs": ["spark"]},
            "spark": spark_section(lake, outputs=["cassandra"], scratch_dir=str(tmp_path)),
            "cassandra": {"type": "cassandra_sink", "keyspace": keyspace, "table": "features",
                          "contract": "features", "on_failure": "stop"},
            "dlq": {"type": "memory_sink"},
        }})
    run = asyncio.create_task(rt.run())
    handler: SparkJob = rt.handlers["spark"]  # type: ignore[assignment]

    def started() -> dict[str, Any] | None:  # the driver is up and reports progress
        for job in handler.status()["running"]:
            attempt = job["attempts"][-1] if job["attempts"] else None
            if attempt and attempt["number"] == 1 and attempt["tasks_total"]:
                return attempt
        return None

    deadline = time.monotonic() + 300
    while (first := started()) is None:
        assert not run.done(), run.result()
        assert time.monotonic() < deadline, "the first run never reported progress"
        await asyncio.sleep(0.2)
    assert first["app_id"] and first["ui"].startswith("http://")
    # the run's Spark scratch space is its own directory under scratch_dir
    [scratch] = list(tmp_path.iterdir())
    assert any(p.name.startswith("blockmgr-") for p in scratch.iterdir()), list(scratch.iterdir())
    os.kill(first["pid"], signal.SIGKILL)  # spark-submit dies mid-run

    report = await asyncio.wait_for(run, 550)
    assert report.ok and report.unacked == 0, report
    assert rt.handlers["dlq"].batches == []
    assert len(rt.handlers["src"].committed) == 3  # every event acknowledged
    [job] = handler.status()["recent"]
    assert [a["state"] for a in job["attempts"]] == ["killed", "succeeded"]
    assert "SIGKILL" in job["attempts"][0]["error"]
    assert job["rows_out"] == 10
    assert rt.metrics.value("spark_job_failures", "spark") == 1
    assert rt.metrics.value("spark_jobs_succeeded", "spark") == 1
    # the job's output was read and removed from the lake
    assert [st.name for st in await lake.fs.list_status(lake.features)] == []
    # no scratch space left behind, not even the killed run's
    assert list(tmp_path.iterdir()) == []

    for recording, x in (("GaCo01_01", x1), ("GaPt03_01", x2)):
        stored = await asyncio.to_thread(
            lambda r=recording: list(session.execute(
                f"SELECT * FROM {keyspace}.features WHERE recording = %s", (r,))))
        expected = expected_features(recording, x)
        assert [r["window_key"] for r in stored] == list(expected.index)  # 5 windows
        assert [r["seq_first"] for r in stored] == [0, 500, 1000, 1500, 2000]
        got = np.array([[r[name] for name in mlf.FEATURE_NAMES] for r in stored], dtype=float)
        np.testing.assert_allclose(got, expected[list(mlf.FEATURE_NAMES)].to_numpy(),
                                   rtol=1e-9, atol=1e-12, equal_nan=True)


@pytest.mark.timeout(600)
async def test_corrupt_segment_is_retried_then_dead_lettered_with_the_driver_error(
        lake: Lake, gaitpdb: Callable[[str, int], np.ndarray]) -> None:
    x = gaitpdb("GaPt05_01", 2000)
    rows = await lake.put_recording("GaPt05_01", x, [0, 1000, 2000], final=False)
    bad = f"{lake.raw}/date={DATE}/recording=GaPt05_01/part-0000002000-0000002999.parquet"
    await lake.fs.create(bad, b"PAR1 definitely not a parquet file " * 20)
    rows.append({"path": bad, "recording": "GaPt05_01", "seq_first": 2000, "seq_last": 2999,
                 "rows": 1000, "final": True})
    rt = Runtime.from_dict({
        "runtime": {"admin_enabled": False, "drain_timeout": 500},
        "dead_letter": {"target": "dlq"},
        "handlers": {
            "src": {"type": "memory_source", "rows": rows, "batch_size": 3,
                    "outputs": ["spark"]},
            "spark": spark_section(lake, outputs=["sink"]),
            "sink": {"type": "memory_sink", "on_failure": "stop"},
            "dlq": {"type": "memory_sink"},
        }})
    report = await asyncio.wait_for(rt.run(), 550)
    assert report.ok and report.unacked == 0, report  # dead-lettered counts as handled
    assert rt.handlers["sink"].row_count == 0
    dead = [r for b in rt.handlers["dlq"].batches for r in b.to_pylist()]
    assert sorted(json.loads(r["payload"])["path"] for r in dead) == sorted(
        r["path"] for r in rows)  # every event of the job
    reason = dead[0]["reason"]
    assert "failed after 2 attempt(s)" in reason
    assert "is not a Parquet file" in reason and "part-0000002000-0000002999.parquet" in reason
    assert dead[0]["handler"] == "spark"
    assert dead[0]["exception"].startswith("SparkJobError")
    assert "driver output (tail)" in dead[0]["exception"]
    assert "Traceback" in dead[0]["exception"]
    [job] = rt.handlers["spark"].status()["recent"]  # type: ignore[attr-defined]
    assert [a["state"] for a in job["attempts"]] == ["failed", "failed"]
    assert all(a["exit_code"] == 1 for a in job["attempts"])
    assert rt.metrics.value("spark_jobs_dead_lettered", "spark") == 1
