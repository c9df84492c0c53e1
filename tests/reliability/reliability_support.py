"""Test support for the reliability tests (not a test module): processes, publishing, audit.

``PipelineProcess``  settings.toml's pipeline as a subprocess (``run.py``) pointed at one
                     run's names; start, kill -9, SIGTERM, admin API.
``ModelServer``      ``python -m ml.serve`` as a subprocess (stop and start it again).
``Publisher``        publishes a schedule of MQTT messages (paced like ``stack.replay``),
                     reconnecting and re-sending the unacknowledged one when the broker
                     goes away, so a broker restart loses nothing on the device side.
``audit_stores``     what every store holds compared with what was sent: missing,
                     duplicated and unexpected keys per store.
``outage``           stops a stack service (or the model server) and always starts it
                     again, waiting until it is ready.

Used by ``bench/soak.py`` too.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT / "tests" / "e2e") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests" / "e2e"))

import audit
from audit import RunNames

#: two controls and two patients from two studies (the end-to-end test's subset)
RECORDINGS = ("GaCo01_01", "GaPt03_01", "JuCo01_01", "JuPt01_01")
#: seconds of each recording replayed (CI budget); RELIABILITY_SECONDS overrides
SECONDS = float(os.environ.get("RELIABILITY_SECONDS", "20"))
WEBHDFS = "http://127.0.0.1:9870"
KAFKA = "127.0.0.1:9092"
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_dir() -> Path:
    d = os.environ.get("GAITPDB_DIR")
    if not d:
        raise RuntimeError("GAITPDB_DIR is not set: point it at a gaitpdb copy (see README)")
    return Path(d)


def load_recordings(ids: Iterable[str], seconds: float | None) -> dict[str, np.ndarray]:
    """``{id: rows}``: the first ``seconds`` of each recording (all of it when None)."""
    from ml.data import list_recordings, load_recording

    ids = list(ids)
    table = list_recordings(data_dir())
    table = table[table["id"].isin(ids)]
    recs = {r.id: load_recording(r.path) for r in table.itertuples(index=False)}
    missing = sorted(set(ids) - set(recs))
    if missing:
        raise RuntimeError(f"recordings not found under {data_dir()}: {missing}")
    if seconds is not None:
        recs = {k: v[: round(seconds * 100)] for k, v in recs.items()}
    return {k: recs[k] for k in ids}


def train_small_model(subset: Path, out: Path, subjects: int = 16) -> Path:
    """A small real model (logistic regression, subject-wise CV), trained in seconds."""
    from ml.data import list_recordings

    table = list_recordings(data_dir())
    all_subjects = sorted(set(table["subject"]))
    rng = np.random.default_rng(0)
    keep = set(rng.choice(all_subjects, size=subjects, replace=False))
    keep |= {r[:6] for r in RECORDINGS}
    for row in table.itertuples(index=False):
        if row.subject in keep:
            (subset / Path(row.path).name).symlink_to(row.path)
    r = subprocess.run([PY, "-m", "ml.train", "--data", str(subset), "--out", str(out),
                        "--candidates", "logreg", "--folds", "3", "--inner-folds", "2",
                        "--bootstrap", "20"], cwd=ROOT, capture_output=True, text=True,
                       check=False)
    if r.returncode != 0:
        raise RuntimeError(f"ml.train failed ({r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
    return out


# --------------------------------------------------------------------------- HTTP
async def http(method: str, url: str, *, token: str | None = None, body: Any = None,
               data: bytes | None = None, timeout: float = 5.0,
               headers: Mapping[str, str] | None = None) -> tuple[int, str]:
    """``(status, text)``; ``(0, error)`` when the server cannot be reached."""
    import aiohttp

    hdrs = dict(headers or {})
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    try:
        async with aiohttp.ClientSession() as session, session.request(
                method, url, json=body, data=data, headers=hdrs,
                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            return resp.status, await resp.text()
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return 0, f"{type(exc).__name__}: {exc}"


async def wait_until(check: Callable[[], Any], timeout: float, what: str,
                     interval: float = 0.5) -> float:
    """Poll ``check`` (sync or async) until truthy; seconds waited; AssertionError on timeout."""
    t0 = time.monotonic()
    while True:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(interval)


# --------------------------------------------------------------------------- processes
try:
    import ctypes

    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl   # looked up here, not in the child
except (OSError, AttributeError):  # not Linux
    _PRCTL = None


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the test process dies (a killed pytest, a
    CI timeout) instead of living on as an orphan holding ports and sessions. One
    C call, no import and no lock: safe in a forked child of a threaded process."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)   # PR_SET_PDEATHSIG


class _Process:
    """A subprocess with its output appended to a log file (one header per start).

    Start it from the event loop's thread: the child is killed when the thread that
    started it exits (``PR_SET_PDEATHSIG``)."""

    what = "process"

    def __init__(self, log: Path) -> None:
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def _spawn(self, argv: list[str], env: Mapping[str, str] | None = None) -> None:
        if self.alive:
            raise RuntimeError(f"{self.what} already running (pid {self.proc.pid})")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as fh:
            fh.write(f"\n==== start {self.starts + 1} at {time.strftime('%H:%M:%S')}: "
                     f"{' '.join(argv[:3])} ...\n".encode())
            self.proc = subprocess.Popen(
                argv, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                preexec_fn=_die_with_parent)  # noqa: PLW1509 - see _die_with_parent
        self.starts += 1

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL (a crash: no drain, no cleanup) and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 120.0) -> int | None:
        """SIGTERM, wait (then SIGKILL); the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"{self.what} did not stop within {timeout:.0f} s of "
                                     f"SIGTERM\n{self.tail()}") from None
        return self.proc.returncode

    def tail(self, chars: int = 4000) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return f"--- end of {self.log} ---\n{text[-chars:]}"

    async def _wait_http(self, url: str, timeout: float, token: str | None = None) -> float:
        t0 = time.monotonic()
        last = ""
        while time.monotonic() - t0 < timeout:
            if not self.alive:
                raise AssertionError(f"{self.what} exited with {self.proc.returncode} before "
                                     f"it was ready\n{self.tail()}")
            status, last = await http("GET", url, token=token, timeout=2)
            if status == 200:
                return time.monotonic() - t0
            await asyncio.sleep(0.3)
        raise AssertionError(f"{self.what} not ready at {url} after {timeout:.0f} s: "
                             f"{last[:1000]}\n{self.tail()}")


