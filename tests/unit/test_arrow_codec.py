"""handlers.arrow_codec: batches as Arrow IPC stream bytes carrying key and meta."""
from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handlers import arrow_codec
from handlers.arrow_codec import DecodeError, decode, encode


def samples(n: int = 5) -> pa.RecordBatch:
    return pa.record_batch({
        "recording": pa.array(["GaCo01_01"] * n),
        "seq": pa.array(np.arange(n, dtype=np.int64)),
        "L": pa.array(np.linspace(0, 400, n)),
    })


def raw_stream(schema: pa.Schema, batches: list[pa.RecordBatch]) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        for b in batches:
            writer.write_batch(b)
    return sink.getvalue().to_pybytes()


def test_roundtrip_keeps_rows_key_meta_and_schema() -> None:
    batch = samples()
    value = encode(batch, key="seq", meta={"recording": "GaCo01_01", "final": True})
    out = decode(value)
    assert isinstance(out.data, pa.RecordBatch)
    assert out.data.equals(batch)
    assert out.data.schema.metadata is None  # only gaitflow.* entries were added, and removed
    assert out.key == "seq"
    assert out.meta == {"recording": "GaCo01_01", "final": True}


def test_value_is_a_plain_arrow_stream_readable_without_the_codec() -> None:
    value = encode(samples(), key="seq", meta={"a": 1})
    table = pa.ipc.open_stream(value).read_all()
    assert table.num_rows == 5
    assert table.schema.metadata[b"gaitflow.key"] == b"seq"
    assert table.schema.metadata[b"gaitflow.meta"] == b'{"a":1}'


def test_table_with_several_chunks_comes_back_as_a_table() -> None:
    table = pa.Table.from_batches([samples(3), samples(4)])
    out = decode(encode(table))
    assert isinstance(out.data, pa.Table)
    assert out.data.equals(table)
    assert out.key is None and out.meta == {}


def test_foreign_schema_metadata_is_kept() -> None:
    batch = samples().replace_schema_metadata({b"pandas": b"{}"})
    out = decode(encode(batch, key="seq"))
    assert out.data.schema.metadata == {b"pandas": b"{}"}


@pytest.mark.parametrize("compression", ["zstd", "lz4", "none"])
def test_compressed_buffers_roundtrip(compression: str) -> None:
    batch = pa.record_batch({"v": pa.array(np.zeros(10_000))})
    value = encode(batch, compression=compression)  # type: ignore[arg-type]
    assert decode(value).data.equals(batch)
    if compression != "none":
        assert len(value) < 10_000 * 8 // 10


def test_meta_values_json_cannot_hold_are_converted() -> None:
    when = dt.datetime(2026, 12, 4, 10, 30, tzinfo=dt.UTC)
    meta = {"t": (1, 2), "when": when, "nan": math.nan, "inf": -math.inf,
            "np": np.int64(7), "nested": {"s": {3}}, "obj": object.__name__}
    out = decode(encode(samples(), meta=meta))
    assert out.meta == {"t": [1, 2], "when": "2026-12-04T10:30:00+00:00", "nan": "nan",
                        "inf": "-inf", "np": 7, "nested": {"s": [3]}, "obj": "object"}


def test_encode_refuses_a_key_that_is_not_a_column() -> None:
    with pytest.raises(ValueError, match="key column 'id' is not in the batch"):
        encode(samples(), key="id")


@pytest.mark.parametrize(("value", "reason"), [
    (None, "no value"),
    (b"", "empty message value"),
    (b"not arrow at all", "not an Arrow IPC stream"),
    (b"\x00" * 8, "not an Arrow IPC stream"),
])
def test_decode_rejects_garbage_with_a_reason(value: bytes | None, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        decode(value)


def test_decode_rejects_a_truncated_stream() -> None:
    value = encode(samples(100))
    with pytest.raises(DecodeError, match="not an Arrow IPC stream"):
        decode(value[: len(value) // 2])


@pytest.mark.parametrize(("metadata", "reason"), [
    ({b"gaitflow.codec": b"9"}, "unsupported gaitflow codec version '9'"),
    ({b"gaitflow.key": b"missing"}, "key column 'missing' is not in the batch"),
    ({b"gaitflow.meta": b"{not json"}, "metadata is not valid JSON"),
    ({b"gaitflow.meta": b"[1, 2]"}, "metadata must be a JSON object, found list"),
])
def test_decode_rejects_invalid_gaitflow_metadata(metadata: dict[bytes, bytes],
                                                  reason: str) -> None:
    batch = samples()
    schema = batch.schema.with_metadata(metadata)
    value = raw_stream(schema, [batch.replace_schema_metadata(metadata)])
    with pytest.raises(DecodeError, match=reason):
        decode(value)


def test_a_plain_arrow_stream_without_gaitflow_metadata_decodes() -> None:
    batch = samples()
    out = decode(raw_stream(batch.schema, [batch]))
    assert out.data.equals(batch) and out.key is None and out.meta == {}


def test_header_returns_the_last_value_of_a_name() -> None:
    headers = [("seq_last", b"1"), ("other", b"x"), ("seq_last", b"2")]
    assert arrow_codec.header(headers, "seq_last") == b"2"
    assert arrow_codec.header(headers, "absent") is None
    assert arrow_codec.header(None, "seq_last") is None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=12), st.integers(-2**63, 2**63 - 1),
                          st.floats(allow_nan=True, allow_infinity=True) | st.none()),
                max_size=40),
       st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8) | st.booleans(),
                       max_size=4))
def test_any_rows_and_meta_roundtrip(rows: list[tuple[str, int, float | None]],
                                     meta: dict[str, object]) -> None:
    table = pa.table({"s": pa.array([r[0] for r in rows], pa.string()),
                      "i": pa.array([r[1] for r in rows], pa.int64()),
                      "f": pa.array([r[2] for r in rows], pa.float64())})
    out = decode(encode(table, key="i", meta=meta))
    assert out.data.num_rows == len(rows)
    got = out.data if isinstance(out.data, pa.Table) else pa.Table.from_batches([out.data])
    assert got.to_pydict().keys() == table.to_pydict().keys()
    assert got.column("s").to_pylist() == table.column("s").to_pylist()
    assert got.column("i").to_pylist() == table.column("i").to_pylist()
    assert [repr(v) for v in got.column("f").to_pylist()] == \
        [repr(v) for v in table.column("f").to_pylist()]  # NaN == NaN by repr
    assert out.meta == meta and out.key == "i"
