"""End to end on the real stack: settings.toml's pipeline, a real model server,
recordings replayed over MQTT; every store then holds each sample and each derived
row exactly once.

Needs the whole local stack (``python -m stack up``) and GAITPDB_DIR.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from audit import (
    RunNames,
    cassandra_windows,
    cleanup,
    es_diagnoses,
    kafka_samples,
    lake_samples,
    mongo_diagnoses,
    per_recording,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
# two controls and two patients from two studies: a subset CI can afford
RECORDINGS = ["GaCo01_01", "GaPt03_01", "JuCo01_01", "JuPt01_01"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_dir() -> Path:
    d = os.environ.get("GAITPDB_DIR")
    if not d:
        pytest.fail("GAITPDB_DIR is not set: point it at a gaitpdb copy (see README)")
    return Path(d)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small model trained here on a subject-wise subset (fast, real artifact)."""
    from ml.data import list_recordings

    table = list_recordings(data_dir())
    subjects = sorted(set(table["subject"]))
    rng = np.random.default_rng(0)
    keep = set(rng.choice(subjects, size=40, replace=False)) | {r[:6] for r in RECORDINGS}
    sub = tmp_path_factory.mktemp("gaitpdb-subset")
    for row in table.itertuples(index=False):
        if row.subject in keep:
            (sub / Path(row.path).name).symlink_to(row.path)
    out = tmp_path_factory.mktemp("model")
    subprocess.run([sys.executable, "-m", "ml.train", "--data", str(sub), "--out", str(out),
                    "--candidates", "logreg", "--folds", "3", "--inner-folds", "2",
                    "--bootstrap", "20"], check=True, cwd=ROOT)
    return out


async def wait_ready(url: str, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"{what} exited with {proc.returncode} before it was ready")
            try:
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        return
            except (TimeoutError, aiohttp.ClientError):
                pass
            await asyncio.sleep(0.5)
    pytest.fail(f"{what} not ready at {url} after {timeout} s")


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail("the process did not stop within 120 s of SIGTERM")
    return proc.returncode


@pytest.mark.parametrize("tiers", ["one process", "split at Kafka"])
async def test_replayed_recordings_reach_every_store_exactly_once(model_dir: Path, tmp_path: Path,
                                                                  tiers: str) -> None:
    """settings.toml in one process, or pipeline/examples/split's ingest and processing
    tiers as two processes joined by the segments topic: the same stores, exactly once."""
    from ml.data import list_recordings, load_recording
    from ml.features import COLUMNS, features_frame
    from stack.replay import ReplayOptions, replay

    names = RunNames(uuid.uuid4().hex[:10])
    model_port = free_port()
    logs = tmp_path / "logs"
    logs.mkdir()
    serve_log = (logs / "serve.log").open("wb")
    server = subprocess.Popen(  # noqa: ASYNC220 - not waited on here
        [sys.executable, "-m", "ml.serve", "--model", str(model_dir), "--host", "127.0.0.1",
         "--port", str(model_port)], cwd=ROOT, stdout=serve_log, stderr=subprocess.STDOUT)
    procs: list[tuple[str, subprocess.Popen, Path]] = []  # (what, process, log)
    try:
        await wait_ready(f"http://127.0.0.1:{model_port}/healthz", server, "the model server")
        model_url, dead = f"http://127.0.0.1:{model_port}", str(tmp_path / "dead.jsonl")
        if tiers == "one process":
            port = free_port()
            runs = [("pipeline", "settings.toml", port,
                     names.overrides(admin_port=port, model_url=model_url, dead_letters=dead))]
        else:
            ports = (free_port(), free_port())
            sets = names.split_overrides(admin_ports=ports, model_url=model_url,
                                         dead_letters=dead)  # fmt: skip
            runs = [("processing tier", "pipeline/examples/split/processing.toml", ports[1],
                     sets[1]),
                    ("ingest tier", "pipeline/examples/split/ingest.toml", ports[0], sets[0])]
        for what, settings, port, sets in runs:
            argv = [sys.executable, "run.py", "--settings", settings]
            for s in sets:
                argv += ["--set", s]
            log = logs / f"{what.replace(' ', '-')}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(argv, cwd=ROOT,  # noqa: ASYNC220
                                        stdout=out, stderr=subprocess.STDOUT)
            procs.append((what, proc, log))
            await wait_ready(f"http://127.0.0.1:{port}/readyz", proc, what)

        table = list_recordings(data_dir())
        table = table[table["id"].isin(RECORDINGS)]
        recs = {r.id: load_recording(r.path) for r in table.itertuples(index=False)}
        assert sorted(recs) == sorted(RECORDINGS)
        await replay(recs, ReplayOptions(topic=names.mqtt_topic, fmt="batch", batch_rows=100,
                                         seed=1), show_progress=False)

        deadline = time.monotonic() + 600
        found: dict = {}
        while time.monotonic() < deadline:
            found = await mongo_diagnoses(names.mongo_db)
            if len(found) >= len(RECORDINGS) or any(p.poll() is not None for _, p, _ in procs):
                break
            await asyncio.sleep(2)
        log_tail = "\n".join(f"--- {what}\n" + log.read_text(errors="replace")[-3000:]
                             for what, _, log in procs)
        assert sorted(found) == sorted(RECORDINGS), f"diagnoses in MongoDB: {sorted(found)}\n{log_tail}"

        # diagnoses: exactly one per recording, in both stores, same model version
        es = await es_diagnoses(names.es_index)
        assert sorted(es) == sorted(RECORDINGS)
        from ml.artifact import load_model

        threshold = load_model(model_dir).model.threshold
        for rec in RECORDINGS:
            d = found[rec]
            assert 0.0 <= d["probability"] <= 1.0
            assert d["threshold"] == pytest.approx(threshold)  # the model's, not 0.5
            assert d["label"] == ("parkinson" if d["probability"] >= threshold else "control")
            assert es[rec]["threshold"] == pytest.approx(threshold)
            assert es[rec]["model_version"] == found[rec]["model_version"]
            assert es[rec]["probability"] == pytest.approx(found[rec]["probability"])

        # raw samples: each exactly once in the lake and in Kafka
        lake_rows, lake_dups = per_recording(await lake_samples("http://127.0.0.1:9870",
                                                                 names.lake_root))
        kafka_rows, kafka_dups = per_recording(await kafka_samples("127.0.0.1:9092",
                                                                   names.kafka_topic))
        expected_rows = {rec: len(rows) for rec, rows in recs.items()}
        assert dict(lake_rows) == expected_rows and not lake_dups
        assert dict(kafka_rows) == expected_rows and not kafka_dups

        # features: every window of every recording in Cassandra, once (primary key)
        windows = await asyncio.to_thread(cassandra_windows, names.keyspace)
        for rec, rows in recs.items():
            frame = pd.DataFrame(rows, columns=list(COLUMNS))
            frame.insert(0, "seq", np.arange(len(rows), dtype=np.int64))
            frame.insert(0, "recording_id", rec)
            assert windows[rec] == len(features_frame(frame)), rec

        # nothing was dead-lettered
        dead = tmp_path / "dead.jsonl"
        assert not dead.exists() or dead.read_text() == ""

        # SIGTERM drains and exits 0 (the ingest tier first: sources before their consumers)
        assert {what: stop(p) for what, p, _ in reversed(procs)} == {w: 0 for w, _, _ in procs}
    finally:
        for _, p, _ in reversed(procs):
            stop(p)
        stop(server)
        serve_log.close()
        await cleanup(names)