class ModelServer(_Process):
    """``python -m ml.serve`` on a fixed port (kept across stop/start)."""

    what = "the model server"

    def __init__(self, model_dir: Path, log: Path, token: str | None = None,
                 port: int | None = None) -> None:
        super().__init__(log)
        self.model_dir, self.token = model_dir, token
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 120.0) -> float:
        argv = [PY, "-m", "ml.serve", "--model", str(self.model_dir), "--host", "127.0.0.1",
                "--port", str(self.port), "--workers", "1"]
        # the token only through the environment, as a deployment would pass a secret
        self._spawn(argv, {"GAITFLOW_MODEL_TOKEN": self.token or ""})
        return await self._wait_http(f"{self.url}/healthz", timeout)


#: ``--set`` arguments that keep settings.toml's Spark job from running: for tests of the
#: ingest tier (MQTT, lake, Kafka), where a Spark job (a minute or more on two cores)
#: would only add time. Segment events then stay pending (unacknowledged) until the end.
INGEST_ONLY = ("handlers.features.max_wait=86400.0", "handlers.features.trigger_on_final=false",
               'handlers.features.on_shutdown="cancel"')


async def start_ingest_tier(names: RunNames, model_server: ModelServer, tmp_path: Path,
                            pipelines: list[PipelineProcess]) -> PipelineProcess:
    """settings.toml's pipeline, ``INGEST_ONLY`` and a 10 s drain, started (and put in
    ``pipelines``, the fixture that kills what is left) and ready; its dead letters and
    log in ``tmp_path``."""
    pipeline = PipelineProcess(names, model_url=model_server.url,
                               dead_letters=tmp_path / "dead.jsonl",
                               log=tmp_path / "pipeline.log",
                               sets=[*INGEST_ONLY, "runtime.drain_timeout=10.0"])
    pipelines.append(pipeline)
    pipeline.start()
    await pipeline.wait_ready()
    return pipeline


def one_spark_job(seconds: float) -> tuple[str, ...]:
    """``--set`` arguments for one Spark job over a whole replay of ``seconds``: started
    that long after the first segment, rather than one per recording end (each job takes
    a minute or more on two cores, and a recording's job waits for the running one)."""
    return ("handlers.features.trigger_on_final=false",
            f"handlers.features.max_wait={seconds:.1f}")


