"""Launching and watching one run of ``spark/features_job.py`` with spark-submit.

Used by the ``spark_job`` handler (:mod:`handlers.spark_job`, which owns the
settings, triggers, retries and dead letters) and by benchmarks: the command line
and environment of a run, the ``ml`` package shipped as ``--py-files``, and
:class:`SparkSubmitter`, which starts spark-submit in its own process group, reads
the job's ``@gaitflow`` stdout events and the tail of its output, polls the Spark
REST API of the driver it announced, enforces the timeout and kills the whole
process group on timeout or cancellation.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pyarrow as pa
import pyarrow.parquet as pq

from .webhdfs import NotFound, WebHdfs

if TYPE_CHECKING:
    from .spark_job import SparkJobSettings

__all__ = ["ANNOUNCE", "SparkAttempt", "SparkSubmitter", "build_ml_zip", "job_script",
           "read_features", "submit_command", "submit_env"]

ANNOUNCE = "@gaitflow "  # spark/features_job.py's stdout protocol (kept in step with it)


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name!r} not found on sys.path")
    return Path(next(iter(spec.submodule_search_locations)))


def build_ml_zip(dest_dir: Path) -> Path:
    """``ml.zip`` for ``--py-files``: the ``ml`` package's sources (``__init__`` added)."""
    src = _package_dir("ml")
    path = dest_dir / "ml.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for directory in sorted({src, *(p.parent for p in src.rglob("*.py"))}):
            if "__pycache__" in directory.parts:
                continue
            rel = directory.relative_to(src.parent).as_posix()
            if not (directory / "__init__.py").exists():
                zf.writestr(f"{rel}/__init__.py", "")
            for f in sorted(directory.glob("*.py")):
                zf.write(f, f"{rel}/{f.name}")
    return path


def job_script() -> Path:
    """``spark/features_job.py``, installed beside this package (not looked up as the
    module ``spark``: a script named ``spark.py``, like ``bench/spark.py``, shadows it)."""
    path = Path(__file__).resolve().parent.parent / "spark" / "features_job.py"
    if not path.is_file():
        raise RuntimeError(f"the Spark job is missing: {path}")
    return path


def _is_local(master: str) -> bool:
    return master == "local" or master.startswith("local[")


def submit_command(s: SparkJobSettings, job_args: list[str], py_files: Path,
                   app_name: str, local_dir: Path | None = None) -> list[str]:
    """The spark-submit command line of one run; ``local_dir`` is its scratch
    directory (``spark.local.dir``), unless ``spark_conf`` names one."""
    python = str(s.python or sys.executable)
    conf = {
        "spark.app.name": app_name,
        "spark.driver.memory": s.driver_memory,
        "spark.sql.shuffle.partitions": str(s.shuffle_partitions),
        # one recording per group is CPU-bound Python: keep every shuffle partition
        # rather than letting AQE merge them into one task on one core
        "spark.sql.adaptive.coalescePartitions.enabled": "false",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        # list the lake's directories on the driver (cheap on HDFS) rather than in a
        # Spark job of one task per directory once there are more than 32
        "spark.sql.sources.parallelPartitionDiscovery.threshold": "10000",
        "spark.ui.enabled": "true",
        "spark.ui.port": str(s.ui_port),
        "spark.ui.showConsoleProgress": "false",
        "spark.log.level": "WARN",
        "spark.pyspark.python": python,
        "spark.pyspark.driver.python": python,
    }
    if _is_local(s.master):
        conf |= {"spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1"}
    if local_dir is not None:
        conf["spark.local.dir"] = str(local_dir)
    conf |= s.spark_conf
    submit = str(s.spark_submit or Path(sys.executable).parent / "spark-submit")
    argv = [submit, "--master", s.master, "--name", app_name, "--py-files", str(py_files)]
    for key, value in conf.items():
        argv += ["--conf", f"{key}={value}"]
    return [*argv, str(job_script()), *job_args]


def submit_env(s: SparkJobSettings, local_dir: Path | None = None) -> dict[str, str]:
    """The environment of one run; ``local_dir`` as in :func:`submit_command` (also the
    driver's ``TMPDIR``, for the files Python writes)."""
    python = str(s.python or sys.executable)
    env = dict(os.environ)
    env |= {"PYSPARK_PYTHON": python, "PYSPARK_DRIVER_PYTHON": python, "PYTHONUNBUFFERED": "1"}
    if local_dir is not None and "spark.local.dir" not in s.spark_conf:
        env |= {"SPARK_LOCAL_DIRS": str(local_dir), "TMPDIR": str(local_dir)}
    if s.spark_submit is None and "SPARK_HOME" not in env:
        env["SPARK_HOME"] = str(_package_dir("pyspark"))
    if _is_local(s.master):
        env.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    return env | s.env


