"""Security: authenticated and encrypted MQTT, bearer tokens, secrets kept out of logs
and the admin API, prepared statements only, ids validated before they reach a path,
a key or a query.

A test for each:

* MQTT: the stack's password listener (8883) and TLS listener (8884) refuse a wrong
  password, no password, plain MQTT on the TLS port and a broker certificate signed
  by an unknown CA; the right credentials (and the stack's CA) work.
* The model server: ``/v1/*`` answers 401 without or with a wrong token, 200 with it;
  ``model_call`` without the token cannot start and says why.
* settings.toml's pipeline with every secret from the environment (MQTT password
  over TLS, admin token, model token), at debug log level: the admin API needs the
  token (probes stay open), and no secret appears in its log, ``/api/status``,
  ``/metrics``, ``/api/graph`` or the dead letters. Messages with unsafe ids
  (``../x``, ``x/y``, control characters, over-long) go to dead letter and never
  become a lake path or a Kafka key. A wrong MQTT password stops ``run.py`` with a
  clear error that does not print the password.
* cassandra_sink: every write is a bound prepared statement (the driver's session is
  watched; ``system.prepared_statements`` holds the INSERT); a value that looks like
  CQL is stored as a value.
* lake_sink and spark_job refuse unsafe recording ids on their own (defence in depth,
  for a user's source that does not validate).
"""
from __future__ import annotations

import asyncio
import json
import re
import secrets
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import reliability_support as rs
from audit import RunNames, lake_entries

from handlers.mqtt_source import COLUMNS
from pipeline import Runtime, StartError
from stack.config import StackConfig
from stack.service import Service
from stack.services.mosquitto import ca_file, credentials

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

UNSAFE_IDS = ["../x", "x/y", "..", "a..b", "/abs", "a\nb", "a\x00b", "a\x1bb", "x" * 65,
              "", " ", "a b", "%2e%2e%2f", "a\\b", "é", "a:b", "a*"]


# --------------------------------------------------------------------------- MQTT
def mqtt_runtime(port: int, client_id: str, env: dict[str, str] | None = None,
                 **mqtt: Any) -> Runtime:
    return Runtime.from_dict({
        "runtime": {"admin_enabled": False, "drain_timeout": 5, "start_timeout": 20},
        "handlers": {
            "mqtt": {"type": "mqtt_source", "port": port, "topics": [f"sec/{client_id}/+"],
                     "client_id": client_id, "persistent_session": False,
                     "connect_timeout": 5, "outputs": ["sink"], "on_failure": "stop", **mqtt},
            "sink": {"type": "memory_sink", "on_failure": "stop"}}}, env=env or {})


async def test_mqtt_password_and_tls_refuse_wrong_credentials_and_unknown_cas(
        stack_service: Callable[[str], Service], stack_cfg: StackConfig) -> None:
    mosquitto = stack_service("mosquitto")
    user, password = credentials(stack_cfg)
    ca = str(ca_file(stack_cfg))
    secure, tls = int(mosquitto.opts["secure_port"]), int(mosquitto.opts["tls_port"])
    wrong = "wrong-" + secrets.token_hex(6)
    run = uuid.uuid4().hex[:8]
    refused: dict[str, tuple[dict[str, Any], str]] = {
        "no credentials on 8883": ({"port": secure}, r"[Nn]ot authori[sz]ed"),
        "wrong password on 8883": ({"port": secure, "username": user, "password": wrong},
                                   r"[Nn]ot authori[sz]ed"),
        "unknown user on 8883": ({"port": secure, "username": "mallory",
                                  "password": password}, r"[Nn]ot authori[sz]ed"),
        "plain MQTT on the TLS port": ({"port": tls, "username": user, "password": password},
                                       r"cannot connect|timed out|[Cc]onnection"),
        "TLS without the stack's CA": ({"port": tls, "username": user, "password": password,
                                        "tls": True}, r"certificate verify failed"),
        "TLS, wrong password": ({"port": tls, "username": user, "password": wrong,
                                 "tls": True, "ca_file": ca}, r"[Nn]ot authori[sz]ed"),
    }
    outcomes = {}
    for what, (kw, pattern) in refused.items():
        port = kw.pop("port")
        rt = mqtt_runtime(port, f"sec-{run}-{len(outcomes)}", **kw)
        with pytest.raises(StartError) as exc:
            await rt.run()
        text = str(exc.value)
        assert re.search(pattern, text), f"{what}: {text}"
        assert password not in text and wrong not in text, f"{what}: a password in {text}"
        outcomes[what] = "refused: " + text.rsplit("): ", 1)[-1][:100]
    # the right ones work, and data flows
    accepted: dict[str, dict[str, Any]] = {
        "password on 8883": {"port": secure, "username": user, "password": "${MQTT_PASSWORD}"},
        "TLS + password on 8884": {"port": tls, "username": user,
                                   "password": "${MQTT_PASSWORD}", "tls": True, "ca_file": ca},
    }
    for what, kw in accepted.items():
        port = kw.pop("port")
        client_id = f"sec-{run}-ok{port}"
        rt = mqtt_runtime(port, client_id, env={"MQTT_PASSWORD": password}, **kw)
        async with rt:
            sink = rt.handlers["sink"]
            pub = rs.Publisher(port=port, username=user, password=password,
                               ca_file=Path(ca) if kw.get("tls") else None)
            rows = np.arange(19 * 5, dtype=float).reshape(5, 19)
            rows[:, 0] = np.arange(5) / 100
            await pub.publish([(0, f"sec/{client_id}/d", json.dumps(
                {"recording": "sec", "seq": 0, "rows": rows.tolist()}).encode())])
            await rs.wait_until(lambda s=sink: s.row_count == 5, 20, f"5 rows with {what}")
        outcomes[what] = "accepted, 5 rows delivered"
    print(json.dumps(outcomes, indent=1))


