"""handlers.gait_dashboard without servers: queries, response shaping, lake decoding,
downsampling, ids and where the settings come from."""
from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from handlers.gait_dashboard import GaitDashboardSettings, settings_from_runtime
from handlers.gait_dashboard_data import (
    QueryError,
    _decode,
    build_search,
    downsample,
    search_result,
    truth_of,
    valid_recording_id,
)
from pipeline import Runtime, Secret


@pytest.mark.parametrize("rid", ["GaCo01_01", "a", "x.y-z_1", "A" * 64])
def test_valid_ids(rid: str) -> None:
    assert valid_recording_id(rid)


@pytest.mark.parametrize("rid", ["", "..", "a..b", "../x", "a/b", "a b", "A" * 65, "é", "a\x00"])
def test_invalid_ids(rid: str) -> None:
    assert not valid_recording_id(rid)


def test_truth_from_gaitpdb_ids() -> None:
    assert truth_of("GaCo01_01") == ("Ga", "control")
    assert truth_of("SiPt34_10") == ("Si", "parkinson")
    assert truth_of("custom-device-7") == (None, None)


def test_build_search_filters() -> None:
    body = build_search({"q": "gapt*", "label": "parkinson", "truth": "parkinson",
                         "study": "Ga", "model_version": "v2", "min_p": "0.5", "max_p": "0.9",
                         "sort": "-probability", "size": "50"})
    must, filters = body["query"]["bool"]["must"], body["query"]["bool"]["filter"]
    should = must[0]["bool"]["should"]
    assert should[0] == {"prefix": {"recording": {"value": "gapt*", "case_insensitive": True,
                                                  "boost": 3}}}
    assert should[1]["wildcard"]["recording"]["value"] == "*gapt\\**"  # user wildcards escaped
    assert {"term": {"label": "parkinson"}} in filters
    assert {"term": {"model_version": "v2"}} in filters
    assert {"prefix": {"recording": "GaPt"}} in filters
    assert {"range": {"probability": {"gte": 0.5, "lte": 0.9}}} in filters
    assert body["sort"][0] == {"probability": "desc"} and body["size"] == 50
    assert build_search({"truth": "control"})["query"]["bool"]["filter"] == [
        {"wildcard": {"recording": "??Co*"}}]
    assert build_search({})["query"]["bool"] == {"must": [{"match_all": {}}], "filter": []}


@pytest.mark.parametrize(("params", "message"), [
    ({"label": "maybe"}, "label"), ({"study": "Xx"}, "study"), ({"min_p": "2"}, "min_p"),
    ({"max_p": "abc"}, "max_p"), ({"min_p": "0.8", "max_p": "0.2"}, "above"),
    ({"sort": "_id"}, "sort"), ({"size": "5000"}, "size"), ({"from": "x"}, "integers"),
    ({"q": "x" * 101}, "q"),
])
def test_build_search_rejects(params: dict[str, str], message: str) -> None:
    with pytest.raises(QueryError, match=message):
        build_search(params)


def test_search_result_confusion_matrix() -> None:
    resp: dict[str, Any] = {
        "took": 3,
        "hits": {"total": {"value": 3}, "hits": [
            {"_id": "GaPt01_01", "_source": {"recording": "GaPt01_01", "label": "parkinson",
                                             "probability": 0.9}},
            {"_id": "JuCo02_01", "_source": {"recording": "JuCo02_01", "label": "parkinson",
                                             "probability": 0.7}},
            {"_id": "dev-9", "_source": {"label": "control", "probability": 0.1}}]},
        "aggregations": {
            "truth": {"buckets": {
                "parkinson": {"doc_count": 5, "label": {"buckets": [
                    {"key": "parkinson", "doc_count": 4}, {"key": "control", "doc_count": 1}]}},
                "control": {"doc_count": 2, "label": {"buckets": [
                    {"key": "parkinson", "doc_count": 2}]}}}},
            "mean_probability": {"value": 0.55},
            "all": {"model_versions": {"buckets": [{"key": "v1", "doc_count": 3}]}}}}
    out = search_result(resp)
    assert [r["correct"] for r in out["rows"]] == [True, False, None]
    assert out["rows"][2]["recording"] == "dev-9" and out["rows"][2]["study"] is None
    assert out["confusion"] == {"tp": 4, "fn": 1, "fp": 2, "tn": 0, "n": 7,
                                "accuracy": round(4 / 7, 4), "sensitivity": 0.8,
                                "specificity": 0.0}
    assert out["model_versions"] == ["v1"] and out["total"] == 3
    empty = search_result({"hits": {"hits": [], "total": {"value": 0}}})
    assert empty["confusion"]["accuracy"] is None and empty["rows"] == []


def _segment(seqs: np.ndarray, value: float) -> bytes:
    n = len(seqs)
    table = pa.table({"recording": ["r"] * n, "seq": seqs, "time": seqs / 100.0,
                      **{f"{s}{i}": np.full(n, value) for s in "LR" for i in range(1, 9)},
                      "L": np.full(n, 8 * value), "R": np.full(n, 8 * value), "device": ["d"] * n})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def test_decode_sorts_and_keeps_the_newest_copy_of_a_sample() -> None:
    old = _segment(np.arange(100, 200), 1.0)        # an older date's copy of 100..199
    new = _segment(np.arange(150, 250)[::-1], 2.0)   # newer, overlapping, out of order
    table = _decode([old, new])
    seq = table.column("seq").to_numpy()
    assert seq.tolist() == list(range(100, 250))
    l1 = table.column("L1").to_numpy()
    assert (l1[:50] == 1.0).all() and (l1[50:] == 2.0).all()