PROCESSING_SECTIONS = ("runtime", "dead_letter", "handlers.feature_store", "handlers.diagnose",
                       "handlers.diagnoses_mongo", "handlers.diagnoses_es",
                       "handlers.dead_letters")


def processing_tier_settings(path: Path, *, recordings: Iterable[str], seconds: float,
                             start_file: Path, ack_log: Path, interval: float = 1.0) -> Path:
    """settings.toml's processing tier (features → Cassandra, model → MongoDB, ES), its
    sections copied verbatim, fed by ``feature_replay`` instead of the Spark job."""
    import re

    text = (ROOT / "settings.toml").read_text()
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^\[([^\]]+)\]", line)
        if m:
            current = m.group(1)
            sections[current] = []
        if current is not None:
            sections[current].append(line)
    outputs = next(line for line in sections["handlers.features"]
                   if line.startswith("outputs"))
    feed = ["[handlers.features]", 'type = "feature_replay:FeatureReplay"',
            f"recordings = {json.dumps(list(recordings))}", f"seconds = {seconds}",
            f"start_file = {json.dumps(str(start_file))}", f"ack_log = {json.dumps(str(ack_log))}",
            f"interval = {interval}", outputs]
    body = ["# settings.toml's processing tier, fed by feature_replay (tests/reliability)"]
    for name in PROCESSING_SECTIONS:
        body += [*sections[name], ""]
    path.write_text("\n".join(body + feed) + "\n")
    return path


