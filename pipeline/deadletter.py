"""Dead-letter records: what failed, where, why, how often, and the original payload.

A dead-letter target is an ordinary sink instance; it receives batches with
:data:`DEAD_LETTER_SCHEMA`, one row per failed row or raw message.
"""
from __future__ import annotations

import base64
import datetime
import json
import math
import time
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from .batch import Batch
from .log import error_text, scrub

__all__ = ["DEAD_LETTER_SCHEMA", "dead_letter_records", "describe_error", "json_safe"]

DEAD_LETTER_SCHEMA = pa.schema([
    pa.field("time", pa.timestamp("ms", tz="UTC"), nullable=False),
    pa.field("handler", pa.string(), nullable=False),     # the handler that gave up
    pa.field("source", pa.string()),                       # who emitted the batch
    pa.field("reason", pa.string(), nullable=False),
    pa.field("exception", pa.string()),                    # "TypeName: message"
    pa.field("attempts", pa.int32(), nullable=False),
    pa.field("key", pa.string()),                          # the row's id or key, if known
    pa.field("payload", pa.string(), nullable=False),
    pa.field("payload_encoding", pa.string(), nullable=False),  # json | utf-8 | base64
])


def describe_error(error: BaseException | None) -> str | None:
    if error is None:
        return None
    return scrub(error_text(error))


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as strings, so ``json.dumps`` stays valid JSON,
    and times in ISO 8601 (``2026-12-05T07:22:58.431000+00:00``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    return str(value)


def _encode(item: Any) -> tuple[str, str]:
    if isinstance(item, (bytes, bytearray, memoryview)):
        raw = bytes(item)
        try:
            return raw.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            return base64.b64encode(raw).decode("ascii"), "base64"
    if isinstance(item, str):
        return item, "utf-8"
    return json.dumps(json_safe(item), default=_default, ensure_ascii=False,
                      allow_nan=False), "json"


def dead_letter_records(
    data: Any,
    *,
    handler: str,
    reason: str,
    error: BaseException | None = None,
    attempts: int = 1,
    rows: Sequence[int] | None = None,
    source: str | None = None,
) -> pa.Table:
    """Dead-letter rows for ``data``: a Batch, an Arrow table, raw bytes/str, or a list of them."""
    keys: list[Any] = []
    if isinstance(data, Batch):
        source = source or data.source
        if rows is not None:
            data = data.take(rows)
        keys = data.keys() if data.key else []
        items: list[Any] = data.to_pylist()
    elif isinstance(data, (pa.RecordBatch, pa.Table)):
        if rows is not None:
            data = data.take(pa.array(rows, type=pa.int64()))
        items = data.to_pylist()
    elif isinstance(data, (list, tuple)):
        items = list(data) if rows is None else [data[i] for i in rows]
    else:
        items = [data]
    encoded = [_encode(item) for item in items]
    n = len(encoded)
    now = int(time.time() * 1000)
    exception = describe_error(error)
    reason = scrub(reason)
    return pa.Table.from_pydict({
        "time": [now] * n,
        "handler": [handler] * n,
        "source": [source] * n,
        "reason": [reason] * n,
        "exception": [exception] * n,
        "attempts": [attempts] * n,
        "key": [None if k is None else str(k) for k in keys] if keys else [None] * n,
        "payload": [p for p, _ in encoded],
        "payload_encoding": [e for _, e in encoded],
    }, schema=DEAD_LETTER_SCHEMA)
