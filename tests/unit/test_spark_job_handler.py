"""spark_job handler against a fake spark-submit (a script) and a fake WebHDFS + Spark
REST API (an aiohttp server over a directory): triggers, acks, retries, dead letters,
timeouts, kills, exclusivity, shutdown, status. The real Spark runs are in
tests/integration/test_spark_job.py."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from handlers.spark_job import SparkJob, SparkJobSettings
from pipeline import Runtime, SettingsError

FAKE_SUBMIT = textwrap.dedent('''\
    #!{python}
    """A stand-in for spark-submit: follows the plan file, one action per run."""
    import json, os, subprocess, sys, time
    from urllib.parse import urlsplit

    root, plan_file = os.environ["FAKE_ROOT"], os.environ["FAKE_PLAN"]
    args = sys.argv[1:]
    if "--spec-json" in args:
        spec = json.loads(args[args.index("--spec-json") + 1])
    else:
        url = args[args.index("--spec") + 1]
        spec = json.loads(open(root + urlsplit(url).path).read())
    turn = 0
    while True:  # claim the next turn atomically (runs may be concurrent)
        try:
            os.close(os.open(f"{{plan_file}}.turn{{turn}}", os.O_CREAT | os.O_EXCL))
            break
        except FileExistsError:
            turn += 1
    plan = json.load(open(plan_file))
    action = plan[turn] if turn < len(plan) else "ok"
    with open(os.path.join(root, "..", "calls.jsonl"), "a") as log:
        log.write(json.dumps({{"turn": turn, "action": action, "pid": os.getpid(),
                               "start": time.time(), "argv": args, "spec": spec,
                               "env": {{k: os.environ.get(k) for k in (
                                   "PYSPARK_PYTHON", "SPARK_LOCAL_IP", "FAKE_EXTRA")}}}}) + "\\n")
    def say(event, **kw):
        print("@gaitflow " + json.dumps({{"event": event, **kw}}), flush=True)
    say("started", app_id=f"app-{{turn}}", ui=os.environ["FAKE_UI"])
    print("some driver log line", file=sys.stderr, flush=True)
    if action.startswith("sleep"):
        time.sleep(float(action.split(":")[1]))
        action = "ok"
    if action == "hang":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open(os.path.join(root, "..", f"child{{turn}}.pid"), "w").write(str(child.pid))
        time.sleep(600)
    if action == "fail":
        print("Traceback (most recent call last):", file=sys.stderr)
        print('  File "features_job.py", line 1, in run', file=sys.stderr)
        print("pyspark.errors.SparkRuntimeException: part-9.parquet is not a Parquet file",
              file=sys.stderr, flush=True)
        say("failed", error="SparkRuntimeException: part-9.parquet is not a Parquet file")
        sys.exit(1)
    if action.startswith("fail_rec:"):  # the error names the corrupt segment's path
        bad = f"hdfs://fake:8020/lake/raw/date=1/recording={{action[9:]}}/part-7.parquet"
        print(f"Caused by: java.lang.RuntimeException: {{bad}} is not a Parquet file",
              file=sys.stderr, flush=True)
        say("failed", error=f"Py4JJavaError: ... | {{bad}} is not a Parquet file")
        sys.exit(1)
    if action.startswith("vanish:"):  # a listed segment was merged away before the read
        gone = f"hdfs://fake:8020/lake/raw/date=1/recording={{action[7:]}}/part-3.parquet"
        print(f"org.apache.spark.SparkFileNotFoundException: [FAILED_READ_FILE.FILE_NOT_EXIST]"
              f" File {{gone}} does not exist. It is possible the underlying files have been "
              "updated.", file=sys.stderr, flush=True)
        say("failed", error=f"SparkFileNotFoundException: File {{gone}} does not exist")
        sys.exit(1)
    if action == "crash":
        print("java.lang.OutOfMemoryError: Java heap space", file=sys.stderr, flush=True)
        sys.exit(3)
    out = root + urlsplit(spec["output"]).path
    if action != "nosuccess":
        import pyarrow as pa, pyarrow.parquet as pq
        os.makedirs(out, exist_ok=True)
        rows = [dict(recording=r, window=k, window_key=f"{{r}}:{{k}}", seq_first=500 * k,
                     seq_last=500 * k + 999, f1=float(k)) for r in spec["recordings"]
                for k in range(2)]
        pq.write_table(pa.Table.from_pylist(rows), os.path.join(out, "part-00000.parquet"))
        open(os.path.join(out, "_SUCCESS"), "w").close()
    say("done", job_id=spec["job_id"], rows=0, recordings=len(spec["recordings"]))
''')


class FakeCluster:
    """WebHDFS (a directory) and the driver's REST API, on one aiohttp server."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.fs = base / "fs"
        self.fs.mkdir()
        self.url = ""
        self.polls = 0

    def local(self, path: str) -> Path:
        return self.fs / path.lstrip("/")

    async def webhdfs(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["path"]
        op, target = request.query.get("op"), self.local(path)
        missing = web.json_response({"RemoteException": {
            "exception": "FileNotFoundException", "message": f"File {path} does not exist."}},
            status=404)
        if op in ("GETFILESTATUS", "LISTSTATUS") and not target.exists():
            return missing
        if op == "GETFILESTATUS":
            return web.json_response({"FileStatus": self._status(target, "")})
        if op == "LISTSTATUS":
            entries = sorted(target.iterdir()) if target.is_dir() else [target]
            return web.json_response({"FileStatuses": {"FileStatus": [
                self._status(e, e.name if target.is_dir() else "") for e in entries]}})
        if op == "OPEN":
            return web.Response(body=target.read_bytes()) if target.is_file() else missing
        if op == "CREATE":
            if "leg" not in request.query:
                raise web.HTTPTemporaryRedirect(str(request.url.update_query(leg="2")))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(await request.read())
            return web.Response(status=201)
        if op == "MKDIRS":
            target.mkdir(parents=True, exist_ok=True)
            return web.json_response({"boolean": True})
        if op == "DELETE":
            existed = target.exists()
            if target.is_dir():
                import shutil
                shutil.rmtree(target)
            elif existed:
                target.unlink()
            return web.json_response({"boolean": existed})
        return web.json_response({"RemoteException": {"exception": "UnsupportedOperation",
                                                      "message": op}}, status=400)

    @staticmethod
    def _status(p: Path, suffix: str) -> dict[str, Any]:
        return {"pathSuffix": suffix, "type": "DIRECTORY" if p.is_dir() else "FILE",
                "length": p.stat().st_size if p.is_file() else 0, "modificationTime": 0}

    async def jobs(self, request: web.Request) -> web.Response:
        self.polls += 1
        return web.json_response([
            {"jobId": 0, "status": "SUCCEEDED", "numTasks": 2, "numCompletedTasks": 2,
             "numSkippedTasks": 0, "numFailedTasks": 0, "stageIds": [0],
             "numCompletedStages": 1, "numSkippedStages": 0},
            {"jobId": 1, "status": "RUNNING", "numTasks": 8, "numCompletedTasks": 3,
             "numSkippedTasks": 0, "numFailedTasks": 1, "stageIds": [1, 2],
             "numCompletedStages": 1, "numSkippedStages": 0}])

    def calls(self) -> list[dict[str, Any]]:
        log = self.base / "calls.jsonl"
        if not log.exists():
            return []
        return sorted((json.loads(ln) for ln in log.read_text().splitlines()),
                      key=lambda c: c["turn"])


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[FakeCluster]:
    fake = FakeCluster(tmp_path)
    app = web.Application()
    app.router.add_route("*", "/webhdfs/v1/{path:.*}", fake.webhdfs)
    app.router.add_get("/api/v1/applications/{app}/jobs", fake.jobs)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    fake.url = f"http://{host}:{port}"
    yield fake
    await runner.cleanup()


@pytest.fixture
def spark(tmp_path: Path, cluster: FakeCluster) -> Callable[..., dict[str, Any]]:
    """``spark(plan, **settings)`` → the spark_job section, using the fake spark-submit."""
    script = tmp_path / "spark-submit"
    script.write_text(FAKE_SUBMIT.format(python=sys.executable))
    script.chmod(0o755)

    def section(plan: list[str] = (), **overrides: Any) -> dict[str, Any]:
        plan_file = tmp_path / "plan.json"
        plan_file.write_text(json.dumps(list(plan)))
        base: dict[str, Any] = {
            "type": "spark_job", "spark_submit": str(script),
            "webhdfs_url": f"{cluster.url}/webhdfs/v1", "hdfs_url": "hdfs://fake:8020",
            "features_root": "/features", "poll_interval": 0.1, "kill_grace": 1.0,
            "max_wait": 60.0, "outputs": ["sink"],
            "job_retry": {"max_attempts": 2, "backoff": 0.05, "jitter": 0.0},
            "env": {"FAKE_ROOT": str(cluster.fs), "FAKE_PLAN": str(plan_file),
                    "FAKE_UI": cluster.url, "FAKE_EXTRA": "yes"},
        }
        return base | overrides

    return section


@pytest.fixture
def build(make_runtime: Callable[..., Runtime]) -> Callable[..., Runtime]:
    """``build(handlers, **runtime)``: a runtime that gives slow fake runs time to drain."""

    def make(handlers: dict[str, dict[str, Any]], **runtime: Any) -> Runtime:
        return make_runtime(handlers, runtime={"drain_timeout": 60, **runtime})

    return make


def events(recording: str, n: int, *, final_last: bool = True, root: str = "/lake/raw",
           first: int = 0) -> list[dict[str, Any]]:
    return [{"path": f"{root}/date=2026-12-04/recording={recording}/"
                     f"part-{1000 * i:010d}-{1000 * i + 999:010d}.parquet",
             "recording": recording, "seq_first": 1000 * i, "seq_last": 1000 * i + 999,
             "rows": 1000, "final": final_last and i == first + n - 1}
            for i in range(first, first + n)]


def pipeline(spark_section: dict[str, Any], rows: list[dict[str, Any]], **source: Any,
             ) -> dict[str, dict[str, Any]]:
    return {
        "src": {"type": "memory_source", "rows": rows, "batch_size": 2, "outputs": ["spark"],
                **source},
        "spark": spark_section,
        "sink": {"type": "memory_sink", "on_failure": "stop"},
    }


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead too
        return f.read().split(")")[-1].split()[0] != "Z"


async def wait_for(predicate: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


# ----------------------------------------------------------------------------- settings


def test_settings_defaults() -> None:
    s = SparkJobSettings()
    assert s.master == "local[*]" and s.features == "windows" and s.on_shutdown == "wait"
    assert s.job_retry.max_attempts == 3 and s.job_retry.backoff == 10.0


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("on_shutdown", "later", "on_shutdown"),
    ("features", "fancy", "features"),
    ("hdfs_url", "127.0.0.1:8020", "needs a scheme"),
    ("webhdfs_url", "ftp://x", "http(s)"),
    ("features_root", "relative/path", "absolute path"),
    ("max_segments", 0, "max_segments"),
    ("job_retry", {"max_attempts": 0}, "max_attempts"),
    ("bogus", 1, "unknown key"),
])
def test_settings_rejected(key: str, value: Any, needle: str) -> None:
    with pytest.raises(SettingsError, match=None) as info:
        Runtime.from_dict({"runtime": {"admin_enabled": False}, "handlers": {
            "spark": {"type": "spark_job", key: value, "outputs": ["sink"],
                      "on_failure": "stop"},
            "sink": {"type": "memory_sink", "on_failure": "stop"}}})
    assert needle in str(info.value)