@dataclasses.dataclass(eq=False)
class SparkAttempt:
    """One spark-submit run and what is known of it."""

    job_id: str
    number: int
    state: str = "starting"  # starting running succeeded failed timed_out killed cancelled
    pid: int | None = None
    app_id: str | None = None
    ui: str | None = None
    started: float = dataclasses.field(default_factory=time.monotonic)
    seconds: float = 0.0
    exit_code: int | None = None
    error: str | None = None
    result: dict[str, Any] | None = None
    spark_jobs: int = 0
    tasks_done: int = 0
    tasks_total: int = 0
    tasks_failed: int = 0
    stages_done: int = 0
    stages_total: int = 0
    tail: collections.deque[str] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=400), repr=False)

    @property
    def ok(self) -> bool:
        return self.state == "succeeded"

    def stderr_tail(self, lines: int = 40) -> str:
        """The driver's last lines, from its last Python traceback when there is one,
        without Java stack frames (the exception and its causes remain)."""
        text = list(self.tail)
        start = max((i for i, ln in enumerate(text) if ln.startswith("Traceback")), default=-1)
        chosen = [ln for ln in (text[start:] if start >= 0 else text)
                  if not ln.lstrip().startswith(("at ", "... "))]
        return "\n".join(chosen[-lines:])

    def as_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("number", "state", "pid", "app_id", "ui",
                                           "exit_code", "error", "spark_jobs", "tasks_done",
                                           "tasks_total", "tasks_failed", "stages_done",
                                           "stages_total")}
        d["seconds"] = round(self.seconds or time.monotonic() - self.started, 3)
        return d


