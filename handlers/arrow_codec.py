"""Record batches as bytes: Arrow IPC stream values that carry their own key and meta.

One encoded value is one Arrow IPC *stream* (``pyarrow.ipc.new_stream``): the
schema, then one or more record batches, then the end-of-stream marker. It is
what ``kafka_sink`` writes as a Kafka message value and what ``kafka_source``
reads back; any Arrow implementation (Java, Rust, Go, Spark's Arrow reader...)
can decode it without this module.

The batch's ``Batch.key`` (the name of its id column) and its ``Batch.meta``
travel inside the value, in the IPC schema's custom metadata, so a value is
self-describing even where Kafka headers are stripped (mirroring, dumps):

``gaitflow.codec``
    ``"1"``: the version of this layout.
``gaitflow.key``
    the key column name; absent when the batch has no key.
``gaitflow.meta``
    ``Batch.meta`` as a JSON object. Values that JSON cannot hold are sent in a
    JSON form: tuples and sets as lists, datetimes as ISO 8601 strings, NaN and
    infinities as strings, anything else as ``str(value)``.

The data's own schema metadata (pandas, Spark) is kept; decoding removes only
the ``gaitflow.*`` entries, so a batch round-trips with the schema it had.

Kafka headers (see :data:`HEADER_CONTENT_TYPE` and friends) repeat what a broker
tool or a consumer may want without decoding the value; they are a convenience,
the value is authoritative.

Buffers can be compressed inside the stream (``compression="zstd"`` or
``"lz4"``, built into pyarrow); readers decompress transparently.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from collections.abc import Mapping
from typing import Any, Literal

import pyarrow as pa

__all__ = [
    "CONTENT_TYPE",
    "HEADER_CONTENT_TYPE",
    "HEADER_KEY",
    "HEADER_SEQ_FIRST",
    "HEADER_SEQ_LAST",
    "DecodeError",
    "Decoded",
    "decode",
    "encode",
    "header",
    "meta_to_json",
]

CONTENT_TYPE = "application/vnd.apache.arrow.stream"
#: Kafka header names (values are UTF-8 bytes)
HEADER_CONTENT_TYPE = "content-type"
HEADER_KEY = "gaitflow-key"          # the batch's key column name
HEADER_SEQ_FIRST = "seq_first"       # decimal, lowest sequence number in the message
HEADER_SEQ_LAST = "seq_last"         # decimal, highest sequence number in the message

_VERSION = b"1"
_M_CODEC = b"gaitflow.codec"
_M_KEY = b"gaitflow.key"
_M_META = b"gaitflow.meta"
_OURS = (_M_CODEC, _M_KEY, _M_META)

Compression = Literal["none", "zstd", "lz4"]


class DecodeError(ValueError):
    """A value is not a batch this codec can read; the message says why."""


@dataclasses.dataclass(frozen=True)
class Decoded:
    """A decoded value: the rows, the key column name and the metadata."""

    data: pa.RecordBatch | pa.Table
    key: str | None
    meta: dict[str, Any]


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [_jsonable(v) for v in items]
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", errors="replace")
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item):
        try:
            return _jsonable(item())
        except (TypeError, ValueError):
            pass
    return str(value)


def meta_to_json(meta: Mapping[str, Any] | None) -> str:
    """``meta`` as a compact JSON object (see the module docstring for conversions)."""
    return json.dumps(_jsonable(dict(meta or {})), separators=(",", ":"), sort_keys=True,
                      ensure_ascii=False, allow_nan=False)


def encode(data: pa.RecordBatch | pa.Table, *, key: str | None = None,
           meta: Mapping[str, Any] | None = None,
           compression: Compression = "none") -> bytes:
    """The rows of ``data`` as one Arrow IPC stream carrying ``key`` and ``meta``."""
    if key is not None and key not in data.schema.names:
        raise ValueError(f"key column {key!r} is not in the batch "
                         f"(columns: {', '.join(data.schema.names)})")
    metadata = {k: v for k, v in (data.schema.metadata or {}).items() if k not in _OURS}
    metadata[_M_CODEC] = _VERSION
    metadata[_M_META] = meta_to_json(meta).encode("utf-8")
    if key is not None:
        metadata[_M_KEY] = key.encode("utf-8")
    schema = data.schema.with_metadata(metadata)
    options = pa.ipc.IpcWriteOptions(compression=None if compression == "none" else compression)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema, options=options) as writer:
        if isinstance(data, pa.Table):
            writer.write_table(data.replace_schema_metadata(metadata))
        else:
            writer.write_batch(data.replace_schema_metadata(metadata))
    return sink.getvalue().to_pybytes()


def decode(value: bytes | bytearray | memoryview | None) -> Decoded:
    """Rows, key and meta from an :func:`encode` value; :class:`DecodeError` when invalid.

    A single record batch comes back as a ``RecordBatch``, several as a ``Table``.
    """
    if value is None:
        raise DecodeError("empty message (no value): expected an Arrow IPC stream")
    if len(value) == 0:
        raise DecodeError("empty message value: expected an Arrow IPC stream")
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(value))
        batches = list(reader)
        schema = reader.schema
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DecodeError(f"not an Arrow IPC stream: {exc}") from None
    metadata = dict(schema.metadata or {})
    version = metadata.get(_M_CODEC)
    if version is not None and version != _VERSION:
        raise DecodeError(f"unsupported gaitflow codec version {version.decode(errors='replace')!r}"
                          f" (this reader knows {_VERSION.decode()!r})")
    key: str | None = None
    if _M_KEY in metadata:
        key = metadata[_M_KEY].decode("utf-8", errors="replace")
        if key not in schema.names:
            raise DecodeError(f"key column {key!r} is not in the batch "
                              f"(columns: {', '.join(schema.names)})")
    meta: dict[str, Any] = {}
    if _M_META in metadata:
        try:
            meta = json.loads(metadata[_M_META])
        except (ValueError, UnicodeDecodeError) as exc:
            raise DecodeError(f"metadata is not valid JSON: {exc}") from None
        if not isinstance(meta, dict):
            raise DecodeError(f"metadata must be a JSON object, found {type(meta).__name__}")
    rest = {k: v for k, v in metadata.items() if k not in _OURS} or None
    data: pa.RecordBatch | pa.Table
    if len(batches) == 1:
        data = batches[0].replace_schema_metadata(rest)
    else:
        data = pa.Table.from_batches(batches, schema=schema).replace_schema_metadata(rest)
    return Decoded(data=data, key=key, meta=meta)


def header(headers: Any, name: str) -> bytes | None:
    """The last value of header ``name`` in a Kafka record's headers, or None."""
    found = None
    for k, v in headers or ():
        if k == name:
            found = v
    return found
