"""Helpers shared by several built-in handlers (append new sections; keep each self-contained)."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# -- document stores (mongo_sink, es_sink) ------------------------------------------
# Rows become one document each, keyed by a column; these helpers keep the
# conversion columnar up to the final ``to_pylist``.

@dataclasses.dataclass
class PreparedDocuments:
    """What a document sink writes for one batch, and what it refuses up front."""

    #: batch row position of each document
    positions: np.ndarray
    #: the documents, in the order of ``positions``
    docs: list[dict[str, Any]]
    #: ``(rows, reason)`` for rows refused before any write (null key, NaN...)
    rejected: list[tuple[list[int], str]]
    #: rows not written because a later row of the batch has the same key
    superseded: int = 0


def last_row_per_key(keys: pa.Array | pa.ChunkedArray) -> np.ndarray | None:
    """Positions (ascending) of the last row of each distinct key; None when keys are unique."""
    n = len(keys)
    if n < 2 or pc.count_distinct(keys, mode="all").as_py() == n:
        return None
    table = pa.table({"k": keys, "i": pa.array(np.arange(n, dtype=np.int64))})
    last = table.group_by("k", use_threads=False).aggregate([("i", "max")])
    return np.sort(last.column("i_max").to_numpy())


def non_finite_rows(table: pa.Table | pa.RecordBatch) -> dict[str, np.ndarray]:
    """``{column: row mask}`` for float (and list-of-float) columns holding NaN or ±Infinity."""
    found: dict[str, np.ndarray] = {}
    n = table.num_rows
    for field, column in zip(table.schema, table.columns, strict=True):
        tp = field.type
        if pa.types.is_floating(tp):
            bad = pc.invert(pc.fill_null(pc.is_finite(column), True))
            mask = np.asarray(bad.to_numpy(zero_copy_only=False), dtype=bool)
        elif ((pa.types.is_list(tp) or pa.types.is_large_list(tp)
               or pa.types.is_fixed_size_list(tp)) and pa.types.is_floating(tp.value_type)):
            flat = pc.list_flatten(column)
            bad_flat = pc.invert(pc.fill_null(pc.is_finite(flat), True))
            if not pc.any(bad_flat).as_py():
                continue
            parents = pc.list_parent_indices(column).to_numpy()
            mask = np.zeros(n, dtype=bool)
            mask[parents[np.asarray(bad_flat.to_numpy(zero_copy_only=False), dtype=bool)]] = True
        else:
            continue
        if mask.any():
            found[field.name] = mask
    return found


def documents(table: pa.Table | pa.RecordBatch) -> list[dict[str, Any]]:
    """Rows as dicts whose values BSON and JSON encoders take.

    Timestamps become ``datetime`` (tz-aware when the column has a zone;
    nanoseconds are truncated to microseconds, which both stores round to
    milliseconds anyway); dates become midnight timestamps (BSON has no date type).
    """
    casts = {}
    for i, field in enumerate(table.schema):
        tp = field.type
        if pa.types.is_timestamp(tp) and tp.unit == "ns":
            casts[i] = pa.timestamp("us", tz=tp.tz)
        elif pa.types.is_date(tp):
            casts[i] = pa.timestamp("ms")
    if casts:
        columns = [pc.cast(col, casts[i], safe=False) if i in casts else col
                   for i, col in enumerate(table.columns)]
        table = pa.table(columns, names=table.schema.names)
    return table.to_pylist()


def prepare_documents(table: pa.Table | pa.RecordBatch, key: str, *,
                      reject_non_finite: bool = True,
                      id_field: str | None = None) -> PreparedDocuments:
    """One document per row of ``table``, keyed by column ``key``.

    Rows with a null key are refused, and so are rows with NaN or ±Infinity when
    ``reject_non_finite``. Several rows with the same key keep the last one (as
    writing them in order would). ``id_field`` adds the key under that name too
    (``"_id"`` for MongoDB).
    """
    n = table.num_rows
    keys = table.column(key)
    ok = np.ones(n, dtype=bool)
    rejected: list[tuple[list[int], str]] = []
    if keys.null_count:
        nulls = np.asarray(keys.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        rejected.append((np.flatnonzero(nulls).tolist(), f"key column {key!r} is null"))
        ok &= ~nulls
    if reject_non_finite:
        for name, mask in non_finite_rows(table).items():
            bad = mask & ok
            if bad.any():
                reason = (f"column {name!r} holds NaN or an infinite value "
                          "(not storable as a number in JSON, refused by FerretDB)")
                rejected.append((np.flatnonzero(bad).tolist(), reason))
                ok &= ~bad
    positions = np.flatnonzero(ok)
    if len(positions) < n:
        table = table.take(pa.array(positions))
    last = last_row_per_key(table.column(key))
    superseded = 0
    if last is not None:
        superseded = len(positions) - len(last)
        positions = positions[last]
        table = table.take(pa.array(last))
    if id_field is not None:
        table = pa.Table.from_batches([table]) if isinstance(table, pa.RecordBatch) else table
        table = table.add_column(0, id_field, table.column(key))
    return PreparedDocuments(positions, documents(table), rejected, superseded)


def group_rows(failures: Iterable[tuple[int, str]]) -> dict[str, list[int]]:
    """``{reason: [row, ...]}`` from ``(row, reason)`` pairs: one dead-letter call per reason."""
    grouped: dict[str, list[int]] = {}
    for row, reason in failures:
        grouped.setdefault(reason, []).append(int(row))
    return grouped