def test_downsample_keeps_peaks_and_zooms() -> None:
    n = 10_000
    seq = np.arange(n)
    force = np.zeros(n)
    force[4321] = 900.0  # one spike: a mean would hide it, the envelope must not
    table = pa.table({"seq": seq, "time": seq / 100.0, "L": force, "R": force / 2,
                      **{f"L{i}": force / 8 for i in range(1, 9)}})
    out = downsample(table, points=500, heat_columns=100)
    assert out is not None
    assert len(out["time"]) == 500 and len(out["L"]["max"]) == 500
    assert max(out["L"]["max"]) == 900.0 and max(out["L"]["mean"]) < 900.0
    assert out["heatmap"]["sensors"] == [f"L{i}" for i in range(1, 9)]
    assert len(out["heatmap"]["values"]) == 8 and len(out["heatmap"]["values"][0]) == 100
    assert (out["rows"], out["seq_first"], out["seq_last"]) == (n, 0, n - 1)
    assert out["full_start"] == 0.0 and out["full_end"] == 99.99

    zoom = downsample(table, points=500, start=40.0, end=45.0)
    assert zoom is not None and zoom["rows"] == 501 and len(zoom["time"]) == 500
    assert zoom["time"][0] >= 40.0 and zoom["time"][-1] <= 45.0
    assert zoom["full_end"] == 99.99  # the whole recording's extent, for the zoom bar
    assert downsample(table, start=500.0) is None
    small = downsample(table.slice(0, 7), points=500)
    assert small is not None and len(small["time"]) == 7  # fewer samples than points


def test_settings_from_runtime_then_env() -> None:
    rt = Runtime.from_dict({
        "runtime": {"admin_enabled": False},
        "handlers": {
            "src": {"type": "memory_source", "count": 1, "outputs": ["es"], "on_failure": "stop"},
            "es": {"type": "es_sink", "hosts": ["http://es-1:9200", "http://es-2:9200"],
                   "index": "diag-v2", "username": "u", "password": "p", "on_failure": "stop"},
        }})
    s = settings_from_runtime(rt, env={})
    assert s.es_hosts == ("http://es-1:9200", "http://es-2:9200") and s.es_index == "diag-v2"
    assert s.es_username == "u" and s.es_password == Secret("p")
    assert s.lake_root == GaitDashboardSettings().lake_root
    s = settings_from_runtime(rt, env={"GAITFLOW_DASHBOARD_ES_INDEX": "other",
                                       "GAITFLOW_DASHBOARD_LAKE_ROOT": "/t/raw",
                                       "GAITFLOW_DASHBOARD_ES_HOSTS": "http://a:1, http://b:2"})
    assert s.es_index == "other" and s.lake_root == "/t/raw"
    assert s.es_hosts == ("http://a:1", "http://b:2")
    assert settings_from_runtime(None, env={}) == GaitDashboardSettings()


async def test_unreachable_services_answer_503_with_the_reason(monkeypatch) -> None:
    import socket

    from aiohttp.test_utils import TestClient, TestServer

    from pipeline.admin import create_admin_app

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("GAITFLOW_DASHBOARD_ES_HOSTS", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("GAITFLOW_DASHBOARD_WEBHDFS_URL", f"http://127.0.0.1:{port}")
    rt = Runtime.from_dict({"runtime": {"admin_enabled": False}, "handlers": {
        "src": {"type": "memory_source", "count": 1, "outputs": ["sink"], "on_failure": "stop"},
        "sink": {"type": "memory_sink", "on_failure": "stop"}}})
    app = create_admin_app(rt, None, ["handlers.gait_dashboard:setup"])
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/api/diagnoses?q=Ga")
        assert resp.status == 503
        assert f"127.0.0.1:{port} is unreachable" in (await resp.json())["error"]
        resp = await client.get("/api/recordings/GaCo01_01/diagnosis")
        assert resp.status == 503
        resp = await client.get("/api/recordings/GaCo01_01/signals")
        assert resp.status == 503
        assert "lake read failed" in (await resp.json())["error"]
        resp = await client.get("/api/recordings/GaCo01_01/signals?start=abc")
        assert resp.status == 400
        for page in ("/diagnoses", "/recordings/GaCo01_01", "/gait/static/plot.js",
                     "/dashboard/"):
            assert (await client.get(page)).status == 200, page


def test_settings_from_lake_sink() -> None:
    rt = Runtime.from_dict({
        "runtime": {"admin_enabled": False},
        "handlers": {
            "src": {"type": "memory_source", "count": 1, "outputs": ["lake"],
                    "on_failure": "stop"},
            "lake": {"type": "lake_sink", "url": "http://nn:9870", "user": "etl",
                     "root": "/data/raw", "on_failure": "stop"},
        }})
    s = settings_from_runtime(rt, env={})
    assert (s.webhdfs_url, s.hdfs_user, s.lake_root) == ("http://nn:9870", "etl", "/data/raw")
