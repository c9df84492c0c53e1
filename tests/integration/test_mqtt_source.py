"""mqtt_source (and lake_sink behind it) on the real Mosquitto and HDFS of the stack.

Topics, client ids and lake paths are unique per test run; persistent sessions
are deleted and lake directories removed at the end of each test.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest
from lake_support import keys, read_lake

from handlers.mqtt_source import COLUMNS
from pipeline import Runtime, StartError
from stack.config import ROOT, StackConfig
from stack.service import Service
from stack.services.mosquitto import ca_file, credentials

pytestmark = pytest.mark.integration


# -- fixtures and helpers --------------------------------------------------------------------
@pytest.fixture
def mosquitto(stack_service: Callable[[str], Service]) -> Service:
    return stack_service("mosquitto")


@pytest.fixture
def run_id() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
async def sessions(mosquitto: Service) -> AsyncIterator[list[tuple[str, dict[str, Any]]]]:
    """Client ids (and connection options) whose persistent session is deleted afterwards."""
    made: list[tuple[str, dict[str, Any]]] = []
    yield made
    for client_id, kw in made:
        async with aiomqtt.Client("127.0.0.1", kw.pop("port", int(mosquitto.opts["port"])),
                                  identifier=client_id, protocol=aiomqtt.ProtocolVersion.V5,
                                  clean_start=True, **kw):
            pass   # clean start + no session expiry: the broker forgets the session


async def publish(port: int, topic: str, payloads: list[bytes], **kw: Any) -> None:
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"it-pub-{uuid.uuid4().hex[:8]}",
                              max_queued_outgoing_messages=None, **kw) as client:
        for p in payloads:
            await client.publish(topic, p, qos=1)


def sample_msg(rec: str, row: np.ndarray, seq: int | None = None) -> bytes:
    obj: dict[str, Any] = {"Patient": rec, **{c: float(v) for c, v in zip(COLUMNS, row,
                                                                          strict=True)}}
    if seq is not None:
        obj["seq"] = seq
    return json.dumps(obj).encode()


def batch_msg(rec: str, seq: int, rows: np.ndarray) -> bytes:
    return json.dumps({"device": f"insole-{rec}", "recording": rec, "seq": seq,
                       "rows": rows.tolist()}).encode()


def end_msg(rec: str, n: int) -> bytes:
    return json.dumps({"device": f"insole-{rec}", "recording": rec, "end": True,
                       "rows_total": n}).encode()


def recording(n: int, seed: int = 0) -> np.ndarray:
    """Synthetic insole rows: time = i / 100 exactly, forces >= 0."""
    rng = np.random.default_rng(seed)
    rows = rng.uniform(0, 900, size=(n, 19)).round(2)
    rows[:, 0] = np.arange(n) / 100
    return rows


def mqtt_lake(port: int, topic: str, client_id: str, url: str, root: str, dlq: Path,
              mqtt: dict[str, Any] | None = None, lake: dict[str, Any] | None = None,
              env: dict[str, str] | None = None) -> Runtime:
    return Runtime.from_dict({
        "runtime": {"admin_enabled": False, "drain_timeout": 30},
        "dead_letter": {"target": "dlq"},
        "handlers": {
            "mqtt": {"type": "mqtt_source", "port": port, "topics": [topic],
                     "client_id": client_id, "session_expiry": 600,
                     "outputs": {"default": ["lake"], "events": ["lake"]}, **(mqtt or {})},
            "lake": {"type": "lake_sink", "url": url, "root": root, "roll_rows": 1000,
                     "roll_interval": 0.5, "outputs": {"segments": ["segs"]}, **(lake or {})},
            "segs": {"type": "memory_sink"},
            "dlq": {"type": "file_dead_letter", "path": str(dlq)},
        }}, env=env or {})


async def until(cond: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def dead_letters(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- validation ----------------------------------------------------------------------------
async def test_every_bad_payload_is_dead_lettered_and_never_reaches_the_lake(
        mosquitto: Service, hdfs_url: str, lake_root: str, run_id: str, tmp_path: Path,
        sessions: list[tuple[str, dict[str, Any]]]) -> None:
    port = int(mosquitto.opts["port"])
    topic, client_id = f"it/{run_id}/dev", f"it-bad-{run_id}"
    sessions.append((client_id, {}))
    good = recording(150)
    row = good[0]
    sample = json.loads(sample_msg("bad", row))
    bad: list[tuple[bytes, str]] = [
        (b"\xc3\x28 not utf-8", "not UTF-8"),
        (b"{\"recording\": ", "not JSON"),
        (b"[1,2,3]", "not a JSON object"),
        (batch_msg("bad", 0, good[:2, :18]), "wrong column count"),
        (json.dumps({**sample, "L4": "heavy"}).encode(), "non-numeric value for 'L4'"),
        (batch_msg("bad", 0, good[:2]).replace(b"[0.0,", b"[NaN,", 1), "NaN or infinite"),
        (json.dumps({**sample, "R2": 1e999}).encode().replace(b"Infinity", b"1e999"),
         "NaN or infinite"),
        (json.dumps({**sample, "R2": -3.5}).encode(), "negative force"),
        (batch_msg("bad", 0, good[[1, 0]]), "time going backwards within the message"),
        (batch_msg("../x", 0, good[:2]), "unsafe recording id"),
        (batch_msg("a/b", 0, good[:2]), "unsafe recording id"),
        (batch_msg("a\u0007b", 0, good[:2]), "unsafe recording id"),
        (batch_msg("r" * 65, 0, good[:2]), "unsafe recording id"),
        (json.dumps({"seq": 0, "rows": good[:2].tolist()}).encode(), "missing recording id"),
        (batch_msg("bad", 0, np.tile(good[:1], (250, 1))), "oversize payload"),
    ]
    clock = recording(200)
    clock[:, 0] += 30.0
    reset = recording(100)               # the same recording's clock restarts at 0
    payloads = [batch_msg("good", 0, good[:100])]
    for p, _ in bad:
        payloads.append(p)
    payloads += [batch_msg("clock", 0, clock[:100]), batch_msg("clock", 100, reset),
                 batch_msg("good", 100, good[100:]), end_msg("good", 150)]
    expected_reasons = [r for _, r in bad] + ["time going backwards across messages"]
    dlq = tmp_path / "dlq.jsonl"
    rt = mqtt_lake(port, topic, client_id, hdfs_url, lake_root, dlq,
                   mqtt={"max_payload_bytes": 30_000})
    async with rt:
        await publish(port, topic, payloads)
        await until(lambda: len(dead_letters(dlq)) >= len(expected_reasons)
                    and any(s["final"] for s in rt.handlers["segs"].rows()), 60,
                    "the dead letters and the good recording's final segment")
    report = rt.report
    assert report is not None and report.ok and report.unacked == 0
    got = dead_letters(dlq)
    assert len(got) == len(expected_reasons)
    for letter, reason in zip(got, expected_reasons, strict=True):
        assert reason in letter["reason"], (reason, letter["reason"])
        assert letter["handler"] == "mqtt" and topic in letter["reason"]
    assert got[0]["payload_encoding"] == "base64"
    assert got[1]["payload"] == "{\"recording\": "
    lake, paths, _ = await read_lake(hdfs_url, lake_root)
    assert keys(lake) == sorted([("clock", s) for s in range(100)]
                                + [("good", s) for s in range(150)])
    assert {p.split("/recording=")[1].split("/")[0] for p in paths} == {"good", "clock"}


async def test_both_payload_formats_land_once_with_their_values(
        mosquitto: Service, hdfs_url: str, lake_root: str, run_id: str, tmp_path: Path,
        sessions: list[tuple[str, dict[str, Any]]]) -> None:
    port = int(mosquitto.opts["port"])
    topic, client_id = f"it/{run_id}/+", f"it-fmt-{run_id}"
    sessions.append((client_id, {}))
    per_sample, batched = recording(1200, seed=1), recording(2500, seed=2)
    samples = [sample_msg("S1", r) for r in per_sample]
    samples[10:10] = samples[5:8]                       # duplicates (device retries)
    batches = [batch_msg("B1", i, batched[i:i + 100]) for i in range(0, 2500, 100)]
    batches.insert(3, batches[1])                        # a redelivered batch
    rt = mqtt_lake(port, f"it/{run_id}/+", client_id, hdfs_url, lake_root,
                   tmp_path / "dlq.jsonl")
    async with rt:
        await asyncio.gather(
            publish(port, f"it/{run_id}/S1", [*samples, end_msg("S1", 1200)]),
            publish(port, f"it/{run_id}/B1", [*batches, end_msg("B1", 2500)]))
        await until(lambda: len([s for s in rt.handlers["segs"].rows() if s["final"]]) == 2,
                    90, "two final segments")
    assert rt.report is not None and rt.report.ok and rt.report.unacked == 0
    assert not dead_letters(tmp_path / "dlq.jsonl")
    lake, paths, leftovers = await read_lake(hdfs_url, lake_root)
    assert keys(lake) == [("B1", s) for s in range(2500)] + [("S1", s) for s in range(1200)]
    assert lake is not None and not leftovers
    lake = lake.sort_by([("recording", "ascending"), ("seq", "ascending")])
    values = np.column_stack([lake.column(c).to_numpy() for c in COLUMNS])
    np.testing.assert_array_equal(values, np.vstack([batched, per_sample]))
    assert set(lake.column("device").to_pylist()) == {"insole-B1", "insole-S1"}
    assert all("/date=" in p for p in paths) and topic.endswith("+")


# -- acknowledgement -----------------------------------------------------------------------
async def test_messages_not_committed_are_redelivered_to_the_next_run(
        mosquitto: Service, run_id: str, sessions: list[tuple[str, dict[str, Any]]]) -> None:
    port = int(mosquitto.opts["port"])
    topic, client_id = f"it/{run_id}/ack", f"it-ack-{run_id}"
    sessions.append((client_id, {}))
    rows = recording(500)

    def pipeline(delay: float) -> Runtime:
        return Runtime.from_dict({
            "runtime": {"admin_enabled": False, "drain_timeout": 1},
            "handlers": {
                "mqtt": {"type": "mqtt_source", "port": port, "topics": [topic],
                         "client_id": client_id, "session_expiry": 600, "batch_rows": 100,
                         "outputs": ["sink"], "on_failure": "stop"},
                "sink": {"type": "memory_sink", "delay": delay, "on_failure": "stop"}}})

    first = pipeline(delay=60)          # never commits before the drain gives up
    async with first:
        await publish(port, topic, [batch_msg("R", i, rows[i:i + 50])
                                    for i in range(0, 500, 50)])
        await until(lambda: first.handlers["mqtt"]._inflight == 10, 20, "10 messages read")
    assert first.report is not None and first.report.unacked > 0
    second = pipeline(delay=0)
    async with second:
        await until(lambda: second.handlers["sink"].row_count >= 500, 30, "redelivery")
    assert second.report is not None and second.report.unacked == 0
    assert sorted(r["seq"] for r in second.handlers["sink"].rows()) == list(range(500))
    third = pipeline(delay=0)            # everything was acknowledged: nothing comes back
    async with third:
        await asyncio.sleep(1.5)
    assert third.handlers["sink"].row_count == 0


def _write_settings(path: Path, port: int, topic: str, client_id: str, url: str, root: str,
                    dlq: Path) -> None:
    path.write_text(f"""
