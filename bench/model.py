"""Benchmark ``POST /v1/predict``: the aiohttp model server beside a Flask server.

    python bench/model.py [--model artifacts/model] [--requests 200] [--concurrency 8]

Both servers load the same model version and answer the same JSON API; both run on
loopback, started as subprocesses on free ports. The aiohttp server is
``python -m ml.serve`` (event loop + a process pool of ``--workers``); the Flask
server is the original tutorial's choice (``app.run(threaded=True)``: one process,
threads, scoring inside the request with the same batched ``predict_batch``). For each server, payload kind and batch size
(1 and 256 recordings per request), a bounded number of requests is sent with a
fixed concurrency; the figures are recordings scored per second and the p50/p99
request latency. Payloads: ``windows`` = 3 feature windows per recording (what the
pipeline sends), ``rows`` = 10 s of raw samples per recording (1000 rows x 19).

Without ``--model`` (or when the directory holds no model) a small model is
trained on synthetic recordings first, so the script always runs; the figures are
then for that model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ----------------------------------------------------------------------------- flask side


def flask_app(model_dir: str) -> Any:
    """The same API on Flask: parse, validate and score in the request thread."""
    from flask import Flask, Response, request

    from ml import features as F
    from ml.artifact import load_model
    from ml.validate import Limits, RequestError, parse_predict

    loaded = load_model(model_dir)
    model = loaded.model
    limits = Limits(min_rows=model.window_rows)
    app = Flask("gaitflow-flask-bench")

    def respond(obj: Any, status: int = 200) -> Response:
        return Response(json.dumps(obj), status=status, mimetype="application/json")

    @app.post("/v1/predict")
    def predict() -> Response:
        try:
            try:
                body = json.loads(request.get_data())
            except ValueError as exc:
                raise RequestError(400, "invalid_json", str(exc)) from exc
            items = parse_predict(body, len(F.COLUMNS), len(model.feature_names), limits)
        except RequestError as exc:
            return respond(exc.body(), exc.status)
        preds = model.predict_batch([(it.kind, it.data) for it in items])
        results = [{"id": it.id, "probability": pred.probability, "label": pred.label,
                    "n_windows": len(pred.window_probabilities),
                    "windows": [float(p) for p in pred.window_probabilities]}
                   for it, pred in zip(items, preds, strict=True)]  # fmt: skip
        return respond({"model_version": model.version, "results": results})

    @app.get("/healthz")
    def healthz() -> Response:
        return respond({"status": "ok", "model_version": model.version})

    return app


def run_flask(model_dir: str, port: int) -> None:
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    flask_app(model_dir).run(host="127.0.0.1", port=port, threaded=True)


# ----------------------------------------------------------------------------- client side


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_ready(url: str, timeout: float = 120.0) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url + "/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} did not become ready")


def payloads(batch: int, kind: str, model_dir: str) -> bytes:
    from ml import features as F
    from ml.synthetic import synthetic_recording

    recs = []
    for i in range(batch):
        x = synthetic_recording(1.0 + 0.01 * (i % 30), 20.0 if kind == "windows" else 10.0,
                                parkinsonian=bool(i % 2), seed=i % 50)  # fmt: skip
        if kind == "rows":
            recs.append({"id": f"r{i}", "rows": np.round(x, 2).tolist()})
        else:
            _, feats = F.recording_features(x)
            wins = [{"key": f"r{i}:{k}",
                     "features": [None if not np.isfinite(v) else round(float(v), 6) for v in f]}
                    for k, f in enumerate(feats)]  # fmt: skip
            recs.append({"id": f"r{i}", "windows": wins})
    return json.dumps({"recordings": recs}).encode()


async def hammer(url: str, body: bytes, n_requests: int, concurrency: int,
                 batch: int) -> dict[str, float]:  # fmt: skip
    import aiohttp

    latencies: list[float] = []
    errors = 0
    sem = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one() -> None:
            nonlocal errors
            async with sem:
                t0 = time.perf_counter()
                async with session.post(url + "/v1/predict", data=body,
                                        headers={"Content-Type": "application/json"}) as resp:  # fmt: skip
                    await resp.read()
                    if resp.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - t0)

        await one()  # warm-up, not counted
        latencies.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*[one() for _ in range(n_requests)])
        wall = time.perf_counter() - t0
    lat = np.array(latencies)
    return {
        "predictions_per_s": n_requests * batch / wall,
        "p50_ms": float(np.percentile(lat, 50) * 1000),
        "p99_ms": float(np.percentile(lat, 99) * 1000),
        "errors": errors,
        "requests": n_requests,
    }


def ensure_model(model: str | None) -> tuple[str, str]:
    """A model directory to serve, training a synthetic one if needed."""
    from ml.artifact import ArtifactError, resolve_version_dir

    if model:
        try:
            return str(resolve_version_dir(model)), "trained model"
        except ArtifactError:
            print(f"no model in {model}; training a small synthetic one", file=sys.stderr)
    from ml import train as T
    from ml.model import DEFAULT_MODEL
    from ml.synthetic import write_synthetic_dataset

    tmp = Path(tempfile.mkdtemp(prefix="gaitflow-bench-"))
    data = write_synthetic_dataset(tmp / "data", n_controls=6, n_patients=6, walks=1, seconds=30)
    vdir = T.train(data, tmp / "models", folds=3, inner_folds=2, jobs=2, n_boot=20,
                   candidates=[DEFAULT_MODEL])  # fmt: skip
    return str(vdir), "synthetic model"


def start_servers(model_dir: str, workers: int) -> tuple[dict[str, str], list[subprocess.Popen]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p1, p2 = free_port(), free_port()
    cmds = {
        "aiohttp": [sys.executable, "-m", "ml.serve", "--model", model_dir, "--host", "127.0.0.1",
                    "--port", str(p1), "--workers", str(workers)],
        "flask": [sys.executable, __file__, "--flask-server", "--model", model_dir,
                  "--port", str(p2)],
    }  # fmt: skip
    procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for c in cmds.values()]  # fmt: skip
    return {"aiohttp": f"http://127.0.0.1:{p1}", "flask": f"http://127.0.0.1:{p2}"}, procs


async def measure(servers: dict[str, str], model_dir: str, what: str,
                  args: argparse.Namespace) -> None:  # fmt: skip
    for url in servers.values():
        await wait_ready(url)
    from ml.artifact import load_model

    version = load_model(model_dir).version
    print(f"model {version} ({what}); {os.cpu_count()} CPUs; aiohttp workers={args.workers}; "
          f"loopback")  # fmt: skip
    print(f"{'server':8} {'payload':8} {'batch':>5} {'requests':>8} {'pred/s':>9} "
          f"{'p50 ms':>9} {'p99 ms':>9} {'errors':>6}")  # fmt: skip
    plan = [("windows", 1, args.requests, args.concurrency),
            ("windows", 256, max(4, args.requests // 25), 2),
            ("rows", 1, max(20, args.requests // 4), args.concurrency),
            ("rows", 256, 3, 1)]  # fmt: skip
    for kind, batch, n, conc in plan:
        body = payloads(batch, kind, model_dir)
        for name, url in servers.items():
            r = await hammer(url, body, n, conc, batch)
            print(f"{name:8} {kind:8} {batch:>5} {n:>8} {r['predictions_per_s']:>9.1f} "
                  f"{r['p50_ms']:>9.1f} {r['p99_ms']:>9.1f} {r['errors']:>6}", flush=True)  # fmt: skip


def bench(args: argparse.Namespace) -> None:
    model_dir, what = ensure_model(args.model)
    servers, procs = start_servers(model_dir, args.workers)
    try:
        asyncio.run(measure(servers, model_dir, what, args))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "artifacts" / "model"))
    ap.add_argument("--requests", type=int, default=200, help="requests at batch 1")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--flask-server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.flask_server:
        run_flask(args.model, args.port)
        return
    bench(args)


if __name__ == "__main__":
    main()
