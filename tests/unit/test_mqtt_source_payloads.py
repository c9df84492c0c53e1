"""mqtt_source payload decoding and validation (pure functions, no broker)."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handlers.mqtt_source import (
    COLUMNS,
    SAMPLE_SCHEMA,
    EndMarker,
    InvalidPayload,
    MqttSourceSettings,
    Samples,
    Timelines,
    check_id,
    parse_payload,
    samples_batch,
)
from pipeline import Runtime, SettingsError


def sample(rec: str = "GaCo01_01", t: float = 0.5, **over: object) -> dict[str, object]:
    obj: dict[str, object] = {"Patient": rec, "time": t}
    obj.update({c: float(i) for i, c in enumerate(COLUMNS[1:], 1)})
    obj.update(over)
    return obj


def batch(rec: str = "GaCo01_01", seq: int = 0, n: int = 3, **over: object) -> dict[str, object]:
    rows = [[round((seq + i) * 0.01, 2), *[float(j) for j in range(1, 19)]] for i in range(n)]
    obj: dict[str, object] = {"device": f"insole-{rec}", "recording": rec, "seq": seq,
                              "rows": rows}
    obj.update(over)
    return obj


def enc(obj: object) -> bytes:
    return json.dumps(obj).encode()


def reason(payload: bytes, **kw: int) -> str:
    with pytest.raises(InvalidPayload) as exc:
        parse_payload(payload, **kw)
    return exc.value.reason


# -- good payloads -----------------------------------------------------------------
def test_sample_payload_as_the_tutorial_sent_it() -> None:
    s = parse_payload(enc(sample(t=1.23)))
    assert isinstance(s, Samples)
    assert (s.recording, s.device) == ("GaCo01_01", "insole-GaCo01_01")
    assert s.seq.tolist() == [123] and s.derived
    assert s.values.shape == (1, 19) and s.values[0, 0] == 1.23 and s.values[0, 18] == 18.0


def test_sample_payload_with_explicit_seq_and_device() -> None:
    s = parse_payload(enc(sample(t=1.23, seq=7, device="dev-1")))
    assert isinstance(s, Samples)
    assert s.seq.tolist() == [7] and not s.derived and s.device == "dev-1"


def test_batch_payload() -> None:
    s = parse_payload(enc(batch(seq=100, n=4)))
    assert isinstance(s, Samples)
    assert s.seq.tolist() == [100, 101, 102, 103]
    assert s.values.shape == (4, 19) and s.values.dtype == np.float64


def test_integers_are_numbers() -> None:
    obj = batch(n=1)
    obj["rows"] = [[0, *range(1, 19)]]
    s = parse_payload(enc(obj))
    assert isinstance(s, Samples) and s.values[0, 5] == 5.0


def test_end_marker() -> None:
    e = parse_payload(enc({"device": "insole-X", "recording": "X", "end": True,
                           "rows_total": 12}))
    assert e == EndMarker("X", "insole-X", 12)


# -- every bad payload kind, with its reason --------------------------------------------
@pytest.mark.parametrize(("payload", "expected"), [
    (b"\xff\xfe{}", "not UTF-8"),
    (b"{not json", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (enc({"hello": 1}), "unknown payload"),
    (enc(sample(L3="12")), "non-numeric value for 'L3'"),
    (enc(sample(L3=True)), "non-numeric value for 'L3'"),
    (enc(sample(L3=None)), "non-numeric value for 'L3'"),
    (enc({k: v for k, v in sample().items() if k != "R"}), "wrong column count"),
    (enc(sample(extra=1)), "unexpected field"),
    (b'{"Patient": "X", "time": NaN' + enc(sample())[len('{"Patient": "GaCo01_01", "time": 0.5'):],
     "NaN or infinite"),
    (enc(sample(L2=1e400)), "NaN or infinite"),
    (enc(sample(L2=-0.5)), "negative force"),
    (enc(sample(t=-1.0)), "negative time"),
    (enc(sample(t=1e12)), "time out of range"),
    (enc(batch(rows=[[0.0] * 18])), "row 0 has 18 values, expected 19"),
    (enc(batch(rows=[[0.0] * 19, [0.01] * 20])), "row 1 has 20 values"),
    (enc(batch(rows=[[0.0] * 18 + ["x"]])), "non-numeric value in row 0 (R)"),
    (enc(batch(rows=[])), "non-empty list"),
    (enc(batch(rows=[1, 2])), "list of lists"),
    (enc(batch(seq=-1)), "\"seq\""),
    (enc(batch(seq=1.5)), "\"seq\""),
    (enc(batch(rows=[[0.5] + [1.0] * 18, [0.4] + [1.0] * 18])), "time going backwards within"),
    (enc(batch(rows=[[0.5] + [1.0] * 18, [0.5] + [1.0] * 18])), "time going backwards within"),
    (enc(batch(rec=None)), "missing recording id"),
    (enc(batch(rec="../x")), "unsafe recording id"),
    (enc(batch(rec="a/b")), "unsafe recording id"),
    (enc(batch(rec="a\nb")), "unsafe recording id"),
    (enc(batch(rec="a\x00b")), "unsafe recording id"),
    (enc(batch(rec="x" * 65)), "unsafe recording id"),
    (enc(batch(rec="é")), "unsafe recording id"),
    (enc(batch(rec="")), "unsafe recording id"),
    (enc(batch(rec="a..b")), "unsafe recording id"),
    (enc(batch(rec=12)), "recording id must be a string"),
    (enc(batch(device="../../etc")), "unsafe device id"),
    (enc(sample(rec="a b")), "unsafe recording id"),
    (enc({"recording": "X", "end": True, "rows_total": -1}), "rows_total"),
    (enc({"recording": "X", "end": False, "rows_total": 1}), "must be true"),
])
def test_invalid_payloads_have_a_reason(payload: bytes, expected: str) -> None:
    assert expected in reason(payload)


def test_oversize_payload() -> None:
    assert "oversize payload: 200 bytes > max_payload_bytes 100" in \
        reason(b" " * 200, max_bytes=100)


def test_check_id_accepts_the_contract_alphabet() -> None:
    assert check_id("GaCo01_01", "recording") == "GaCo01_01"
    assert check_id("a.b-c_D9", "recording") == "a.b-c_D9"
    assert check_id("x" * 64, "recording") == "x" * 64


# -- across messages ------------------------------------------------------------------------
def _samples(rec: str, seq0: int, times: list[float], derived: bool = False) -> Samples:
    values = np.zeros((len(times), 19))
    values[:, 0] = times
    return Samples(rec, "d", np.arange(seq0, seq0 + len(times), dtype=np.int64), values, derived)


def test_timeline_accepts_redelivery_and_small_reorder() -> None:
    tl = Timelines(tolerance=10.0)
    first = _samples("A", 0, [0.0, 0.01])
    tl.check(first)
    tl.update(first)
    later = _samples("A", 500, [5.0, 5.01])
    tl.check(later)
    tl.update(later)
    tl.check(first)                       # redelivered: 5 s behind, within the tolerance
    tl.check(_samples("B", 0, [0.0]))     # another recording has its own timeline


def test_timeline_rejects_a_reset_clock() -> None:
    tl = Timelines(tolerance=10.0)
    tl.update(_samples("A", 3000, [30.0]))
    with pytest.raises(InvalidPayload, match="time going backwards across messages"):
        tl.check(_samples("A", 0, [0.0]))
    with pytest.raises(InvalidPayload, match="time going backwards across messages"):
        tl.check(_samples("A", 3001, [29.0]))     # seq forward, time backwards
    tl.forget("A")
    tl.check(_samples("A", 0, [0.0]))


def test_timeline_reports_seq_collisions_of_derived_seqs() -> None:
    tl = Timelines(tolerance=10.0)
    tl.update(_samples("A", 7072, [70.715], derived=True))
    tl.check(_samples("A", 7072, [70.715], derived=True))   # the same sample again: fine
    with pytest.raises(InvalidPayload, match="sequence number collision"):
        tl.check(_samples("A", 7072, [70.725], derived=True))


# -- columnar batch -------------------------------------------------------------------------
def test_samples_batch_is_columnar_and_follows_the_contract() -> None:
    a = _samples("A", 0, [0.0, 0.01])
    b = _samples("B", 5, [0.05])
    rb = samples_batch([a, b])
    assert rb.schema == SAMPLE_SCHEMA
    assert rb.column("recording").to_pylist() == ["A", "A", "B"]
    assert rb.column("seq").to_pylist() == [0, 1, 5]
    assert rb.column("time").to_pylist() == [0.0, 0.01, 0.05]
    assert rb.column("device").to_pylist() == ["d", "d", "d"]
    assert rb.schema.names == ["recording", "seq", *COLUMNS, "device"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.floats(0, 1000, allow_nan=False), min_size=19, max_size=19),
                min_size=1, max_size=20), st.integers(0, 10**6))
def test_batch_round_trip(rows: list[list[float]], seq0: int) -> None:
    for i, r in enumerate(rows):   # make time strictly increasing
        r[0] = i * 0.01
    s = parse_payload(enc({"recording": "R", "seq": seq0, "rows": rows}))
    assert isinstance(s, Samples)
    rb = samples_batch([s])
    assert rb.num_rows == len(rows)
    assert rb.column("seq").to_pylist() == list(range(seq0, seq0 + len(rows)))
    for j, c in enumerate(COLUMNS):
        assert rb.column(c).to_pylist() == [r[j] for r in rows]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash(payload: bytes) -> None:
    try:
        out = parse_payload(payload)
    except InvalidPayload as exc:
        assert exc.reason
    else:
        assert isinstance(out, (Samples, EndMarker))
        if isinstance(out, Samples):
            assert np.isfinite(out.values).all() and (out.values >= 0).all()


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_never_passes(bad: str) -> None:
    text = json.dumps(batch(n=1)).replace("1.0,", f"{bad},", 1)
    assert "NaN or infinite" in reason(text.encode())


# -- settings ---------------------------------------------------------------------------------
def _doc(**mqtt: object) -> dict[str, object]:
    return {"runtime": {"admin_enabled": False},
            "handlers": {"m": {"type": "mqtt_source", "on_failure": "stop", "outputs": ["s"],
                               **mqtt},
                         "s": {"type": "memory_sink", "on_failure": "stop"}}}


@pytest.mark.parametrize(("mqtt", "expected"), [
    ({}, "topics"),
    ({"topics": ["t"], "qos": 2}, "qos"),
    ({"topics": ["t"], "password": "p"}, "password needs username"),
    ({"topics": ["t"], "ca_file": "/x"}, "need tls = true"),
    ({"topics": ["t"], "tls": True, "key_file": "/k"}, "key_file needs cert_file"),
    ({"topics": ["t"], "shared_group": "a/b"}, "shared_group"),
    ({"topics": ["t"], "max_inflight": 0}, "max_inflight"),
    ({"topics": ["t"], "colour": "red"}, "unknown key"),
])
def test_settings_are_checked(mqtt: dict[str, object], expected: str) -> None:
    with pytest.raises(SettingsError) as exc:
        Runtime.from_dict(_doc(**mqtt))
    assert expected in str(exc.value)


def test_password_is_secret() -> None:
    rt = Runtime.from_dict(_doc(topics=["t"], username="u", password="hunter22"))
    s = rt.handlers["m"].settings
    assert isinstance(s, MqttSourceSettings)
    assert "hunter22" not in repr(s) and s.password is not None and s.password.get() == "hunter22"
    assert rt.handlers["m"].client_id == "gaitflow-m"
    assert pa.types.is_string(SAMPLE_SCHEMA.field("recording").type)
