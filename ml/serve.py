"""The model server: ``python -m ml.serve --model DIR --host H --port P``.

HTTP API (JSON; errors are ``{"error": {"code", "message", "field"?}}`` with a 4xx status):

``POST /v1/predict``
    Body ``{"recordings": [...]}`` with, per recording, either raw samples
    ``{"id": "r1", "rows": [[time, L1..L8, R1..R8, L, R], ...]}`` (100 Hz, at least one
    window: 1000 rows for 10 s windows) or window features
    ``{"id": "r1", "windows": [{"key": "r1:0", "features": [...]}, ...]}`` with the
    model's ``feature_names`` in order (``null`` = undefined feature), as
    ``ml.features.features_frame`` computes them. Answer::

        {"model_version": "...", "results": [{"id": "r1", "probability": 0.91,
          "label": "parkinson", "threshold": 0.705, "n_windows": 23,
          "windows": [{"key": "r1:0", "start": 0, "probability": 0.88}, ...]}]}

    ``label`` is ``parkinson`` when ``probability`` reaches the model's decision
    ``threshold`` (its training prevalence; a window is read against the same one).

    Feature windows are scored by the model's window-feature members only (rocket
    and hydra members read the sensor series, so they need raw samples); ``GET
    /v1/models`` says which inputs a model takes and which members score each.
``GET /v1/models``
    The active version, every version in the models directory, feature names.
``POST /v1/models/{version}/activate``, ``POST /v1/models/reload``
    Switch the active model without downtime: requests already running finish on
    the model they started with; new requests use the new one. ``reload`` (or
    SIGHUP) re-reads the models directory's ``LATEST``.
``GET /healthz``, ``GET /metrics`` (Prometheus text format).

With a token (``--token`` or ``$GAITFLOW_MODEL_TOKEN``) every ``/v1/`` call needs
``Authorization: Bearer <token>``; ``/healthz`` and ``/metrics`` stay open.

Feature extraction and prediction run in a process pool (``--workers``), so the
event loop only parses, validates and answers. Concurrent requests are grouped
into shared batches (:class:`MicroBatcher`, at most ``batch_delay_s`` of waiting):
scikit-learn's per-call overhead, not arithmetic, dominates a single recording.
Bodies over ``whole_in_worker_bytes`` (raw rows) are decoded, validated and
scored in one worker process instead.

Limits (``ml.validate.Limits``): 256 recordings per request, 360 000 rows per
recording, 2 000 000 rows per request, 10 000 windows per recording, 256 MiB body.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aiohttp import web

from . import features as F
from .artifact import ArtifactError, LoadedModel, list_versions, load_model, resolve_version_dir
from .prom import Registry
from .validate import Limits, PredictItem, RequestError, parse_predict

__all__ = ["ENV_TOKEN", "ModelRegistry", "ServeConfig", "create_app", "main", "serve"]

log = logging.getLogger("gaitflow.ml.serve")
ENV_TOKEN = "GAITFLOW_MODEL_TOKEN"


@dataclass(frozen=True)
class ServeConfig:
    model_path: Path  # a models directory (with versions) or one version directory
    token: str | None = None
    workers: int = 2
    executor: str = "process"  # "process" | "thread"
    limits: Limits = field(default_factory=Limits)
    max_body_bytes: int = 256 * 2**20
    batch_delay_s: float = 0.003  # how long a request may wait to share a batch
    whole_in_worker_bytes: int = 4 << 20  # bigger bodies are parsed and scored in a worker


# ----------------------------------------------------------------------------- worker side

_CACHE: dict[str, Any] = {}
_CACHE_LOCK = threading.Lock()


def _model_for(path: str) -> Any:
    """The model at ``path``, loaded once per worker (a few versions kept)."""
    with _CACHE_LOCK:
        m = _CACHE.get(path)
        if m is None:
            m = load_model(path).model
            if len(_CACHE) >= 4:
                _CACHE.pop(next(iter(_CACHE)))
            _CACHE[path] = m
        return m


def _warm(path: str) -> str:
    return _model_for(path).version


def _predict_chunk(path: str, items: list[PredictItem]) -> list[dict[str, Any]]:
    """Score a chunk of recordings with the model at ``path`` (runs in a worker).

    The chunk is scored as one batch; if that fails, item by item, so that one
    bad recording answers with its own error (``{"error": ...}``) and the others
    (possibly from other requests) are still scored.
    """
    model = _model_for(path)
    try:
        preds: list[Any] = model.predict_batch([(it.kind, it.data) for it in items])
    except Exception:  # noqa: BLE001 - isolate the failing item below
        preds = []
        for it in items:
            try:
                preds.append(model.predict_batch([(it.kind, it.data)])[0])
            except Exception as exc:  # noqa: BLE001 - reported to the request that sent it
                preds.append(exc)
    step_rows = round(model.step_s * model.fs)
    out: list[dict[str, Any]] = []
    for it, pred in zip(items, preds, strict=True):
        if isinstance(pred, Exception):
            out.append({"id": it.id, "error": f"{type(pred).__name__}: {pred}"})
            continue
        if it.kind == "rows":
            windows = [
                {"key": f"{it.id}:{int(s) // step_rows}", "start": int(s), "probability": float(p)}
                for s, p in zip(pred.window_starts, pred.window_probabilities, strict=True)
            ]
        else:
            windows = [
                {"key": k, "probability": float(p)}
                for k, p in zip(it.keys, pred.window_probabilities, strict=True)
            ]
        out.append({
            "id": it.id, "probability": float(pred.probability), "label": pred.label,
            "threshold": float(model.threshold), "n_windows": len(windows), "windows": windows,
        })  # fmt: skip
    return out


class MicroBatcher:
    """Groups the recordings of concurrent requests into shared executor batches.

    Scoring one recording costs ~10 ms of scikit-learn call overhead; a batch of
    hundreds costs little more. Requests wait at most ``max_delay`` seconds for
    company (or until ``max_items`` recordings are pending), then their items go
    to the workers in at most ``workers`` chunks per model version. Each request
    names its model version, so requests started before a switch are still scored
    by the old model.
    """

    def __init__(self, run: Callable[[str, list[PredictItem]], Awaitable[list[dict[str, Any]]]],
                 *, workers: int, max_items: int = 256, max_delay: float = 0.003,
                 on_batch: Callable[[int, int], None] | None = None) -> None:  # fmt: skip
        self._run = run
        self.on_batch = on_batch  # (requests, recordings) of each batch
        self.workers = workers
        self.max_items = max_items
        self.max_delay = max_delay
        self._pending: list[tuple[str, list[PredictItem], asyncio.Future[list[dict[str, Any]]]]] = []
        self._n = 0
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, path: str, items: list[PredictItem]) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[dict[str, Any]]] = loop.create_future()
        self._pending.append((path, items, fut))
        self._n += len(items)
        if self._n >= self.max_items:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.max_delay, self._flush)
        return await fut

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending, self._n = self._pending, [], 0
        by_path: dict[str, list[tuple[list[PredictItem], asyncio.Future[Any]]]] = {}
        for path, items, fut in pending:
            if not fut.done():  # a cancelled request needs no answer
                by_path.setdefault(path, []).append((items, fut))
        for path, entries in by_path.items():
            task = asyncio.get_running_loop().create_task(self._process(path, entries))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _process(self, path: str,
                       entries: list[tuple[list[PredictItem], asyncio.Future[Any]]]) -> None:  # fmt: skip
        flat = [it for items, _ in entries for it in items]
        chunks = _chunks(len(flat), [it.data.shape[0] for it in flat], self.workers)
        if self.on_batch is not None:
            self.on_batch(len(entries), len(flat))
        try:
            parts = await asyncio.gather(*[self._run(path, [flat[i] for i in c]) for c in chunks])
        except Exception as exc:  # noqa: BLE001 - every waiting request gets the error
            for _, fut in entries:
                if not fut.done():
                    fut.set_exception(exc)
            return
        results: list[dict[str, Any]] = [{} for _ in flat]
        for c, part in zip(chunks, parts, strict=True):
            for i, r in zip(c, part, strict=True):
                results[i] = r
        pos = 0
        for items, fut in entries:
            if not fut.done():
                fut.set_result(results[pos : pos + len(items)])
            pos += len(items)

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pending:
            self._flush()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


# ----------------------------------------------------------------------------- registry


class ModelRegistry:
    """The loaded model versions and the active one.

    ``active`` is replaced atomically; a request reads it once and keeps that
    model for its whole life, which is what lets a switch happen under load.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        vdir = resolve_version_dir(self.path)
        # A version directory's siblings are the other versions.
        self.root = vdir.parent if vdir == self.path else self.path
        self._initial = vdir
        self._active: LoadedModel | None = None
        self._lock = asyncio.Lock()
        self.switches = 0

    @property
    def active(self) -> LoadedModel:
        if self._active is None:
            raise RuntimeError("model registry not started")
        return self._active

    async def start(self) -> None:
        self._active = await asyncio.to_thread(load_model, self._initial)

    def versions(self) -> list[str]:
        return list_versions(self.root)

    async def activate(self, version: str, warm: Callable[[LoadedModel], Awaitable[None]]) -> tuple[str, str]:
        """Load (and check) ``version``, warm the workers, then switch to it."""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", version):
            raise RequestError(404, "unknown_version", f"no model version {version!r}", "version")
        async with self._lock:
            try:
                loaded = await asyncio.to_thread(load_model, self.root, version)
            except ArtifactError as exc:
                status = 404 if "no model version" in str(exc) else 409
                raise RequestError(status, "unknown_version" if status == 404 else
                                   "incompatible_model", str(exc), "version") from exc  # fmt: skip
            await warm(loaded)
            previous = self.active.version
            self._active = loaded
            if previous != loaded.version:
                self.switches += 1
            log.info("active model %s (was %s)", loaded.version, previous)
            return loaded.version, previous

    async def reload(self, warm: Callable[[LoadedModel], Awaitable[None]]) -> tuple[str, bool]:
        vdir = await asyncio.to_thread(resolve_version_dir, self.root)
        if vdir.name == self.active.version:
            return vdir.name, False
        version, _ = await self.activate(vdir.name, warm)
        return version, True