# --------------------------------------------------------------------------- model server
async def test_model_server_needs_its_bearer_token(model_dir: Path, tmp_path: Path) -> None:
    token = secrets.token_urlsafe(24)
    server = rs.ModelServer(model_dir, tmp_path / "serve.log", token=token)
    await server.start()
    try:
        body = {"recordings": [{"id": "x", "rows": [[i / 100] + [1.0] * 18
                                                   for i in range(1000)]}]}
        for method, path, payload in (("GET", "/v1/models", None),
                                      ("POST", "/v1/predict", body),
                                      ("POST", "/v1/models/reload", None)):
            url = server.url + path
            for given, want in ((None, 401), ("wrong-" + token[:8], 401),
                                (token + "x", 401), (token, 200)):
                code, text = await rs.http(method, url, token=given, body=payload, timeout=60)
                assert code == want, f"{method} {path} with token {given!r}: {code} {text}"
                if code == 401:
                    assert json.loads(text)["error"]["code"] == "unauthorized"
            code, _ = await rs.http(method, url, timeout=10,
                                    headers={"Authorization": token})   # no "Bearer "
            assert code == 401
        code, _ = await rs.http("GET", server.url + "/healthz")
        assert code == 200, "the health probe stays open"
        # model_call without the token: refuses to start, says why, no token in the error
        rt = Runtime.from_dict({
            "runtime": {"admin_enabled": False, "start_timeout": 30},
            "handlers": {
                "src": {"type": "memory_source", "count": 1, "outputs": ["diagnose"],
                        "on_failure": "stop"},
                "diagnose": {"type": "model_call", "url": server.url, "outputs": ["sink"],
                             "on_failure": "stop"},
                "sink": {"type": "memory_sink", "on_failure": "stop"}}})
        with pytest.raises(StartError, match="401") as exc:
            await rt.run()
        assert token not in str(exc.value)
        text = server.log.read_text()
        assert token not in text, "the model server logged its token"
    finally:
        server.stop()


# --------------------------------------------------------------------------- the pipeline
def unsafe_messages(topic: str) -> list[tuple[float, str, bytes]]:
    rows = [[0.01 * i, *([5.0] * 18)] for i in range(3)]
    out = []
    for i, bad in enumerate(UNSAFE_IDS):
        obj: dict[str, Any] = ({"recording": bad, "seq": 0, "rows": rows} if i % 3 else
                               {"Patient": bad, **dict(zip(COLUMNS, rows[0], strict=True))})
        if i % 4 == 1:
            obj = {"recording": f"okid{i}", "device": bad, "seq": 0, "rows": rows}
        out.append((0.0, topic.format(recording=f"evil{i}"), json.dumps(obj).encode()))
    return out


