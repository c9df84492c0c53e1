"""The model server: predictions, every validation error, auth, switching versions."""

from __future__ import annotations

import asyncio
import io
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer

from ml import features as F
from ml import train as T
from ml.artifact import load_model, save_model
from ml.model import DEFAULT_MODEL
from ml.serve import STATE, ServeConfig, create_app, serve
from ml.synthetic import synthetic_recording, write_synthetic_dataset
from ml.validate import Limits

V1, V2 = "20260101-000000-test0001", "20260102-000000-test0002"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two versions of small feature models (V1: the default model, V2: ensemble_core;
    LATEST = V1)."""
    data = write_synthetic_dataset(tmp_path_factory.mktemp("data"), n_controls=6, n_patients=6,
                                   walks=1, seconds=25.0, seed=2)  # fmt: skip
    ds = T.load_dataset(data, series=True, jobs=1)
    out = tmp_path_factory.mktemp("models")
    for version, seed, cand in ((V2, 1, "ensemble_core"), (V1, 0, DEFAULT_MODEL)):
        model = T.fit_final(ds, cand, inner_folds=2, seed=seed, version=version, jobs=1)
        save_model(model, {"created": version}, out)
    rocket = T.fit_final(ds, "rocket_logreg", inner_folds=2, seed=0, version="rocket-only", jobs=1)
    save_model(rocket, {}, out / "rocket", set_latest=True)
    return out


ClientFactory = Callable[..., Awaitable[TestClient]]


@pytest.fixture
async def make_client(models_dir: Path) -> AsyncIterator[ClientFactory]:
    clients: list[TestClient] = []

    async def make(path: Path | None = None, **kw: Any) -> TestClient:
        cfg = ServeConfig(model_path=path or models_dir, executor="thread", workers=2, **kw)
        client = TestClient(TestServer(create_app(cfg)))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for c in reversed(clients):
        await c.close()


def _rows(seconds: float = 12.0, parkinsonian: bool = False, seed: int = 0) -> list[list[float]]:
    x = synthetic_recording(1.2, seconds, parkinsonian=parkinsonian, seed=seed)
    return np.round(x, 3).tolist()


def _windows(rid: str = "w1", seconds: float = 16.0) -> list[dict[str, Any]]:
    _, feats = F.recording_features(synthetic_recording(1.2, seconds))
    return [
        {"key": f"{rid}:{k}", "features": [None if not np.isfinite(v) else float(v) for v in row]}
        for k, row in enumerate(feats)
    ]


async def _error(resp: aiohttp.ClientResponse, status: int, code: str) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    return body["error"]


# ----------------------------------------------------------------------------- happy paths


async def test_predict_raw_rows(make_client: ClientFactory) -> None:
    client = await make_client()
    body = {"recordings": [{"id": "a", "rows": _rows(12.0)},
                           {"id": "b", "rows": _rows(16.0, parkinsonian=True, seed=1)}]}  # fmt: skip
    resp = await client.post("/v1/predict", json=body)
    assert resp.status == 200, await resp.text()
    out = await resp.json()
    assert out["model_version"] == V1
    assert [r["id"] for r in out["results"]] == ["a", "b"]
    a, b = out["results"]
    assert 0.0 <= a["probability"] <= 1.0 and a["label"] in {"parkinson", "control"}
    for r in (a, b):  # the label is the probability read against the model's threshold
        assert 0.0 < r["threshold"] < 1.0
        assert r["label"] == ("parkinson" if r["probability"] >= r["threshold"] else "control")
    assert a["n_windows"] == 1 and b["n_windows"] == 2
    assert [w["key"] for w in b["windows"]] == ["b:0", "b:1"]
    assert [w["start"] for w in b["windows"]] == [0, 500]


async def test_feature_windows_give_the_same_answer_as_rows(make_client: ClientFactory) -> None:
    # with a model whose members all read window features (V2); the default model's
    # hydra member reads the sensor series, so windows skip it (next test)
    client = await make_client()
    assert (await client.post(f"/v1/models/{V2}/activate")).status == 200
    x = synthetic_recording(1.2, 16.0)
    _, feats = F.recording_features(x)
    wins = [{"key": f"r:{k}", "features": [None if not np.isfinite(v) else float(v) for v in f]}
            for k, f in enumerate(feats)]  # fmt: skip
    r1 = await (await client.post("/v1/predict", json={"recordings": [
        {"id": "r", "rows": x.tolist()}]})).json()  # fmt: skip
    r2 = await (await client.post("/v1/predict", json={"recordings": [
        {"id": "r", "windows": wins}]})).json()  # fmt: skip
    assert r2["results"][0]["probability"] == pytest.approx(r1["results"][0]["probability"])
    assert [w["key"] for w in r2["results"][0]["windows"]] == ["r:0", "r:1"]


async def test_feature_windows_skip_the_series_member_of_the_default_model(
        make_client: ClientFactory, models_dir: Path) -> None:  # fmt: skip
    client = await make_client()
    info = await (await client.get("/v1/models")).json()
    assert info["active"] == V1 and info["feature_windows_supported"] is True
    assert info["members"] == {"rows": ["logreg_core", "set_svm", "hydra_ridge"],
                               "windows": ["logreg_core", "set_svm"]}
    x = synthetic_recording(1.2, 16.0)
    _, feats = F.recording_features(x)
    wins = [{"key": f"r:{k}", "features": [None if not np.isfinite(v) else float(v) for v in f]}
            for k, f in enumerate(feats)]  # fmt: skip
    got = (await (await client.post("/v1/predict", json={"recordings": [
        {"id": "r", "windows": wins}]})).json())["results"][0]["probability"]  # fmt: skip
    model = load_model(models_dir).model
    window_members = replace(model, members=model.feature_members)
    assert got == pytest.approx(window_members.predict_rows(x).probability)
    assert got != pytest.approx(model.predict_rows(x).probability)


async def test_null_features_are_imputed(make_client: ClientFactory) -> None:
    client = await make_client()
    wins = _windows()
    wins[0]["features"] = [None] * len(F.FEATURE_NAMES)
    resp = await client.post("/v1/predict", json={"recordings": [{"id": "w1", "windows": wins}]})
    assert resp.status == 200


async def test_models_health_and_metrics(make_client: ClientFactory) -> None:
    client = await make_client()
    assert await (await client.get("/healthz")).json() == {"status": "ok", "model_version": V1}
    models = await (await client.get("/v1/models")).json()
    assert models["active"] == V1
    assert [v["version"] for v in models["versions"]] == [V1, V2]
    assert models["feature_names"] == list(F.FEATURE_NAMES)
    assert models["window"] == {"window_s": 10.0, "step_s": 5.0, "fs": 100.0}
    assert models["feature_windows_supported"] is True
    await client.post("/v1/predict", json={"recordings": [{"id": "a", "rows": _rows()}]})
    await client.post("/v1/predict", data=b"{")
    resp = await client.get("/metrics")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    assert 'gaitflow_model_http_requests_total{endpoint="/v1/predict",status="200"} 1' in text
    assert 'gaitflow_model_http_requests_total{endpoint="/v1/predict",status="400"} 1' in text
    assert f'gaitflow_model_predictions_total{{version="{V1}"}} 1' in text
    assert f'gaitflow_model_model_info{{version="{V1}"}} 1' in text
    assert "gaitflow_model_http_request_seconds_bucket" in text


# ----------------------------------------------------------------------------- validation

GOOD_ROWS = [[0.0] * 19] * 1000
NAN_BODY = (
    b'{"recordings": [{"id": "a", "rows": [' + b",".join([b"[" + b",".join([b"1"] * 19) + b"]"] * 999)
    + b",[1,1,1,NaN" + b",1" * 15 + b"]]}]}"
)  # fmt: skip
INF_BODY = NAN_BODY.replace(b"NaN", b"Infinity")
BIG_NUMBER_BODY = NAN_BODY.replace(b"NaN", b"1e999")


def _one(**rec: Any) -> dict[str, Any]:
    return {"recordings": [{"id": "a", **rec}]}


def _features(n: int, bad: Any = None, at: int = 0) -> dict[str, Any]:
    f: list[Any] = [0.5] * n
    if bad is not None:
        f[at] = bad
    return _one(windows=[{"key": "a:0", "features": f}])


NF = len(F.FEATURE_NAMES)
CASES: list[tuple[str, Any, int, str, str | None]] = [
    ("bad json", b"{not json", 400, "invalid_json", None),
    ("empty body", b"", 400, "invalid_json", None),
    ("not an object", [1, 2], 400, "invalid_body", "$"),
    ("no recordings", {"items": []}, 422, "missing_field", "recordings"),
    ("recordings not a list", {"recordings": {"id": "a"}}, 422, "invalid_type", "recordings"),
    ("empty batch", {"recordings": []}, 422, "empty_batch", "recordings"),
    ("recording not an object", {"recordings": [[1, 2]]}, 422, "invalid_type", "recordings[0]"),
    ("missing id", {"recordings": [{"rows": GOOD_ROWS}]}, 422, "missing_field", "recordings[0].id"),
    ("bad id", {"recordings": [{"id": 7, "rows": GOOD_ROWS}]}, 422, "invalid_id",
     "recordings[0].id"),
    ("duplicate id", {"recordings": [{"id": "a", "rows": GOOD_ROWS}, {"id": "a", "rows": GOOD_ROWS}]},
     422, "duplicate_id", "recordings[1].id"),
    ("neither rows nor windows", _one(), 422, "missing_field", "recordings[0]"),
    ("both rows and windows", _one(rows=GOOD_ROWS, windows=[]), 422, "ambiguous_input",
     "recordings[0]"),
    ("rows not a list", _one(rows="1,2,3"), 422, "invalid_type", "recordings[0].rows"),
    ("row not a list", _one(rows=[5] * 1000), 422, "invalid_type", "recordings[0].rows[0]"),
    ("18 columns", _one(rows=[[0.0] * 18] * 1000), 422, "wrong_column_count",
     "recordings[0].rows[0]"),
    ("one row with 20 columns", _one(rows=GOOD_ROWS[:500] + [[0.0] * 20] + GOOD_ROWS[:499]), 422,
     "wrong_column_count", "recordings[0].rows[500]"),
    ("a string value", _one(rows=[[0.0] * 18 + ["1"]] + GOOD_ROWS[1:]), 422, "invalid_type",
     "recordings[0].rows[0][18]"),
    ("a null value", _one(rows=[[None] + [0.0] * 18] + GOOD_ROWS[1:]), 422, "invalid_type",
     "recordings[0].rows[0][0]"),
    # JSON true/false are not numbers, although Python's bool is an int subclass
    ("a true value", _one(rows=GOOD_ROWS[:3] + [[0.0] * 5 + [True] + [0.0] * 13] + GOOD_ROWS[4:]),
     422, "invalid_type", "recordings[0].rows[3][5]"),
    ("a false value among ints", _one(rows=[[1] * 19] * 10 + [[False] + [1] * 18] + [[1] * 19] * 989),
     422, "invalid_type", "recordings[0].rows[10][0]"),
    ("all values true", _one(rows=[[True] * 19] * 1000), 422, "invalid_type",
     "recordings[0].rows[0][0]"),
    ("NaN", NAN_BODY, 422, "non_finite", "recordings[0].rows[999][3]"),
    ("Infinity", INF_BODY, 422, "non_finite", "recordings[0].rows[999][3]"),
    ("overflowing number", BIG_NUMBER_BODY, 422, "non_finite", "recordings[0].rows[999][3]"),
    ("shorter than a window", _one(rows=GOOD_ROWS[:999]), 422, "too_short", "recordings[0].rows"),
    ("windows not a list", _one(windows={"key": "a"}), 422, "invalid_type",
     "recordings[0].windows"),
    ("no windows", _one(windows=[]), 422, "too_short", "recordings[0].windows"),
    ("window not an object", _one(windows=[[0.5] * NF]), 422, "invalid_type",
     "recordings[0].windows[0]"),
    ("window without features", _one(windows=[{"key": "a:0"}]), 422, "missing_field",
     "recordings[0].windows[0].features"),
    ("window key not a string", _one(windows=[{"key": 1, "features": [0.5] * NF}]), 422,
     "invalid_type", "recordings[0].windows[0].key"),
    ("too few features", _features(NF - 1), 422, "wrong_feature_count",
     "recordings[0].windows[0].features"),
    ("too many features", _features(NF + 1), 422, "wrong_feature_count",
     "recordings[0].windows[0].features"),
    ("a string feature", _features(NF, "x", 4), 422, "invalid_type",
     "recordings[0].windows[0].features[4]"),
    ("a boolean feature", _features(NF, True, 5), 422, "invalid_type",
     "recordings[0].windows[0].features[5]"),
    ("a NaN feature", json.dumps(_features(NF, float("nan"), 7)).encode(), 422, "non_finite",
     "recordings[0].windows[0].features[7]"),
    ("an infinite feature", json.dumps(_features(NF, float("-inf"), 9)).encode(), 422,
     "non_finite", "recordings[0].windows[0].features[9]"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "status", "code", "where"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
async def test_validation_errors(make_client: ClientFactory, body: Any, status: int, code: str,
                                 where: str | None) -> None:  # fmt: skip
    client = await make_client()
    if isinstance(body, bytes):
        resp = await client.post("/v1/predict", data=body,
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    else:
        resp = await client.post("/v1/predict", json=body)
    err = await _error(resp, status, code)
    assert err.get("field") == where


async def test_size_limits(make_client: ClientFactory) -> None:
    client = await make_client(limits=Limits(max_recordings=2, max_rows=1500, max_total_rows=2500,
                                             max_windows=3),
                               max_body_bytes=2_000_000)  # fmt: skip
    rec = {"rows": GOOD_ROWS}
    three = {"recordings": [{"id": str(i), **rec} for i in range(3)]}
    await _error(await client.post("/v1/predict", json=three), 413, "batch_too_large")
    long = _one(rows=[[0.0] * 19] * 1600)
    err = await _error(await client.post("/v1/predict", json=long), 413, "recording_too_long")
    assert err["field"] == "recordings[0].rows"
    total = {"recordings": [{"id": "a", "rows": [[0.0] * 19] * 1400},
                            {"id": "b", "rows": [[0.0] * 19] * 1400}]}  # fmt: skip
    await _error(await client.post("/v1/predict", json=total), 413, "batch_too_large")
    many = _one(windows=[{"features": [0.5] * NF}] * 4)
    await _error(await client.post("/v1/predict", json=many), 413, "recording_too_long")
    huge = b'{"recordings": [' + b" " * 2_100_000 + b"]}"
    await _error(await client.post("/v1/predict", data=io.BytesIO(huge)), 413, "body_too_large")


async def test_unknown_routes_and_methods_answer_json(make_client: ClientFactory) -> None:
    client = await make_client()
    await _error(await client.get("/v1/nope"), 404, "not_found")
    await _error(await client.get("/v1/predict"), 405, "method_not_allowed")


async def test_model_without_feature_members_refuses_windows(make_client: ClientFactory,
                                                             models_dir: Path) -> None:  # fmt: skip
    client = await make_client(models_dir / "rocket")
    info = await (await client.get("/v1/models")).json()
    assert info["feature_windows_supported"] is False
    assert info["members"] == {"rows": ["rocket_logreg"], "windows": []}
    resp = await client.post("/v1/predict", json={"recordings": [{"id": "w", "windows": _windows()}]})
    await _error(resp, 422, "windows_not_supported")
    ok = await client.post("/v1/predict", json={"recordings": [{"id": "a", "rows": _rows()}]})
    assert ok.status == 200 and (await ok.json())["model_version"] == "rocket-only"


# ----------------------------------------------------------------------------- auth


async def test_bearer_token(make_client: ClientFactory) -> None:
    client = await make_client(token="s3cret")
    body = {"recordings": [{"id": "a", "rows": _rows()}]}
    resp = await client.post("/v1/predict", json=body)
    await _error(resp, 401, "unauthorized")
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = await client.post("/v1/predict", json=body, headers={"Authorization": "Bearer nope"})
    await _error(wrong, 401, "unauthorized")
    await _error(await client.get("/v1/models"), 401, "unauthorized")
    ok = await client.post("/v1/predict", json=body, headers={"Authorization": "Bearer s3cret"})
    assert ok.status == 200
    assert (await client.get("/healthz")).status == 200  # probes stay open
    assert (await client.get("/metrics")).status == 200


# ----------------------------------------------------------------------------- versions


async def test_activate_and_reload(make_client: ClientFactory, models_dir: Path,
                                   tmp_path: Path) -> None:  # fmt: skip
    client = await make_client()
    await _error(await client.post("/v1/models/nope/activate"), 404, "unknown_version")
    await _error(await client.post("/v1/models/..%2F..%2Fetc/activate"), 404, "unknown_version")
    resp = await client.post(f"/v1/models/{V2}/activate")
    assert await resp.json() == {"active": V2, "previous": V1}
    out = await (await client.post("/v1/predict", json={"recordings": [
        {"id": "a", "rows": _rows()}]})).json()  # fmt: skip
    assert out["model_version"] == V2
    assert await (await client.post("/v1/models/reload")).json() == {"active": V1, "changed": True}
    assert (await (await client.get("/healthz")).json())["model_version"] == V1
    assert await (await client.post("/v1/models/reload")).json() == {"active": V1, "changed": False}


async def test_switching_models_under_load_loses_no_request(make_client: ClientFactory) -> None:
    client = await make_client()
    state = client.app[STATE]
    rows = _rows(11.0)

    async def one(i: int) -> tuple[int, str]:
        resp = await client.post("/v1/predict", json={"recordings": [{"id": f"r{i}", "rows": rows}]})
        body = await resp.json()
        return resp.status, body.get("model_version", "")

    versions_seen: list[str] = []
    for target in (V2, V1, V2):
        tasks = [asyncio.create_task(one(i)) for i in range(24)]
        while state["inflight"] < 4:  # requests that are running when the switch happens
            await asyncio.sleep(0.002)
        in_flight = state["inflight"]
        previous = V1 if target == V2 else V2
        resp = await client.post(f"/v1/models/{target}/activate")
        assert resp.status == 200
        results = await asyncio.gather(*tasks)
        assert [s for s, _ in results] == [200] * 24  # nothing lost
        versions = [v for _, v in results]
        assert set(versions) <= {V1, V2}
        # every request already running at the switch finished on the old model
        assert versions.count(previous) >= in_flight
        versions_seen += versions
        after = await one(99)
        assert after == (200, target)
    assert {V1, V2} <= set(versions_seen)


async def test_process_workers_and_serve_lifecycle(models_dir: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stop = asyncio.Event()
    cfg = ServeConfig(model_path=models_dir / V2, executor="process", workers=1,
                      whole_in_worker_bytes=100_000)  # fmt: skip
    task = asyncio.create_task(serve(cfg, "127.0.0.1", port, stop))
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        for _ in range(300):  # worker processes take a moment to spawn
            try:
                async with session.get(f"{base}/healthz") as resp:
                    if resp.status == 200:
                        assert (await resp.json())["model_version"] == V2
                        break
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)
        else:
            pytest.fail("server did not come up")
        body = {"recordings": [{"id": "a", "rows": _rows()}]}
        async with session.post(f"{base}/v1/predict", json=body) as resp:
            assert resp.status == 200
            assert (await resp.json())["results"][0]["n_windows"] == 1
        # a big body is decoded, validated and scored inside the worker process
        big = {"recordings": [{"id": f"b{i}", "rows": _rows(seed=i)} for i in range(3)]}
        async with session.post(f"{base}/v1/predict", json=big) as resp:
            assert resp.status == 200
            assert [r["id"] for r in (await resp.json())["results"]] == ["b0", "b1", "b2"]
        big["recordings"][2]["rows"][5][3] = float("nan")
        async with session.post(f"{base}/v1/predict", data=json.dumps(big),
                                headers={"Content-Type": "application/json"}) as resp:  # fmt: skip
            err = await _error(resp, 422, "non_finite")
            assert err["field"] == "recordings[2].rows[5][3]"
    stop.set()
    await asyncio.wait_for(task, 30)


def test_config_is_frozen(models_dir: Path) -> None:
    cfg = ServeConfig(model_path=models_dir)
    assert replace(cfg, workers=3).workers == 3
    with pytest.raises(AttributeError):
        cfg.workers = 5  # type: ignore[misc]


# ----------------------------------------------------------------------------- batching


async def test_concurrent_requests_share_batches(make_client: ClientFactory) -> None:
    client = await make_client(batch_delay_s=0.05)
    wins = _windows("w", 11.0)
    answers = await asyncio.gather(*[
        client.post("/v1/predict", json={"recordings": [{"id": f"r{i}", "windows": wins}]})
        for i in range(16)
    ])  # fmt: skip
    bodies = [await a.json() for a in answers]
    assert [b["results"][0]["id"] for b in bodies] == [f"r{i}" for i in range(16)]
    probs = {round(b["results"][0]["probability"], 12) for b in bodies}
    assert len(probs) == 1  # same input, same answer, whatever batch it was in
    metrics = await (await client.get("/metrics")).text()
    line = next(ln for ln in metrics.splitlines() if ln.startswith("gaitflow_model_batches_total "))
    batches = float(line.split()[1])
    assert batches < 16


def test_one_bad_item_does_not_fail_its_batch(models_dir: Path) -> None:
    from ml.serve import _predict_chunk
    from ml.validate import PredictItem

    _, feats = F.recording_features(synthetic_recording(1.2, 12.0))
    good = PredictItem("good", "windows", feats, ["good:0"])
    bad = PredictItem("bad", "windows", feats[:, :10], ["bad:0"])  # wrong width
    out = _predict_chunk(str(models_dir / V1), [good, bad, good])
    assert [o["id"] for o in out] == ["good", "bad", "good"]
    assert "error" in out[1] and "probability" in out[0] and "probability" in out[2]