class PipelineProcess(_Process):
    """settings.toml's pipeline, pointed at ``names``; the same admin port on every start.

    ``settings``: another file (the processing tier: ``processing_tier_settings``), then
    only its handlers' names are overridden.
    """

    what = "the pipeline"

    def __init__(self, names: RunNames, *, model_url: str, dead_letters: Path, log: Path,
                 sets: Iterable[str] = (), env: Mapping[str, str] | None = None,
                 admin_token: str | None = None, settings: Path | None = None) -> None:
        super().__init__(log)
        self.names = names
        self.admin_port = free_port()
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        self.dead_letters = dead_letters
        self.token = admin_token
        self.env = dict(env or {})
        if settings is None:
            base = names.overrides(admin_port=self.admin_port, model_url=model_url,
                                   dead_letters=str(dead_letters))
            self.argv = [PY, "run.py", "--settings", "settings.toml"]
        else:
            base = [f"runtime.admin_port={self.admin_port}", "runtime.admin_extensions=[]",
                    f'handlers.feature_store.keyspace="{names.keyspace}"',
                    f'handlers.diagnose.url="{model_url}"',
                    f'handlers.diagnoses_mongo.database="{names.mongo_db}"',
                    f'handlers.diagnoses_es.index="{names.es_index}"',
                    f'handlers.dead_letters.path="{dead_letters}"']
            self.argv = [PY, "run.py", "--settings", str(settings)]
            self.env.setdefault("PYTHONPATH", os.pathsep.join(
                [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]))
        # RELIABILITY_EXTRA_SETS: "key=value;key=value" added to every pipeline the tests
        # start, to try a setting against the faults (e.g. a longer retry budget)
        extra = [x.strip() for x in os.environ.get("RELIABILITY_EXTRA_SETS", "").split(";")]
        for s in [*base, *sets, *filter(None, extra)]:
            self.argv += ["--set", s]

    def start(self) -> None:
        self._spawn(self.argv, self.env)

    async def wait_ready(self, timeout: float = 180.0) -> float:
        return await self._wait_http(f"{self.admin}/readyz", timeout)

    async def wait_running(self, timeout: float = 180.0) -> float:
        """Until every handler started (the runtime is "running"), connected or not: an
        outage elsewhere (another test restarting a shared service) must not stall a
        test that is not about readiness."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if not self.alive:
                raise AssertionError(f"{self.what} exited with {self.proc.returncode} before "
                                     f"it was running\n{self.tail()}")
            code, text = await http("GET", f"{self.admin}/healthz", timeout=2)
            if code == 200 and json.loads(text).get("state") == "running":
                return time.monotonic() - t0
            await asyncio.sleep(0.3)
        raise AssertionError(f"{self.what} not running after {timeout:.0f} s\n{self.tail()}")

    async def ready(self) -> bool:
        status, _ = await http("GET", f"{self.admin}/readyz", timeout=3)
        return status == 200

    async def readyz(self) -> tuple[int, dict[str, Any]]:
        status, text = await http("GET", f"{self.admin}/readyz", timeout=3)
        try:
            return status, json.loads(text)
        except ValueError:
            return status, {"error": text}

    async def status(self) -> dict[str, Any]:
        code, text = await http("GET", f"{self.admin}/api/status", token=self.token, timeout=5)
        if code != 200:
            return {"error": f"HTTP {code}: {text[:200]}"}
        return json.loads(text)

    async def metrics(self) -> str:
        code, text = await http("GET", f"{self.admin}/metrics", token=self.token, timeout=5)
        return text if code == 200 else ""

    def dead_letter_records(self) -> list[dict[str, Any]]:
        return read_dead_letters(self.dead_letters)


def read_dead_letters(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.strip():
            with contextlib.suppress(ValueError):  # a line cut by kill -9
                out.append(json.loads(line))
    return out


def kill_strays(run: str) -> list[int]:
    """Kill processes a killed pipeline of this run left behind (its spark-submit jobs).

    They run in their own session (the job's process group); only processes whose
    command line names this run are touched, by pid.
    """
    killed = []
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        if run in cmd and "pytest" not in cmd:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(d), signal.SIGKILL)
                killed.append(int(d))
    return killed


# --------------------------------------------------------------------------- MQTT
def schedule_recordings(recs: Mapping[str, np.ndarray], topic: str, *, batch_rows: int = 100,
                        fmt: str = "batch", end_marker: bool = True,
                        rename: Callable[[str], str] | None = None,
                        ) -> list[tuple[float, str, bytes]]:
    """``(offset s, topic, payload)`` of every message, by offset (``stack.replay`` payloads)."""
    from stack.replay import encode_messages, end_message

    out: list[tuple[float, str, bytes]] = []
    for rec, rows in recs.items():
        rid = rename(rec) if rename else rec
        t = topic.format(recording=rid)
        last = 0.0
        for offset, payload in encode_messages(rid, rows, fmt, batch_rows):
            out.append((offset, t, payload))
            last = offset
        if end_marker:
            out.append((last, t, end_message(rid, len(rows))))
    out.sort(key=lambda m: m[0])  # stable: a recording's messages keep their order
    return out


@dataclasses.dataclass
class Publisher:
    """Publishes QoS 1 messages; survives broker restarts (reconnects, re-sends)."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    client_id: str = dataclasses.field(default_factory=lambda: f"rel-pub-{uuid.uuid4().hex[:8]}")
    reconnect_timeout: float = 120.0
    sent: int = 0
    reconnects: int = 0

    def client(self) -> Any:
        """A new aiomqtt client with these settings (not connected)."""
        import ssl

        import aiomqtt

        kw: dict[str, Any] = {}
        if self.ca_file is not None:
            kw["tls_params"] = aiomqtt.TLSParameters(ca_certs=str(self.ca_file),
                                                     cert_reqs=ssl.CERT_REQUIRED)
        return aiomqtt.Client(self.host, self.port, identifier=self.client_id,
                              username=self.username, password=self.password,
                              max_queued_outgoing_messages=None, timeout=10, **kw)

    async def publish(self, schedule: list[tuple[float, str, bytes]], speed: float = 0.0,
                      t0: float | None = None) -> int:
        """Publish in order; ``speed`` 1 = real time, 0 = as fast as the broker takes it."""
        import aiomqtt

        t0 = time.monotonic() if t0 is None else t0
        i, last_progress = 0, time.monotonic()
        while i < len(schedule):
            try:
                async with self.client() as client:
                    while i < len(schedule):
                        offset, topic, payload = schedule[i]
                        if speed > 0:
                            delay = t0 + offset / speed - time.monotonic()
                            if delay > 0:
                                await asyncio.sleep(delay)
                        await client.publish(topic, payload, qos=1)
                        i += 1
                        self.sent += 1
                        last_progress = time.monotonic()
            except aiomqtt.MqttError:
                if time.monotonic() - last_progress > self.reconnect_timeout:
                    raise
                self.reconnects += 1
                await asyncio.sleep(0.5)
        return i


async def forget_mqtt_session(client_id: str, port: int = 1883) -> None:
    """Delete a persistent session (clean start, no expiry), best effort."""
    import aiomqtt

    with contextlib.suppress(aiomqtt.MqttError, OSError):
        async with aiomqtt.Client("127.0.0.1", port, identifier=client_id,
                                  protocol=aiomqtt.ProtocolVersion.V5, clean_start=True,
                                  timeout=5):
            pass


# --------------------------------------------------------------------------- audit
def expected_windows(recs: Mapping[str, np.ndarray]) -> dict[str, set[int]]:
    """The window indexes ``ml.features`` computes for each (complete) recording."""
    import pandas as pd

    from ml.features import COLUMNS, features_frame

    out = {}
    for rec, rows in recs.items():
        frame = pd.DataFrame(rows, columns=list(COLUMNS))
        frame.insert(0, "seq", np.arange(len(rows), dtype=np.int64))
        frame.insert(0, "recording_id", rec)
        out[rec] = set(features_frame(frame)["window"].tolist())
    return out


@dataclasses.dataclass
class StoreAudit:
    """One store compared with the expected keys."""

    store: str
    held: int = 0
    missing: Counter[str] = dataclasses.field(default_factory=Counter)
    duplicated: Counter[str] = dataclasses.field(default_factory=Counter)
    unexpected: Counter[str] = dataclasses.field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.duplicated or self.unexpected)

    def __str__(self) -> str:
        if self.ok:
            return f"{self.store}: ok ({self.held} keys)"
        parts = [f"{k} {dict(v)}" for k, v in (("missing", self.missing),
                                                ("duplicated", self.duplicated),
                                                ("unexpected", self.unexpected)) if v]
        return f"{self.store}: {self.held} keys held; " + "; ".join(parts)