# ----------------------------------------------------------------------------- the flow


async def test_features_emitted_per_recording_and_events_committed(
        build: Callable[..., Runtime], spark: Callable[..., dict[str, Any]],
        cluster: FakeCluster) -> None:
    rows = events("GaCo01_01", 3) + events("GaPt03_01", 2, final_last=False)
    rt = build(pipeline(spark(["ok"], trigger_on_final=False), rows))  # one job
    report = await rt.run()
    assert report.ok and report.unacked == 0, report
    assert len(rt.handlers["src"].committed) == 3  # every event acknowledged upstream
    batches = rt.handlers["sink"].batches
    assert {b.meta["recording"]: b.meta["final"] for b in batches} == {
        "GaCo01_01": True, "GaPt03_01": False}
    for b in batches:
        assert b.key == "window_key"
        assert b.data.column("window_key").to_pylist() == [f"{b.meta['recording']}:0",
                                                           f"{b.meta['recording']}:1"]
        assert b.schema.names[:5] == ["recording", "window", "window_key", "seq_first",
                                      "seq_last"]
    [call] = cluster.calls()
    spec = call["spec"]
    assert spec["recordings"] == ["GaCo01_01", "GaPt03_01"]
    assert spec["inputs"] == [  # every segment of each recording, not only the new ones
        "hdfs://fake:8020/lake/raw/date=*/recording=GaCo01_01",
        "hdfs://fake:8020/lake/raw/date=*/recording=GaPt03_01"]
    # the recording that ended is read whole; a vanished file of the other is skipped
    assert spec["complete_inputs"] == ["hdfs://fake:8020/lake/raw/date=*/recording=GaCo01_01"]
    assert spec["output"] == f"hdfs://fake:8020/features/job={spec['job_id']}"
    assert "--spec-json" in call["argv"] and "--py-files" in call["argv"]
    assert call["env"]["FAKE_EXTRA"] == "yes" and call["env"]["PYSPARK_PYTHON"]
    assert not cluster.local(f"/features/job={spec['job_id']}").exists()  # cleaned up
    m = rt.metrics
    assert m.value("spark_job_attempts", "spark") == 1
    assert m.value("spark_jobs_succeeded", "spark") == 1
    assert m.value("spark_feature_rows", "spark") == 4
    assert m.value("spark_jobs_running", "spark") == 0


