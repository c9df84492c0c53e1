"""pipeline.dashboard without a browser: routes, the admin token, handler extras."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from pipeline import Processor, Runtime
from pipeline.admin import create_admin_app
from pipeline.dashboard import handler_extras

TOKEN = "dash-token-123"


class JobLike(Processor):
    """Reports progress through metrics and a status() hook, as spark_job does."""

    broken = False

    async def process(self, batch: Any) -> Any:
        return batch.data

    def status(self) -> dict[str, Any]:
        if self.broken:
            raise RuntimeError("boom")
        return {"stage": "features", "running": [{"job": "j1"}],
                "progress": {"label": "segments", "done": 3, "total": 4}}


def make_runtime() -> Runtime:
    return Runtime.from_dict({
        "runtime": {"admin_enabled": False},
        "handlers": {
            "src": {"type": "memory_source", "count": 10, "outputs": ["job"],
                    "on_failure": "stop"},
            "job": {"type": f"{__name__}:JobLike", "outputs": ["sink"], "on_failure": "stop"},
            "sink": {"type": "memory_sink", "on_failure": "stop"},
        }})


@pytest.fixture
async def client() -> AsyncIterator[TestClient]:
    app = create_admin_app(make_runtime(), TOKEN, ["pipeline.dashboard:setup"])
    async with TestClient(TestServer(app)) as c:
        yield c


async def test_page_and_assets_are_public_data_needs_the_token(client: TestClient) -> None:
    resp = await client.get("/", allow_redirects=False)
    assert resp.status == 302 and resp.headers["Location"] == "/dashboard/"
    resp = await client.get("/dashboard/")
    assert resp.status == 200
    html = await resp.text()
    assert '<a href="/dashboard/" class="active"' in html and "{{nav}}" not in html
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    for asset in ("dashboard.js", "common.js", "dashboard.css"):
        resp = await client.get(f"/dashboard/static/{asset}")
        assert resp.status == 200, asset
    assert (await client.get("/dashboard/api/state")).status == 401
    assert (await client.get("/api/status")).status == 401
    resp = await client.get("/dashboard/api/state", headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status == 200
    state = await resp.json()
    assert set(state["handlers"]) == {"src", "job", "sink"}
    assert state["handlers"]["sink"]["input"]["capacity"] == 16
    assert "settings" not in state and state["handlers"]["job"]["settings"]["type"].endswith(
        ":JobLike")


@pytest.mark.parametrize("path", [
    "/dashboard/static/../api/status", "/dashboard/static/%2e%2e/%2e%2e/api/status",
    "/dashboard/static/..%2f..%2fapi/status", "/dashboard/static/../../../etc/passwd",
    "/dashboard/api/state/../../api/status", "/dashboard/x/../api/state",
])
async def test_public_prefix_does_not_open_other_routes(client: TestClient, path: str) -> None:
    resp = await client.get(URL(path, encoded=True), allow_redirects=False)
    body = await resp.text()
    assert resp.status in (401, 403, 404), (path, resp.status)
    assert '"handlers"' not in body and "root:" not in body


async def test_handler_extras_metrics_progress_and_status_hook() -> None:
    rt = make_runtime()
    m = rt.handlers["job"].metrics
    m.gauge("spark_tasks_done", "tasks done").set(12)
    m.gauge("spark_tasks_total", "tasks total").set(40)
    m.counter("spark_job_attempts", "runs").inc(2)
    extras = handler_extras(rt)
    job = extras["job"]
    assert job["metrics"] == {"spark_tasks_done": 12.0, "spark_tasks_total": 40.0,
                              "spark_job_attempts_total": 2.0}
    assert job["progress"] == [
        {"label": "spark tasks", "done": 12.0, "total": 40.0,
         "metrics": ["spark_tasks_done", "spark_tasks_total"]},
        {"label": "segments", "done": 3, "total": 4}]
    assert job["info"]["stage"] == "features" and job["info"]["running"] == [{"job": "j1"}]
    assert extras["sink"] == {"metrics": {}, "progress": [], "info": {}, "latency_sum": 0.0,
                              "latency_count": 0.0}
    json.dumps(extras, allow_nan=False)

    rt.handlers["job"].broken = True  # type: ignore[attr-defined]
    info = handler_extras(rt)["job"]["info"]
    assert info == {"error": "status failed: RuntimeError: boom"}


async def test_setup_is_idempotent_and_links_accumulate() -> None:
    from pipeline.dashboard import LINKS_KEY, add_link, setup

    rt = make_runtime()
    app = create_admin_app(rt, None, ["pipeline.dashboard:setup"])
    setup(app, rt)  # a second extension calling it: no duplicate routes
    add_link(app, "Diagnoses", "/diagnoses")
    assert app[LINKS_KEY] == [("Pipeline", "/dashboard/"), ("Diagnoses", "/diagnoses")]
    async with TestClient(TestServer(app)) as c:
        assert (await c.get("/dashboard/api/state")).status == 200  # no token configured
