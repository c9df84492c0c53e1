"""spark_job: turns committed lake segments into window features with a Spark job it
launches and monitors, and emits the feature rows downstream.

Input: "segment committed" events (handlers/README.md §3: ``path``, ``recording``,
``seq_first``, ``seq_last``, ``rows``, ``final``), from ``lake_sink``'s ``segments``
output or a ``kafka_source`` reading ``gaitflow.segments``. Output (``default``):
window features (§4), one batch per recording, key ``window_key``, ``meta`` with
``recording``, ``final`` (the recording ended and the batch holds all its windows)
and ``job_id``.

Behaviour
    Pending segments start a job when ``max_segments`` are waiting, when the oldest
    waited ``max_wait`` seconds, or at once when a recording ends (``final``). A job
    reads *every* committed segment of each affected recording
    (``<root>/date=*/recording=<id>/part-*.parquet``), so windows that cross segment
    boundaries come out right; recomputed windows keep their ``window_key``. The job
    is ``spark/features_job.py``, run by ``spark-submit`` with the ``ml`` package
    shipped as a zip in ``--py-files`` (the features are ``ml.features``' own
    functions) and its spec passed as an argument (or, when large, as a file on
    HDFS): nothing depends on a local file system, so a cluster ``master`` works
    unchanged. It writes ``<features_root>/job=<job_id>/`` with Spark's
    ``_SUCCESS`` marker; the handler then reads that Parquet through WebHDFS,
    emits it, and deletes it (``keep_outputs = false``).

    Monitoring: the job announces its application id and driver UI; the handler
    polls the Spark REST API there (``/api/v1/applications/<id>/jobs``) every
    ``poll_interval`` for jobs, stages and tasks done of total, and watches the
    exit status. Metrics (``gaitflow_spark_*{handler=...}``): jobs running, tasks
    and stages done/total of the running job(s), pending segments, last job
    seconds, attempts, failures, timeouts, dead-lettered jobs, feature rows.
    ``/api/status`` shows a one-line summary in the handler's ``detail``; the admin
    extension ``handlers.spark_job:admin_routes`` adds ``/api/spark_jobs`` with
    every job's progress and errors (``[runtime] admin_extensions``).

    Failures: a run that exits non-zero, is killed, exceeds ``job_timeout`` (its
    process group is killed) or whose output cannot be read is retried per
    ``job_retry`` (backoff with jitter). When the attempts are spent, the segment
    events go to dead letter with the driver's error (reason: the job's one-line
    error; exception: plus the tail of the driver's stderr, Java frames left out),
    but only those of the recordings at fault: in a job over several recordings,
    the recordings the error names (a corrupt file's path) are dead-lettered and
    the others rerun without them; an error naming none reruns each recording
    alone, once.

    Segment files replaced while a run reads them: the lake sink rewrites a live
    recording's partial file every ``roll_interval`` (handlers/README.md §3). A
    run skips a listed file that is gone when read (Spark's ``ignoreMissingFiles``):
    the replacing file has its own event, so a later run covers its rows, and
    windows are never computed across a gap. The recordings whose final segment
    the run covers are read whole instead (``complete_inputs`` of the job spec:
    their windows go out as ``final``); if one of their files vanishes, the run is
    rerun at once, up to ``max_input_reruns`` times, without counting as a failed
    attempt, and the next listing sees the new file. Malformed events (missing
    columns, unsafe ids, a path outside the lake layout) are rejected to dead
    letter at once.

    Shutdown: ``on_shutdown = "wait"`` runs a last job over everything pending and
    waits for it (bounded by ``[runtime] drain_timeout``); ``"cancel"`` kills the
    running job and leaves its events uncommitted. ``close()`` always kills what
    still runs (SIGTERM to the process group, SIGKILL after ``kill_grace``).

Guarantees
    * A segment event is committed only after the feature rows of its recording
      were committed by every sink downstream (or the event was dead-lettered):
      at-least-once. Rows are keyed by ``window_key``, deterministic from the
      samples, so upserting sinks make it effectively once.
    * A segment is in at most one running job, and a recording in at most one
      running job: events arriving for a recording whose job runs wait for the next
      job. Job ids are derived from the segment set, so a rerun overwrites its own
      output.
    * Nothing is kept across restarts: uncommitted events are redelivered by the
      upstream (channel source, Kafka) and recomputed.
    * Intake stops (backpressure) once ``max_pending`` segments wait.

Settings: see :class:`SparkJobSettings` (``python run.py --describe spark_job``)::

    [handlers.features]
    type = "spark_job"
    master = "local[*]"                 # or spark://host:7077, yarn: nothing else changes
    hdfs_url = "hdfs://127.0.0.1:8020"
    webhdfs_url = "http://127.0.0.1:9870/webhdfs/v1"
    features_root = "/gaitflow/features"
    max_segments = 50                   # triggers: N segments, T seconds, recording end
    max_wait = 60
    job_timeout = 1800
    job_retry = { max_attempts = 3, backoff = 10 }
    on_shutdown = "wait"
    outputs = ["cassandra", "model"]
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

import aiohttp
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import Batch, Deferred, Processor, Reject, RetryPolicy, setting

from .spark_submit import (
    SparkAttempt,
    SparkSubmitter,
    build_ml_zip,
    job_script,
    read_features,
)
from .webhdfs import WebHdfs, WebHdfsError

__all__ = ["JobRetry", "SparkAttempt", "SparkJob", "SparkJobError", "SparkJobSettings",
           "SparkSubmitter", "admin_routes", "build_ml_zip", "read_features",
           "run_features_job"]

_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_GLOB = r"*?\[\]{}\\"
# [scheme://authority]/root.../date=<d>/recording=<id>/<file>.parquet  (README §1, §3)
_SEGMENT_PATH = re.compile(
    rf"^(?P<fs>[A-Za-z][A-Za-z0-9+.-]*://[^/{_GLOB}]+)?(?P<root>(?:/[^/{_GLOB}]+)*?)"
    rf"/date=[^/{_GLOB}]+/recording=(?P<recording>[^/]+)/[^/{_GLOB}]+\.parquet$")


#: seconds between lake probes while disconnected
REPROBE_S = 5.0
# a file listed by the job was deleted before it was read (Spark's error class, Hadoop's),
# on the line that names the file
_VANISHED = re.compile(r"FAILED_READ_FILE\.FILE_NOT_EXIST|FileNotFoundException")
INPUT_RERUN_DELAY_S = 2.0


@dataclasses.dataclass(frozen=True)
class JobRetry(RetryPolicy):
    """Retries of a failed Spark job (a whole spark-submit run)."""

    max_attempts: int = setting(3, doc="runs per job, the first included", min=1)
    backoff: float = setting(10.0, doc="seconds before the first rerun", min=0)
    max_backoff: float = setting(300.0, doc="ceiling of the delay between runs", min=0)


@dataclasses.dataclass(frozen=True)
class SparkJobSettings:
    """``[handlers.<name>]`` of ``type = "spark_job"``."""

    master: str = setting("local[*]", doc="Spark master: local[*], spark://host:7077, yarn...")
    spark_submit: Path | None = setting(
        None, doc="spark-submit to run (default: the one pyspark installed beside this Python)")
    python: Path | None = setting(
        None, doc="Python of the driver and executors, with numpy and pandas "
                  "(default: this interpreter)")
    driver_memory: str = setting("1g", doc="spark.driver.memory")
    shuffle_partitions: int = setting(8, doc="spark.sql.shuffle.partitions", min=1)
    ui_port: int = setting(0, doc="driver UI / REST API port (0: a free port, announced "
                                  "by the job)", min=0, max=65535)
    spark_conf: dict[str, str] = setting(
        {}, doc="extra --conf key = value for spark-submit (override the defaults)")
    env: dict[str, str] = setting({}, doc="extra environment variables for spark-submit")
    hdfs_url: str = setting("hdfs://127.0.0.1:8020",
                            doc="file system Spark reads and writes; event paths without a "
                                "scheme are on it")
    webhdfs_url: str = setting("http://127.0.0.1:9870/webhdfs/v1",
                               doc="WebHDFS endpoint of that file system (outputs, job specs)")
    hdfs_user: str | None = setting(None, doc="WebHDFS user.name (default: the current user)")
    features_root: str = setting("/gaitflow/features",
                                 doc="lake directory of job outputs: <root>/job=<job_id>/")
    features: Literal["windows", "baseline"] = setting(
        "windows", doc="windows: ml.features.features_frame; baseline: the tutorial's "
                       "per-100-row means (ml.features.baseline_frame)")
    window_s: float = setting(10.0, doc="window length, seconds", min=0.02)
    step_s: float = setting(5.0, doc="window step, seconds", min=0.01)
    max_segments: int = setting(50, doc="start a job once this many segments are pending",
                                min=1)
    max_wait: float = setting(60.0, doc="... or once the oldest pending segment waited this "
                                        "many seconds", min=0)
    trigger_on_final: bool = setting(True, doc="... or at once when a recording ends")
    max_pending: int = setting(10000, doc="pending segments beyond which intake waits", min=1)
    max_jobs: int = setting(1, doc="jobs running at once (over disjoint recordings)", min=1)
    job_timeout: float = setting(1800.0, doc="seconds a run may take before its process "
                                             "group is killed", min=1)
    job_retry: JobRetry = setting(JobRetry(), doc="reruns of a failed job (max_attempts, "
                                                  "backoff, max_backoff, multiplier, jitter)")
    poll_interval: float = setting(2.0, doc="seconds between Spark REST API polls", min=0.1)
    kill_grace: float = setting(5.0, doc="seconds between SIGTERM and SIGKILL when killing a "
                                         "run", min=0)
    on_shutdown: Literal["wait", "cancel"] = setting(
        "wait", doc="wait: finish pending work before stopping; cancel: kill the running job "
                    "(its events stay uncommitted and are redelivered)")
    keep_outputs: bool = setting(False, doc="keep each job's features directory after emitting")
    spec_inline_max: int = setting(32768, doc="bytes of job spec passed as an argument; a "
                                              "larger spec goes to <features_root>/_specs/",
                                   min=0)
    stderr_lines: int = setting(40, doc="driver stderr lines kept for errors and dead letters",
                                min=5)
    max_input_reruns: int = setting(
        5, doc="reruns of a job whose input file vanished while it ran (the lake sink "
               "replaced it by a merged one), not counted as failed attempts", min=0)
    scratch_dir: Path | None = setting(
        None, doc="where each run gets its own Spark scratch directory (spark.local.dir: "
                  "block manager, shuffle and Python files), removed when the run ends, "
                  "killed or not (default: the system temporary directory)")

    def __post_init__(self) -> None:
        if "://" not in self.hdfs_url:
            raise ValueError(f"hdfs_url {self.hdfs_url!r} needs a scheme (hdfs://host:port)")
        if not self.webhdfs_url.startswith(("http://", "https://")):
            raise ValueError(f"webhdfs_url {self.webhdfs_url!r} must be an http(s) URL")
        if not self.features_root.startswith("/") or re.search(f"[{_GLOB}]",
                                                               self.features_root):
            raise ValueError(f"features_root {self.features_root!r} must be an absolute path "
                             "without glob characters")


class SparkJobError(Exception):
    """A Spark job kept failing; the message ends with the tail of the driver's stderr."""