async def test_paths_with_a_scheme_and_large_specs_via_hdfs(
        build: Callable[..., Runtime], spark: Callable[..., dict[str, Any]],
        cluster: FakeCluster) -> None:
    rows = events("GaCo02_01", 1, root="hdfs://other:9000/lake")
    rt = build(pipeline(spark(["ok"], spec_inline_max=0, keep_outputs=True), rows))
    assert (await rt.run()).ok
    [call] = cluster.calls()
    assert "--spec" in call["argv"] and "--spec-json" not in call["argv"]
    assert call["spec"]["inputs"] == [
        "hdfs://other:9000/lake/date=*/recording=GaCo02_01"]
    job = call["spec"]["job_id"]
    assert not cluster.local(f"/features/_specs/{job}.json").exists()  # spec removed
    assert cluster.local(f"/features/job={job}/_SUCCESS").exists()      # output kept
    assert rt.handlers["sink"].row_count == 2


async def test_malformed_events_are_dead_lettered(
        build: Callable[..., Runtime], spark: Callable[..., dict[str, Any]]) -> None:
    good = events("GaCo01_01", 1)
    bad = [
        {"path": "/lake/raw/date=1/recording=../x/part-1.parquet", "recording": "../x"},
        {"path": "/lake/raw/recording=GaCo01_01/part-1.parquet", "recording": "GaCo01_01"},
        {"path": "/lake/raw/date=1/recording=Other/part-1.parquet", "recording": "GaCo01_01"},
        {"path": "/lake/raw/date=*/recording=GaCo01_01/part-1.parquet",
         "recording": "GaCo01_01"},
    ]
    rt = build(pipeline(spark(["ok"]), good + bad, batch_size=5))
    report = await rt.run()
    assert report.ok and report.unacked == 0
    dead = [r for b in rt.handlers["dlq"].batches for r in b.to_pylist()]
    assert len(dead) == 4
    reason = dead[0]["reason"]
    assert "unsafe or missing recording id" in reason and "is not a lake segment" in reason
    assert "does not belong to recording" in reason
    assert rt.handlers["sink"].row_count == 2


