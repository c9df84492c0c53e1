"""The Spark job's pure parts (spec, per-recording features in the §4 layout) and how
the handler builds a spark-submit run (command, environment, the ml zip). No Spark."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from handlers.spark_job import SparkJobSettings
from handlers.spark_submit import build_ml_zip, submit_command, submit_env
from ml import features as mlf
from spark.features_job import (
    KEY_COLUMNS,
    JobSpec,
    SpecError,
    error_summary,
    recording_features,
    spec_from_args,
)


def synthetic_recording(recording: str, n: int = 3000, seed: int = 0) -> pd.DataFrame:
    """A walk-like signal: alternating feet, ~1.1 s strides, some noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 100.0
    phase = 2 * np.pi * t / 1.1
    left = 700 * np.clip(np.sin(phase), 0, None) + rng.normal(0, 5, n).clip(0)
    right = 700 * np.clip(np.sin(phase + np.pi), 0, None) + rng.normal(0, 5, n).clip(0)
    cols = {"time": t}
    for i in range(1, 9):
        cols[f"L{i}"] = left * (0.05 + 0.02 * i)
        cols[f"R{i}"] = right * (0.05 + 0.02 * i)
    cols["L"], cols["R"] = left, right
    df = pd.DataFrame(cols)[list(mlf.COLUMNS)]
    df.insert(0, "seq", np.arange(n, dtype=np.int64))
    df.insert(0, "recording", recording)
    return df


def spec(**kw: object) -> JobSpec:
    doc = {"job_id": "j1", "inputs": ["hdfs://x/raw/date=*/recording=*/part-*.parquet"],
           "output": "hdfs://x/features/job=j1", **kw}
    return JobSpec.from_dict(doc)


# ----------------------------------------------------------------------------- spec


def test_spec_defaults_follow_ml() -> None:
    s = spec()
    assert (s.features, s.window_s, s.step_s) == ("windows", mlf.DEFAULT_WINDOW_S,
                                                  mlf.DEFAULT_STEP_S)
    assert JobSpec.from_dict(json.loads(s.to_json())) == s


@pytest.mark.parametrize(("change", "needle"), [
    ({"job_id": "../x"}, "job_id"),
    ({"inputs": []}, "inputs"),
    ({"features": "deep"}, "features"),
    ({"recordings": ["ok", "b*d"]}, "recordings"),
    ({"complete_inputs": ["hdfs://x/raw/date=*/recording=other"]}, "complete_inputs"),
    ({"complete_inputs": "hdfs://x/raw"}, "complete_inputs"),
    ({"window_s": 0}, "positive"),
    ({"colour": "red"}, "unknown keys"),
])
def test_spec_rejects(change: dict[str, object], needle: str) -> None:
    with pytest.raises(SpecError, match=needle):
        spec(**change)


def test_full_mode_reads_the_whole_lake() -> None:
    args = argparse.Namespace(spec=None, spec_json=None, full="hdfs://nn:8020/gaitflow/raw/",
                              output="hdfs://nn:8020/f/job=all", features="baseline",
                              job_id="all")
    s = spec_from_args(args)
    assert s.inputs == ["hdfs://nn:8020/gaitflow/raw"]
    assert s.features == "baseline" and s.recordings is None
    with pytest.raises(SpecError, match="not JSON"):
        spec_from_args(argparse.Namespace(spec=None, spec_json="{", full=None))


# ----------------------------------------------------------------------------- features


def test_window_features_match_ml_in_the_contract_layout() -> None:
    df = synthetic_recording("GaCo01_01")
    expected = mlf.features_frame(df, id_col="recording")
    # any order, with duplicates (a replayed segment): same result
    noisy = pd.concat([df, df.iloc[500:1500]]).sample(frac=1.0, random_state=1)
    got = recording_features(noisy.reset_index(drop=True), spec())
    assert list(got.columns) == [*KEY_COLUMNS, *mlf.FEATURE_NAMES]
    assert len(got) == len(expected) == 5
    assert got["window_key"].tolist() == expected["key"].tolist()
    assert got["window"].tolist() == [0, 1, 2, 3, 4]
    assert got["seq_first"].tolist() == [0, 500, 1000, 1500, 2000]
    assert (got["seq_last"] - got["seq_first"]).eq(999).all()
    np.testing.assert_allclose(got[list(mlf.FEATURE_NAMES)].to_numpy(),
                               expected[list(mlf.FEATURE_NAMES)].to_numpy(), equal_nan=True)
    assert got.dtypes[list(mlf.FEATURE_NAMES)].eq(np.float64).all()


def test_gaps_and_short_recordings() -> None:
    df = synthetic_recording("GaPt03_01", n=2500)
    got = recording_features(df[(df.seq < 1200) | (df.seq >= 1300)], spec())
    # windows overlapping the missing seq 1200..1299 are skipped, never computed on a gap
    assert got["window"].tolist() == [0, 3]
    empty = recording_features(synthetic_recording("GaPt03_02", n=300), spec())
    assert empty.empty and list(empty.columns) == [*KEY_COLUMNS, *mlf.FEATURE_NAMES]


