"""The data side of the gait dashboard (``handlers/gait_dashboard.py``): Elasticsearch
queries over the diagnoses, and force signals read from the lake and downsampled.

Everything here is either pure (query building, response shaping, downsampling:
unit-testable without a server) or takes its client as an argument.

Recording ids follow gaitpdb's naming, ``<study><group><subject>_<walk>``
(``GaCo01_01``: study Ga = Yogev et al., Ju = Hausdorff et al., Si = Frenkel-Toledo
et al.; group Co = control, Pt = Parkinson's patient), so the *true* label of a
diagnosis is read from its id.
"""
from __future__ import annotations

import asyncio
import io
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .webhdfs import FileStatus, NotFound, WebHdfs, join

__all__ = ["LABELS", "SENSORS", "STUDIES", "LakeTooLarge", "QueryError", "build_search",
           "downsample", "read_recording", "search_result", "truth_of", "valid_recording_id"]

ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
GAITPDB_RE = re.compile(r"^(Ga|Ju|Si)(Co|Pt)\d+_\d+$")
DATE_DIR_RE = re.compile(r"^date=\d{4}-\d{2}-\d{2}$")
PART_RE = re.compile(r"^part-\d+-\d+\.parquet$")  # lake_sink's visible files only, no temp names
LABELS = ("parkinson", "control")
STUDIES = ("Ga", "Ju", "Si")
TRUTH = {"Pt": "parkinson", "Co": "control"}
SENSORS = tuple(f"{side}{i}" for side in "LR" for i in range(1, 9))
SORTS = {"recording": [{"recording": "asc"}],
         "-probability": [{"probability": "desc"}, {"recording": "asc"}],
         "probability": [{"probability": "asc"}, {"recording": "asc"}],
         "-diagnosed_at": [{"diagnosed_at": "desc"}, {"recording": "asc"}]}
ROW_FIELDS = ["recording", "probability", "label", "threshold", "model_version", "n_windows",
              "diagnosed_at"]
MAX_SIZE = 1000


class QueryError(ValueError):
    """A query parameter is invalid (HTTP 400 with this message)."""


class LakeTooLarge(RuntimeError):
    """The recording's files exceed the dashboard's read budget."""


def valid_recording_id(value: str) -> bool:
    """The contract's id rule: ``[A-Za-z0-9_.-]{1,64}`` and no ``..``."""
    return bool(ID_RE.match(value)) and ".." not in value


def truth_of(recording: str) -> tuple[str | None, str | None]:
    """``(study, true label)`` from a gaitpdb id, ``(None, None)`` for other ids."""
    m = GAITPDB_RE.match(recording)
    return (m.group(1), TRUTH[m.group(2)]) if m else (None, None)


# -- Elasticsearch -----------------------------------------------------------------------
def _probability(params: Mapping[str, str], name: str) -> float | None:
    raw = params.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise QueryError(f"{name}: expected a number between 0 and 1, got {raw!r}") from None
    if not (0.0 <= value <= 1.0):
        raise QueryError(f"{name}: expected a number between 0 and 1, got {raw!r}")
    return value


def _choice(params: Mapping[str, str], name: str, allowed: tuple[str, ...]) -> str:
    value = params.get(name, "").strip()
    if value and value not in allowed:
        raise QueryError(f"{name}: expected one of {', '.join(allowed)}, got {value!r}")
    return value


def _wild(text: str) -> str:
    return re.sub(r"([*?\\])", r"\\\1", text)