async def test_not_segment_events_rejected_whole(
        build: Callable[..., Runtime], spark: Callable[..., dict[str, Any]]) -> None:
    rt = build(pipeline(spark(), [{"seq": 1, "value": 2.0}]))
    assert (await rt.run()).ok
    [row] = rt.handlers["dlq"].batches[0].to_pylist()
    assert "not a segment event" in row["reason"]


# ----------------------------------------------------------------------------- failures


async def test_failing_job_is_retried_then_dead_lettered_with_driver_error(
        build: Callable[..., Runtime], spark: Callable[..., dict[str, Any]],
        cluster: FakeCluster) -> None:
    rows = events("GaPt05_02", 2)
    rt = build(pipeline(spark(["fail", "fail"]), rows))
    report = await rt.run()
    assert report.ok and report.unacked == 0  # dead-lettered counts as handled
    assert [c["action"] for c in cluster.calls()] == ["fail", "fail"]
    dead = [r for b in rt.handlers["dlq"].batches for r in b.to_pylist()]
    assert len(dead) == 2  # one per segment event
    assert "failed after 2 attempt(s)" in dead[0]["reason"]
    assert "is not a Parquet file" in dead[0]["reason"]
    assert dead[0]["exception"].startswith("SparkJobError")
    assert "Traceback (most recent call last)" in dead[0]["exception"]  # stderr tail
    assert json.loads(dead[0]["payload"])["recording"] == "GaPt05_02"
    assert rt.handlers["sink"].row_count == 0
    m = rt.metrics
    assert m.value("spark_job_failures", "spark") == 2
    assert m.value("spark_jobs_dead_lettered", "spark") == 1


