"""model_call against the real model server (``python -m ml.serve``) in a subprocess.

A tiny model is trained once per module on a synthetic gaitpdb-like dataset
(``ml.synthetic``, ``ml.train.fit_final``) into a temporary directory; the server
runs it on a free loopback port. The windows sent are real ``ml.features``
windows of synthetic recordings, shaped as spark_job emits them
(handlers/README.md §4).
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pyarrow as pa
import pytest
from stores_support import FeedSource, feed, pipeline_doc, wait_for

from ml import features as F
from ml import train as T
from ml.artifact import save_model
from ml.synthetic import synthetic_recording, write_synthetic_dataset
from pipeline import Runtime, StartError

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
VERSION = f"it-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = write_synthetic_dataset(tmp_path_factory.mktemp("data"), n_controls=4, n_patients=4,
                                   walks=1, seconds=25.0, seed=3)
    ds = T.load_dataset(data, series=False, jobs=1)
    model = T.fit_final(ds, "logreg", inner_folds=2, seed=0, version=VERSION, jobs=1)
    out = tmp_path_factory.mktemp("models")
    save_model(model, {"created": VERSION}, out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ModelServer:
    """``python -m ml.serve`` on a fixed port; ``stop()`` and ``start()`` again."""

    def __init__(self, model_dir: Path, log: Path) -> None:
        self.model_dir, self.log = model_dir, log
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self) -> subprocess.Popen[bytes]:
        with open(self.log, "ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "ml.serve", "--model", str(self.model_dir),
                 "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                 "--threads"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL)

    async def start(self) -> None:
        self.proc = self._spawn()
        deadline = time.monotonic() + 60
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    pytest.fail(f"ml.serve exited with {self.proc.returncode}:\n"
                                f"{self.log.read_text(errors='replace')[-2000:]}")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.get(f"{self.url}/healthz",
                                        timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status == 200:
                            return
                await asyncio.sleep(0.2)
        pytest.fail(f"ml.serve not healthy after 60 s:\n{self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture
async def server(model_dir: Path, tmp_path: Path) -> AsyncIterator[ModelServer]:
    srv = ModelServer(model_dir, tmp_path / "model-server.log")
    await srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def recordings() -> Iterator[dict[str, tuple[pa.Table, dict[str, Any]]]]:
    """Window feature batches (final) for two recordings."""
    out = {}
    rows = round(F.DEFAULT_WINDOW_S * F.FS)
    for rid, pd_like, seed in (("SyPt01_01", True, 1), ("SyCo02_01", False, 2)):
        starts, feats = F.recording_features(
            synthetic_recording(1.2, 30.0, parkinsonian=pd_like, seed=seed))
        cols: dict[str, Any] = {
            "recording": [rid] * len(starts),
            "window": list(range(len(starts))),
            "window_key": [f"{rid}:{k}" for k in range(len(starts))],
            "seq_first": [int(s) for s in starts],
            "seq_last": [int(s) + rows - 1 for s in starts],
        }
        for j, name in enumerate(F.FEATURE_NAMES):
            cols[name] = feats[:, j]
        out[rid] = (pa.table(cols), {"final": True, "recording": rid})
    yield out


def pipeline(server: ModelServer, **call: Any) -> dict[str, Any]:
    assert FeedSource  # the runtime loads it as stores_support:FeedSource
    return pipeline_doc({
        "src": {"type": "stores_support:FeedSource", "key": "window_key", "outputs": ["model"]},
        "model": {"type": "model_call", "url": server.url, "outputs": ["out"],
                  "retry": {"max_attempts": 1},
                  "retry_policy": {"max_attempts": 2, "backoff": 0.05, "jitter": 0.0}, **call},
        "out": {"type": "memory_sink"},
    })


async def test_diagnoses_come_back_with_the_model_version(server: ModelServer,
                                                          recordings: Any) -> None:
    async with Runtime.from_dict(pipeline(server, max_wait_ms=50.0)) as rt:
        table, meta = recordings["SyPt01_01"]
        feed("src", table.slice(0, 2), {"final": False})   # not final: no call, no output
        for table, meta in recordings.values():
            feed("src", table, meta)
        await wait_for(lambda: len(rt.handlers["src"].committed) == 3,  # type: ignore[attr-defined]
                       what="three batches committed")
        assert rt.handlers["model"].model_version == VERSION  # type: ignore[attr-defined]
    assert rt.report is not None and rt.report.ok, rt.report
    out = {r["recording"]: r for r in rt.handlers["out"].rows()}  # type: ignore[attr-defined]
    assert set(out) == {"SyPt01_01", "SyCo02_01"}
    for rid, (table, _) in recordings.items():
        d = out[rid]
        assert d["model_version"] == VERSION
        assert d["n_windows"] == table.num_rows
        assert len(d["window_probabilities"]) == table.num_rows
        assert 0.0 <= d["probability"] <= 1.0
        assert d["label"] in ("parkinson", "control")
        assert d["diagnosed_at"].tzinfo is not None
    assert rt.handlers["dlq"].row_count == 0  # type: ignore[attr-defined]


async def test_wrong_feature_count_is_dead_lettered_with_the_server_message(
        server: ModelServer, recordings: Any) -> None:
    names = list(F.FEATURE_NAMES[:-1])
    with pytest.raises(StartError, match=r"expects 196 features .* the settings send 195"):
        await Runtime.from_dict(pipeline(server, features=names)).run()
    # the same mistake when the check is off (or the model changed after the start)
    async with Runtime.from_dict(pipeline(server, features=names,
                                          check_at_start=False)) as rt:
        table, meta = recordings["SyCo02_01"]
        feed("src", table, meta)
        await wait_for(lambda: len(rt.handlers["src"].committed) == 1,  # type: ignore[attr-defined]
                       what="batch committed (dead-lettered)")
    dead = rt.handlers["dlq"].table().to_pylist()  # type: ignore[attr-defined]
    assert len(dead) == table.num_rows
    assert dead[0]["reason"] == (
        "model server refused the input (422): wrong_feature_count: 195 features; the model "
        "expects 196 (at recordings[0].windows[0].features)")
    assert dead[0]["key"] == "SyCo02_01:0"
    assert rt.handlers["out"].row_count == 0  # type: ignore[attr-defined]
    assert rt.handlers["model"].health()[0]  # the server answered: not an outage


async def test_server_down_opens_the_circuit_then_recovers(server: ModelServer,
                                                           recordings: Any) -> None:
    doc = pipeline(server, breaker_failures=2, breaker_cooldown=0.5, connect_timeout=1.0)
    async with Runtime.from_dict(doc) as rt:
        model, dlq = rt.handlers["model"], rt.handlers["dlq"]
        (first, meta1), (second, meta2) = recordings.values()
        feed("src", first, meta1)
        await wait_for(lambda: rt.handlers["out"].row_count == 1, what="first diagnosis")  # type: ignore[attr-defined]
        server.stop()                                                 # the outage
        feed("src", second, meta2)
        await wait_for(lambda: dlq.row_count == second.num_rows, what="dead letters")  # type: ignore[attr-defined]
        connected, detail = model.health()
        assert not connected and "circuit open" in detail
        assert not rt.readiness()[0]
        assert "model server unreachable" in dlq.table().to_pylist()[0]["reason"]  # type: ignore[attr-defined]
        feed("src", second, meta2)                                    # fails fast while open
        await wait_for(lambda: dlq.row_count == 2 * second.num_rows, what="fail fast")  # type: ignore[attr-defined]
        assert "CircuitOpenError" in dlq.table().to_pylist()[-1]["reason"]  # type: ignore[attr-defined]
        await server.start()                                          # back, same port
        await wait_for(lambda: model.health()[0], timeout=30, what="circuit closed")
        assert rt.readiness()[0]
        feed("src", second, meta2)
        await wait_for(lambda: rt.handlers["out"].row_count == 2, what="second diagnosis")  # type: ignore[attr-defined]
    assert rt.report is not None and rt.report.ok, rt.report
    assert {r["model_version"] for r in rt.handlers["out"].rows()} == {VERSION}  # type: ignore[attr-defined]