def compare(store: str, found: Iterable[tuple[str, Any]],
            expected: Mapping[str, Iterable[Any]]) -> StoreAudit:
    """Per recording: expected keys absent, keys held more than once, keys not expected."""
    counts = Counter(found)
    a = StoreAudit(store, held=sum(counts.values()))
    want = {(rec, k) for rec, keys in expected.items() for k in keys}
    for (rec, _), n in counts.items():
        if n > 1:
            a.duplicated[rec] += n - 1
    for rec, k in want - counts.keys():
        a.missing[rec] += 1
    for rec, k in counts.keys() - want:
        a.unexpected[rec] += 1
    return a


@dataclasses.dataclass
class Audit:
    stores: list[StoreAudit]

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.stores)

    def lost(self) -> int:
        return sum(sum(s.missing.values()) for s in self.stores)

    def __str__(self) -> str:
        return "\n".join(str(s) for s in self.stores)


async def audit_stores(names: RunNames, recs: Mapping[str, np.ndarray], *,
                       raw: bool = True, derived: bool = True) -> Audit:
    """Lake and Kafka: every (recording, seq) once (``raw``); Cassandra: every window
    once; MongoDB and Elasticsearch: one diagnosis per recording that has a window
    (``derived``)."""
    stores = []
    if raw:
        samples = {rec: range(len(rows)) for rec, rows in recs.items()}
        lake = await audit.lake_samples(WEBHDFS, names.lake_root)
        kafka = await audit.kafka_samples(KAFKA, names.kafka_topic, timeout=60)
        stores += [
            compare("lake", zip(lake.column("recording").to_pylist(),
                                lake.column("seq").to_pylist(), strict=True), samples),
            compare("kafka", zip(kafka.column("recording").to_pylist(),
                                 kafka.column("seq").to_pylist(), strict=True), samples),
        ]
    if derived:
        windows = await asyncio.to_thread(audit.cassandra_window_keys, names.keyspace)
        want = expected_windows(recs)
        stores.append(compare("cassandra", windows, want))
        one = {rec: [rec] for rec in recs if want[rec]}   # no window, no diagnosis
        mongo = await audit.mongo_diagnoses(names.mongo_db)
        stores.append(compare("mongodb", ((k, k) for k in mongo), one))
        es = await audit.es_diagnoses(names.es_index)
        stores.append(compare("elasticsearch", ((k, k) for k in es), one))
    return Audit(stores)