async def test_only_the_recording_named_by_the_error_is_dead_lettered(
        build: Callable[..., Runtime], spark: Callable[..., dict[str, Any]],
        cluster: FakeCluster) -> None:
    rows = events("GaCo10_01", 2) + events("GaPt10_01", 1)
    rt = build(pipeline(spark(["fail_rec:GaPt10_01"] * 2 + ["ok"], trigger_on_final=False),
                        rows))
    report = await rt.run()
    assert report.ok and report.unacked == 0
    dead = [r for b in rt.handlers["dlq"].batches for r in b.to_pylist()]
    assert [json.loads(r["payload"])["recording"] for r in dead] == ["GaPt10_01"]
    assert "recording=GaPt10_01/part-7.parquet is not a Parquet file" in dead[0]["reason"]
    [batch] = rt.handlers["sink"].batches  # the healthy recording, rerun alone
    assert batch.meta["recording"] == "GaCo10_01" and batch.num_rows == 2
    calls = cluster.calls()
    assert [c["spec"]["recordings"] for c in calls] == [
        ["GaCo10_01", "GaPt10_01"], ["GaCo10_01", "GaPt10_01"], ["GaCo10_01"]]
    top, child = rt.handlers["spark"].status()["recent"]  # type: ignore[attr-defined]
    assert top["state"] == "isolating" and child["parent"] == top["job_id"]
    assert child["state"] == "succeeded"


async def test_unattributed_failure_splits_the_job_per_recording(
        build: Callable[..., Runtime], spark: Callable[..., dict[str, Any]],
        cluster: FakeCluster) -> None:
    rows = events("GaCo11_01", 1) + events("GaPt11_01", 1)
    rt = build(pipeline(spark(["fail", "fail", "fail", "ok"], trigger_on_final=False), rows))
    assert (await rt.run()).ok
    calls = cluster.calls()
    assert [c["spec"]["recordings"] for c in calls] == [
        ["GaCo11_01", "GaPt11_01"], ["GaCo11_01", "GaPt11_01"], ["GaCo11_01"], ["GaPt11_01"]]
    dead = [r for b in rt.handlers["dlq"].batches for r in b.to_pylist()]
    assert [json.loads(r["payload"])["recording"] for r in dead] == ["GaCo11_01"]
    assert "failed after 1 attempt(s)" in dead[0]["reason"]
    assert [b.meta["recording"] for b in rt.handlers["sink"].batches] == ["GaPt11_01"]


