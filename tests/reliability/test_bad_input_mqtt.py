"""Bad input over MQTT: thousands of malformed payloads interleaved with good ones.

Through the real Mosquitto into ``mqtt_source`` (in this process, with memory sinks
behind it): every bad message lands in dead letter with a reason naming what is
wrong (and its original payload), every good row is delivered once with its values,
every end marker arrives, and the source stays up and connected.

Hypothesis draws the interleaving and the kind of each message (random bytes, not
UTF-8, truncated JSON, oversize, wrong types, wrong column count, NaN/Infinity,
negative values, unsafe ids, unknown shapes, extra fields, ...); the payload bodies
come from a NumPy generator seeded by the drawn integer, so an example stays small
for Hypothesis while a message can hold hundreds of numbers. Examples are not
shrunk (each one is a broker round trip); a failure prints the plan.
"""
from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from handlers.mqtt_source import COLUMNS
from pipeline import Runtime
from stack.service import Service

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

N_GOOD_RECORDINGS = 3
MAX_PAYLOAD = 1 << 20   # mqtt_source's default max_payload_bytes


# --------------------------------------------------------------------------- payloads
class Plan:
    """Builds the messages of one example; remembers what each should become."""

    def __init__(self, run: str) -> None:
        self.run = run
        self.recs = [f"fz{run}-{i}" for i in range(N_GOOD_RECORDINGS)]
        self.next_seq = dict.fromkeys(self.recs, 0)
        self.expected_rows: dict[tuple[str, int], tuple[float, ...]] = {}
        self.payloads: list[bytes] = []
        self.bad: list[tuple[bytes, str, str]] = []   # payload, kind, expected reason part
        self.bad_count = 0

    # good ------------------------------------------------------------------
    def rows(self, rng: np.random.Generator, seq0: int, n: int) -> np.ndarray:
        rows = rng.uniform(0, 1200, size=(n, 19)).round(3)
        rows[:, 0] = (seq0 + np.arange(n)) / 100
        return rows

    def good(self, rec_i: int, n: int, fmt: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        rec = self.recs[rec_i % len(self.recs)]
        seq0 = self.next_seq[rec]
        rows = self.rows(rng, seq0, n if fmt == "batch" else 1)
        if fmt == "batch":
            body: list[list[Any]] = rows.tolist()
            if seed % 3 == 0:          # integers are numbers too
                body = [[r[0], *(int(v) for v in r[1:])] for r in body]
            obj: dict[str, Any] = {"device": f"insole-{rec}", "recording": rec, "seq": seq0,
                                   "rows": body}
            if seed % 5 == 0:
                del obj["device"]      # optional
            values = [tuple(float(v) for v in r) for r in body]
        else:
            r = rows[0]
            obj = {"Patient": rec, "seq": seq0, **{c: float(v) for c, v in zip(COLUMNS, r)}}
            values = [tuple(float(v) for v in r)]
        for i, v in enumerate(values):
            self.expected_rows[(rec, seq0 + i)] = v
        self.next_seq[rec] = seq0 + len(values)
        self.payloads.append(json.dumps(obj, separators=(",", ":")).encode())

    def end_markers(self) -> None:
        for rec in self.recs:
            self.payloads.append(json.dumps({"device": f"insole-{rec}", "recording": rec,
                                             "end": True,
                                             "rows_total": self.next_seq[rec]}).encode())

    # bad -------------------------------------------------------------------
    def add_bad(self, payload: bytes, kind: str, reason: str) -> None:
        self.payloads.append(payload)
        self.bad.append((payload, kind, reason))

    def bad_message(self, kind: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        rec = f"bad{self.run}-{seed % 1000}"
        n = int(rng.integers(1, 30))
        rows = self.rows(rng, 0, n).tolist()
        base = {"device": f"insole-{rec}", "recording": rec, "seq": 0, "rows": rows}

        def dump(obj: Any) -> bytes:
            return json.dumps(obj, separators=(",", ":")).encode()

        if kind == "random_bytes":
            payload = rng.bytes(int(rng.integers(0, 400)))
            try:   # astronomically unlikely, but a valid payload is not bad input
                obj = json.loads(payload)
                if isinstance(obj, dict):
                    payload = b"\x00" + payload
            except ValueError:
                pass
            self.add_bad(payload, kind, "")
        elif kind == "not_utf8":
            raw = dump(base)
            at = int(rng.integers(0, len(raw)))
            self.add_bad(raw[:at] + bytes([int(rng.integers(0x80, 0x100))]) + b"\xff" + raw[at:],
                         kind, "not UTF-8")
        elif kind == "truncated_json":
            raw = dump(base)
            self.add_bad(raw[:int(rng.integers(0, len(raw) - 1))], kind, "not JSON")
        elif kind == "oversize":
            filler = int(rng.integers(MAX_PAYLOAD + 1, MAX_PAYLOAD + 300_000))
            raw = dump({**base, "rows": [[0.0] * 19]})
            self.add_bad(raw[:-1] + b"," + b'"pad":"' + b"x" * filler + b'"}', kind,
                         "oversize payload")
        elif kind == "wrong_type_value":
            i, j = int(rng.integers(0, n)), int(rng.integers(0, 19))
            rows[i][j] = [str(rows[i][j]), True, None, [1.0], {"v": 1}][seed % 5]
            self.add_bad(dump(base), kind, "non-numeric value")
        elif kind == "wrong_type_field":
            field, value, reason = [
                ("seq", "0", "\"seq\""), ("seq", -1, "\"seq\""), ("seq", 1.5, "\"seq\""),
                ("rows", "[[1,2]]", "\"rows\""), ("rows", [], "\"rows\""),
                ("rows", [1.0] * 19, "\"rows\""), ("recording", 17, "id must be a string"),
                ("recording", None, "missing recording id"),
                ("device", ["x"], "id must be a string"),
            ][seed % 9]
            self.add_bad(dump({**base, field: value}), kind, reason)
        elif kind == "column_count":
            i = int(rng.integers(0, n))
            rows[i] = rows[i][:18] if seed % 2 else [*rows[i], 1.0]
            self.add_bad(dump(base), kind, "wrong column count")
        elif kind == "non_finite":
            i, j = int(rng.integers(0, n)), int(rng.integers(0, 19))
            token = ["NaN", "Infinity", "-Infinity", "1e999"][seed % 4]
            rows[i][j] = 123456.789
            raw = dump(base).replace(b"123456.789", token.encode(), 1)
            self.add_bad(raw, kind, "NaN or infinite")
        elif kind == "negative":
            i, j = int(rng.integers(0, n)), int(rng.integers(1, 19))
            rows[i][j] = -float(rng.uniform(0.001, 100))
            self.add_bad(dump(base), kind, "negative force")
        elif kind == "time_not_increasing":
            if n < 2:
                rows.append(list(rows[0]))
            rows[-1][0] = rows[-2][0]
            self.add_bad(dump(base), kind, "time")
        elif kind == "unsafe_id":
            bad_ids = ["../x", "x/y", "/etc/passwd", "..", "a..b", "", " ", "x y", "a\nb",
                       "a\x00b", "a\x1fb", "x" * 65, "é", "GaCo01_01;DROP", "%2e%2e%2fx",
                       "a\\b", "con:", "*", "a\u202eb", "\ud83d\ude00"]
            value = bad_ids[seed % len(bad_ids)]
            field = "recording" if seed % 3 else "device"
            if seed % 4 == 0:   # the tutorial's per-sample shape
                obj: dict[str, Any] = {"Patient": value, **dict(zip(COLUMNS, rows[0]))}
                field = "recording"
            else:
                obj = {**base, field: value}
            self.add_bad(dump(obj), kind, f"unsafe {field} id")
        elif kind == "unknown_shape":
            obj = [[1, 2, 3], "text", 42, None, True, {"hello": "world"},
                   {"recording": rec, "seq": 0}, {"Patient": rec}][seed % 8]
            reasons = ["not a JSON object", "not a JSON object", "not a JSON object",
                       "not a JSON object", "not a JSON object", "unknown payload",
                       "unknown payload", "missing field"]
            self.add_bad(dump(obj), kind, reasons[seed % 8])
        elif kind == "extra_field":
            self.add_bad(dump({**base, "patient_name": "Jane Doe"}), kind, "unexpected field")
        elif kind == "bad_end_marker":
            obj = [{"recording": rec, "end": False, "rows_total": 3},
                   {"recording": rec, "end": True, "rows_total": -1},
                   {"recording": rec, "end": True, "rows_total": "3"},
                   {"recording": "../up", "end": True, "rows_total": 3}][seed % 4]
            reason = ["\"end\" must be true", "rows_total", "rows_total", "recording id"][seed % 4]
            self.add_bad(dump(obj), kind, reason)
        else:  # pragma: no cover - a typo in the strategy
            raise AssertionError(kind)


BAD_KINDS = ["random_bytes", "not_utf8", "truncated_json", "oversize", "wrong_type_value",
             "wrong_type_field", "column_count", "non_finite", "negative",
             "time_not_increasing", "unsafe_id", "unknown_shape", "extra_field",
             "bad_end_marker"]

good_op = st.tuples(st.just("good"), st.integers(0, N_GOOD_RECORDINGS - 1),
                    st.integers(1, 120), st.sampled_from(["batch", "batch", "sample"]),
                    st.integers(0, 2**31))
bad_op = st.tuples(st.just("bad"), st.sampled_from(BAD_KINDS), st.just(0), st.just(""),
                   st.integers(0, 2**31))


@st.composite
def plan_ops(draw: st.DrawFn) -> list[tuple[Any, ...]]:
    """Hundreds of good and bad messages, interleaved at random (always both kinds)."""
    goods = draw(st.lists(good_op, min_size=150, max_size=300))
    bads = draw(st.lists(bad_op, min_size=150, max_size=400))
    order = np.random.default_rng(draw(st.integers(0, 2**31))).permutation(
        len(goods) + len(bads))
    ops = [*goods, *bads]
    return [ops[i] for i in order]


def build(run: str, ops: list[tuple[Any, ...]]) -> Plan:
    plan = Plan(run)
    oversize = 0
    for op in ops:
        if op[0] == "good":
            plan.good(op[1], op[2], op[3], op[4])
        else:
            if op[1] == "oversize":
                oversize += 1
                if oversize > 4:     # a few MiB-sized messages are enough per example
                    continue
            plan.bad_message(op[1], op[4])
    plan.end_markers()
    return plan


def decode_payload(record: dict[str, Any]) -> bytes:
    if record["payload_encoding"] == "base64":
        return base64.b64decode(record["payload"])
    if record["payload_encoding"] == "utf-8":
        return record["payload"].encode("utf-8", "surrogatepass")
    return record["payload"].encode()


# --------------------------------------------------------------------------- the run
async def push_through(mosquitto: Service, plan: Plan) -> dict[str, Any]:
    """Publish every message of ``plan`` to mqtt_source; collect what came out."""
    import aiomqtt

    port = int(mosquitto.opts["port"])
    topic = f"gaitflow-test/fuzz-{plan.run}"
    rt = Runtime.from_dict({
        "runtime": {"admin_enabled": False, "drain_timeout": 10},
        "dead_letter": {"target": "dlq"},
        "handlers": {
            "mqtt": {"type": "mqtt_source", "port": port, "topics": [f"{topic}/+"],
                     "client_id": f"rel-fuzz-{plan.run}", "persistent_session": False,
                     "batch_rows": 500, "linger_ms": 2.0,
                     "outputs": {"default": ["samples"], "events": ["ends"]}},
            "samples": {"type": "memory_sink"},
            "ends": {"type": "memory_sink"},
            "dlq": {"type": "memory_sink"},
        }})
    want_good = len(plan.expected_rows)
    want_bad = len(plan.bad)
    async with rt:
        mqtt, samples, ends, dlq = (rt.handlers[n] for n in ("mqtt", "samples", "ends", "dlq"))
        async with aiomqtt.Client("127.0.0.1", port,
                                  identifier=f"rel-fuzz-pub-{plan.run}",
                                  max_queued_outgoing_messages=None) as pub:
            for i, payload in enumerate(plan.payloads):
                await pub.publish(f"{topic}/dev{i % 7}", payload, qos=1)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not (
                samples.row_count >= want_good and dlq.row_count >= want_bad
                and ends.row_count >= len(plan.recs)):
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)   # anything extra would show up now
        connected, detail = mqtt.health()
        out = {"rows": samples.rows(), "ends": ends.rows(), "dead": dlq.rows(),
               "connected": connected, "detail": detail, "state": rt.state,
               "errors": list(rt.errors)}
    return out


def check(plan: Plan, out: dict[str, Any]) -> None:
    assert out["state"] == "running" and not out["errors"], out["errors"]
    assert out["connected"], f"mqtt_source disconnected: {out['detail']}"
    # every good row exactly once, with its values
    got = Counter((r["recording"], r["seq"]) for r in out["rows"])
    dups = {k: n for k, n in got.items() if n > 1}
    assert not dups, f"duplicated rows: {list(dups.items())[:5]}"
    missing = plan.expected_rows.keys() - got.keys()
    extra = got.keys() - plan.expected_rows.keys()
    assert not missing, f"{len(missing)} good rows lost, e.g. {sorted(missing)[:5]}"
    assert not extra, f"{len(extra)} rows that were never sent valid, e.g. {sorted(extra)[:5]}"
    for r in out["rows"]:
        want = plan.expected_rows[(r["recording"], r["seq"])]
        assert tuple(r[c] for c in COLUMNS) == want, (r["recording"], r["seq"])
    # every recording's end marker
    assert sorted((e["recording"], e["rows_total"]) for e in out["ends"]) == sorted(
        (rec, plan.next_seq[rec]) for rec in plan.recs)
    # every bad message dead-lettered once, with the reason, never in the samples
    dead = out["dead"]
    assert all(d["handler"] == "mqtt" and d["reason"] for d in dead)
    by_payload: dict[bytes, list[str]] = {}
    for d in dead:
        by_payload.setdefault(decode_payload(d), []).append(d["reason"])
    sent = Counter(p if len(p) <= 4096 else p[:4096] for p, _, _ in plan.bad)
    got_dead = Counter({p: len(r) for p, r in by_payload.items()})
    assert got_dead == sent, (
        f"dead letters differ from the bad messages sent: missing "
        f"{[(p[:80], n) for p, n in (sent - got_dead).items()][:5]}, unexpected "
        f"{[(p[:80], n) for p, n in (got_dead - sent).items()][:5]}")
    wrong = []
    for payload, kind, reason in plan.bad:
        key = payload if len(payload) <= 4096 else payload[:4096]
        reasons = by_payload[key]
        if reason and not any(reason in r for r in reasons):
            wrong.append((kind, payload[:100], reason, reasons[:2]))
        if kind == "oversize":
            assert all("truncated" in r for r in reasons), reasons
    assert not wrong, "dead-letter reasons that do not say what is wrong:\n" + "\n".join(
        f"  {k}: {p!r}: expected {e!r} in {r}" for k, p, e, r in wrong[:10])


# one of every bad kind, deterministically, besides what Hypothesis draws
EVERY_KIND = [("good", i % N_GOOD_RECORDINGS, 50, "batch", i) for i in range(6)] + [
    ("bad", kind, 0, "", seed) for kind in BAD_KINDS for seed in range(
        1 if kind == "oversize" else 20)] + [
    ("good", i % N_GOOD_RECORDINGS, 3, "sample", 100 + i) for i in range(6)]


@pytest.mark.timeout(900)
@settings(max_examples=10, deadline=None, database=None,
          phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.large_base_example,
                                 HealthCheck.function_scoped_fixture])
@example(ops=EVERY_KIND)
@given(ops=plan_ops())
def test_malformed_mqtt_payloads_go_to_dead_letter_and_good_ones_through(
        stack_service: Callable[[str], Service], ops: list[tuple[Any, ...]]) -> None:
    mosquitto = stack_service("mosquitto")
    plan = build(uuid.uuid4().hex[:8], ops)
    assert plan.bad, "the plan holds bad messages"
    t0 = time.monotonic()
    out = asyncio.run(push_through(mosquitto, plan))
    check(plan, out)
    kinds = Counter(kind for _, kind, _ in plan.bad)
    print(f"mqtt fuzz: {len(plan.payloads)} messages ({len(plan.bad)} bad: {dict(kinds)}; "
          f"{len(plan.expected_rows)} good rows) in {time.monotonic() - t0:.1f} s: ok")