def test_baseline_features() -> None:
    df = synthetic_recording("GaCo02_01", n=350)
    got = recording_features(df, spec(features="baseline"))
    assert list(got.columns) == [*KEY_COLUMNS, *mlf.BASELINE_NAMES]
    assert got["window_key"].tolist() == ["GaCo02_01:b0", "GaCo02_01:b1", "GaCo02_01:b2"]
    assert got["seq_first"].tolist() == [0, 100, 200] and got["seq_last"].tolist() == [99, 199,
                                                                                       299]
    assert got["mean_L"].iloc[1] == pytest.approx(df["L"].iloc[100:200].mean())


def test_error_summary_keeps_the_innermost_cause() -> None:
    exc = RuntimeError("Job aborted due to stage failure: Task 0 failed\n\tat org.x\n"
                       "Caused by: java.io.IOException: boom\n\tat y\n"
                       "Caused by: java.lang.RuntimeException: x.parquet is not a Parquet file")
    text = error_summary(exc)
    assert text.startswith("RuntimeError: Job aborted due to stage failure")
    assert text.endswith("x.parquet is not a Parquet file")


# ----------------------------------------------------------------------------- the run


def test_submit_command_local(tmp_path: Path) -> None:
    s = SparkJobSettings(ui_port=4050, spark_conf={"spark.sql.shuffle.partitions": "3"})
    argv = submit_command(s, ["--spec-json", "{}"], tmp_path / "ml.zip", "gaitflow-features-x")
    assert argv[0].endswith("spark-submit")
    assert argv[argv.index("--master") + 1] == "local[*]"
    assert argv[argv.index("--py-files") + 1] == str(tmp_path / "ml.zip")
    confs = dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--conf")
    assert confs["spark.sql.shuffle.partitions"] == "3"  # spark_conf overrides defaults
    assert confs["spark.ui.port"] == "4050"
    assert confs["spark.sql.execution.arrow.pyspark.enabled"] == "true"
    assert confs["spark.driver.host"] == "127.0.0.1"
    assert confs["spark.pyspark.python"] == sys.executable
    assert argv[-3].endswith("spark/features_job.py") and argv[-2:] == ["--spec-json", "{}"]
    env = submit_env(s)
    assert env["PYSPARK_PYTHON"] == sys.executable and env["SPARK_LOCAL_IP"] == "127.0.0.1"
    assert Path(env["SPARK_HOME"], "bin", "spark-class").exists()


def test_a_run_scratch_dir_is_spark_local_dir_unless_spark_conf_names_one(tmp_path: Path) -> None:
    def conf(argv: list[str]) -> dict[str, str]:
        return dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--conf")

    scratch = tmp_path / "run-1"
    s = SparkJobSettings()
    assert "spark.local.dir" not in conf(submit_command(s, [], tmp_path / "ml.zip", "app"))
    assert conf(submit_command(s, [], tmp_path / "ml.zip", "app", scratch))["spark.local.dir"] \
        == str(scratch)
    env = submit_env(s, scratch)
    assert env["SPARK_LOCAL_DIRS"] == env["TMPDIR"] == str(scratch)
    # an operator's spark.local.dir wins, and the environment does not contradict it
    own = SparkJobSettings(spark_conf={"spark.local.dir": "/data/spark"})
    assert conf(submit_command(own, [], tmp_path / "ml.zip", "app", scratch))["spark.local.dir"] \
        == "/data/spark"
    assert submit_env(own, scratch).get("SPARK_LOCAL_DIRS") == os.environ.get("SPARK_LOCAL_DIRS")


def test_submit_command_cluster_has_no_loopback(tmp_path: Path) -> None:
    s = SparkJobSettings(master="spark://master:7077", python=Path("/opt/py/bin/python3"),
                         env={"HADOOP_CONF_DIR": "/etc/hadoop"})
    argv = submit_command(s, [], tmp_path / "ml.zip", "app")
    assert argv[argv.index("--master") + 1] == "spark://master:7077"
    assert not any("spark.driver.host" in a or "bindAddress" in a for a in argv)
    assert "spark.pyspark.python=/opt/py/bin/python3" in argv
    env = submit_env(s)
    assert env.get("SPARK_LOCAL_IP") == os.environ.get("SPARK_LOCAL_IP")  # not forced
    assert env["HADOOP_CONF_DIR"] == "/etc/hadoop"


def test_ml_zip_is_importable_on_its_own(tmp_path: Path) -> None:
    path = build_ml_zip(tmp_path)
    names = zipfile.ZipFile(path).namelist()
    assert "ml/__init__.py" in names and "ml/features.py" in names
    assert not any("__pycache__" in n for n in names)
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import ml.features as f; "
             "print(f.__file__, len(f.FEATURE_NAMES))")
    out = subprocess.run([sys.executable, "-I", "-c", probe, str(path)], check=True,
                         capture_output=True, text=True, cwd=tmp_path).stdout
    assert str(path) in out and f" {len(mlf.FEATURE_NAMES)}" in out
