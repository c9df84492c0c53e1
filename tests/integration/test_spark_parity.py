"""Parity: the features the Spark job computes from the lake equal, to float tolerance,
those ``ml.features`` computes directly from the same samples (windows, and the
tutorial's baseline means). The lake is made awkward on purpose: segment boundaries
not aligned on windows, an overlapping replayed segment (duplicate samples), a
recording spread over two date partitions, and one too short for any window.

One spark-submit run per test (full mode over a small lake).
"""
from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pandas as pd
import pytest
from lake_support import raw_parquet

from handlers.spark_job import SparkJobSettings, run_features_job
from handlers.webhdfs import WebHdfs
from ml import data as mldata
from ml import features as mlf

pytestmark = pytest.mark.integration

# recording -> (rows, [(date, first, last_exclusive), ...])
LAYOUT = {
    "GaCo02_01": (4200, [("2026-12-04", 0, 1700), ("2026-12-04", 1700, 2600),
                         ("2026-12-04", 1000, 2000),              # replayed, overlapping
                         ("2026-12-05", 2600, 4200)]),            # after midnight
    "GaPt03_01": (3000, [("2026-12-04", 0, 3000)]),
    "GaCo03_01": (600, [("2026-12-04", 0, 600)]),                 # < one window
}


@pytest.fixture
async def lake(stack_service: Callable[[str], Any]) -> AsyncIterator[dict[str, Any]]:
    """The layout above written to a unique lake root; the samples it holds."""
    if not os.environ.get(mldata.ENV_VAR):
        pytest.fail(f"{mldata.ENV_VAR} is not set: export it to the gaitpdb directory",
                    pytrace=False)
    hdfs = stack_service("hdfs")
    if not stack_service("spark").ready():
        pytest.fail("Spark is not usable: `python -m stack status spark`", pytrace=False)
    paths = mldata.list_recordings().set_index("id")["path"]
    root = f"/gaitflow-test/parity-{uuid.uuid4().hex[:12]}"
    samples = {}
    async with WebHdfs(hdfs.webhdfs()) as fs:
        try:
            for rid, (n, segments) in LAYOUT.items():
                x = mldata.load_recording(paths[rid])[:n]
                samples[rid] = x
                for date, a, b in segments:
                    await fs.create(f"{root}/raw/date={date}/recording={rid}/"
                                    f"part-{a:010d}-{b - 1:010d}.parquet",
                                    raw_parquet(rid, x, a, b))
            yield {"root": root, "samples": samples, "hdfs": hdfs,
                   "settings": SparkJobSettings(hdfs_url=hdfs.address(),
                                                webhdfs_url=hdfs.webhdfs(),
                                                features_root=f"{root}/features",
                                                shuffle_partitions=4)}
        finally:
            await fs.delete(root, recursive=True)


async def spark_features(lake: dict[str, Any], feature_set: str) -> pd.DataFrame:
    url = lake["hdfs"].address()
    spec = {"job_id": f"parity-{feature_set}",
            "inputs": [f"{url}{lake['root']}/raw"],
            "output": f"{url}{lake['root']}/features/job=parity-{feature_set}",
            "features": feature_set}
    attempt, table = await run_features_job(spec, lake["settings"])
    assert attempt.ok, f"{attempt.error}\n{attempt.stderr_tail()}"
    assert table is not None
    assert attempt.result is not None and attempt.result["recordings"] == 3
    assert attempt.result["rows"] == 4200 + 1000 + 3000 + 600  # read, replayed rows included
    return table.to_pandas().set_index("window_key").sort_index()


def frame_of(rid: str, x: np.ndarray) -> pd.DataFrame:
    df = pd.DataFrame(x, columns=list(mlf.COLUMNS))
    df.insert(0, "seq", np.arange(len(x), dtype=np.int64))
    df.insert(0, "recording", rid)
    return df


@pytest.mark.timeout(600)
async def test_window_features_equal_ml(lake: dict[str, Any]) -> None:
    got = await spark_features(lake, "windows")
    expected = pd.concat([mlf.features_frame(frame_of(rid, x), id_col="recording")
                          for rid, x in lake["samples"].items()]).set_index("key").sort_index()
    assert list(got.index) == list(expected.index)
    assert len(got) == 7 + 5  # 4200 rows -> 7 windows, 3000 -> 5, 600 -> none
    assert (got["recording"] == expected["recording_id"]).all()
    assert (got["window"] == expected["window"]).all()
    assert (got["seq_first"] == expected["start_seq"]).all()
    assert (got["seq_last"] == expected["start_seq"] + 999).all()
    names = list(mlf.FEATURE_NAMES)
    assert list(got.columns[4:]) == names  # §4 order after the key columns
    np.testing.assert_allclose(got[names].to_numpy(), expected[names].to_numpy(),
                               rtol=1e-9, atol=1e-12, equal_nan=True)


@pytest.mark.timeout(600)
async def test_baseline_features_equal_ml(lake: dict[str, Any]) -> None:
    got = await spark_features(lake, "baseline")
    expected = pd.concat([mlf.baseline_frame(frame_of(rid, x), id_col="recording")
                          for rid, x in lake["samples"].items()]).set_index("key").sort_index()
    assert list(got.index) == list(expected.index)
    assert len(got) == 42 + 30 + 6
    assert (got["window"] == expected["block"]).all()
    assert (got["seq_first"] == expected["block"] * 100).all()
    names = list(mlf.BASELINE_NAMES)
    np.testing.assert_allclose(got[names].to_numpy(), expected[names].to_numpy(),
                               rtol=1e-9, atol=1e-9)
