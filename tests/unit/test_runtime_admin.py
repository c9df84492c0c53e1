"""The admin server: /healthz, /readyz, /metrics, /api/status, bearer token, redaction."""
from __future__ import annotations

import asyncio
import io
import json

import aiohttp
import pytest

from pipeline.log import configure_logging

FAKES = "runtime_fakes"
PASSWORD = "pa55-very-secret-word"
TOKEN = "admin-token-4711"


async def wait_for_url(rt) -> str:
    for _ in range(500):
        if rt.admin_url:
            return rt.admin_url
        await asyncio.sleep(0.01)
    raise AssertionError("admin server did not start")


async def test_readyz_false_until_every_handler_started(make_runtime, probe_events) -> None:
    rt = make_runtime({
        "src": {"type": "memory_source", "forever": True, "interval": 0.01, "outputs": ["slow"]},
        "slow": {"type": f"{FAKES}:LifecycleProbe", "start_delay": 0.5},
    }, runtime={"admin_enabled": True, "admin_port": 0})
    task = asyncio.create_task(rt.run())
    url = await wait_for_url(rt)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/healthz") as resp:
            assert resp.status == 200
            assert (await resp.json())["status"] == "ok"
        async with http.get(f"{url}/readyz") as resp:
            assert resp.status == 503
            body = await resp.json()
            assert body["ready"] is False and body["not_ready"]["slow"] == "starting"
            assert body["not_ready"]["src"] == "created"
        for _ in range(200):
            async with http.get(f"{url}/readyz") as resp:
                if resp.status == 200:
                    assert (await resp.json()) == {"ready": True, "not_ready": {}}
                    break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("never ready")
        rt.handlers["slow"].set_connected(False, "server gone")
        async with http.get(f"{url}/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["not_ready"] == {"slow": "not connected: server gone"}
    rt.request_stop("test")
    assert (await asyncio.wait_for(task, 5)).ok


async def test_metrics_and_status_content(make_runtime) -> None:
    rt = make_runtime({
        "src": {"type": "memory_source", "forever": True, "batch_size": 5, "interval": 0.005,
                "outputs": ["sink"]},
        "sink": {"type": f"{FAKES}:ScriptedSink", "fail_on": [7], "capacity": 3,
                 "retry": {"max_attempts": 2, "backoff": 0}},
    }, runtime={"admin_enabled": True, "admin_port": 0})
    async with rt:
        while rt.metrics.value("dead_letters", "sink") < 1 or rt.metrics.value("batches_in",
                                                                               "dlq") < 1:
            await asyncio.sleep(0.01)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{rt.admin_url}/metrics") as resp:
                assert resp.status == 200
                assert resp.content_type == "text/plain"
                text = await resp.text()
            async with http.get(f"{rt.admin_url}/api/status") as resp:
                status = await resp.json()
            async with http.get(f"{rt.admin_url}/api/graph") as resp:
                graph = await resp.json()
    for expected in [
        '# TYPE gaitflow_batches_in_total counter',
        'gaitflow_rows_out_total{handler="src",output="default"}',
        'gaitflow_retries_total{handler="sink"} 1',
        'gaitflow_errors_total{handler="sink"} 2',
        'gaitflow_dead_letters_total{handler="sink"} 1',
        'gaitflow_dead_letter_rows_total{handler="sink"} 5',
        '# TYPE gaitflow_handle_seconds histogram',
        'gaitflow_handle_seconds_bucket{handler="sink",le="+Inf"}',
        'gaitflow_channel_capacity{handler="sink"} 3',
        'gaitflow_channel_depth{handler="sink"}',
        'gaitflow_ack_lag_seconds{handler="src"}',
        'gaitflow_ack_pending{handler="src"}',
        'gaitflow_handler_up{handler="sink"} 1',
        'gaitflow_ready 1',
    ]:
        assert expected in text, expected
    process = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines()
               if ln.startswith(("gaitflow_process_", "gaitflow_arrow_"))}
    assert process["gaitflow_process_resident_memory_bytes"] > 10e6
    assert process["gaitflow_process_cpu_seconds_total"] > 0
    assert process["gaitflow_process_open_fds"] >= 3
    assert process["gaitflow_arrow_allocated_bytes"] >= 0
    sink = status["handlers"]["sink"]
    assert status["state"] == "running" and status["ready"] is True
    assert sink["kind"] == "sink" and sink["dead_letters"] == 1 and sink["input"]["capacity"] == 3
    assert status["handlers"]["src"]["ack"]["committed"] >= 1
    assert status["settings"]["handlers"]["sink"]["retry"]["max_attempts"] == 2
    assert graph["mermaid"].startswith("flowchart LR") and "src (source" in graph["text"]


