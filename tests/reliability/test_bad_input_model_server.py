"""Bad input to the model server's API: never a 5xx, always a JSON error, server stays up.

A real ``python -m ml.serve`` (a small model trained for the session) receives
bodies Hypothesis draws: arbitrary JSON values, valid requests with one part broken
(missing or extra fields, wrong types, wrong shapes, too few rows, NaN/Infinity,
booleans and huge integers as numbers, duplicate ids), random bytes, truncated
JSON, deeply nested JSON, and odd methods and paths. Each answer must be 2xx (the
body was in fact valid) or 4xx with ``{"error": {"code", "message"}}``; afterwards
``/healthz`` answers and a valid request is still diagnosed.
"""
from __future__ import annotations

import http.client
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import reliability_support as rs
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

N_COLUMNS = 19
STATS: Counter[str] = Counter()


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[rs.ModelServer]:
    import asyncio

    srv = rs.ModelServer(model_dir, tmp_path_factory.mktemp("serve") / "serve.log")
    asyncio.run(srv.start())
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def n_features(server: rs.ModelServer) -> int:
    status, body = request(server, "GET", "/v1/models")
    assert status == 200, body
    return len(json.loads(body)["feature_names"])


def request(server: rs.ModelServer, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json",
                                                       **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def valid_rows(seed: int, n: int = 1000) -> list[list[float]]:
    rng = np.random.default_rng(seed)
    rows = rng.uniform(0, 900, size=(n, N_COLUMNS)).round(2)
    rows[:, 0] = np.arange(n) / 100
    return rows.tolist()


def valid_body(seed: int, n_features: int, kind: str = "rows") -> dict[str, Any]:
    if kind == "rows":
        return {"recordings": [{"id": f"r{seed}", "rows": valid_rows(seed)}]}
    rng = np.random.default_rng(seed)
    return {"recordings": [{"id": f"r{seed}", "windows": [
        {"key": f"r{seed}:{k}", "features": rng.normal(size=n_features).tolist()}
        for k in range(3)]}]}


# --------------------------------------------------------------------------- strategies
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**80, 2**80),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)),
    max_leaves=30)

BREAKS = ["drop_recordings", "recordings_type", "empty_recordings", "item_type", "drop_id",
          "id_type", "id_empty", "id_long", "duplicate_id", "both_inputs", "no_input",
          "rows_type", "too_few_rows", "row_short", "row_long", "row_type", "cell_string",
          "cell_null", "cell_bool", "cell_list", "cell_huge_int", "cell_nan", "cell_inf",
          "windows_type", "windows_empty", "window_type", "key_type", "features_missing",
          "features_type", "features_short", "features_long", "feature_string",
          "feature_bool", "feature_nan", "feature_inf", "extra_top_field", "too_many",
          "cell_value"]


def broken_body(brk: str, seed: int, value: Any, n_features: int) -> bytes:
    rng = np.random.default_rng(seed)
    kind = "windows" if brk.startswith(("window", "key", "feature")) else "rows"
    body: dict[str, Any] = valid_body(seed, n_features, kind)
    rec = body["recordings"][0]
    rows, wins = rec.get("rows"), rec.get("windows")
    i = int(rng.integers(0, 1000))
    j = int(rng.integers(0, N_COLUMNS))
    k = int(rng.integers(0, n_features))
    nan_token = None
    match brk:
        case "drop_recordings":
            body = {"items": body["recordings"]}
        case "recordings_type":
            body["recordings"] = value if not isinstance(value, list) else {"x": value}
        case "empty_recordings":
            body["recordings"] = []
        case "item_type":
            body["recordings"] = [value if not isinstance(value, dict) else [value]]
        case "drop_id":
            del rec["id"]
        case "id_type":
            rec["id"] = value if not isinstance(value, str) and value is not None else 5
        case "id_empty":
            rec["id"] = ""
        case "id_long":
            rec["id"] = "x" * 201
        case "duplicate_id":
            body["recordings"].append(dict(rec))
        case "both_inputs":
            rec["windows"] = [{"features": [0.0] * n_features}]
        case "no_input":
            del rec["rows"]
        case "rows_type":
            rec["rows"] = value if not isinstance(value, list) else {"rows": value}
        case "too_few_rows":
            rec["rows"] = rows[: int(rng.integers(0, 999))]
        case "row_short":
            rows[i] = rows[i][: int(rng.integers(0, N_COLUMNS))]
        case "row_long":
            rows[i] = rows[i] + [1.0] * int(rng.integers(1, 5))
        case "row_type":
            rows[i] = value if not isinstance(value, list) else {"row": value}
        case "cell_string":
            rows[i][j] = str(rows[i][j])
        case "cell_null":
            rows[i][j] = None
        case "cell_bool":
            rows[i][j] = bool(seed % 2)
        case "cell_list":
            rows[i][j] = [rows[i][j]]
        case "cell_huge_int":
            rows[i][j] = 10 ** int(rng.integers(19, 400))
        case "cell_nan" | "feature_nan":
            nan_token = "NaN"
        case "cell_inf" | "feature_inf":
            nan_token = ["Infinity", "-Infinity", "1e999"][seed % 3]
        case "cell_value":
            rows[i][j] = value
        case "windows_type":
            rec["windows"] = value if not isinstance(value, list) else {"w": value}
        case "windows_empty":
            rec["windows"] = []
        case "window_type":
            wins[0] = value if not isinstance(value, dict) else [value]
        case "key_type":
            wins[0]["key"] = value if not isinstance(value, str) else 7
        case "features_missing":
            del wins[0]["features"]
        case "features_type":
            wins[0]["features"] = value if not isinstance(value, list) else {"f": value}
        case "features_short":
            wins[0]["features"] = wins[0]["features"][: int(rng.integers(0, n_features))]
        case "features_long":
            wins[0]["features"] += [0.5] * int(rng.integers(1, 4))
        case "feature_string":
            wins[0]["features"][k] = "0.5"
        case "feature_bool":
            wins[0]["features"][k] = True
        case "too_many":
            body["recordings"] = [{"id": f"t{n}", "windows": [
                {"features": [0.0] * n_features}]} for n in range(300)]
        case "extra_top_field":
            body["debug"] = value
    if nan_token is not None:
        marker = 987654.321
        if kind == "rows":
            rows[i][j] = marker
        else:
            wins[0]["features"][k] = marker
        return json.dumps(body).replace(str(marker), nan_token, 1).encode()
    return json.dumps(body).encode()


