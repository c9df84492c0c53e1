"""Parsing and validating ``POST /v1/predict`` bodies (no aiohttp here).

A body is ``{"recordings": [item, ...]}``; an item is either raw samples::

    {"id": "GaCo01_01", "rows": [[t, L1..L8, R1..R8, L, R], ...]}   # 19 numbers, 100 Hz

or precomputed window features (what ``ml.features.features_frame`` produces)::

    {"id": "GaCo01_01", "windows": [{"key": "GaCo01_01:0", "features": [f1, ...]}, ...]}

where ``features`` holds ``len(FEATURE_NAMES)`` numbers in the model's order
(``GET /v1/models`` lists them); ``null`` marks a feature that is undefined for the
window (imputed by the model). NaN and infinities are rejected everywhere.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Limits", "PredictItem", "RequestError", "parse_predict"]


class RequestError(Exception):
    """A client error: HTTP ``status``, a stable ``code``, a message and where."""

    def __init__(self, status: int, code: str, message: str, where: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.where = where

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across worker processes
        return (type(self), (self.status, self.code, self.message, self.where))

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.where is not None:
            err["field"] = self.where
        return {"error": err}


@dataclass(frozen=True)
class Limits:
    max_recordings: int = 256  # per request
    max_rows: int = 360_000  # per recording (1 h at 100 Hz)
    max_total_rows: int = 2_000_000  # per request
    max_windows: int = 10_000  # per recording
    min_rows: int = 1000  # one window at the model's window length


@dataclass
class PredictItem:
    id: str
    kind: str  # "rows" | "windows"
    data: np.ndarray  # (n, 19) rows or (k, n_features) window features
    keys: list[str] = field(default_factory=list)  # window keys (windows only)


def _unprocessable(code: str, message: str, where: str) -> RequestError:
    return RequestError(422, code, message, where)


def parse_predict(body: Any, n_columns: int, n_features: int, limits: Limits) -> list[PredictItem]:
    """Validate a decoded JSON body; raise :class:`RequestError` on the first problem."""
    if not isinstance(body, dict):
        raise RequestError(400, "invalid_body", "the body must be a JSON object", "$")
    if "recordings" not in body:
        raise _unprocessable("missing_field", "missing field 'recordings'", "recordings")
    recs = body["recordings"]
    if not isinstance(recs, list):
        raise _unprocessable("invalid_type", "'recordings' must be a list", "recordings")
    if not recs:
        raise _unprocessable("empty_batch", "'recordings' is empty", "recordings")
    if len(recs) > limits.max_recordings:
        raise RequestError(
            413, "batch_too_large",
            f"{len(recs)} recordings in one request; the limit is {limits.max_recordings}",
            "recordings",
        )  # fmt: skip
    items: list[PredictItem] = []
    seen: set[str] = set()
    total_rows = 0
    for i, rec in enumerate(recs):
        where = f"recordings[{i}]"
        if not isinstance(rec, dict):
            raise _unprocessable("invalid_type", "a recording must be an object", where)
        rid = rec.get("id")
        if rid is None:
            raise _unprocessable("missing_field", "missing field 'id'", f"{where}.id")
        if not isinstance(rid, str) or not rid or len(rid) > 200:
            raise _unprocessable("invalid_id", "'id' must be a non-empty string (<= 200 chars)",
                                 f"{where}.id")  # fmt: skip
        if rid in seen:
            raise _unprocessable("duplicate_id", f"id {rid!r} appears twice", f"{where}.id")
        seen.add(rid)
        has_rows, has_windows = "rows" in rec, "windows" in rec
        if has_rows == has_windows:
            raise _unprocessable(
                "missing_field" if not has_rows else "ambiguous_input",
                "give exactly one of 'rows' (raw samples) or 'windows' (features)", where,
            )  # fmt: skip
        if has_rows:
            arr = _rows(rec["rows"], n_columns, limits, f"{where}.rows")
            total_rows += arr.shape[0]
            if total_rows > limits.max_total_rows:
                raise RequestError(
                    413, "batch_too_large",
                    f"more than {limits.max_total_rows} rows in one request", "recordings",
                )  # fmt: skip
            items.append(PredictItem(rid, "rows", arr))
        else:
            arr, keys = _windows(rec["windows"], n_features, limits, f"{where}.windows", rid)
            items.append(PredictItem(rid, "windows", arr, keys))
    return items


def _rows(rows: Any, n_columns: int, limits: Limits, where: str) -> np.ndarray:
    if not isinstance(rows, list):
        raise _unprocessable("invalid_type", "'rows' must be a list of rows", where)
    if len(rows) > limits.max_rows:
        raise RequestError(413, "recording_too_long",
                           f"{len(rows)} rows; the limit is {limits.max_rows}", where)  # fmt: skip
    if len(rows) < limits.min_rows:
        raise _unprocessable(
            "too_short", f"{len(rows)} rows; a recording needs at least one window "
            f"({limits.min_rows} rows at 100 Hz)", where,
        )  # fmt: skip
    try:
        arr = np.array(rows)
    except (ValueError, TypeError):
        arr = None
    if arr is None or arr.ndim != 2 or arr.shape[1] != n_columns:
        for j, r in enumerate(rows):
            if not isinstance(r, list):
                raise _unprocessable("invalid_type", "each row must be a list of numbers",
                                     f"{where}[{j}]")  # fmt: skip
            if len(r) != n_columns:
                raise _unprocessable(
                    "wrong_column_count",
                    f"row has {len(r)} values; expected {n_columns} (time, L1..L8, R1..R8, L, R)",
                    f"{where}[{j}]",
                )  # fmt: skip
        raise _unprocessable("invalid_type", "rows must hold numbers only", where)
    # JSON true/false decode to bool, an int subclass that numpy turns into 1/0
    # silently when mixed with numbers: look for them explicitly (a C-level pass,
    # a few % of the JSON decoding time).
    if arr.dtype.kind not in "iuf" or bool in set(map(type, itertools.chain.from_iterable(rows))):
        bad = _first_non_number(rows)
        raise _unprocessable("invalid_type", "rows must hold numbers only",
                             f"{where}[{bad[0]}][{bad[1]}]" if bad else where)  # fmt: skip
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        j, k = np.argwhere(~np.isfinite(arr))[0]
        raise _unprocessable("non_finite", "NaN or infinite value", f"{where}[{j}][{k}]")
    return arr


def _first_non_number(rows: list) -> tuple[int, int] | None:
    for j, r in enumerate(rows):
        for k, v in enumerate(r):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                return j, k
    return None


def _windows(wins: Any, n_features: int, limits: Limits, where: str,
             rid: str) -> tuple[np.ndarray, list[str]]:  # fmt: skip
    if not isinstance(wins, list):
        raise _unprocessable("invalid_type", "'windows' must be a list", where)
    if not wins:
        raise _unprocessable("too_short", "'windows' is empty", where)
    if len(wins) > limits.max_windows:
        raise RequestError(413, "recording_too_long",
                           f"{len(wins)} windows; the limit is {limits.max_windows}", where)  # fmt: skip
    out = np.empty((len(wins), n_features), dtype=np.float64)
    keys: list[str] = []
    for j, w in enumerate(wins):
        wj = f"{where}[{j}]"
        if not isinstance(w, dict):
            raise _unprocessable("invalid_type", "a window must be an object", wj)
        key = w.get("key", f"{rid}:{j}")
        if not isinstance(key, str):
            raise _unprocessable("invalid_type", "'key' must be a string", f"{wj}.key")
        if "features" not in w:
            raise _unprocessable("missing_field", "missing field 'features'", f"{wj}.features")
        f = w["features"]
        if not isinstance(f, list):
            raise _unprocessable("invalid_type", "'features' must be a list", f"{wj}.features")
        if len(f) != n_features:
            raise _unprocessable(
                "wrong_feature_count", f"{len(f)} features; the model expects {n_features}",
                f"{wj}.features",
            )  # fmt: skip
        for k, v in enumerate(f):
            if v is None:
                out[j, k] = np.nan  # undefined feature: imputed
            elif isinstance(v, bool) or not isinstance(v, (int, float)):
                raise _unprocessable("invalid_type", "features must be numbers or null",
                                     f"{wj}.features[{k}]")  # fmt: skip
            elif not math.isfinite(v):
                raise _unprocessable("non_finite", "NaN or infinite value (use null for a "
                                     "missing feature)", f"{wj}.features[{k}]")  # fmt: skip
            else:
                out[j, k] = v
        keys.append(key)
    return out, keys