async def test_input_replaced_during_the_run_is_rerun_without_using_an_attempt(
        build: Callable[..., Runtime], spark: Callable[..., dict[str, Any]],
        cluster: FakeCluster) -> None:
    # one attempt allowed: two vanished-file runs must not spend it, nor dead-letter
    section = spark(["vanish:GaCo12_01", "vanish:GaCo12_01", "ok"],
                    job_retry={"max_attempts": 1, "backoff": 0.05, "jitter": 0.0})
    rt = build(pipeline(section, events("GaCo12_01", 2)))
    report = await rt.run()
    assert report.ok and report.unacked == 0
    assert rt.handlers["dlq"].batches == []
    assert rt.handlers["sink"].row_count == 2
    assert [c["action"] for c in cluster.calls()] == ["vanish:GaCo12_01"] * 2 + ["ok"]
    [job] = rt.handlers["spark"].status()["recent"]
    assert [a["state"] for a in job["attempts"]] == ["inputs_changed"] * 2 + ["succeeded"]
    m = rt.metrics
    assert m.value("spark_job_input_reruns", "spark") == 2
    assert m.value("spark_job_failures", "spark") == 0


async def test_input_reruns_are_bounded_then_count_as_failures(
        build: Callable[..., Runtime], spark: Callable[..., dict[str, Any]],
        cluster: FakeCluster) -> None:
    # endless reruns are no better than a failure
    section = spark(["vanish:GaCo13_01"] * 3, max_input_reruns=1,
                    job_retry={"max_attempts": 2, "backoff": 0.05, "jitter": 0.0})
    rt = build(pipeline(section, events("GaCo13_01", 1)))
    assert (await rt.run()).ok
    assert len(cluster.calls()) == 3  # 1 rerun + 2 attempts
    [dead] = [r for b in rt.handlers["dlq"].batches for r in b.to_pylist()]
    assert "failed after 2 attempt(s)" in dead["reason"] and "does not exist" in dead["reason"]


async def test_a_vanished_file_of_another_recording_is_a_plain_failure(
        build: Callable[..., Runtime], spark: Callable[..., dict[str, Any]]) -> None:
    other = spark(["vanish:Other_01", "ok"],
                  job_retry={"max_attempts": 2, "backoff": 0.05, "jitter": 0.0})
    rt2 = build(pipeline(other, events("GaCo14_01", 1)))
    assert (await rt2.run()).ok
    assert rt2.metrics.value("spark_job_input_reruns", "spark") == 0
    assert rt2.metrics.value("spark_job_failures", "spark") == 1


async def test_crash_without_report_is_retried_and_succeeds(
        build: Callable[..., Runtime], spark: Callable[..., dict[str, Any]]) -> None:
    rt = build(pipeline(spark(["crash", "ok"]), events("GaCo03_01", 1)))
    assert (await rt.run()).ok
    assert rt.handlers["sink"].row_count == 2
    [job] = rt.handlers["spark"].status()["recent"]
    first, second = job["attempts"]
    assert first["state"] == "failed" and first["exit_code"] == 3
    assert "exit status 3" in first["error"] and "OutOfMemoryError" in first["error"]
    assert second["state"] == "succeeded"


async def test_missing_success_marker_is_a_failure(
        build: Callable[..., Runtime], spark: Callable[..., dict[str, Any]]) -> None:
    rt = build(pipeline(spark(["nosuccess", "ok"]), events("GaCo03_01", 1)))
    assert (await rt.run()).ok
    [job] = rt.handlers["spark"].status()["recent"]
    assert "no _SUCCESS marker" in job["attempts"][0]["error"]
    assert rt.handlers["sink"].row_count == 2


async def test_timeout_kills_the_process_group(
        build: Callable[..., Runtime], spark: Callable[..., dict[str, Any]],
        tmp_path: Path) -> None:
    rt = build(pipeline(spark(["hang", "ok"], job_timeout=3), events("GaCo04_01", 1)))
    assert (await rt.run()).ok
    [job] = rt.handlers["spark"].status()["recent"]
    first = job["attempts"][0]
    assert first["state"] == "timed_out" and "timed out after 3 s" in first["error"]
    assert not alive(first["pid"])
    assert not alive(int((tmp_path / "child0.pid").read_text()))  # the whole group
    assert rt.metrics.value("spark_job_timeouts", "spark") == 1
    assert rt.handlers["sink"].row_count == 2