async def kafka_keys(topic: str) -> set[bytes]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=rs.KAFKA, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    keys: set[bytes] = set()
    try:
        await rs.wait_until(lambda: consumer.assignment(), 20, f"partitions of {topic}",
                            interval=0.1)
        tps = sorted(consumer.assignment())
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        while any([await consumer.position(tp) < end[tp] for tp in tps]):
            for msgs in (await consumer.getmany(timeout_ms=1000)).values():
                keys.update(m.key for m in msgs)
    finally:
        await consumer.stop()
    return keys


async def lake_paths(root: str) -> list[str]:
    from handlers.webhdfs import WebHdfs

    async with WebHdfs(rs.WEBHDFS) as fs:
        return [st.path + ("/" if st.is_dir else "") async for st in lake_entries(fs, root)]


@pytest.mark.timeout(600)
async def test_secrets_stay_secret_and_unsafe_ids_never_reach_a_path_or_key(
        whole_stack: dict[str, Service], stack_cfg: StackConfig, model_dir: Path,
        recordings: dict[str, np.ndarray], run_names: RunNames, tmp_path: Path,
        pipelines: list[rs.PipelineProcess]) -> None:
    user, mqtt_password = credentials(stack_cfg)
    admin_token, model_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    server = rs.ModelServer(model_dir, tmp_path / "serve.log", token=model_token)
    await server.start()
    names = run_names
    tls_port = int(whole_stack["mosquitto"].opts["tls_port"])
    recs = dict(list(recordings.items())[:2])
    try:
        # a wrong MQTT password: run.py stops with the broker's reason, no password shown
        wrong = "wrong-" + secrets.token_hex(8)
        common = [f"handlers.mqtt.port={tls_port}", f'handlers.mqtt.username="{user}"',
                  'handlers.mqtt.password="${MQTT_PASSWORD}"', "handlers.mqtt.tls=true",
                  f'handlers.mqtt.ca_file="{ca_file(stack_cfg)}"',
                  'handlers.diagnose.token="${MODEL_TOKEN}"', 'runtime.log_level="debug"',
                  *rs.INGEST_ONLY, "runtime.drain_timeout=10.0"]
        env = {"GAITFLOW_ADMIN_TOKEN": admin_token, "MODEL_TOKEN": model_token}
        bad = rs.PipelineProcess(names, model_url=server.url, dead_letters=tmp_path / "d0",
                                 log=tmp_path / "wrong-password.log", sets=common,
                                 env={**env, "MQTT_PASSWORD": wrong}, admin_token=admin_token)
        pipelines.append(bad)
        bad.start()
        rc = await asyncio.to_thread(bad.proc.wait, 120)
        text = bad.log.read_text()
        assert rc == 1, f"exit {rc} with a wrong MQTT password\n{text[-3000:]}"
        assert re.search(r"[Nn]ot authori[sz]ed", text), text[-3000:]
        assert wrong not in text and mqtt_password not in text

        pipeline = rs.PipelineProcess(names, model_url=server.url,
                                      dead_letters=tmp_path / "dead.jsonl",
                                      log=tmp_path / "pipeline.log", sets=common,
                                      env={**env, "MQTT_PASSWORD": mqtt_password},
                                      admin_token=admin_token)
        pipelines.append(pipeline)
        pipeline.start()
        await pipeline.wait_ready()

        # the admin API needs the token; the probes do not
        for path in ("/healthz", "/readyz"):
            code, _ = await rs.http("GET", pipeline.admin + path)
            assert code == 200, path
        for path in ("/metrics", "/api/status", "/api/graph"):
            for given in (None, "wrong", admin_token[:-1]):
                code, _ = await rs.http("GET", pipeline.admin + path, token=given)
                assert code == 401, f"{path} with token {given!r}: {code}"
            code, _ = await rs.http("GET", pipeline.admin + path, token=admin_token)
            assert code == 200, path

        # good recordings and unsafe ids, over TLS with the password
        publisher = rs.Publisher(port=tls_port, username=user, password=mqtt_password,
                                 ca_file=ca_file(stack_cfg))
        schedule = rs.schedule_recordings(recs, names.mqtt_topic)
        await publisher.publish(unsafe_messages(names.mqtt_topic) + schedule)
        await rs.wait_raw_complete(names, recs, pipeline)
        await rs.wait_until(lambda: len(pipeline.dead_letter_records()) >= len(UNSAFE_IDS),
                            30, "every unsafe id dead-lettered")

        # what the outside world can see
        seen = {"log": "", "status": "", "metrics": "", "graph": "", "dead_letters": ""}
        for key, path in (("status", "/api/status"), ("metrics", "/metrics"),
                          ("graph", "/api/graph")):
            seen[key] = (await rs.http("GET", pipeline.admin + path, token=admin_token))[1]
        status = json.loads(seen["status"])
        assert status["settings"]["runtime"]["admin_token"] == "***"
        assert status["settings"]["handlers"]["mqtt"]["password"] == "***"
        assert status["settings"]["handlers"]["diagnose"]["token"] == "***"
        assert pipeline.stop() is not None
        seen["log"] = pipeline.log.read_text()
        seen["dead_letters"] = pipeline.dead_letters.read_text()
        for where, text in seen.items():
            for name, secret in (("MQTT password", mqtt_password), ("admin token", admin_token),
                                 ("model token", model_token)):
                assert secret not in text, f"the {name} appears in the {where}"
        assert "mqtts://" in seen["log"] and "debug" in seen["log"]   # it did log, verbosely

        # unsafe ids: dead-lettered with the reason, never a lake path or a Kafka key
        dead = pipeline.dead_letter_records()
        assert len(dead) == len(UNSAFE_IDS), [d["reason"] for d in dead]
        for d in dead:
            assert d["handler"] == "mqtt" and re.search(r"(unsafe|missing) (recording|device) id|"
                                                        r"id must be", d["reason"]), d["reason"]
        paths = await lake_paths(f"/gaitflow-test/{names.run}")
        good = "|".join(map(re.escape, recs))
        allowed = re.compile(rf"^{re.escape(names.lake_root)}(/|/_tmp/?.*|/date=\d{{4}}-\d\d-\d\d/"
                             rf"(recording=({good})/(part-\d{{10}}-\d{{10}}\.parquet)?)?)$")
        strays = [p for p in paths if not allowed.match(p)
                  and p != f"/gaitflow-test/{names.run}/raw/"]
        assert not strays, f"lake paths other than the good recordings': {strays}"
        keys = await kafka_keys(names.kafka_topic)
        assert keys == {r.encode() for r in recs}, f"Kafka keys: {keys}"
        print(f"{len(UNSAFE_IDS)} unsafe ids dead-lettered; lake paths {len(paths)}, "
              f"Kafka keys {sorted(keys)}; no secret in log ({len(seen['log'])} chars), "
              f"status, metrics, graph or dead letters")
    finally:
        server.stop()