async def run_features_job(spec: dict[str, Any], settings: SparkJobSettings | None = None,
                           on_progress: Callable[[SparkAttempt], None] | None = None,
                           ) -> tuple[SparkAttempt, pa.Table | None]:
    """One run of ``spark/features_job.py`` outside a pipeline (benchmarks, tests):
    ``spec`` as the job takes it; returns the attempt and, on success, the features
    read back through WebHDFS from ``spec["output"]`` (left in place)."""
    s = settings or SparkJobSettings()
    with tempfile.TemporaryDirectory(prefix="gaitflow-spark-") as tmp:
        async with aiohttp.ClientSession() as session:
            submitter = SparkSubmitter(s, build_ml_zip(Path(tmp)), session, on_progress)
            attempt = await submitter.run(SparkAttempt(spec["job_id"], 1),
                                          ["--spec-json", json.dumps(spec)])
            if not attempt.ok:
                return attempt, None
        async with WebHdfs(s.webhdfs_url, user=s.hdfs_user) as hdfs:
            return attempt, await read_features(hdfs, urlsplit(spec["output"]).path)


# ----------------------------------------------------------------------------- the handler


@dataclasses.dataclass(eq=False)
class _Segment:
    path: str
    recording: str
    root: str  # file system URL + lake root, e.g. hdfs://127.0.0.1:8020/gaitflow/raw
    final: bool
    arrived: float
    deferreds: list[Deferred]