async def test_killed_job_is_detected_and_retried(
        build: Callable[..., Runtime], spark: Callable[..., dict[str, Any]],
        cluster: FakeCluster) -> None:
    rt = build(pipeline(spark(["hang", "ok"]), events("GaCo05_01", 1)))
    run = asyncio.create_task(rt.run())
    handler: SparkJob = rt.handlers["spark"]  # type: ignore[assignment]

    def progressed() -> dict[str, Any] | None:
        running = handler.status()["running"]
        if running and running[0]["attempts"]:
            attempt = running[0]["attempts"][-1]
            return attempt if attempt["tasks_total"] else None
        return None

    attempt = await wait_for(progressed)
    assert cluster.polls > 0  # progress came from the REST API
    os.kill(attempt["pid"], signal.SIGKILL)
    report = await asyncio.wait_for(run, 30)
    assert report.ok
    [job] = handler.status()["recent"]
    assert job["attempts"][0]["state"] == "killed"
    assert "SIGKILL" in job["attempts"][0]["error"]
    assert job["state"] == "succeeded" and rt.handlers["sink"].row_count == 2


# ----------------------------------------------------------------------------- scheduling


async def test_a_recording_is_never_in_two_running_jobs(
        build: Callable[..., Runtime], spark: Callable[..., dict[str, Any]],
        cluster: FakeCluster) -> None:
    # one event every 0.3 s, a job per event (max_segments=1) that takes 1 s, 2 slots
    rows = [*events("GaCo06_01", 1, final_last=False), *events("GaPt06_01", 1, final_last=False),
            *events("GaCo06_01", 2, first=1)]
    section = spark(["sleep:1"] * 4, max_segments=1, max_jobs=2, max_wait=60.0)
    rt = build(pipeline(section, rows, batch_size=1, interval=0.3))
    assert (await rt.run()).ok
    calls = cluster.calls()
    spans: dict[str, list[tuple[float, float]]] = {}
    handler: SparkJob = rt.handlers["spark"]  # type: ignore[assignment]
    for job in handler.status()["recent"]:
        [rec] = job["recordings"]
        call = next(c for c in calls if c["spec"]["job_id"] == job["job_id"])
        spans.setdefault(rec, []).append((call["start"], call["start"] + 1.0))
    # GaPt06_01 ran beside GaCo06_01 (disjoint recordings, two slots)...
    assert len(spans["GaPt06_01"]) == 1
    # ...but GaCo06_01's later segments waited for its running job, then went together
    co = sorted(spans["GaCo06_01"])
    assert len(co) == 2 and co[1][0] >= co[0][1] - 0.05
    assert len(calls) == 3 and rt.handlers["sink"].row_count == 6
    assert len(rt.handlers["src"].committed) == 4


class _Recorder(SparkJob):
    """Records launches instead of running jobs."""

    launched: list[list[str]]

    def _start_job(self, job: Any) -> None:
        self.launched.append(sorted(seg.path for seg in job.segments))


def _add(h: SparkJob, rec: str, n: int, final: bool = False, age: float = 0.0) -> None:
    from handlers.spark_job import _Segment

    for i in range(n):
        path = f"/l/date=1/recording={rec}/part-{len(h._pending)}-{i}.parquet"
        h._pending[path] = _Segment(path, rec, "hdfs://x/l", final and i == n - 1,
                                    time.monotonic() - age, [])