[runtime]
admin_enabled = false
drain_timeout = 30
log_level = "info"

[dead_letter]
target = "dlq"

[handlers.mqtt]
type = "mqtt_source"
port = {port}
topics = ["{topic}"]
client_id = "{client_id}"
session_expiry = 600
batch_rows = 300
outputs = {{ default = ["lake"], events = ["lake"] }}

[handlers.lake]
type = "lake_sink"
url = "{url}"
root = "{root}"
roll_rows = 1000
roll_interval = 0.3
end_timeout = 30

[handlers.dlq]
type = "file_dead_letter"
path = "{dlq}"
""")


async def test_kill_9_mid_stream_then_restart_stores_every_sample_once(
        mosquitto: Service, hdfs_url: str, lake_root: str, run_id: str, tmp_path: Path,
        sessions: list[tuple[str, dict[str, Any]]]) -> None:
    port = int(mosquitto.opts["port"])
    topic, client_id = f"it/{run_id}/crash", f"it-crash-{run_id}"
    sessions.append((client_id, {}))
    settings = tmp_path / "crash.toml"
    _write_settings(settings, port, topic, client_id, hdfs_url, lake_root, tmp_path / "dlq")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    n = 12000
    rows = recording(n, seed=3)
    msgs = [batch_msg("K", i, rows[i:i + 20]) for i in range(0, n, 20)] + [end_msg("K", n)]
    procs: list[subprocess.Popen[bytes]] = []

    def start(i: int) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"run{i}.log").open("wb")
        p = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "--settings", str(settings)],
                             cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        procs.append(p)
        return p

    def ready(i: int) -> bool:
        return "runtime.ready" in (tmp_path / f"run{i}.log").read_text()

    try:
        proc = start(0)
        await until(lambda: ready(0), 60, "the first run to be ready")

        async def paced() -> None:     # ~3 s of publishing
            async with aiomqtt.Client("127.0.0.1", port, identifier=f"it-pub-{run_id}") as c:
                for i, m in enumerate(msgs):
                    await c.publish(topic, m, qos=1)
                    if i % 20 == 0:
                        await asyncio.sleep(0.1)

        publisher = asyncio.create_task(paced())
        for i in range(2):             # kill twice while files are being written
            await asyncio.sleep(1.0)
            lake, _, _ = await read_lake(hdfs_url, lake_root)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            proc = start(i + 1)
            await until(lambda i=i: ready(i + 1), 60, "the restarted run to be ready")
        await publisher
        complete = [("K", s) for s in range(n)]
        deadline = time.monotonic() + 90
        while True:
            lake, paths, _ = await read_lake(hdfs_url, lake_root)
            got = keys(lake)
            assert len(got) == len(set(got)), "a sample is visible twice"
            if got == complete and any(p.endswith("part-0000011000-0000011999.parquet")
                                       for p in paths):
                break
            assert time.monotonic() < deadline, f"{len(got)} of {n} samples in the lake"
            await asyncio.sleep(1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, (tmp_path / f"run{len(procs) - 1}.log").read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    lake, paths, leftovers = await read_lake(hdfs_url, lake_root)
    assert keys(lake) == complete and not leftovers
    assert [p.rsplit("/", 1)[1] for p in paths] == [
        f"part-{k:010d}-{k + 999:010d}.parquet" for k in range(0, n, 1000)]
    assert lake is not None
    lake = lake.sort_by("seq")
    np.testing.assert_array_equal(np.column_stack([lake.column(c).to_numpy()
                                                   for c in COLUMNS]), rows)
    assert not dead_letters(tmp_path / "dlq")


# -- security ------------------------------------------------------------------------------
def _sink_pipeline(port: int, topic: str, client_id: str, env: dict[str, str],
                   **mqtt: Any) -> Runtime:
    return Runtime.from_dict({
        "runtime": {"admin_enabled": False, "drain_timeout": 10},
        "handlers": {
            "mqtt": {"type": "mqtt_source", "port": port, "topics": [topic],
                     "client_id": client_id, "session_expiry": 60, "outputs": ["sink"],
                     "on_failure": "stop", **mqtt},
            "sink": {"type": "memory_sink", "on_failure": "stop"}}}, env=env)


async def test_username_and_password_on_the_secure_listener(
        mosquitto: Service, stack_cfg: StackConfig, run_id: str,
        sessions: list[tuple[str, dict[str, Any]]]) -> None:
    port = int(mosquitto.opts["secure_port"])
    user, password = credentials(stack_cfg)
    topic, client_id = f"it/{run_id}/auth", f"it-auth-{run_id}"
    sessions.append((client_id, {"port": port, "username": user, "password": password}))
    rt = _sink_pipeline(port, topic, client_id, {"MQTT_PASSWORD": password},
                        username=user, password="${MQTT_PASSWORD}")
    async with rt:
        await publish(port, topic, [batch_msg("P", 0, recording(30))], username=user,
                      password=password)
        await until(lambda: rt.handlers["sink"].row_count == 30, 20, "30 rows")
    assert rt.report is not None and rt.report.unacked == 0
    wrong = _sink_pipeline(port, topic, f"{client_id}-x", {}, username=user,
                           password="not-the-password")
    with pytest.raises(StartError, match=r"cannot connect to mqtt://127.0.0.1:8883 as "
                                         r"'gaitflow'.*[Nn]ot authori[sz]ed") as exc:
        await wrong.run()
    assert "not-the-password" not in str(exc.value)


async def test_tls_with_the_stack_ca(mosquitto: Service, stack_cfg: StackConfig, run_id: str,
                                     sessions: list[tuple[str, dict[str, Any]]]) -> None:
    import ssl

    port = int(mosquitto.opts["tls_port"])
    user, password = credentials(stack_cfg)
    ca = str(ca_file(stack_cfg))
    topic, client_id = f"it/{run_id}/tls", f"it-tls-{run_id}"
    ctx = ssl.create_default_context(cafile=ca)
    sessions.append((client_id, {"port": port, "username": user, "password": password,
                                 "tls_context": ctx}))
    rt = _sink_pipeline(port, topic, client_id, {"MQTT_PASSWORD": password}, username=user,
                        password="${MQTT_PASSWORD}", tls=True, ca_file=ca)
    async with rt:
        assert rt.handlers["mqtt"].url == f"mqtts://127.0.0.1:{port}"
        await publish(port, topic, [batch_msg("T", 0, recording(40))], username=user,
                      password=password, tls_context=ctx)
        await until(lambda: rt.handlers["sink"].row_count == 40, 20, "40 rows over TLS")
    assert rt.report is not None and rt.report.unacked == 0
    # the broker's certificate is really verified: the system CAs do not know the stack's
    untrusted = _sink_pipeline(port, topic, f"{client_id}-x", {"MQTT_PASSWORD": password},
                               username=user, password="${MQTT_PASSWORD}", tls=True)
    with pytest.raises(StartError, match="certificate verify failed"):
        await untrusted.run()


# -- scale-out ------------------------------------------------------------------------------
async def test_shared_subscription_splits_the_load(
        mosquitto: Service, run_id: str, sessions: list[tuple[str, dict[str, Any]]]) -> None:
    port = int(mosquitto.opts["port"])
    topic = f"it/{run_id}/shared/+"
    ids = [f"it-share-{run_id}-{i}" for i in (1, 2)]
    sessions.extend((i, {}) for i in ids)
    handlers: dict[str, Any] = {}
    for i, client_id in enumerate(ids, 1):
        handlers[f"mqtt{i}"] = {"type": "mqtt_source", "port": port, "topics": [topic],
                                "client_id": client_id, "shared_group": f"g{run_id}",
                                "session_expiry": 60, "batch_rows": 1, "linger_ms": 0,
                                "outputs": [f"sink{i}"], "on_failure": "stop"}
        handlers[f"sink{i}"] = {"type": "memory_sink", "on_failure": "stop"}
    rt = Runtime.from_dict({"runtime": {"admin_enabled": False, "drain_timeout": 10},
                            "handlers": handlers})
    rows = recording(2000)
    async with rt:
        await publish(port, f"it/{run_id}/shared/dev",
                      [batch_msg("SH", i, rows[i:i + 10]) for i in range(0, 2000, 10)])
        await until(lambda: rt.handlers["sink1"].row_count + rt.handlers["sink2"].row_count
                    >= 2000, 30, "2000 rows over both members")
    a = [r["seq"] for r in rt.handlers["sink1"].rows()]
    b = [r["seq"] for r in rt.handlers["sink2"].rows()]
    assert sorted(a + b) == list(range(2000))            # each message to one member only
    assert 400 <= len(a) <= 1600 and 400 <= len(b) <= 1600, (len(a), len(b))
    assert rt.report is not None and rt.report.unacked == 0
