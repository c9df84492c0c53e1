"""Benchmark: window features of the whole gaitpdb dataset with the Spark job, against
the same features in one Python process.

    GAITPDB_DIR=... python bench/spark.py [--limit N] [--replicas 5] [--features windows]

1. Loads every recording of GAITPDB_DIR into the HDFS lake of the local stack
   (raw layout of handlers/README.md §1, 10 000-row zstd segments, as lake_sink
   writes them) under a unique bench path, removed at the end.
2. Runs ``spark/features_job.py`` in full mode over it with spark-submit (the
   spark_job handler's launcher and REST-API monitor), and reports the wall time
   (spark-submit start to exit, JVM start included) and raw rows/s.
3. Computes the same features in this process with pandas
   (``ml.features.features_frame`` per recording, samples already in memory).
4. Replicates the lake ``--replicas`` times (recording ids ``<id>-r<k>``) and runs the
   job again.

Needs `python -m stack up hdfs` (Spark runs locally through spark-submit).
Prints progress and a table of figures; never asserts anything.
"""
from __future__ import annotations

import argparse
import asyncio
import time
import uuid

import numpy as np
import pandas as pd

from handlers.lake_sink import segment_bytes
from handlers.spark_job import SparkAttempt, SparkJobSettings, run_features_job
from handlers.webhdfs import WebHdfs
from ml import data as mldata
from ml import features as mlf
from stack import services
from stack.config import load as load_stack

SEGMENT_ROWS = 10_000
DATE = "2026-12-04"


def segment_files(recording: str, x: np.ndarray) -> list[tuple[str, bytes]]:
    """``(relative path, Parquet bytes)`` of a recording's lake segments."""
    out = []
    for a in range(0, len(x), SEGMENT_ROWS):
        b = min(a + SEGMENT_ROWS, len(x))
        out.append((f"date={DATE}/recording={recording}/part-{a:010d}-{b - 1:010d}.parquet",
                    segment_bytes(recording, x[a:b], a)))
    return out


async def load_lake(fs: WebHdfs, raw: str, samples: dict[str, np.ndarray],
                    suffixes: list[str]) -> tuple[int, int, float]:
    """Write every recording once per suffix; ``(rows, bytes, seconds)``."""
    t0 = time.perf_counter()
    queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue(maxsize=16)
    written = [0, 0]

    async def writer() -> None:
        while (item := await queue.get()) is not None:
            path, body = item
            await fs.create(f"{raw}/{path}", body)
            written[1] += len(body)

    async def producer() -> None:
        total, done = len(samples) * len(suffixes), 0
        for suffix in suffixes:
            for rid, x in samples.items():
                for item in await asyncio.to_thread(segment_files, rid + suffix, x):
                    await queue.put(item)
                written[0] += len(x)
                done += 1
                if done % 100 == 0 or done == total:
                    print(f"    {done}/{total} recordings, {written[0]:,} rows, "
                          f"{written[1] / 1e6:.0f} MB written", flush=True)
        for _ in range(4):
            await queue.put(None)

    async with asyncio.TaskGroup() as tg:  # a failed write stops everything
        for _ in range(4):
            tg.create_task(writer())
        tg.create_task(producer())
    return written[0], written[1], time.perf_counter() - t0


class Progress:
    """Prints the job's progress (from the Spark REST API) when it changes."""

    def __init__(self, label: str) -> None:
        self.label, self.last, self.t0 = label, (), time.monotonic()

    def __call__(self, a: SparkAttempt) -> None:
        state = (a.state, a.spark_jobs, a.stages_done, a.stages_total, a.tasks_done,
                 a.tasks_total)
        if state != self.last:
            self.last = state
            print(f"    [{self.label}] {time.monotonic() - self.t0:6.1f} s  {a.state:<9} "
                  f"spark jobs {a.spark_jobs}  stages {a.stages_done}/{a.stages_total}  "
                  f"tasks {a.tasks_done}/{a.tasks_total}", flush=True)


async def spark_run(settings: SparkJobSettings, hdfs_url: str, raw: str, out: str, job: str,
                    features: str) -> tuple[SparkAttempt, int]:
    spec = {"job_id": job, "inputs": [f"{hdfs_url}{raw}"],
            "output": f"{hdfs_url}{out}/job={job}", "features": features}
    t0 = time.perf_counter()
    attempt, table = await run_features_job(spec, settings, Progress(job))
    attempt.seconds = time.perf_counter() - t0  # includes reading the features back
    if not attempt.ok:
        print(f"    job {job} failed: {attempt.error}\n{attempt.stderr_tail()}", flush=True)
        return attempt, 0
    return attempt, table.num_rows if table is not None else 0