@st.composite
def recipes(draw: st.DrawFn) -> tuple[Any, ...]:
    """A compact description of one body (what Hypothesis prints on failure)."""
    what = draw(st.sampled_from(["json_value", "break", "break", "break", "bytes",
                                 "truncated", "nested"]))
    if what == "json_value":
        return what, draw(json_values)
    if what == "bytes":
        return what, draw(st.binary(max_size=300))
    if what == "truncated":
        return what, draw(st.integers(0, 2**31)), draw(st.sampled_from(["rows", "windows"])), \
            draw(st.floats(0, 1, exclude_max=True))
    if what == "nested":
        return what, draw(st.sampled_from([10, 1000, 5000, 100_000])), \
            draw(st.sampled_from(["[", '{"a":']))
    return what, draw(st.sampled_from(BREAKS)), draw(st.integers(0, 2**31)), draw(json_values)


def materialize(recipe: tuple[Any, ...], n_features: int) -> tuple[str, bytes]:
    what = recipe[0]
    if what == "json_value":
        return what, json.dumps(recipe[1]).encode()
    if what == "bytes":
        return what, recipe[1]
    if what == "truncated":
        _, seed, kind, cut = recipe
        raw = json.dumps(valid_body(seed, n_features, kind)).encode()
        return what, raw[: int(cut * len(raw))]
    if what == "nested":
        _, depth, opener = recipe
        closer = "]" if opener == "[" else "}"
        return what, (opener * depth + "1" + closer * depth).encode()
    _, brk, seed, value = recipe
    return f"break:{brk}", broken_body(brk, seed, value, n_features)


def check_answer(what: str, status: int, raw: bytes) -> None:
    STATS[f"{status // 100}xx"] += 1
    assert status < 500, f"{what}: HTTP {status}: {raw[:300]!r}"
    try:
        doc = json.loads(raw)
    except ValueError:
        raise AssertionError(f"{what}: HTTP {status} with a non-JSON body {raw[:200]!r}") \
            from None
    if status >= 400:
        err = doc.get("error") if isinstance(doc, dict) else None
        assert isinstance(err, dict) and err.get("code") and err.get("message"), \
            f"{what}: HTTP {status} without an error code and message: {doc}"
    else:
        assert "results" in doc and "model_version" in doc, f"{what}: {doc}"


# --------------------------------------------------------------------------- tests
@pytest.mark.timeout(600)
@settings(max_examples=600, deadline=None, database=None,
          phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.large_base_example])
@example(recipe=("nested", 100_000, "["))
@example(recipe=("nested", 50_000, '{"recordings":'))
@given(recipe=recipes())
def test_malformed_predict_bodies_get_a_4xx_json_error(server: rs.ModelServer, n_features: int,
                                                       recipe: tuple[Any, ...]) -> None:
    what, raw = materialize(recipe, n_features)
    status, answer = request(server, "POST", "/v1/predict", raw)
    check_answer(what, status, answer)
    assert server.alive, f"the model server died on {what}\n{server.tail()}"


def test_every_broken_part_is_refused_with_4xx(server: rs.ModelServer, n_features: int) -> None:
    """Each kind of break at least once, deterministically (the fuzz may miss some)."""
    codes: dict[str, tuple[int, str]] = {}
    for brk in BREAKS:
        for seed, value in ((1, "text"), (2, 3.5), (3, None)):
            raw = broken_body(brk, seed, value, n_features)
            status, answer = request(server, "POST", "/v1/predict", raw)
            check_answer(f"break:{brk}", status, answer)
            assert status >= 400 or brk in ("cell_value", "extra_top_field"), (
                f"{brk}: accepted with HTTP {status}")
            codes[brk] = (status, json.loads(answer).get("error", {}).get("code", "-")
                          if status >= 400 else "accepted")
    # odd methods and paths
    for method, path in (("GET", "/v1/predict"), ("PUT", "/v1/predict"), ("GET", "/nope"),
                         ("POST", "/v1/models/..%2F..%2Fetc/activate"),
                         ("POST", "/v1/models/does-not-exist/activate"),
                         ("DELETE", "/v1/models")):
        status, answer = request(server, method, path, b"{}")
        check_answer(f"{method} {path}", status, answer)
        assert status >= 400
    print("model server refusals:", json.dumps(codes))


def test_server_still_diagnoses_after_the_fuzz(server: rs.ModelServer, n_features: int) -> None:
    status, body = request(server, "GET", "/healthz")
    assert status == 200, body
    t0 = time.monotonic()
    status, body = request(server, "POST", "/v1/predict",
                           json.dumps(valid_body(7, n_features)).encode())
    assert status == 200, body
    result = json.loads(body)["results"][0]
    assert 0.0 <= result["probability"] <= 1.0 and result["n_windows"] >= 1
    print(f"after the fuzz ({dict(STATS)}): valid request answered in "
          f"{time.monotonic() - t0:.2f} s")