# ----------------------------------------------------------------------------- app

CONFIG = web.AppKey("config", ServeConfig)
METRICS = web.AppKey("metrics", Registry)
MODELS = web.AppKey("models", ModelRegistry)
EXECUTOR = web.AppKey("executor", Executor)
STATE = web.AppKey("state", dict)
BATCHER = web.AppKey("batcher", MicroBatcher)


def _json_error(status: int, code: str, message: str, where: str | None = None,
                headers: dict[str, str] | None = None) -> web.Response:  # fmt: skip
    body = RequestError(status, code, message, where).body()
    return web.json_response(body, status=status, headers=headers)


_HTTP_CODES = {
    404: "not_found", 405: "method_not_allowed", 413: "body_too_large", 415: "unsupported_media_type",
}  # fmt: skip


@web.middleware
async def _errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Every error as JSON, and request counting/latency."""
    metrics = request.app[METRICS]
    route = request.match_info.route.resource
    endpoint = route.canonical if route is not None else "unmatched"
    t0 = time.perf_counter()
    try:
        resp = await handler(request)
    except RequestError as exc:
        headers = {"WWW-Authenticate": 'Bearer realm="gaitflow"'} if exc.status == 401 else None
        resp = web.json_response(exc.body(), status=exc.status, headers=headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        resp = _json_error(exc.status, code, exc.reason if exc.status != 413 else
                           f"request body over {request.app[CONFIG].max_body_bytes} bytes")  # fmt: skip
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        resp = _json_error(500, "internal_error", "internal error (see the server log)")
    metrics.inc("http_requests_total", "HTTP requests by endpoint and status",
                labels={"endpoint": endpoint, "status": str(resp.status)})  # fmt: skip
    metrics.observe("http_request_seconds", "HTTP request latency",
                    time.perf_counter() - t0, labels={"endpoint": endpoint})  # fmt: skip
    return resp


def _auth_middleware(token: str | None) -> Any:
    expected = f"Bearer {token}".encode() if token else None

    @web.middleware
    async def _auth(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if expected is not None and request.path.startswith("/v1/"):
            got = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(got, expected):
                raise RequestError(401, "unauthorized", "missing or wrong bearer token")
        return await handler(request)

    return _auth


async def _resources(app: web.Application) -> AsyncIterator[None]:
    """Startup/cleanup: the worker pool and the model registry (reverse-order cleanup)."""
    cfg = app[CONFIG]
    if cfg.executor == "process":
        ex: Executor = ProcessPoolExecutor(
            max_workers=cfg.workers, mp_context=multiprocessing.get_context("spawn")
        )
    else:
        ex = ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="gaitflow-model")
    app[EXECUTOR] = ex
    loop = asyncio.get_running_loop()

    def run(path: str, items: list[PredictItem]) -> Awaitable[list[dict[str, Any]]]:
        return loop.run_in_executor(ex, _predict_chunk, path, items)

    def on_batch(requests: int, recordings: int) -> None:
        m = app[METRICS]
        m.inc("batches_total", "executor batches (requests are grouped)")
        m.observe("batch_requests", "requests per batch", requests,
                  buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))  # fmt: skip
        m.observe("batch_recordings", "recordings per batch", recordings,
                  buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))  # fmt: skip

    batcher = MicroBatcher(run, workers=cfg.workers, max_items=cfg.limits.max_recordings,
                           max_delay=cfg.batch_delay_s, on_batch=on_batch)  # fmt: skip
    app[BATCHER] = batcher
    try:
        reg = ModelRegistry(cfg.model_path)
        await reg.start()
        app[MODELS] = reg
        await _warm_workers(app, reg.active)
        _publish_model(app)
        yield
    finally:
        try:
            await batcher.close()
        finally:
            ex.shutdown(wait=True, cancel_futures=True)


async def _warm_workers(app: web.Application, loaded: LoadedModel) -> None:
    loop = asyncio.get_running_loop()
    n = app[CONFIG].workers
    await asyncio.gather(*[loop.run_in_executor(app[EXECUTOR], _warm, str(loaded.path)) for _ in range(n)])


def _publish_model(app: web.Application) -> None:
    m = app[METRICS]
    m.clear("model_info")
    m.set("model_info", "the active model version", 1.0,
          labels={"version": app[MODELS].active.version})  # fmt: skip
    m.set("model_switches", "model switches since start", float(app[MODELS].switches))


async def predict(request: web.Request) -> web.Response:
    app = request.app
    loaded = app[MODELS].active  # this request's model, whatever happens meanwhile
    model = loaded.model
    state = app[STATE]
    state["inflight"] += 1
    app[METRICS].set("inflight_requests", "predict requests in progress", state["inflight"])
    try:
        raw = await request.read()
        if not raw:
            raise RequestError(400, "invalid_json", "empty body; expected a JSON object")
        limits = replace(app[CONFIG].limits, min_rows=model.window_rows)
        args = (raw, len(F.COLUMNS), len(model.feature_names), limits)
        cfg = app[CONFIG]
        if len(raw) > cfg.whole_in_worker_bytes and cfg.executor == "process":
            # A big body (raw rows) is a batch of its own: one worker process
            # decodes, validates and scores it, so the loop never parses megabytes
            # and the arrays cross the process boundary once.
            loop = asyncio.get_running_loop()
            results = await loop.run_in_executor(
                app[EXECUTOR], _decode_validate_predict, str(loaded.path), *args
            )
        else:
            items = await asyncio.to_thread(_decode_and_validate, *args)
            _check_inputs(model, items)
            results = await app[BATCHER].submit(str(loaded.path), items)
        for i, r in enumerate(results):
            if "error" in r:
                raise RequestError(422, "unscorable", r["error"], f"recordings[{i}]")
        app[METRICS].inc("predictions_total", "recordings scored", len(results),
                         labels={"version": model.version})  # fmt: skip
        return web.json_response({"model_version": model.version, "results": results})
    finally:
        state["inflight"] -= 1
        app[METRICS].set("inflight_requests", "predict requests in progress", state["inflight"])


def _check_inputs(model: Any, items: list[PredictItem]) -> None:
    if any(it.kind == "windows" for it in items) and not model.feature_members:
        raise RequestError(422, "windows_not_supported",
                           f"model {model.version} needs raw rows", "recordings")  # fmt: skip


def _decode_validate_predict(path: str, raw: bytes, n_columns: int, n_features: int,
                             limits: Limits) -> list[dict[str, Any]]:  # fmt: skip
    """A whole request in a worker: decode, validate, score."""
    items = _decode_and_validate(raw, n_columns, n_features, limits)
    _check_inputs(_model_for(path), items)
    return _predict_chunk(path, items)


def _decode_and_validate(raw: bytes, n_columns: int, n_features: int,
                         limits: Limits) -> list[PredictItem]:  # fmt: skip
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, "invalid_json", f"body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise RequestError(400, "invalid_json", "body is nested too deeply") from exc
    return parse_predict(body, n_columns, n_features, limits)


def _chunks(n_items: int, sizes: list[int], n: int) -> list[list[int]]:
    """Indices split into at most ``n`` chunks of similar total size (rows or windows)."""
    n = max(1, min(n, n_items))
    order = sorted(range(n_items), key=lambda i: -sizes[i])
    bins: list[list[int]] = [[] for _ in range(n)]
    load = [0] * n
    for i in order:
        b = load.index(min(load))
        bins[b].append(i)
        load[b] += sizes[i]
    return [sorted(b) for b in bins if b]


def _model_summary(meta: dict[str, Any], active: str) -> dict[str, Any]:
    overall = next((r for r in meta.get("evaluation", {}).get("metrics", [])
                    if r.get("slice") == "overall"), {})  # fmt: skip
    return {
        "version": meta.get("version"),
        "active": meta.get("version") == active,
        "candidate": meta.get("candidate"),
        "created": meta.get("created"),
        "threshold": meta.get("threshold"),
        "cv_auc": overall.get("auc"),
        "cv_balanced_accuracy": overall.get("balanced_accuracy"),
        "feature_windows_supported": meta.get("inputs", {}).get("feature_windows_supported"),
    }


async def models(request: web.Request) -> web.Response:
    reg = request.app[MODELS]
    active = reg.active

    def read_all() -> list[dict[str, Any]]:
        out = []
        for v in reg.versions():
            try:
                meta = json.loads((reg.root / v / "model.json").read_text())
            except (OSError, ValueError):
                continue
            out.append(_model_summary(meta, active.version))
        return out

    versions = await asyncio.to_thread(read_all)
    return web.json_response({
        "active": active.version,
        "versions": versions,
        "feature_names": list(active.model.feature_names),
        "columns": list(F.COLUMNS),
        "window": {"window_s": active.model.window_s, "step_s": active.model.step_s,
                   "fs": active.model.fs},
        "threshold": active.model.threshold,
        "feature_windows_supported": bool(active.model.feature_members),
        "members": {"rows": [m.name for m in active.model.members],
                    "windows": [m.name for m in active.model.feature_members]},
    })  # fmt: skip


async def activate(request: web.Request) -> web.Response:
    app = request.app
    version = request.match_info["version"]
    new, old = await app[MODELS].activate(version, lambda m: _warm_workers(app, m))
    _publish_model(app)
    return web.json_response({"active": new, "previous": old})


async def reload(request: web.Request) -> web.Response:
    app = request.app
    version, changed = await app[MODELS].reload(lambda m: _warm_workers(app, m))
    _publish_model(app)
    return web.json_response({"active": version, "changed": changed})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "model_version": request.app[MODELS].active.version})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[METRICS].render().encode(),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )


def create_app(config: ServeConfig) -> web.Application:
    """Build the application; nothing is loaded until it starts (``cleanup_ctx``)."""
    app = web.Application(
        middlewares=[_errors, _auth_middleware(config.token)], client_max_size=config.max_body_bytes
    )
    app[CONFIG] = config
    app[METRICS] = Registry("gaitflow_model")
    app[STATE] = {"inflight": 0}
    app.cleanup_ctx.append(_resources)
    app.router.add_post("/v1/predict", predict)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/models/reload", reload)
    app.router.add_post("/v1/models/{version}/activate", activate)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


# ----------------------------------------------------------------------------- running


async def serve(config: ServeConfig, host: str, port: int,
                stop: asyncio.Event | None = None) -> None:  # fmt: skip
    """Listen on ``host:port`` until ``stop`` is set (or SIGINT/SIGTERM); SIGHUP reloads."""
    app = create_app(config)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass

    def on_hup() -> None:
        loop.create_task(_reload_logged(app))

    try:
        loop.add_signal_handler(signal.SIGHUP, on_hup)
    except (NotImplementedError, RuntimeError, AttributeError):
        pass
    active = app[MODELS].active
    log.info("serving model %s on http://%s:%d", active.version, host, port)
    print(f"gaitflow model server: model {active.version} on http://{host}:{port}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


async def _reload_logged(app: web.Application) -> None:
    try:
        version, changed = await app[MODELS].reload(lambda m: _warm_workers(app, m))
        _publish_model(app)
        log.info("reload: active %s (changed=%s)", version, changed)
    except Exception:
        log.exception("reload failed")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ml.serve", description="gaitflow model server")
    ap.add_argument("--model", default="artifacts/model",
                    help="models directory (versions + LATEST) or one version directory")  # fmt: skip
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8090,
                    help="default 8090, model_call's default URL (8080 is the pipeline's admin port)")
    ap.add_argument("--token", default=None, help=f"bearer token (default ${ENV_TOKEN})")
    ap.add_argument("--workers", type=int, default=2, help="prediction worker processes")
    ap.add_argument("--threads", action="store_true", help="use threads instead of processes")
    ap.add_argument("--max-batch", type=int, default=Limits.max_recordings)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    config = ServeConfig(
        model_path=Path(args.model),
        token=args.token or os.environ.get(ENV_TOKEN) or None,
        workers=max(1, args.workers),
        executor="thread" if args.threads else "process",
        limits=Limits(max_recordings=args.max_batch),
    )
    try:
        resolve_version_dir(config.model_path)
    except ArtifactError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(config, args.host, args.port))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