def build_search(params: Mapping[str, str]) -> dict[str, Any]:
    """The search body for ``/api/diagnoses`` query parameters; QueryError when invalid.

    ``q`` (text: recording id prefix or substring, label, model version prefix),
    ``label`` (parkinson|control), ``truth`` (parkinson|control, from the id),
    ``study`` (Ga|Ju|Si), ``model_version``, ``min_p``/``max_p`` (0..1), ``sort``
    (recording, -probability, probability, -diagnosed_at), ``size`` (≤ 1000), ``from``.
    """
    q = params.get("q", "").strip()
    if len(q) > 100:
        raise QueryError("q: at most 100 characters")
    label = _choice(params, "label", LABELS)
    truth = _choice(params, "truth", LABELS)
    study = _choice(params, "study", STUDIES)
    version = params.get("model_version", "").strip()
    if len(version) > 100:
        raise QueryError("model_version: at most 100 characters")
    min_p, max_p = _probability(params, "min_p"), _probability(params, "max_p")
    if min_p is not None and max_p is not None and min_p > max_p:
        raise QueryError(f"min_p ({min_p}) is above max_p ({max_p})")
    sort = params.get("sort", "recording") or "recording"
    if sort not in SORTS:
        raise QueryError(f"sort: expected one of {', '.join(SORTS)}, got {sort!r}")
    try:
        size = int(params.get("size") or 200)
        start = int(params.get("from") or 0)
    except ValueError:
        raise QueryError("size and from must be integers") from None
    if not (0 <= size <= MAX_SIZE) or not (0 <= start <= 10_000 - size):
        raise QueryError(f"size: 0..{MAX_SIZE}; from + size: at most 10000")

    must: list[dict[str, Any]] = []
    filters: list[dict[str, Any]] = []
    if q:
        must.append({"bool": {"minimum_should_match": 1, "should": [
            {"prefix": {"recording": {"value": q, "case_insensitive": True, "boost": 3}}},
            {"wildcard": {"recording": {"value": f"*{_wild(q)}*", "case_insensitive": True}}},
            {"term": {"label": {"value": q.lower()}}},
            {"prefix": {"model_version": {"value": q}}},
        ]}})
    if label:
        filters.append({"term": {"label": label}})
    if version:
        filters.append({"term": {"model_version": version}})
    group = {"parkinson": "Pt", "control": "Co"}.get(truth, "")
    if study:
        filters.append({"prefix": {"recording": study + group}})
    elif group:
        filters.append({"wildcard": {"recording": f"??{group}*"}})
    if min_p is not None or max_p is not None:
        bounds = {k: v for k, v in (("gte", min_p), ("lte", max_p)) if v is not None}
        filters.append({"range": {"probability": bounds}})
    return {
        "query": {"bool": {"must": must or [{"match_all": {}}], "filter": filters}},
        "sort": SORTS[sort], "size": size, "from": start, "track_total_hits": True,
        "_source": ROW_FIELDS,
        "aggs": {
            "truth": {"filters": {"filters": {
                "parkinson": {"wildcard": {"recording": "??Pt*"}},
                "control": {"wildcard": {"recording": "??Co*"}}}},
                "aggs": {"label": {"terms": {"field": "label", "size": 10}}}},
            "mean_probability": {"avg": {"field": "probability"}},
            "all": {"global": {}, "aggs": {
                "model_versions": {"terms": {"field": "model_version", "size": 100}}}},
        },
    }


def search_result(resp: Mapping[str, Any]) -> dict[str, Any]:
    """Shape an Elasticsearch answer for the page: rows, total, confusion matrix, versions."""
    rows = []
    for hit in resp["hits"]["hits"]:
        doc = dict(hit.get("_source") or {})
        doc.setdefault("recording", hit.get("_id"))
        study, truth = truth_of(str(doc["recording"]))
        doc["study"], doc["truth"] = study, truth
        doc["correct"] = None if truth is None or "label" not in doc else doc["label"] == truth
        rows.append(doc)
    aggs = resp.get("aggregations", {})
    cells = {(t, p): 0 for t in LABELS for p in LABELS}
    for truth, bucket in aggs.get("truth", {}).get("buckets", {}).items():
        for b in bucket.get("label", {}).get("buckets", []):
            if (truth, b["key"]) in cells:
                cells[(truth, b["key"])] = int(b["doc_count"])
    tp, fn = cells[("parkinson", "parkinson")], cells[("parkinson", "control")]
    fp, tn = cells[("control", "parkinson")], cells[("control", "control")]
    n = tp + fn + fp + tn

    def ratio(a: int, b: int) -> float | None:
        return round(a / b, 4) if b else None

    mean = aggs.get("mean_probability", {}).get("value")
    return {
        "total": int(resp["hits"]["total"]["value"]),
        "rows": rows,
        "confusion": {"tp": tp, "fn": fn, "fp": fp, "tn": tn, "n": n,
                      "accuracy": ratio(tp + tn, n), "sensitivity": ratio(tp, tp + fn),
                      "specificity": ratio(tn, tn + fp)},
        "mean_probability": mean if mean is None or math.isfinite(mean) else None,
        "model_versions": [b["key"] for b in
                           aggs.get("all", {}).get("model_versions", {}).get("buckets", [])],
    }


