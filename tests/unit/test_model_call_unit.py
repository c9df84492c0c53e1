"""model_call against a fake model server (aiohttp, on a loopback port).

The fake speaks ml.serve's protocol: ``POST /v1/predict`` with recordings and their
windows, ``GET /v1/models``, ``GET /healthz``; it can fail, stall, refuse
recordings and check a bearer token on demand.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import pyarrow as pa
import pytest
from aiohttp import web

from handlers.model_call import CircuitBreaker, CircuitOpenError, ModelCall
from pipeline import NoSettings, Runtime, Source, StartError

FEATURES = ["f1", "f2", "f3"]
_FEEDS: dict[str, asyncio.Queue[Any]] = {}


class WindowFeed(Source):
    """Emits the (table, meta) pairs put in its queue; ``None`` ends it."""

    Settings: ClassVar[type] = NoSettings

    def __init__(self, name: str, settings: Any = None) -> None:
        super().__init__(name, settings)
        self.committed: list[int] = []
        self.queue: asyncio.Queue[Any] = asyncio.Queue()

    async def start(self) -> None:
        _FEEDS[self.name] = self.queue

    async def run(self) -> None:
        n = 0
        while (item := await self.queue.get()) is not None:
            await self.emit(item[0], key="window_key", meta=item[1], token=n)
            n += 1

    async def commit(self, tokens: list[Any]) -> None:
        self.committed.extend(tokens)


def windows(recording: str, n: int = 3, *, final: bool = True, nan: bool = False,
            features: list[str] = FEATURES) -> tuple[pa.Table, dict[str, Any]]:
    cols: dict[str, Any] = {
        "recording": [recording] * n,
        "window": list(range(n)),
        "window_key": [f"{recording}:{k}" for k in range(n)],
        "seq_first": [k * 500 for k in range(n)],
        "seq_last": [k * 500 + 999 for k in range(n)],
    }
    for j, f in enumerate(features):
        cols[f] = [float(k + j) / 10 for k in range(n)]
    if nan:
        cols[features[0]][0] = float("nan")
    return pa.table(cols), {"final": final, "recording": recording}


@dataclasses.dataclass
class FakeModel:
    """What the fake server does; tests flip these fields while it runs."""

    version: str = "fake-1"
    status: int = 200                 # answer this status to every predict (when >= 400)
    fail_next: int = 0                # then fail this many predicts with 503
    delay: float = 0.0                # seconds before answering a predict
    stall_next: int = 0               # stall this many predicts for 5 s (client timeouts)
    token: str | None = None          # required bearer token
    refuse: dict[str, str] = dataclasses.field(default_factory=dict)  # id -> 400 message
    requests: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    health_checks: int = 0
    model_calls: int = 0
    in_flight: int = 0
    max_in_flight: int = 0

    async def predict(self, request: web.Request) -> web.Response:
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"error": "missing or wrong bearer token"}, status=401)
        body = await request.json()
        self.requests.append(body)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.stall_next:
                self.stall_next -= 1
                await asyncio.sleep(5)
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.fail_next:
                self.fail_next -= 1
                return web.json_response({"error": "overloaded"}, status=503)
            if self.status >= 400:
                return web.json_response({"error": "broken"}, status=self.status)
            for rec in body["recordings"]:
                if rec["id"] in self.refuse:
                    return web.json_response({"error": self.refuse[rec["id"]]}, status=400)
                for j, w in enumerate(rec["windows"]):
                    if len(w["features"]) != len(FEATURES):  # as ml.serve words it
                        return web.json_response({"error": {
                            "code": "wrong_feature_count",
                            "message": f"{len(w['features'])} features; the model expects "
                                       f"{len(FEATURES)}",
                            "field": f"recordings[0].windows[{j}].features"}}, status=422)
            results = []
            for rec in body["recordings"]:
                probs = [0.25 + 0.25 * (i % 3) for i, _ in enumerate(rec["windows"])]
                p = sum(probs) / len(probs)
                results.append({"id": rec["id"], "probability": p, "threshold": 0.45,
                                "label": "parkinson" if p >= 0.45 else "control",
                                "windows": [{"key": w["key"], "probability": q}
                                            for w, q in zip(rec["windows"], probs, strict=True)]})
            return web.json_response({"model_version": self.version, "results": results})
        finally:
            self.in_flight -= 1

    async def models(self, request: web.Request) -> web.Response:
        self.model_calls += 1
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"error": {"code": "unauthorized",
                                                "message": "missing or wrong bearer token"}},
                                     status=401)
        return web.json_response({"active": self.version, "versions": [{"version": self.version}],
                                  "feature_names": FEATURES})

    async def healthz(self, request: web.Request) -> web.Response:
        self.health_checks += 1
        if self.status >= 500:
            return web.json_response({"status": "broken"}, status=503)
        return web.json_response({"status": "ok"})


class FakeServer:
    """Serves a FakeModel; ``stop()`` closes the listener and every connection."""

    def __init__(self, model: FakeModel) -> None:
        self.model = model
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/predict", self.model.predict)
        app.router.add_get("/v1/models", self.model.models)
        app.router.add_get("/healthz", self.model.healthz)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
async def server() -> AsyncIterator[FakeServer]:
    srv = FakeServer(FakeModel())
    await srv.start()
    yield srv
    await srv.stop()


def runtime(server: FakeServer, *, call: dict[str, Any] | None = None,
            section: dict[str, Any] | None = None) -> Runtime:
    """feed -> model_call -> out, dead letters in dlq."""
    settings = {"url": server.url, "features": FEATURES, "max_wait_ms": 0.0,
                "retry_policy": {"max_attempts": 3, "backoff": 0.01, "jitter": 0.0},
                **(call or {})}
    rt = Runtime.from_dict({
        "runtime": {"admin_enabled": False, "drain_timeout": 10.0},
        "dead_letter": {"target": "dlq"},
        "handlers": {
            "feed": {"type": "test_model_call_unit:WindowFeed", "outputs": ["model"]},
            "model": {"type": "model_call", "outputs": ["out"], **settings,
                      **(section or {"retry": {"max_attempts": 1}})},
            "out": {"type": "memory_sink"},
            "dlq": {"type": "memory_sink"},
        }}, file="test.toml", env={})
    return rt


async def run_all(rt: Runtime, batches: list[tuple[pa.Table, dict[str, Any]]]) -> Any:
    """Run until the fed batches are all committed."""
    task = asyncio.create_task(rt.run())
    while "feed" not in _FEEDS or rt.handlers["feed"].queue is not _FEEDS["feed"]:  # type: ignore[attr-defined]
        await asyncio.sleep(0.01)
        if task.done():
            return task.result()
    for b in batches:
        _FEEDS["feed"].put_nowait(b)
    _FEEDS["feed"].put_nowait(None)
    return await task


def out_rows(rt: Runtime) -> dict[str, dict[str, Any]]:
    return {r["recording"]: r for r in rt.handlers["out"].rows()}  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- tests
async def test_final_batches_are_diagnosed_with_the_model_version(server: FakeServer) -> None:
    rt = runtime(server)
    report = await run_all(rt, [windows("GaPt01_01"), windows("GaCo02_01", 5)])
    assert report.ok, report.errors
    got = out_rows(rt)
    assert set(got) == {"GaPt01_01", "GaCo02_01"}
    d = got["GaCo02_01"]
    assert d["model_version"] == "fake-1"
    assert d["n_windows"] == 5
    assert d["window_probabilities"] == [0.25, 0.5, 0.75, 0.25, 0.5]
    assert d["label"] in ("parkinson", "control")
    assert d["threshold"] == 0.45  # the model's, kept beside its label
    assert d["diagnosed_at"].tzinfo is not None
    out = rt.handlers["out"].batches[0]  # type: ignore[attr-defined]
    assert out.key == "recording"
    assert out.schema.field("diagnosed_at").type == pa.timestamp("us", tz="UTC")
    assert rt.handlers["feed"].committed == [0, 1]  # type: ignore[attr-defined]
    sent = server.model.requests[0]["recordings"][0]
    assert sent["id"] == "GaPt01_01"
    assert [w["key"] for w in sent["windows"]] == ["GaPt01_01:0", "GaPt01_01:1", "GaPt01_01:2"]
    assert sent["windows"][1]["features"] == [0.1, 0.2, 0.3]


async def test_non_final_batches_are_committed_without_a_call(server: FakeServer) -> None:
    rt = runtime(server)
    report = await run_all(rt, [windows("GaPt01_01", final=False), windows("GaPt01_01")])
    assert report.ok
    assert len(server.model.requests) == 1
    assert rt.handlers["out"].row_count == 1  # type: ignore[attr-defined]
    assert rt.handlers["feed"].committed == [0, 1]  # type: ignore[attr-defined]


async def test_every_batch_mode_diagnoses_partial_batches(server: FakeServer) -> None:
    rt = runtime(server, call={"diagnose": "every_batch"})
    report = await run_all(rt, [windows("GaPt01_01", 2, final=False)])
    assert report.ok
    assert out_rows(rt)["GaPt01_01"]["n_windows"] == 2


async def test_windows_are_sorted_and_grouped_by_recording(server: FakeServer) -> None:
    a, _ = windows("GaPt01_01", 3)
    b, _ = windows("GaCo02_01", 2)
    mixed = pa.concat_tables([a, b]).take([4, 2, 0, 3, 1])
    rt = runtime(server)
    report = await run_all(rt, [(mixed, {"final": True})])
    assert report.ok
    sent = {r["id"]: [w["key"] for w in r["windows"]]
            for r in server.model.requests[0]["recordings"]}
    assert sent == {"GaPt01_01": ["GaPt01_01:0", "GaPt01_01:1", "GaPt01_01:2"],
                    "GaCo02_01": ["GaCo02_01:0", "GaCo02_01:1"]}
    assert len(server.model.requests) == 1


async def test_concurrent_batches_share_requests(server: FakeServer) -> None:
    server.model.delay = 0.05
    rt = runtime(server, call={"max_batch": 4, "max_wait_ms": 200.0},
                 section={"concurrency": 8, "retry": {"max_attempts": 1}})
    recs = [f"GaPt{i:02d}_01" for i in range(8)]
    report = await run_all(rt, [windows(r) for r in recs])
    assert report.ok
    assert set(out_rows(rt)) == set(recs)
    assert len(server.model.requests) <= 3  # 8 recordings, 4 per request
    assert max(len(r["recordings"]) for r in server.model.requests) == 4


async def test_requests_in_flight_are_bounded(server: FakeServer) -> None:
    server.model.delay = 0.1
    rt = runtime(server, call={"max_batch": 1, "max_in_flight": 2},
                 section={"concurrency": 6, "retry": {"max_attempts": 1}})
    report = await run_all(rt, [windows(f"GaPt{i:02d}_01") for i in range(6)])
    assert report.ok
    assert len(server.model.requests) == 6
    assert server.model.max_in_flight == 2


async def test_4xx_dead_letters_only_the_refused_recording(server: FakeServer) -> None:
    server.model.refuse = {"GaPt02_01": "recording GaPt02_01: expected 3 features, got 2"}
    server.model.delay = 0.02
    rt = runtime(server, call={"max_batch": 8, "max_wait_ms": 100.0},
                 section={"concurrency": 4, "retry": {"max_attempts": 3, "backoff": 0.01}})
    recs = ["GaPt01_01", "GaPt02_01", "GaPt03_01"]
    report = await run_all(rt, [windows(r) for r in recs])
    assert report.ok
    assert set(out_rows(rt)) == {"GaPt01_01", "GaPt03_01"}
    dead = rt.handlers["dlq"].table().to_pylist()  # type: ignore[attr-defined]
    assert [d["key"] for d in dead] == ["GaPt02_01:0", "GaPt02_01:1", "GaPt02_01:2"]
    assert dead[0]["reason"] == ("model server refused the input (400): recording GaPt02_01: "
                                 "expected 3 features, got 2")
    assert dead[0]["attempts"] == 1  # never retried
    assert '"window_key": "GaPt02_01:0"' in dead[0]["payload"]
    assert rt.handlers["feed"].committed == [0, 1, 2]  # type: ignore[attr-defined]


async def test_wrong_feature_count_is_refused_by_the_server(server: FakeServer) -> None:
    # e.g. the server switched to a model with other features after the start
    rt = runtime(server, call={"features": ["f1", "f2"], "check_at_start": False})
    table, meta = windows("GaPt01_01")
    report = await run_all(rt, [(table, meta)])
    assert report.ok
    dead = rt.handlers["dlq"].table().to_pylist()  # type: ignore[attr-defined]
    assert len(dead) == 3
    assert dead[0]["reason"] == (
        "model server refused the input (422): wrong_feature_count: 2 features; the model "
        "expects 3 (at recordings[0].windows[0].features)")


async def test_start_fails_when_the_features_differ_from_the_model(server: FakeServer) -> None:
    rt = runtime(server, call={"features": ["f1", "f3", "f2"]})
    with pytest.raises(StartError, match=r"expects 3 features \(f1, f2, f3\), the settings "
                                         r"send 3 \(f1, f3, f2\): fix `features`"):
        await rt.run()


async def test_5xx_is_retried(server: FakeServer) -> None:
    server.model.fail_next = 2
    rt = runtime(server)
    report = await run_all(rt, [windows("GaPt01_01")])
    assert report.ok
    assert len(server.model.requests) == 3
    assert set(out_rows(rt)) == {"GaPt01_01"}


async def test_timeouts_are_retried(server: FakeServer) -> None:
    server.model.stall_next = 1
    rt = runtime(server, call={"request_timeout": 0.3})
    report = await run_all(rt, [windows("GaPt01_01")])
    assert report.ok
    assert set(out_rows(rt)) == {"GaPt01_01"}
    assert len(server.model.requests) == 2


async def test_nan_features_are_sent_as_null(server: FakeServer) -> None:
    rt = runtime(server)
    report = await run_all(rt, [windows("GaPt01_01", nan=True)])
    assert report.ok
    assert server.model.requests[0]["recordings"][0]["windows"][0]["features"][0] is None


async def test_batch_without_feature_columns_is_rejected(server: FakeServer) -> None:
    rt = runtime(server)
    table, meta = windows("GaPt01_01", features=["f1"])
    report = await run_all(rt, [(table, meta)])
    assert report.ok
    dead = rt.handlers["dlq"].table().to_pylist()  # type: ignore[attr-defined]
    assert len(dead) == 3 and "lacks column(s) f2, f3" in dead[0]["reason"]
    assert server.model.requests == []


async def test_bearer_token(server: FakeServer) -> None:
    server.model.token = "s3cret"
    rt = runtime(server, call={"token": "s3cret"})
    report = await run_all(rt, [windows("GaPt01_01")])
    assert report.ok and rt.handlers["out"].row_count == 1  # type: ignore[attr-defined]

    calls = server.model.model_calls
    with pytest.raises(StartError, match=r"GET /v1/models: 401 unauthorized: missing or wrong"):
        await runtime(server, call={"token": "not-the-token-4d1f"}).run()
    assert server.model.model_calls == calls + 1  # not retried: it cannot get better

    rt = runtime(server, call={"token": "not-the-token-4d1f", "check_at_start": False})
    report = await run_all(rt, [windows("GaPt01_01")])
    assert report.ok
    dead = rt.handlers["dlq"].table().to_pylist()  # type: ignore[attr-defined]
    assert len(dead) == 3 and "(401)" in dead[0]["reason"] and "check `token`" in \
        dead[0]["reason"]
    assert "s3cret" not in repr(rt.status()) and "not-the-token-4d1f" not in repr(rt.status())
    assert rt.handlers["model"].health()[0] is False


async def test_circuit_opens_fails_fast_and_recovers(server: FakeServer) -> None:
    server.model.status = 500
    rt = runtime(server, call={"breaker_failures": 2, "breaker_cooldown": 0.3,
                               "retry_policy": {"max_attempts": 5, "backoff": 0.01}})
    task = asyncio.create_task(rt.run())
    while "feed" not in _FEEDS or rt.handlers["feed"].queue is not _FEEDS["feed"]:  # type: ignore[attr-defined]
        await asyncio.sleep(0.01)
    model: ModelCall = rt.handlers["model"]  # type: ignore[assignment]
    _FEEDS["feed"].put_nowait(windows("GaPt01_01"))
    dlq = rt.handlers["dlq"]
    await _until(lambda: dlq.row_count == 3)  # type: ignore[attr-defined]
    assert len(server.model.requests) == 2  # the circuit opened: no more attempts
    assert model.breaker.state in ("open", "half_open")
    connected, detail = model.health()
    assert not connected and "circuit open" in detail
    assert not rt.readiness()[0]
    # fail fast while open: no request reaches the server
    _FEEDS["feed"].put_nowait(windows("GaPt02_01"))
    await _until(lambda: dlq.row_count == 6)  # type: ignore[attr-defined]
    reasons = [r["reason"] for r in dlq.table().to_pylist()]  # type: ignore[attr-defined]
    assert "CircuitOpenError" in reasons[-1]
    assert len(server.model.requests) == 2
    # the server heals: the background probe closes the circuit without traffic
    server.model.status = 200
    await _until(lambda: model.health()[0], timeout=5)
    assert server.model.health_checks >= 1
    assert model.breaker.state == "closed"
    _FEEDS["feed"].put_nowait(windows("GaPt03_01"))
    await _until(lambda: rt.handlers["out"].row_count == 1)  # type: ignore[attr-defined]
    _FEEDS["feed"].put_nowait(None)
    report = await task
    assert report.ok


async def test_server_down_opens_the_circuit_then_recovers(server: FakeServer) -> None:
    rt = runtime(server, call={"breaker_failures": 2, "breaker_cooldown": 0.2,
                               "connect_timeout": 0.5})
    task = asyncio.create_task(rt.run())
    while "feed" not in _FEEDS or rt.handlers["feed"].queue is not _FEEDS["feed"]:  # type: ignore[attr-defined]
        await asyncio.sleep(0.01)
    model: ModelCall = rt.handlers["model"]  # type: ignore[assignment]
    await server.stop()
    _FEEDS["feed"].put_nowait(windows("GaPt01_01"))
    await _until(lambda: rt.handlers["dlq"].row_count == 3)  # type: ignore[attr-defined]
    assert not model.health()[0]
    reason = rt.handlers["dlq"].table().to_pylist()[0]["reason"]  # type: ignore[attr-defined]
    assert "unreachable" in reason
    await server.start()  # same port
    await _until(lambda: model.health()[0], timeout=5)
    _FEEDS["feed"].put_nowait(windows("GaPt02_01"))
    await _until(lambda: rt.handlers["out"].row_count == 1)  # type: ignore[attr-defined]
    _FEEDS["feed"].put_nowait(None)
    assert (await task).ok


async def test_start_fails_when_the_server_is_unreachable(server: FakeServer) -> None:
    await server.stop()
    rt = runtime(server, call={"retry_policy": {"max_attempts": 2, "backoff": 0.01},
                               "connect_timeout": 0.5})
    with pytest.raises(StartError, match=r"GET /v1/models"):
        await rt.run()


def test_settings_reject_a_bad_url() -> None:
    with pytest.raises(Exception, match="url"):
        Runtime.from_dict({"handlers": {
            "model": {"type": "model_call", "url": "localhost:8090", "on_failure": "stop"}}})


def test_default_features_are_the_feature_names() -> None:
    from ml.features import FEATURE_NAMES

    assert ModelCall("m").features == list(FEATURE_NAMES)


# --------------------------------------------------------------------------- breaker
class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_consecutive_failures_and_half_opens() -> None:
    clock, changes = Clock(), []
    b = CircuitBreaker(3, 10.0, clock=clock, on_change=lambda s, e: changes.append(s))
    for _ in range(2):
        b.acquire()
        b.failure("boom")
    b.acquire()
    b.success()                       # a success resets the count
    for _ in range(3):
        b.acquire()
        b.failure("boom")
    assert b.state == "open" and changes == ["open"]
    with pytest.raises(CircuitOpenError, match=r"3 consecutive failures, next probe in 10.0s"):
        b.acquire()
    clock.now += 10
    b.acquire()                       # the probe
    assert b.state == "half_open"
    with pytest.raises(CircuitOpenError, match="a probe is in flight"):
        b.acquire()                   # only one probe at a time
    b.failure("still down")
    assert b.state == "open" and b.retry_after() == 10.0
    clock.now += 10
    b.acquire()
    b.success()
    assert b.state == "closed" and changes == ["open", "half_open", "open", "half_open",
                                               "closed"]
    b.acquire()


async def _until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)