def test_triggers() -> None:
    h = _Recorder("spark", SparkJobSettings(max_segments=3, max_wait=30, max_jobs=1))
    h.launched = []
    _add(h, "A", 2)
    delay = h._launch_ready()
    assert h.launched == [] and delay is not None and 29 < delay <= 30  # waiting for T
    _add(h, "B", 1)                                                       # N reached
    assert h._launch_ready() is None and len(h.launched) == 1 and not h._pending
    _add(h, "C", 1, final=True)                                           # recording end
    h._launch_ready()
    assert len(h.launched) == 2
    _add(h, "D", 1, age=31)                                               # T reached
    h._launch_ready()
    assert len(h.launched) == 3
    h2 = _Recorder("spark", SparkJobSettings(trigger_on_final=False, max_segments=5))
    h2.launched = []
    _add(h2, "E", 1, final=True)
    h2._launch_ready()
    assert h2.launched == []
    h2._flushing = True                                                   # drain: everything
    h2._launch_ready()
    assert len(h2.launched) == 1


async def test_intake_waits_when_too_many_segments_pend(
        build: Callable[..., Runtime], spark: Callable[..., dict[str, Any]]) -> None:
    rows = events("GaCo07_01", 6, final_last=False)
    # at most 2 pending: the third event waits until a job took the first two
    section = spark(["sleep:0.5"] * 3, max_pending=2, max_segments=2, max_wait=60.0)
    rt = build(pipeline(section, rows, batch_size=1))
    assert (await rt.run()).ok
    handler: SparkJob = rt.handlers["spark"]  # type: ignore[assignment]
    assert [j["segments"] for j in handler.status()["recent"]] == [2, 2, 2]
    assert rt.metrics.value("spark_pending_segments", "spark") == 0


# ----------------------------------------------------------------------------- shutdown, status


async def test_shutdown_cancel_kills_the_job_and_leaves_events_unacked(
        build: Callable[..., Runtime], spark: Callable[..., dict[str, Any]],
        cluster: FakeCluster, tmp_path: Path) -> None:
    section = spark(["hang"], on_shutdown="cancel", max_wait=60.0)
    # a source that keeps going (its generated rows are rejected: not segment events)
    rt = build(pipeline(section, events("GaCo08_01", 2), forever=True, interval=0.5),
               drain_timeout=1)
    run = asyncio.create_task(rt.run())
    handler: SparkJob = rt.handlers["spark"]  # type: ignore[assignment]
    await wait_for(lambda: (tmp_path / "child0.pid").exists())
    pid = cluster.calls()[0]["pid"]
    rt.request_stop("test")
    report = await asyncio.wait_for(run, 30)
    assert report.unacked >= 1  # the events are redelivered after a restart
    assert ("rows", 0, 2) not in rt.handlers["src"].committed
    assert not alive(pid) and not alive(int((tmp_path / "child0.pid").read_text()))
    assert handler.status()["recent"][0]["state"] == "cancelled"


async def test_status_health_and_admin_route(
        build: Callable[..., Runtime], spark: Callable[..., dict[str, Any]]) -> None:
    section = spark(["sleep:2"])
    rt = build(pipeline(section, events("GaCo09_01", 1)), admin_enabled=True, admin_port=0,
               admin_extensions=["handlers.spark_job:admin_routes"])
    run = asyncio.create_task(rt.run())
    handler: SparkJob = rt.handlers["spark"]  # type: ignore[assignment]
    await wait_for(lambda: any(bar["total"] for bar in handler.status()["progress"]))
    connected, detail = handler.health()
    assert connected and "attempt 1/2" in detail and "/10 tasks" in detail
    assert rt.metrics.value("spark_tasks_total", "spark") == 10
    assert rt.metrics.value("spark_jobs_running", "spark") == 1
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{rt.admin_url}/api/spark_jobs") as resp:
            body = await resp.json()
        async with session.get(f"{rt.admin_url}/api/status") as resp:
            status = await resp.json()
    [running] = body["spark"]["running"]
    [bar] = body["spark"]["progress"]  # drawn by the dashboard
    assert bar["done"] == 5 and bar["total"] == 10
    assert running["attempts"][0]["app_id"] == "app-0"
    assert running["attempts"][0]["stages_total"] == 3
    assert "tasks" in status["handlers"]["spark"]["detail"]
    assert (await asyncio.wait_for(run, 30)).ok
