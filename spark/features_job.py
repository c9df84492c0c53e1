"""Window features of raw lake segments, computed by Spark with the very functions
training uses (``ml.features``).

Run by ``spark-submit`` (the ``spark_job`` handler builds the command)::

    spark-submit --master local[*] --py-files ml.zip spark/features_job.py --spec-json '{...}'
    spark-submit ... spark/features_job.py --spec hdfs://127.0.0.1:8020/gaitflow/features/_specs/ID.json
    spark-submit ... spark/features_job.py --full hdfs://127.0.0.1:8020/gaitflow/raw \\
        --output hdfs://127.0.0.1:8020/gaitflow/features/job=backfill [--features baseline]

The job spec (JSON, inline or a file on HDFS / any Hadoop file system):

``job_id``        ``[A-Za-z0-9_.-]{1,64}`` (the launcher names the application
                  ``gaitflow-features-<id>``)
``inputs``        directories (or globs of directories) of the raw lake (handlers/README.md
                  §1), read recursively for ``part-*.parquet`` files (names starting with
                  ``_`` or ``.``, e.g. files being written, are skipped), e.g.
                  ``<root>/date=*/recording=GaCo01_01`` (incremental: every committed
                  segment of each affected recording) or ``<root>`` (full: the whole lake)
``output``        directory for the features; overwritten; Spark writes ``_SUCCESS`` last
``features``      ``"windows"`` (``ml.features.features_frame``, default) or ``"baseline"``
                  (``ml.features.baseline_frame``: the tutorial's per-100-row means)
``window_s``, ``step_s``, ``baseline_rows``   parameters of those functions
``recordings``    optional: keep only these recordings
``complete_inputs`` optional: the ``inputs`` that must be read whole (the spark_job
                  handler names the recordings whose final segment the run covers).
                  A file of the other inputs that is listed and then gone before it
                  is read is skipped: the lake sink replaced it (a live recording's
                  partial file, every ``roll_interval``) and the replacing file has
                  its own event, so a later run covers its rows (handlers/README.md
                  §3; windows are never computed across a gap). A vanished file of a
                  complete input fails the run, which the handler reruns.

What it does: reads the raw columns with a fixed schema (no inference: a column of
another type fails the job, a missing one reads as null and the windows it touches
are skipped), drops rows without a recording or a valid ``seq``, groups by
recording (one shuffle) and, per recording, deduplicates by ``seq`` (a replayed
segment) and computes the features with ``groupBy("recording").applyInPandas``; the
result
follows handlers/README.md §4: ``recording, window, window_key, seq_first,
seq_last`` then one float64 column per feature name.

It talks to its launcher through stdout lines ``@gaitflow {json}``: ``started``
(application id, UI URL), then ``done`` (recordings and rows read, seconds, seconds
spent in the feature function summed over workers) or
``failed`` (a one-line error; the traceback goes to stderr). Exit status: 0 done,
1 the job failed, 2 the spec is invalid.

Only this module's ``main`` imports pyspark, so the pure helpers
(:func:`contract_frame`, :func:`spec_from_args`) are importable without it.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ml import features as mlf

__all__ = [
    "ANNOUNCE",
    "KEY_COLUMNS",
    "RAW_COLUMNS",
    "JobSpec",
    "SpecError",
    "contract_frame",
    "feature_names",
    "main",
    "recording_features",
    "spec_from_args",
]

#: Prefix of the lines the job prints on stdout for its launcher.
ANNOUNCE = "@gaitflow "
#: Raw lake columns the job reads (handlers/README.md §1; ``device`` is not needed).
RAW_COLUMNS: tuple[str, ...] = ("recording", "seq", *mlf.COLUMNS)
#: The key columns of every feature row (handlers/README.md §4).
KEY_COLUMNS: tuple[str, ...] = ("recording", "window", "window_key", "seq_first", "seq_last")

_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_FEATURE_SETS = ("windows", "baseline")


class SpecError(ValueError):
    """The job spec is malformed (exit status 2)."""


@dataclass(frozen=True)
class JobSpec:
    job_id: str
    inputs: list[str]
    output: str
    features: str = "windows"
    window_s: float = mlf.DEFAULT_WINDOW_S
    step_s: float = mlf.DEFAULT_STEP_S
    baseline_rows: int = 100
    recordings: list[str] | None = field(default=None)
    complete_inputs: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, doc: Any) -> JobSpec:
        if not isinstance(doc, dict):
            raise SpecError(f"job spec must be a JSON object, got {type(doc).__name__}")
        unknown = sorted(set(doc) - {f for f in cls.__dataclass_fields__})
        if unknown:
            raise SpecError(f"job spec: unknown keys {unknown}")
        try:
            spec = cls(**doc)
        except TypeError as exc:
            raise SpecError(f"job spec: {exc}") from None
        spec.validate()
        return spec

    def validate(self) -> None:
        if not isinstance(self.job_id, str) or not _ID.match(self.job_id):
            raise SpecError(f"job spec: job_id {self.job_id!r} must match {_ID.pattern}")
        if (not isinstance(self.inputs, list) or not self.inputs
                or not all(isinstance(p, str) and p for p in self.inputs)):
            raise SpecError("job spec: inputs must be a non-empty list of paths")
        if not isinstance(self.output, str) or not self.output:
            raise SpecError("job spec: output must be a path")
        if self.features not in _FEATURE_SETS:
            raise SpecError(f"job spec: features {self.features!r} is not one of {_FEATURE_SETS}")
        if self.recordings is not None and not all(
                isinstance(r, str) and _ID.match(r) for r in self.recordings):
            raise SpecError("job spec: recordings must be a list of recording ids")
        if not isinstance(self.complete_inputs, list) or any(
                p not in self.inputs for p in self.complete_inputs):
            raise SpecError("job spec: complete_inputs must be a list of some of the inputs")
        if not (self.window_s > 0 and self.step_s > 0 and self.baseline_rows > 0):
            raise SpecError("job spec: window_s, step_s and baseline_rows must be positive")

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)


# ----------------------------------------------------------------------------- pure helpers


def feature_names(feature_set: str) -> tuple[str, ...]:
    """The value columns of a feature set, in output order."""
    return mlf.FEATURE_NAMES if feature_set == "windows" else mlf.BASELINE_NAMES


def contract_frame(frame: pd.DataFrame, feature_set: str, spec: JobSpec) -> pd.DataFrame:
    """ml's output for one recording in the handlers/README.md §4 layout."""
    names = list(feature_names(feature_set))
    if feature_set == "windows":
        span = round(spec.window_s * mlf.FS)
        window, key = frame["window"], frame["key"]
        first = frame["start_seq"].to_numpy(dtype=np.int64)
    else:
        span = spec.baseline_rows
        window, key = frame["block"], frame["key"]
        first = frame["block"].to_numpy(dtype=np.int64) * span
    out = pd.DataFrame({
        "recording": frame["recording_id"].astype(object).to_numpy(),
        "window": window.to_numpy(dtype=np.int64),
        "window_key": key.astype(object).to_numpy(),
        "seq_first": first,
        "seq_last": first + span - 1,
    })
    values = frame[names].to_numpy(dtype=np.float64) if len(frame) else np.zeros((0, len(names)))
    return pd.concat([out, pd.DataFrame(values, columns=names, index=out.index)], axis=1)


