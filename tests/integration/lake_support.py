"""Test support for the tests that read the data lake on HDFS (not a test module).

``PATIENT``    a retry policy that rides out a NameNode restart.
``read_lake``  every visible row, file and leftover ``_tmp`` file under a lake root.
``keys``       the sorted ``(recording, seq)`` pairs of what ``read_lake`` returned.
``raw_parquet`` rows of a recording as a raw lake segment (what the Spark job reads).

The ``hdfs_url`` and ``lake_root`` fixtures are in ``conftest.py``.
"""
from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from handlers.lake_sink import segment_bytes
from handlers.webhdfs import NotFound, WebHdfs
from pipeline import RetryPolicy

PATIENT = RetryPolicy(max_attempts=30, backoff=0.5, max_backoff=3.0, jitter=0.2)


async def _walk(fs: WebHdfs, path: str, out: dict[str, list[Any]]) -> None:
    try:
        entries = await fs.list_status(path)
    except NotFound:
        return
    for st in entries:
        if st.is_dir:
            await _walk(fs, st.path, out)
        elif "/_tmp/" in st.path:
            out["leftovers"].append(st.path)
        elif st.name.endswith(".parquet"):
            out["paths"].append(st.path)
            out["tables"].append(pq.read_table(pa.BufferReader(await fs.open(st.path))))


async def read_lake(url: str, root: str) -> tuple[pa.Table | None, list[str], list[str]]:
    """(all visible rows, visible file paths, leftover _tmp files) under ``root``.

    A file may vanish between the listing and the read while a pipeline replaces
    it (compaction): then the whole read starts over.
    """
    async with WebHdfs(url, retry=PATIENT) as fs:
        for _ in range(20):
            out: dict[str, list[Any]] = {"tables": [], "paths": [], "leftovers": []}
            try:
                await _walk(fs, root, out)
            except NotFound:
                await asyncio.sleep(0.2)
                continue
            tables = out["tables"]
            return (pa.concat_tables(tables) if tables else None), sorted(out["paths"]), \
                out["leftovers"]
    raise AssertionError(f"the lake under {root} kept changing while being read")


def keys(lake: pa.Table | None) -> list[tuple[str, int]]:
    if lake is None:
        return []
    return sorted(zip(lake.column("recording").to_pylist(), lake.column("seq").to_pylist(),
                      strict=True))


def raw_parquet(recording: str, x: np.ndarray, a: int, b: int) -> bytes:
    """Rows ``a..b-1`` in the raw sample layout (handlers/README.md §1), zstd Parquet."""
    return segment_bytes(recording, x[a:b], a)