def pandas_run(samples: dict[str, np.ndarray], features: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    windows = 0
    for rid, x in samples.items():
        df = pd.DataFrame(x, columns=list(mlf.COLUMNS))
        df.insert(0, "seq", np.arange(len(x), dtype=np.int64))
        df.insert(0, "recording", rid)
        fn = mlf.features_frame if features == "windows" else mlf.baseline_frame
        windows += len(fn(df, id_col="recording"))
    return time.perf_counter() - t0, windows


async def main(args: argparse.Namespace) -> None:
    cfg = load_stack()
    hdfs = services.get("hdfs")(cfg)
    recs = mldata.list_recordings()
    if args.limit:
        recs = recs.head(args.limit)
    print(f"loading {len(recs)} recordings from {mldata.data_dir()} ...", flush=True)
    samples = {row.id: mldata.load_recording(row.path) for row in recs.itertuples()}
    rows1 = sum(len(x) for x in samples.values())
    settings = SparkJobSettings(master=args.master, hdfs_url=hdfs.address(),
                                webhdfs_url=hdfs.webhdfs(),
                                shuffle_partitions=args.shuffle_partitions,
                                driver_memory=args.driver_memory, poll_interval=1.0,
                                job_timeout=3600)
    root = f"/gaitflow-bench/spark-{uuid.uuid4().hex[:12]}"
    figures: list[tuple[str, float, int, int]] = []
    async with WebHdfs(hdfs.webhdfs()) as fs:
        try:
            print(f"[1] lake 1x at {root}/raw1", flush=True)
            n, size, secs = await load_lake(fs, f"{root}/raw1", samples, [""])
            print(f"    {n:,} rows, {size / 1e6:.1f} MB in {secs:.1f} s", flush=True)

            print("[2] Spark job, full mode, 1x", flush=True)
            a1, w1 = await spark_run(settings, hdfs.address(), f"{root}/raw1",
                                     f"{root}/features", "bench-1x", args.features)
            figures.append((f"spark {args.master} 1x", a1.seconds, rows1, w1))
            if a1.ok and a1.result:
                print(f"    job said: {a1.result}", flush=True)

            print("[3] the same features in this process (pandas)", flush=True)
            secs, w = await asyncio.to_thread(pandas_run, samples, args.features)
            figures.append(("pandas, 1 process, 1x", secs, rows1, w))

            if args.replicas > 1:
                suffixes = [f"-r{k}" for k in range(args.replicas)]
                print(f"[4] lake {args.replicas}x at {root}/raw{args.replicas}", flush=True)
                n, size, secs = await load_lake(fs, f"{root}/raw{args.replicas}", samples,
                                                suffixes)
                print(f"    {n:,} rows, {size / 1e6:.1f} MB in {secs:.1f} s", flush=True)
                print(f"[5] Spark job, full mode, {args.replicas}x", flush=True)
                a5, w5 = await spark_run(settings, hdfs.address(), f"{root}/raw{args.replicas}",
                                         f"{root}/features", f"bench-{args.replicas}x",
                                         args.features)
                figures.append((f"spark {args.master} {args.replicas}x", a5.seconds,
                                n, w5))
                if a5.ok and a5.result:
                    print(f"    job said: {a5.result}", flush=True)
        finally:
            print(f"cleaning {root}", flush=True)
            await fs.delete(root, recursive=True)

    print()
    print(f"features = {args.features}, {len(samples)} recordings, "
          f"{args.shuffle_partitions} shuffle partitions")
    print(f"{'run':<28} {'wall s':>9} {'raw rows':>12} {'rows/s':>10} {'windows':>9}")
    for label, secs, nrows, windows in figures:
        rate = nrows / secs if secs and windows else float("nan")
        print(f"{label:<28} {secs:9.1f} {nrows:12,} {rate:10,.0f} {windows:9,}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--limit", type=int, default=0, help="first N recordings only (0: all)")
    p.add_argument("--replicas", type=int, default=5, help="copies in the replicated lake")
    p.add_argument("--features", choices=("windows", "baseline"), default="windows")
    p.add_argument("--master", default="local[*]")
    p.add_argument("--shuffle-partitions", type=int, default=8)
    p.add_argument("--driver-memory", default="2g")
    return p.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