class SparkSubmitter:
    """Runs spark-submit for one job spec and watches it to the end.

    Reads the job's ``@gaitflow`` stdout events, keeps the tail of its output, polls
    the Spark REST API of the driver it announced, enforces the timeout and kills
    the whole process group (driver, Python workers) on timeout or cancellation.
    """

    def __init__(self, settings: SparkJobSettings, py_files: Path,
                 session: aiohttp.ClientSession,
                 on_progress: Callable[[SparkAttempt], None] | None = None) -> None:
        self.s, self.py_files, self.session = settings, py_files, session
        self.on_progress = on_progress or (lambda a: None)

    async def run(self, attempt: SparkAttempt, job_args: list[str]) -> SparkAttempt:
        """Run one attempt to its end. Its scratch directory (see
        :attr:`SparkJobSettings.scratch_dir`) is removed afterwards whatever happened:
        a killed JVM never runs the shutdown hook that would clean it."""
        s = self.s
        if s.scratch_dir is not None:
            s.scratch_dir.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f"gaitflow-spark-{attempt.job_id}-{attempt.number}-",
                                        dir=s.scratch_dir))
        try:
            return await self._run(attempt, job_args, scratch)
        finally:
            await asyncio.to_thread(shutil.rmtree, scratch, ignore_errors=True)

    async def _run(self, attempt: SparkAttempt, job_args: list[str], scratch: Path) -> SparkAttempt:
        s = self.s
        argv = submit_command(s, job_args, self.py_files, f"gaitflow-features-{attempt.job_id}",
                              scratch)
        attempt.started = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=submit_env(s, scratch),
                start_new_session=True, limit=1 << 20)
        except OSError as exc:
            attempt.state, attempt.error = "failed", f"cannot run {argv[0]}: {exc}"
            return attempt
        attempt.pid = proc.pid
        assert proc.stdout is not None and proc.stderr is not None
        readers = [asyncio.create_task(self._read(proc.stdout, attempt, events=True)),
                   asyncio.create_task(self._read(proc.stderr, attempt, events=False))]
        poller = asyncio.create_task(self._poll(attempt))
        try:
            async with asyncio.timeout(s.job_timeout):
                await _exited(proc)
        except TimeoutError:
            attempt.state = "timed_out"
            attempt.error = f"timed out after {s.job_timeout:g} s; process group killed"
            await self._kill(proc)
        except asyncio.CancelledError:
            attempt.state, attempt.error = "cancelled", "cancelled; process group killed"
            await self._kill(proc)
            raise
        finally:
            poller.cancel()
            _killpg(proc.pid, signal.SIGKILL)  # stragglers (Python workers) of a finished run
            _, late = await asyncio.wait(readers, timeout=5)
            for task in (*late, poller):
                task.cancel()
            await asyncio.gather(*readers, poller, return_exceptions=True)
            attempt.seconds = time.monotonic() - attempt.started
            attempt.exit_code = proc.returncode
        self._classify(attempt)
        self.on_progress(attempt)
        return attempt

    @staticmethod
    def _classify(a: SparkAttempt) -> None:
        code = a.exit_code
        if a.state == "timed_out":
            return
        if code == 0 and a.result is not None:
            a.state, a.error = "succeeded", None
        elif code is not None and code < 0:
            a.state = "killed"
            a.error = f"spark-submit killed by {signal.Signals(-code).name}" + (
                f" ({a.error})" if a.error else "")
        else:
            a.state = "failed"
            if not a.error:
                last = next((ln for ln in reversed(a.tail) if "Error" in ln or "Exception" in ln),
                            None)
                a.error = f"exit status {code}" + (f": {last.strip()}" if last else "")

    async def _read(self, stream: asyncio.StreamReader, a: SparkAttempt, events: bool) -> None:
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # an over-long line: keep its start
                raw = await stream.read(1 << 16)
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip()
            if events and line.startswith(ANNOUNCE):
                self._event(a, line[len(ANNOUNCE):])
            elif line:
                a.tail.append(line)

    def _event(self, a: SparkAttempt, text: str) -> None:
        try:
            ev = json.loads(text)
        except ValueError:
            return
        kind = ev.get("event")
        if kind == "started":
            a.state, a.app_id, a.ui = "running", ev.get("app_id"), ev.get("ui")
        elif kind == "done":
            a.result = ev
        elif kind == "failed":
            a.error = str(ev.get("error") or "")[:2000]
        self.on_progress(a)

    async def _poll(self, a: SparkAttempt) -> None:
        timeout = aiohttp.ClientTimeout(total=max(self.s.poll_interval, 2.0))
        while True:
            await asyncio.sleep(self.s.poll_interval)
            if not a.ui or not a.app_id:
                continue
            try:
                async with self.session.get(f"{a.ui}/api/v1/applications/{a.app_id}/jobs",
                                            timeout=timeout) as resp:
                    if resp.status != 200:
                        continue
                    jobs = await resp.json()
            except (aiohttp.ClientError, TimeoutError, ValueError):
                continue  # the UI comes up late and goes away first
            a.spark_jobs = len(jobs)
            a.tasks_total = sum(j.get("numTasks", 0) for j in jobs)
            a.tasks_done = sum(j.get("numCompletedTasks", 0) + j.get("numSkippedTasks", 0)
                               for j in jobs)
            a.tasks_failed = sum(j.get("numFailedTasks", 0) for j in jobs)
            a.stages_total = sum(len(j.get("stageIds", ())) for j in jobs)
            a.stages_done = sum(j.get("numCompletedStages", 0) + j.get("numSkippedStages", 0)
                                for j in jobs)
            self.on_progress(a)

    async def _kill(self, proc: asyncio.subprocess.Process) -> None:
        _killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.s.kill_grace):
                await _exited(proc)
        _killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await _exited(proc)


async def _exited(proc: asyncio.subprocess.Process) -> int:
    """The exit status. Not ``proc.wait()``: on Python 3.11 that also waits for every
    process holding the output pipes (a stray Python worker) to close them."""
    while proc.returncode is None:
        await asyncio.sleep(0.1)
    return proc.returncode


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def read_features(hdfs: WebHdfs, directory: str) -> pa.Table | None:
    """A job's features (all ``*.parquet`` parts), or None without its ``_SUCCESS`` marker."""
    try:
        names = {st.name for st in await hdfs.list_status(directory)}
    except NotFound:
        return None
    if "_SUCCESS" not in names:
        return None
    parts = sorted(n for n in names if n.endswith(".parquet") and not n.startswith(("_", ".")))
    tables = []
    for part in parts:
        data = await hdfs.open(f"{directory}/{part}")
        tables.append(await asyncio.to_thread(pq.read_table, io.BytesIO(data)))
    if not tables:
        return pa.table({})
    # Spark's own schema metadata means nothing downstream
    return pa.concat_tables(tables, promote_options="default").replace_schema_metadata(None)