async def wait_raw_complete(names: RunNames, recs: Mapping[str, np.ndarray],
                            pipeline: PipelineProcess, timeout: float = 180.0) -> float:
    """Wait until the lake and Kafka hold every sample (not checking duplicates yet)."""
    want = {rec: len(rows) for rec, rows in recs.items()}
    t0 = time.monotonic()
    have: dict[str, dict[str, int]] = {}
    while time.monotonic() - t0 < timeout:
        if not pipeline.alive:
            raise AssertionError(f"the pipeline exited ({pipeline.proc.returncode})\n"
                                 f"{pipeline.tail()}")
        with contextlib.suppress(Exception):
            lake = await audit.lake_samples(WEBHDFS, names.lake_root)
            kafka = await audit.kafka_samples(KAFKA, names.kafka_topic, timeout=30)
            have = {"lake": dict(Counter(lake.column("recording").to_pylist())),
                    "kafka": dict(Counter(kafka.column("recording").to_pylist()))}
            if all(all(v.get(r, 0) >= n for r, n in want.items()) for v in have.values()):
                return time.monotonic() - t0
        await asyncio.sleep(2.0)
    status = await pipeline.status()
    raise AssertionError(f"raw samples after {timeout:.0f} s: {have}; expected {want}\n"
                         f"status: {json.dumps(_brief(status))[:3000]}\n{pipeline.tail()}")


async def diagnosed(names: RunNames) -> tuple[set[str], set[str]]:
    """Recordings with a diagnosis in (MongoDB, Elasticsearch)."""
    mongo = await audit.mongo_diagnoses(names.mongo_db)
    try:
        es = await audit.es_diagnoses(names.es_index)
    except Exception:  # noqa: BLE001 - the index may not exist yet, ES may be restarting
        es = {}
    return set(mongo), set(es)


async def wait_diagnosed(names: RunNames, recs: Iterable[str], pipeline: PipelineProcess,
                         timeout: float = 300.0) -> float:
    want = set(recs)
    got: tuple[set[str], set[str]] = (set(), set())
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if not pipeline.alive:
            raise AssertionError(f"the pipeline exited ({pipeline.proc.returncode})\n"
                                 f"{pipeline.tail()}")
        with contextlib.suppress(Exception):
            got = await diagnosed(names)
            if want <= got[0] and want <= got[1]:
                return time.monotonic() - t0
        await asyncio.sleep(1.0)
    status = await pipeline.status()
    raise AssertionError(
        f"diagnoses after {timeout:.0f} s: mongo {sorted(got[0])}, es {sorted(got[1])}; "
        f"expected {sorted(want)}\nstatus: {json.dumps(_brief(status))[:3000]}\n"
        f"{pipeline.tail()}")


def _brief(status: Mapping[str, Any]) -> dict[str, Any]:
    """The useful part of /api/status for a failure message."""
    out: dict[str, Any] = {"state": status.get("state"), "not_ready": status.get("not_ready"),
                           "errors": status.get("errors")}
    for name, h in (status.get("handlers") or {}).items():
        out[name] = {k: h.get(k) for k in ("connected", "detail", "rows_in", "errors",
                                           "retries", "dead_letters", "ack") if h.get(k)}
    return out


# --------------------------------------------------------------------------- outages
async def _call(fn: Callable[[], Any]) -> Any:
    """A blocking callable in a worker thread; a coroutine function on the loop."""
    if inspect.iscoroutinefunction(fn):
        return await fn()
    return await asyncio.to_thread(fn)


@contextlib.asynccontextmanager
async def outage(stop: Callable[[], Any], start: Callable[[], Any],
                 ready: Callable[[], Any], what: str, ready_timeout: float = 240.0,
                 ) -> AsyncIterator[dict[str, float]]:
    """Stop a service for the block; ALWAYS start it again and wait until it is ready.

    ``stop``/``start``/``ready``: blocking callables (a stack Service's methods, run in
    a worker thread) or coroutine functions."""
    times: dict[str, float] = {}
    t0 = time.monotonic()
    await _call(stop)
    times["stopped_at"] = t0
    times["stop_seconds"] = time.monotonic() - t0
    try:
        yield times
    finally:
        t1 = time.monotonic()
        times["down_seconds"] = t1 - t0
        await _call(start)
        deadline = time.monotonic() + ready_timeout
        while not await _call(ready):
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not ready {ready_timeout:.0f} s after its restart")
            await asyncio.sleep(1.0)
        times["restart_seconds"] = time.monotonic() - t1


def stack_status() -> str:
    """``python -m stack status`` output."""
    r = subprocess.run([PY, "-m", "stack", "status"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, check=False)
    return r.stdout + r.stderr