async def test_status_logs_and_errors_never_show_secrets(make_runtime, monkeypatch) -> None:
    stream = io.StringIO()
    configure_logging("debug", stream=stream)
    rt = make_runtime({
        "src": {"type": "memory_source", "forever": True, "interval": 0.01, "outputs": ["db"]},
        "db": {"type": f"{FAKES}:SecretSink", "password": "${DB_PASSWORD}",
               "api_token": "${API_TOKEN:-tok-default-value}",
               "retry": {"max_attempts": 2, "backoff": 0}},
    }, runtime={"admin_enabled": True, "admin_port": 0, "admin_token": "${ADMIN_TOKEN}"},
        env={"DB_PASSWORD": PASSWORD, "ADMIN_TOKEN": TOKEN})
    assert rt.handlers["db"].settings.password.get() == PASSWORD
    async with rt:
        while rt.metrics.value("dead_letters", "db") < 1:
            await asyncio.sleep(0.01)
        async with aiohttp.ClientSession() as http:
            auth = {"Authorization": f"Bearer {TOKEN}"}
            async with http.get(f"{rt.admin_url}/api/status", headers=auth) as resp:
                assert resp.status == 200
                status_text = await resp.text()
            async with http.get(f"{rt.admin_url}/metrics", headers=auth) as resp:
                raw = status_text + await resp.text()
    status = json.loads(status_text)
    db = status["settings"]["handlers"]["db"]
    assert db["password"] == "***" and db["api_token"] == "***" and db["user"] == "svc"
    assert status["settings"]["runtime"]["admin_token"] == "***"
    logs = stream.getvalue()
    dead = rt.handlers["dlq"].rows()
    for secret in (PASSWORD, TOKEN, "tok-default-value"):
        assert secret not in raw
        assert secret not in logs
        assert all(secret not in json.dumps(d, default=str) for d in dead)
    assert 'password="***"' in logs, "the handler's own log line is redacted"
    assert "login failed for svc:***@db" in logs, "secrets echoed by exceptions are scrubbed"
    assert dead[0]["exception"] == "PermissionError: login failed for svc:***@db"


@pytest.mark.parametrize(("path", "header", "status"), [
    ("/metrics", None, 401),
    ("/api/status", "Bearer wrong", 401),
    ("/api/status", f"Bearer {TOKEN}", 200),
    ("/metrics", f"Bearer {TOKEN}", 200),
    ("/healthz", None, 200),
    ("/readyz", None, 200),
])
async def test_bearer_token_protects_everything_but_probes(
        make_runtime, path: str, header: str | None, status: int) -> None:
    rt = make_runtime({
        "src": {"type": "memory_source", "forever": True, "interval": 0.01, "outputs": ["s"]},
        "s": {"type": "memory_sink"},
    }, runtime={"admin_enabled": True, "admin_port": 0, "admin_token": TOKEN})
    async with rt, aiohttp.ClientSession() as http:
        headers = {"Authorization": header} if header else {}
        async with http.get(f"{rt.admin_url}{path}", headers=headers) as resp:
            assert resp.status == status
            if status == 401:
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")


def test_arrow_pool_bytes_follow_allocations() -> None:
    import pyarrow as pa

    from pipeline.metrics import process_samples

    before = process_samples()["arrow_allocated_bytes"]
    held = pa.array(range(1_000_000), type=pa.int64())
    assert process_samples()["arrow_allocated_bytes"] >= before + 8_000_000
    del held
    assert process_samples()["arrow_allocated_bytes"] < before + 8_000_000