@dataclasses.dataclass(eq=False)
class _Job:
    job_id: str
    segments: list[_Segment]
    state: str = "queued"  # queued running backoff emitting succeeded dead_lettered cancelled
    attempts: list[SparkAttempt] = dataclasses.field(default_factory=list)
    rows_out: int = 0
    parent: str | None = None  # the job this one was split from
    spec_path: str | None = None  # a spec written to HDFS (large jobs)
    created: float = dataclasses.field(default_factory=time.monotonic)
    task: asyncio.Task[None] | None = None
    active: _Job | None = None  # the (sub-)job running now

    @property
    def recordings(self) -> list[str]:
        return sorted({seg.recording for seg in self.segments})

    @property
    def final(self) -> set[str]:
        return {seg.recording for seg in self.segments if seg.final}

    def as_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "state": self.state, "parent": self.parent,
                "segments": len(self.segments), "recordings": self.recordings,
                "rows_out": self.rows_out,
                "age_seconds": round(time.monotonic() - self.created, 3),
                "attempts": [a.as_dict() for a in self.attempts]}


class SparkJob(Processor):
    """Segment events in, Spark-computed window features out (see the module docs)."""

    Settings: ClassVar[type] = SparkJobSettings
    settings: SparkJobSettings

    def __init__(self, name: str, settings: SparkJobSettings | None = None) -> None:
        super().__init__(name, settings)
        self._pending: dict[str, _Segment] = {}
        self._running: dict[str, _Job] = {}
        self._history: collections.deque[_Job] = collections.deque(maxlen=20)
        self._flushing = False
        self._tmp: Path | None = None
        self._session: aiohttp.ClientSession | None = None
        self._hdfs: WebHdfs | None = None
        self._submitter: SparkSubmitter | None = None
        self._scheduler: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._pulse: asyncio.Event | None = None  # set (and replaced) on every state change
        self._m: dict[str, Any] = {}

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        submit = s.spark_submit or Path(sys.executable).parent / "spark-submit"
        if not os.access(submit, os.X_OK):
            raise RuntimeError(f"spark-submit not found or not executable: {submit}")
        job_script()
        self._tmp = Path(tempfile.mkdtemp(prefix=f"gaitflow-{self.name}-"))
        try:
            py_files = await asyncio.to_thread(build_ml_zip, self._tmp)
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300))
            self._hdfs = WebHdfs(s.webhdfs_url, user=s.hdfs_user, on_state=self._hdfs_state)
            await self._hdfs.open_session()
        except BaseException:
            if self._session is not None:
                await self._session.close()
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise
        self._submitter = SparkSubmitter(s, py_files, self._session, self._progress)
        m = self.metrics
        self._m = {
            "running": m.gauge("spark_jobs_running", "Spark jobs running now"),
            "pending": m.gauge("spark_pending_segments", "Segments waiting for a job"),
            "tasks_done": m.gauge("spark_tasks_done", "Tasks done in the running job(s)"),
            "tasks_total": m.gauge("spark_tasks_total", "Tasks known in the running job(s)"),
            "stages_done": m.gauge("spark_stages_done", "Stages done in the running job(s)"),
            "stages_total": m.gauge("spark_stages_total", "Stages of the running job(s)"),
            "last_seconds": m.gauge("spark_last_job_seconds", "Duration of the last run"),
            "attempts": m.counter("spark_job_attempts", "spark-submit runs started"),
            "succeeded": m.counter("spark_jobs_succeeded", "Jobs whose features were emitted"),
            "failures": m.counter("spark_job_failures", "Runs that failed (retried or not)"),
            "timeouts": m.counter("spark_job_timeouts", "Runs killed for exceeding job_timeout"),
            "dead": m.counter("spark_jobs_dead_lettered", "Jobs whose events went to dead "
                                                          "letter"),
            "rows": m.counter("spark_feature_rows", "Feature rows emitted"),
            "input_reruns": m.counter("spark_job_input_reruns", "Runs repeated because an "
                                      "input file was replaced while they ran"),
        }
        self._wake, self._pulse = asyncio.Event(), asyncio.Event()
        await self._probe_hdfs()  # before the scheduler: it re-probes while disconnected
        self._scheduler = asyncio.create_task(self._schedule(), name=f"{self.name}:scheduler")
        self.log.info("spark_job.started", master=s.master, features=s.features,
                      features_root=s.features_root, py_files=str(py_files))

    async def _probe_hdfs(self) -> None:
        assert self._hdfs is not None
        try:  # a hint for /readyz only: jobs retry the lake on their own
            async with asyncio.timeout(5):
                await self._hdfs.get_file_status("/")
            self.set_connected(True)
        except (WebHdfsError, TimeoutError) as exc:
            self.set_connected(False, f"WebHDFS {self.settings.webhdfs_url}: "
                                      f"{exc or 'no answer within 5 s'}")

    def _hdfs_state(self, connected: bool, detail: str) -> None:
        self.set_connected(connected, f"WebHDFS: {detail}" if detail else "")

    async def drain(self) -> None:
        if self.settings.on_shutdown == "cancel":
            await self._cancel_jobs()
            return
        self._flushing = True
        assert self._wake is not None
        self._wake.set()
        await self._wait_until(lambda: not self._pending and not self._running)

    async def close(self) -> None:
        if self._scheduler is not None:
            self._scheduler.cancel()
            await asyncio.gather(self._scheduler, return_exceptions=True)
        await self._cancel_jobs()
        if self._hdfs is not None:
            await self._hdfs.close()
        if self._session is not None:
            await self._session.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    async def _cancel_jobs(self) -> None:
        tasks = [job.task for job in self._running.values() if job.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- intake -----------------------------------------------------------------------
    async def process(self, batch: Batch) -> None:
        table = batch.data
        names = table.schema.names
        missing = [c for c in ("path", "recording") if c not in names]
        if missing:
            raise Reject(f"not a segment event (handlers/README.md §3): no column(s) {missing}")
        paths = table.column("path").to_pylist()
        recordings = table.column("recording").to_pylist()
        finals = (table.column("final").to_pylist() if "final" in names
                  else [False] * table.num_rows)
        bad: dict[str, list[int]] = {}
        for i, (path, rec, final) in enumerate(zip(paths, recordings, finals, strict=True)):
            root, problem = self._locate(path, rec)
            if problem:
                bad.setdefault(problem, []).append(i)
                continue
            await self._wait_for_room()
            seg = self._pending.get(path)
            if seg is None:
                seg = self._pending[path] = _Segment(path, rec, root, bool(final),
                                                     time.monotonic(), [])
            seg.final |= bool(final)
            seg.deferreds.append(self.defer(batch.take([i])))
        self._gauges()
        assert self._wake is not None
        self._wake.set()
        if bad:
            rows = sorted(i for idx in bad.values() for i in idx)
            raise Reject("; ".join(bad)[:1000], rows=rows)

    def _locate(self, path: Any, recording: Any) -> tuple[str, str | None]:
        """``(fs URL + lake root, None)`` for a valid event, else ``("", problem)``."""
        if not isinstance(recording, str) or not _ID.fullmatch(recording) or ".." in recording:
            return "", f"unsafe or missing recording id {recording!r}"
        m = _SEGMENT_PATH.match(path) if isinstance(path, str) else None
        if m is None:
            return "", f"path {path!r} is not a lake segment (<root>/date=*/recording=*/*.parquet)"
        if m["recording"] != recording:
            return "", f"path {path!r} does not belong to recording {recording!r}"
        return (m["fs"] or self.settings.hdfs_url.rstrip("/")) + m["root"], None

    async def _wait_for_room(self) -> None:
        await self._wait_until(lambda: len(self._pending) < self.settings.max_pending)

    async def _wait_until(self, ready: Callable[[], bool]) -> None:
        while not ready():
            assert self._pulse is not None
            await self._pulse.wait()

    def _signal(self) -> None:
        """Wake everything waiting in ``_wait_until`` (intake backpressure, drain)."""
        if self._pulse is not None:
            pulse, self._pulse = self._pulse, asyncio.Event()
            pulse.set()

    # -- scheduling -------------------------------------------------------------------
    async def _schedule(self) -> None:
        assert self._wake is not None
        while True:
            self._wake.clear()
            delay = self._launch_ready()
            if not self._connected:  # re-probe the lake, or /readyz stays false without traffic
                delay = REPROBE_S if delay is None else min(delay, REPROBE_S)
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass
            if not self._connected and self._hdfs is not None:
                await self._probe_hdfs()

    def _launch_ready(self) -> float | None:
        """Start every job the triggers allow; the seconds until the next timed trigger."""
        s = self.settings
        while len(self._running) < s.max_jobs:
            busy = {r for job in self._running.values() for r in job.recordings}
            ready = [seg for seg in self._pending.values() if seg.recording not in busy]
            if not ready:
                return None
            oldest = min(seg.arrived for seg in ready)
            wait = oldest + s.max_wait - time.monotonic()
            if not (self._flushing or len(ready) >= s.max_segments or wait <= 0
                    or (s.trigger_on_final and any(seg.final for seg in ready))):
                return wait
            for seg in ready:
                del self._pending[seg.path]
            job = _Job(self._job_id(ready), ready)
            self.log.info("spark_job.queued", job_id=job.job_id, segments=len(ready),
                          recordings=len(job.recordings))
            self._start_job(job)
            self._gauges()
            self._signal()
        return None

    def _start_job(self, job: _Job) -> None:
        self._running[job.job_id] = job
        job.task = asyncio.create_task(self._run_job(job), name=f"{self.name}:{job.job_id}")

    # -- one job ----------------------------------------------------------------------
    async def _run_job(self, job: _Job) -> None:
        try:
            await self._settle(job, self.settings.job_retry.max_attempts, job)
        except asyncio.CancelledError:
            job.state = "cancelled"
            self.log.warning("spark_job.cancelled", job_id=job.job_id)
            raise
        except Exception as exc:  # noqa: BLE001 - a bug here must not strand the events
            self.log.error("spark_job.crashed", job_id=job.job_id,
                           error=f"{type(exc).__name__}: {exc}")
            open_segments = [seg for seg in job.segments
                             if any(d.pending for d in seg.deferreds)]
            await self._give_up(_Job(job.job_id, open_segments),
                                f"spark_job crashed: {type(exc).__name__}: {exc}", exc)
        finally:
            self._running.pop(job.job_id, None)
            self._history.append(job)
            self._gauges()
            if self._wake is not None:
                self._wake.set()
            self._signal()

    async def _settle(self, job: _Job, attempts: int, top: _Job) -> None:
        """Run ``job``; when it keeps failing, dead-letter only the recordings at fault.

        A corrupt segment must not take the other recordings of its job down: the
        recordings the driver's error names are dead-lettered and the others rerun;
        when it names none, each recording reruns alone, once.
        """
        top.active = job
        if await self._attempts(job, attempts):
            return
        reason, error = self._failure(job)
        recordings = job.recordings
        if len(recordings) == 1:
            await self._give_up(job, reason, error)
            return
        last = job.attempts[-1]
        text = f"{last.error}\n" + "\n".join(last.tail)
        culprits = {r for r in recordings
                    if re.search(rf"recording={re.escape(r)}(?![A-Za-z0-9_.-])", text)}
        if culprits and len(culprits) < len(recordings):
            job.state = "isolating"
            bad = [seg for seg in job.segments if seg.recording in culprits]
            await self._give_up(_Job(job.job_id, bad, parent=top.job_id), reason, error)
            rest = [seg for seg in job.segments if seg.recording not in culprits]
            await self._child(rest, self.settings.job_retry.max_attempts, top)
        else:
            job.state = "split"
            self.log.warning("spark_job.split", job_id=job.job_id, recordings=len(recordings))
            for rec in recordings:
                await self._child([seg for seg in job.segments if seg.recording == rec], 1, top)

    async def _child(self, segments: list[_Segment], attempts: int, top: _Job) -> None:
        child = _Job(self._job_id(segments), segments, parent=top.job_id)
        try:
            await self._settle(child, attempts, top)
        finally:
            self._history.append(child)

    def _job_id(self, segments: list[_Segment]) -> str:
        """Deterministic from the segment set: a rerun overwrites its own output."""
        features = self.settings.features
        text = "\n".join([features, *sorted(seg.path for seg in segments)])
        return features[0] + hashlib.sha256(text.encode()).hexdigest()[:20]

    def _failure(self, job: _Job) -> tuple[str, SparkJobError]:
        last = job.attempts[-1]
        failed = sum(a.state != "inputs_changed" for a in job.attempts)
        reason = (f"spark job {job.job_id} failed after {failed} attempt(s): "
                  f"{last.error}")
        tail = last.stderr_tail(self.settings.stderr_lines)
        return reason, SparkJobError(
            f"{last.error}\n--- driver output (tail) ---\n{tail}" if tail else str(last.error))

    async def _attempts(self, job: _Job, attempts: int) -> bool:
        """Run the job until it succeeds (features emitted, True) or ``attempts`` ran."""
        policy = self.settings.job_retry
        assert self._submitter is not None
        number, reruns = 1, 0
        while number <= attempts:
            attempt = SparkAttempt(job.job_id, number)
            job.attempts.append(attempt)
            job.state = "running"
            self._m["attempts"].inc()
            self.log.info("spark_job.submit", job_id=job.job_id, attempt=number, of=attempts,
                          segments=len(job.segments), recordings=len(job.recordings))
            features: pa.Table | None = None
            try:
                await self._submitter.run(attempt, await self._job_args(job))
                if attempt.ok:
                    features = await self._read_output(job)
                    self.set_connected(True)
            except (WebHdfsError, OSError, pa.ArrowException) as exc:
                attempt.state, attempt.error = "failed", f"lake I/O: {type(exc).__name__}: {exc}"
            self._m["last_seconds"].set(round(attempt.seconds, 3))
            if attempt.ok and features is not None:
                job.state = "emitting"
                await self._deliver(job, features)
                await self._cleanup(job)
                job.state = "succeeded"
                self._m["succeeded"].inc()
                self.log.info("spark_job.succeeded", job_id=job.job_id, attempt=number,
                              seconds=round(attempt.seconds, 1), rows=job.rows_out,
                              recordings=len(job.recordings))
                return True
            if (attempt.state == "failed" and reruns < self.settings.max_input_reruns
                    and self._inputs_vanished(job, attempt)):
                # the lake sink merged segments while Spark read them: not a failure,
                # the next listing sees the merged file (README §3)
                reruns += 1
                attempt.state = "inputs_changed"
                self._m["input_reruns"].inc()
                self.log.info("spark_job.inputs_changed", job_id=job.job_id, rerun=reruns,
                              of=self.settings.max_input_reruns, error=attempt.error)
                job.state = "backoff"
                await asyncio.sleep(min(policy.delay(1), INPUT_RERUN_DELAY_S))
                continue
            self._m["failures"].inc()
            if attempt.state == "timed_out":
                self._m["timeouts"].inc()
            self.log.warning("spark_job.failed", job_id=job.job_id, attempt=number, of=attempts,
                             state=attempt.state, error=attempt.error,
                             exit_code=attempt.exit_code)
            if number < attempts:
                job.state = "backoff"
                await asyncio.sleep(policy.delay(number))
            number += 1
        job.state = "failed"
        return False

    @staticmethod
    def _inputs_vanished(job: _Job, attempt: SparkAttempt) -> bool:
        """Did the run fail because a segment file of its recordings disappeared?"""
        lines = [ln for ln in (attempt.error or "", *attempt.tail) if _VANISHED.search(ln)]
        return any(re.search(rf"recording={re.escape(r)}/[^/\s]+\.parquet", ln)
                   for ln in lines for r in job.recordings)

    async def _job_args(self, job: _Job) -> list[str]:
        s = self.settings
        def directory(seg: _Segment) -> str:
            return f"{seg.root}/date=*/recording={seg.recording}"

        spec = {
            "job_id": job.job_id,
            "inputs": sorted({directory(seg) for seg in job.segments}),
            # read whole: the recordings whose final windows this run emits
            "complete_inputs": sorted({directory(seg) for seg in job.segments if seg.final}),
            "output": f"{s.hdfs_url.rstrip('/')}{s.features_root}/job={job.job_id}",
            "features": s.features,
            "window_s": s.window_s,
            "step_s": s.step_s,
            "recordings": job.recordings,
        }
        text = json.dumps(spec, separators=(",", ":"))
        if len(text.encode()) <= s.spec_inline_max:
            return ["--spec-json", text]
        assert self._hdfs is not None
        job.spec_path = f"{s.features_root}/_specs/{job.job_id}.json"
        await self._hdfs.create(job.spec_path, text.encode())
        return ["--spec", f"{s.hdfs_url.rstrip('/')}{job.spec_path}"]

    async def _read_output(self, job: _Job) -> pa.Table:
        assert self._hdfs is not None
        directory = f"{self.settings.features_root}/job={job.job_id}"
        table = await read_features(self._hdfs, directory)
        if table is None:
            raise WebHdfsError("LISTSTATUS", directory, "the job left no _SUCCESS marker")
        return table

    async def _deliver(self, job: _Job, table: pa.Table) -> None:
        by_recording: dict[str, pa.Table] = {}
        if table.num_rows:
            table = table.sort_by([("recording", "ascending"), ("window", "ascending")])
            recs = table.column("recording")
            for rec in pc.unique(recs).to_pylist():
                by_recording[rec] = table.filter(pc.equal(recs, rec))
        final = job.final
        for rec in job.recordings:
            parents = [d for seg in job.segments if seg.recording == rec for d in seg.deferreds]
            rows = by_recording.get(rec)
            if rows is not None and rows.num_rows:
                await self.emit(rows, key="window_key", parents=parents,
                                meta={"recording": rec, "final": rec in final,
                                      "job_id": job.job_id})
                job.rows_out += rows.num_rows
                self._m["rows"].inc(rows.num_rows)
            for d in parents:
                d.commit()

    async def _cleanup(self, job: _Job) -> None:
        s = self.settings
        assert self._hdfs is not None
        targets = [job.spec_path] if job.spec_path else []
        if not s.keep_outputs:
            targets.append(f"{s.features_root}/job={job.job_id}")
        for path in targets:
            try:
                await self._hdfs.delete(path, recursive=True)
            except WebHdfsError as exc:
                self.log.warning("spark_job.cleanup_failed", path=path, error=str(exc))

    async def _give_up(self, job: _Job, reason: str, error: BaseException) -> None:
        job.state = "dead_lettered"
        self._m["dead"].inc()
        self.log.error("spark_job.dead_letter", job_id=job.job_id, reason=reason,
                       segments=len(job.segments))
        for seg in job.segments:
            for d in seg.deferreds:
                try:
                    await d.fail(error, reason)
                except Exception as exc:  # noqa: BLE001 - the runtime is stopping: redelivered
                    self.log.error("spark_job.dead_letter_failed", path=seg.path,
                                   error=f"{type(exc).__name__}: {exc}")

    # -- progress and status ----------------------------------------------------------
    def _progress(self, attempt: SparkAttempt) -> None:
        self._gauges()

    def _gauges(self) -> None:
        if not self._m:
            return
        current = [j.active or j for j in self._running.values()]
        attempts = [j.attempts[-1] for j in current if j.attempts]
        self._m["running"].set(len(self._running))
        self._m["pending"].set(len(self._pending))
        for key in ("tasks_done", "tasks_total", "stages_done", "stages_total"):
            self._m[key].set(sum(getattr(a, key) for a in attempts))

    def health(self) -> tuple[bool, str]:
        connected, detail = super().health()
        return connected, "; ".join(p for p in (detail, self._summary()) if p)

    def _summary(self) -> str:
        parts = []
        for top in self._running.values():
            job = top.active or top
            a = job.attempts[-1] if job.attempts else None
            text = f"job {job.job_id} {job.state}"
            if a is not None:
                text += (f" (attempt {a.number}/{self.settings.job_retry.max_attempts}, "
                         f"{a.tasks_done}/{a.tasks_total} tasks, "
                         f"{a.stages_done}/{a.stages_total} stages)")
            parts.append(text)
        parts.append(f"{len(self._pending)} segment(s) pending")
        return "; ".join(parts)

    def status(self) -> dict[str, Any]:
        """Jobs running and recent, pending segments: what ``/api/spark_jobs`` and the
        dashboard show (``progress``: tasks done of total of each running job)."""
        progress = []
        for top in self._running.values():
            job = top.active or top
            if job.attempts:
                a = job.attempts[-1]
                progress.append({"done": a.tasks_done, "total": a.tasks_total,
                                 "label": f"job {job.job_id} attempt {a.number} tasks"})
        return {"pending_segments": len(self._pending), "progress": progress,
                "running": [j.as_dict() for j in self._running.values()],
                "recent": [j.as_dict() for j in reversed(self._history)]}


def admin_routes(app: Any, runtime: Any) -> None:
    """Admin extension (``[runtime] admin_extensions = ["handlers.spark_job:admin_routes"]``):
    ``GET /api/spark_jobs`` -> ``{handler: status}`` of every spark_job handler."""
    from aiohttp import web

    async def spark_jobs(request: web.Request) -> web.Response:
        body = {name: h.status() for name, h in runtime.handlers.items()
                if isinstance(h, SparkJob)}
        return web.json_response(body, dumps=lambda d: json.dumps(d, default=str, indent=1))

    app.router.add_get("/api/spark_jobs", spark_jobs)