# --------------------------------------------------------------------------- Cassandra
@pytest.mark.timeout(300)
async def test_cassandra_sink_runs_prepared_statements_only(
        stack_service: Callable[[str], Service], run_names: RunNames,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from cassandra.cluster import Session
    from cassandra.query import BatchStatement, BoundStatement

    stack_service("cassandra")
    seen: list[tuple[str, str]] = []
    original = Session.execute_async

    def watch(self: Session, query: Any, *args: Any, **kw: Any) -> Any:
        if isinstance(query, BoundStatement):
            seen.append(("bound", query.prepared_statement.query_string))
        elif isinstance(query, BatchStatement):
            kinds = {"bound" if prepared else "text"
                     for prepared, *_ in query._statements_and_parameters}
            seen.append(("batch of " + "+".join(sorted(kinds)), ""))
        else:
            seen.append(("text", str(getattr(query, "query_string", query))))
        return original(self, query, *args, **kw)

    monkeypatch.setattr(Session, "execute_async", watch)
    hostile = ["x'); DROP KEYSPACE system_auth; --", "a\" OR 1=1 --", "'; TRUNCATE t; --",
               "../../x", "\x00\x01", "é" * 10]
    rows = [{"recording": rec, "seq": i, "time": i / 100,
             **{c: float(i) for c in COLUMNS if c != "time"}, "device": rec}
            for j, rec in enumerate(hostile) for i in range(j * 10, j * 10 + 10)]
    keyspace = run_names.keyspace
    rt = Runtime.from_dict({
        "runtime": {"admin_enabled": False, "start_timeout": 60},
        "dead_letter": {"target": "dlq"},
        "handlers": {
            "src": {"type": "memory_source", "rows": rows, "batch_size": 25, "key": "seq",
                    "outputs": ["cass"]},
            "cass": {"type": "cassandra_sink", "keyspace": keyspace, "table": "samples",
                     "contract": "samples"},
            "dlq": {"type": "memory_sink"}}})
    report = await rt.run_until_idle(timeout=120)
    assert report.ok, report.errors
    assert rt.handlers["dlq"].row_count == 0, rt.handlers["dlq"].rows()

    writes = [s for s in seen if s[0] != "text" or re.match(r"\s*(INSERT|UPDATE|DELETE|BATCH)",
                                                            s[1], re.IGNORECASE)]
    assert writes and all(kind in ("bound", "batch of bound") for kind, _ in writes), writes
    texts = [q for kind, q in seen if kind == "text"]
    assert all(re.match(r"\s*(CREATE|SELECT)\b", q, re.IGNORECASE) for q in texts), texts

    def read_back() -> tuple[list[str], list[str]]:
        cluster = rs.audit._cassandra_cluster()
        try:
            session = cluster.connect()
            stored = [r.recording for r in session.execute(
                f'SELECT DISTINCT recording FROM "{keyspace}"."samples"')]
            statements = [r.query_string for r in session.execute(
                "SELECT query_string FROM system.prepared_statements")
                if keyspace in (r.query_string or "")]
            return stored, statements
        finally:
            cluster.shutdown()

    stored, statements = await asyncio.to_thread(read_back)
    assert sorted(stored) == sorted(hostile), "CQL-looking values are stored as values"
    insert = (f'INSERT INTO "{keyspace}"."samples"', f"INSERT INTO {keyspace}.samples")
    assert any(q.startswith(insert) for q in statements), statements
    print(f"{len(writes)} writes, all bound: {sorted({k for k, _ in writes})}; "
          f"DDL/schema text: {len(texts)}; system.prepared_statements: {statements}")


# --------------------------------------------------------------------------- defence in depth
@pytest.mark.timeout(300)
async def test_lake_and_spark_refuse_unsafe_recording_ids_on_their_own(
        stack_service: Callable[[str], Service], run_names: RunNames) -> None:
    stack_service("hdfs")
    root = run_names.lake_root
    rows = [{"recording": rec, "seq": i, "time": i / 100,
             **{c: 1.0 for c in COLUMNS if c != "time"}, "device": "d"}
            for rec in [*UNSAFE_IDS, "good_one"] for i in range(5)]
    # segment events naming the unsafe id in their path too (as a forged event on the
    # gaitflow.segments topic could); "ok\n": a trailing newline only
    segments = [{"path": f"hdfs://127.0.0.1:8020{root}/date=2026-12-04/recording={rec}/"
                         "part-0000000000-0000000004.parquet",
                 "recording": rec, "seq_first": 0, "seq_last": 4, "rows": 5, "final": True}
                for rec in [*UNSAFE_IDS, "ok\n"]]
    rt = Runtime.from_dict({
        "runtime": {"admin_enabled": False, "start_timeout": 60, "drain_timeout": 5},
        "dead_letter": {"target": "dlq"},
        "handlers": {
            "src": {"type": "memory_source", "rows": rows, "batch_size": 200, "key": "seq",
                    "outputs": ["lake"]},
            "lake": {"type": "lake_sink", "url": rs.WEBHDFS, "root": root},
            "events": {"type": "memory_source", "rows": segments, "batch_size": 100,
                       "key": "path", "outputs": ["features"]},
            "features": {"type": "spark_job", "features_root": run_names.features_root,
                         "max_wait": 86400.0, "trigger_on_final": False,
                         "on_shutdown": "cancel", "outputs": ["sink"]},
            "sink": {"type": "memory_sink"},
            "dlq": {"type": "memory_sink"}}})
    await rt.run_until_idle(timeout=60)   # sources exhausted; accepted events stay pending
    dead = rt.handlers["dlq"].rows()
    by_handler: dict[str, list[str]] = {}
    for d in dead:
        by_handler.setdefault(d["handler"], []).append(d["reason"])
    assert len(by_handler.get("lake", [])) == len(UNSAFE_IDS) * 5, by_handler
    assert all("unsafe recording id" in r for r in by_handler["lake"])
    refused = [json.loads(d["payload"])["recording"] for d in dead if d["handler"] == "features"]
    assert sorted(refused) == sorted(s["recording"] for s in segments), (
        f"spark_job accepted segment events with unsafe recording ids: "
        f"{sorted({s['recording'] for s in segments} - set(refused))!r}")
    paths = await lake_paths(f"/gaitflow-test/{run_names.run}")
    assert all("recording=good_one" in p or p.endswith(("/raw/", "/_tmp/")) or
               re.search(r"/date=[\d-]+/$", p) for p in paths), paths