def recording_features(pdf: pd.DataFrame, spec: JobSpec) -> pd.DataFrame:
    """Features of one recording's raw rows (any order, duplicates allowed)."""
    pdf = pdf.sort_values("seq", kind="stable").drop_duplicates("seq", keep="last")
    if spec.features == "windows":
        frame = mlf.features_frame(pdf, id_col="recording", seq_col="seq",
                                        window_s=spec.window_s, step_s=spec.step_s)
    else:
        frame = mlf.baseline_frame(pdf, id_col="recording", seq_col="seq",
                                        rows=spec.baseline_rows)
    return contract_frame(frame, spec.features, spec)


def spec_from_args(args: argparse.Namespace, read_text: Any = None) -> JobSpec:
    """The job spec from the command line (``read_text(url)`` fetches ``--spec``)."""
    if args.spec_json is not None:
        text = args.spec_json
    elif args.spec is not None:
        if read_text is None:
            raise SpecError("--spec needs a reader")
        text = read_text(args.spec)
    else:
        root = args.full.rstrip("/")
        if not args.output:
            raise SpecError("--full needs --output")
        return JobSpec.from_dict({
            "job_id": args.job_id, "inputs": [root],
            "output": args.output, "features": args.features})
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(f"job spec is not JSON: {exc}") from None
    return JobSpec.from_dict(doc)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="features_job", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--spec", help="URL or path of a JSON job spec")
    src.add_argument("--spec-json", help="the JSON job spec itself")
    src.add_argument("--full", metavar="LAKE_ROOT", help="every recording under this lake root")
    p.add_argument("--output", help="features directory (with --full)")
    p.add_argument("--features", choices=_FEATURE_SETS, default="windows")
    p.add_argument("--job-id", default="full", help="job id (with --full)")
    return p.parse_args(argv)