# -- lake --------------------------------------------------------------------------------
async def read_recording(fs: WebHdfs, root: str, recording: str, *,
                         max_bytes: int = 256 * 2**20) -> tuple[pa.Table | None, list[str]]:
    """Every committed Parquet segment of ``recording`` under ``root`` as one table sorted
    by ``seq`` (a sample written under two dates counts once: the newest file wins), and
    the file paths; ``(None, [])`` when the lake holds nothing for it."""
    if not valid_recording_id(recording):
        raise ValueError(f"unsafe recording id {recording!r}")
    try:
        dates = [d for d in await fs.list_status(root) if d.is_dir and DATE_DIR_RE.match(d.name)]
    except NotFound:
        return None, []
    dates.sort(key=lambda d: d.name)
    gate = asyncio.Semaphore(8)

    async def parts(date: FileStatus) -> list[FileStatus]:
        async with gate:
            try:
                entries = await fs.list_status(join(date.path, f"recording={recording}"))
            except NotFound:
                return []
        return sorted((e for e in entries if e.type == "FILE" and PART_RE.match(e.name)),
                      key=lambda e: e.name)

    files = [f for found in await asyncio.gather(*(parts(d) for d in dates)) for f in found]
    if not files:
        return None, []
    size = sum(f.length for f in files)
    if size > max_bytes:
        raise LakeTooLarge(f"{recording}: {len(files)} files, {size} bytes (limit {max_bytes})")

    async def fetch(f: FileStatus) -> bytes:
        async with gate:
            return await fs.open(f.path)

    blobs = await asyncio.gather(*(fetch(f) for f in files))
    table = await asyncio.to_thread(_decode, blobs)
    return table, [f.path for f in files]


def _decode(blobs: list[bytes]) -> pa.Table:
    wanted = ("seq", "time", "L", "R", *SENSORS)
    tables = []
    for blob in blobs:
        pf = pq.ParquetFile(io.BytesIO(blob))
        names = set(pf.schema_arrow.names)
        tables.append(pf.read(columns=[c for c in wanted if c in names]))
    table = pa.concat_tables(tables, promote_options="default")
    seq = table.column("seq").to_numpy()
    order = np.argsort(seq, kind="stable")  # stable: among equal seq, the newest file is last
    ordered = seq[order]
    keep = np.append(ordered[1:] != ordered[:-1], True)
    return table.take(pa.array(order[keep]))


def _buckets(n: int, count: int) -> np.ndarray:
    return np.unique(np.linspace(0, n, min(count, n) + 1).astype(np.int64)[:-1])


def _time(table: pa.Table) -> np.ndarray:
    if "time" in table.column_names:
        return np.nan_to_num(table.column("time").to_numpy(zero_copy_only=False).astype(float))
    return table.column("seq").to_numpy() / 100.0  # the contract's 100 Hz


def downsample(table: pa.Table, points: int = 1000, heat_columns: int = 300,
               start: float | None = None, end: float | None = None) -> dict[str, Any] | None:
    """L/R totals as mean, min and max per bucket (``points`` buckets, peaks kept) and a
    per-sensor heatmap (``heat_columns`` buckets of mean force), ready for JSON.

    ``start``/``end`` (seconds) keep a time range (zoom); ``full_start``/``full_end``
    give the whole recording's. None when the range holds no sample.
    """
    all_time = _time(table)
    full = (round(float(all_time[0]), 3), round(float(all_time[-1]), 3))
    if start is not None or end is not None:
        keep = np.ones(len(all_time), dtype=bool)
        if start is not None:
            keep &= all_time >= start
        if end is not None:
            keep &= all_time <= end
        table = table.filter(pa.array(keep))
    n = table.num_rows
    if n == 0:
        return None

    def col(name: str) -> np.ndarray:
        return np.nan_to_num(table.column(name).to_numpy(zero_copy_only=False).astype(np.float64))

    seq = table.column("seq").to_numpy()
    time = _time(table)
    starts = _buckets(n, points)
    counts = np.diff(np.append(starts, n))

    def r(values: np.ndarray, digits: int = 2) -> list[float]:
        return np.round(values, digits).tolist()

    out: dict[str, Any] = {
        "rows": n, "seq_first": int(seq[0]), "seq_last": int(seq[-1]),
        "duration_s": round(full[1] - full[0], 3), "full_start": full[0], "full_end": full[1],
        "time": r(np.add.reduceat(time, starts) / counts, 3),
    }
    sensors = [s for s in SENSORS if s in table.column_names]
    for side in ("L", "R"):
        if side in table.column_names:
            values = col(side)
        else:  # totals missing: the sum of the side's sensors
            values = sum((col(s) for s in sensors if s[0] == side), np.zeros(n))
        out[side] = {"mean": r(np.add.reduceat(values, starts) / counts),
                     "min": r(np.minimum.reduceat(values, starts)),
                     "max": r(np.maximum.reduceat(values, starts))}
    heat_starts = _buckets(n, heat_columns)
    heat_counts = np.diff(np.append(heat_starts, n))
    grid = [np.add.reduceat(col(s), heat_starts) / heat_counts for s in sensors]
    out["heatmap"] = {
        "sensors": sensors,
        "time": r(np.add.reduceat(time, heat_starts) / heat_counts, 3),
        "values": [r(g, 1) for g in grid],
        "max": round(float(max((g.max() for g in grid), default=0.0)), 1),
    }
    return out