def announce(event: str, **fields: Any) -> None:
    print(ANNOUNCE + json.dumps({"event": event, **fields}, default=str), flush=True)


def error_summary(exc: BaseException, limit: int = 2000) -> str:
    """One line: the exception and the innermost Java cause (what actually went wrong)."""
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    head = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    causes = [ln for ln in lines if ln.startswith("Caused by:")]
    if causes and causes[-1] not in head:
        head += " | " + causes[-1]
    return head[:limit]


# ----------------------------------------------------------------------------- the Spark part


def raw_schema() -> Any:
    from pyspark.sql import types as t

    return t.StructType([
        t.StructField("recording", t.StringType()),
        t.StructField("seq", t.LongType()),
        *(t.StructField(c, t.DoubleType()) for c in mlf.COLUMNS),
    ])


def output_schema(feature_set: str) -> Any:
    from pyspark.sql import types as t

    return t.StructType([
        t.StructField("recording", t.StringType()),
        t.StructField("window", t.LongType()),
        t.StructField("window_key", t.StringType()),
        t.StructField("seq_first", t.LongType()),
        t.StructField("seq_last", t.LongType()),
        *(t.StructField(c, t.DoubleType()) for c in feature_names(feature_set)),
    ])


def run(spark: Any, spec: JobSpec) -> dict[str, Any]:
    from pyspark.sql import functions as F

    sc = spark.sparkContext
    rows_in, recordings_in = sc.accumulator(0), sc.accumulator(0)
    busy = sc.accumulator(0.0)  # seconds inside the feature function, all workers

    def per_recording(pdf: pd.DataFrame) -> pd.DataFrame:
        t0 = time.perf_counter()
        out = recording_features(pdf, spec)
        rows_in.add(len(pdf))
        recordings_in.add(1)
        busy.add(time.perf_counter() - t0)
        return out

    # Inputs are directories (or globs of them): their part-*.parquet files are listed
    # on the driver, recursively, without partition discovery (date=, recording= are
    # not columns: recording is in the data). Files that vanish between listing and
    # reading are skipped, except in complete_inputs (see the module docstring).
    whole = set(spec.complete_inputs)
    complete = [p for p in spec.inputs if p in whole]
    partial = [p for p in spec.inputs if p not in whole]
    parts = [_read_raw(spark, paths, skip_missing=skip)
             for paths, skip in ((partial, True), (complete, False)) if paths]
    raw = parts[0] if len(parts) == 1 else parts[0].unionByName(parts[1])
    raw = raw.where(F.col("recording").isNotNull() & F.col("seq").isNotNull()
                    & (F.col("seq") >= 0))
    if spec.recordings is not None:
        raw = raw.where(F.col("recording").isin(spec.recordings))
    out = raw.groupBy("recording").applyInPandas(per_recording, output_schema(spec.features))
    out.write.mode("overwrite").option("compression", "zstd").parquet(spec.output)
    return {"rows": rows_in.value, "recordings": recordings_in.value,
            "feature_seconds": round(busy.value, 3)}


def _read_raw(spark: Any, paths: list[str], *, skip_missing: bool) -> Any:
    reader = (spark.read.schema(raw_schema()).option("recursiveFileLookup", "true")
              .option("pathGlobFilter", "part-*.parquet")
              .option("ignoreMissingFiles", "true" if skip_missing else "false"))
    return reader.parquet(*paths)


def _read_text(spark: Any, url: str) -> str:
    rows = spark.read.text(url, wholetext=True).collect()
    if not rows:
        raise SpecError(f"job spec {url} is empty")
    return str(rows[0][0])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        spec = None if args.spec else spec_from_args(args)
    except SpecError as exc:
        announce("failed", error=str(exc))
        print(f"features_job: {exc}", file=sys.stderr)
        return 2
    from pyspark.sql import SparkSession

    t0 = time.monotonic()
    spark = SparkSession.builder.getOrCreate()  # named by spark-submit --name
    sc = spark.sparkContext
    announce("started", app_id=sc.applicationId, ui=sc.uiWebUrl, app_name=sc.appName)
    try:
        if spec is None:
            spec = spec_from_args(args, lambda url: _read_text(spark, url))
        result = run(spark, spec)
    except SpecError as exc:
        announce("failed", error=str(exc))
        print(f"features_job: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - reported to the launcher, then exit 1
        traceback.print_exc(file=sys.stderr)
        announce("failed", error=error_summary(exc))
        return 1
    finally:
        spark.stop()
    announce("done", job_id=spec.job_id, output=spec.output, features=spec.features,
             seconds=round(time.monotonic() - t0, 3), **result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
