"""lake_sink on the real HDFS of the local stack (WebHDFS on 127.0.0.1:9870).

Every test writes under its own ``/tmp/gaitflow-it/lake-<uuid>`` and deletes it.
The last test restarts the shared NameNode (about 15 s of HDFS outage for
everyone): keep it last, and keep it alone.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from lake_support import keys, read_lake

from handlers.webhdfs import WebHdfs
from pipeline import Runtime, Source, setting
from stack.service import Service

pytestmark = pytest.mark.integration


@dataclasses.dataclass(frozen=True)
class RowsSettings:
    recordings: list[str] = setting(["A"], doc="recording ids")
    rows: int = setting(1000, doc="rows per recording", min=1)
    batch: int = setting(100, doc="rows per batch", min=1)
    interval: float = setting(0.0, doc="seconds between batches", min=0)
    repeat_every: int = setting(0, doc="re-send every Nth batch (redelivery)", min=0)
    end: bool = setting(True, doc="send a recording_end event per recording")


class RowSource(Source):
    """Sample batches for each recording, interleaved, then the end events."""

    Settings: ClassVar[type] = RowsSettings
    optional_outputs: ClassVar[tuple[str, ...]] = ("events",)

    def __init__(self, name: str, settings: Any = None) -> None:
        super().__init__(name, settings)
        self.committed: list[Any] = []

    async def run(self) -> None:
        s = self.settings
        n = 0
        for first in range(0, s.rows, s.batch):
            for rec in s.recordings:
                seq = np.arange(first, min(first + s.batch, s.rows), dtype=np.int64)
                table = pa.table({"recording": [rec] * len(seq), "seq": seq,
                                  "time": seq / 100.0, "L": seq * 0.5})
                await self.emit(table, key="seq", token=("rows", rec, first))
                n += 1
                if s.repeat_every and n % s.repeat_every == 0:
                    await self.emit(table, key="seq", token=("again", rec, first))
                if s.interval:
                    await asyncio.sleep(s.interval)
        if s.end:
            for rec in s.recordings:
                await self.emit(pa.table({"recording": [rec], "rows_total": [s.rows]}),
                                output="events", meta={"event": "recording_end"},
                                token=("end", rec))

    async def commit(self, tokens: list[Any]) -> None:
        self.committed.extend(tokens)


def runtime(url: str, root: str, source: dict[str, Any], **lake: Any) -> Runtime:
    return Runtime.from_dict({
        "runtime": {"admin_enabled": False, "drain_timeout": 90},
        "dead_letter": {"target": "dlq"},
        "handlers": {
            "src": {"type": "test_lake_sink:RowSource", **source,
                    "outputs": {"default": ["lake"], "events": ["lake"]}},
            "lake": {"type": "lake_sink", "url": url, "root": root,
                     "outputs": {"segments": ["segs"]}, **lake},
            "segs": {"type": "memory_sink"},
            "dlq": {"type": "memory_sink"},
        }})


async def test_samples_land_exactly_once_in_parquet_files(hdfs_url: str, lake_root: str) -> None:
    rt = runtime(hdfs_url, lake_root,
                 {"recordings": ["GaCo01_01", "JuPt03_02"], "rows": 2500, "batch": 70,
                  "repeat_every": 5},
                 roll_rows=1000, roll_interval=0.3)
    report = await rt.run()
    assert report.ok and report.drained and report.unacked == 0, report
    lake, paths, leftovers = await read_lake(hdfs_url, lake_root)
    assert keys(lake) == [(r, s) for r in ("GaCo01_01", "JuPt03_02") for s in range(2500)]
    names = {p.rsplit("/", 1)[1] for p in paths}
    assert names == {"part-0000000000-0000000999.parquet", "part-0000001000-0000001999.parquet",
                     "part-0000002000-0000002499.parquet"}
    assert all("/recording=GaCo01_01/" in p or "/recording=JuPt03_02/" in p for p in paths)
    assert not leftovers
    finals = [s for s in rt.handlers["segs"].rows() if s["final"]]
    assert sorted((s["recording"], s["seq_first"], s["seq_last"], s["rows"]) for s in finals) \
        == [("GaCo01_01", 2000, 2499, 500), ("JuPt03_02", 2000, 2499, 500)]
    assert rt.handlers["dlq"].row_count == 0
    assert lake is not None and lake.column("L").to_pylist()[:3] == [0.0, 0.5, 1.0]


async def test_picks_up_what_a_crashed_flush_left_behind(hdfs_url: str, lake_root: str) -> None:
    date = time.strftime("%Y-%m-%d", time.gmtime())
    vis = f"{lake_root}/date={date}/recording=A"
    tmp = f"{lake_root}/_tmp/date={date}/recording=A"

    def parquet(seqs: range) -> bytes:
        sink = pa.BufferOutputStream()
        seq = np.asarray(seqs, dtype=np.int64)
        pq.write_table(pa.table({"recording": ["A"] * len(seq), "seq": seq,
                                 "time": seq / 100.0, "L": seq * 0.5}), sink)
        return sink.getvalue().to_pybytes()

    async with WebHdfs(hdfs_url) as fs:
        # a flush merged 0..299 (visible before) with 300..599, wrote _tmp, deleted the
        # visible file and died before the rename; another died while writing
        await fs.mkdirs(vis)
        await fs.create(f"{tmp}/part-0000000000-0000000599.parquet.00aa00aa00aa.tmp",
                        parquet(range(600)))
        await fs.create(f"{tmp}/part-0000000600-0000000699.parquet.11bb11bb11bb.tmp", b"PAR1")
    rt = runtime(hdfs_url, lake_root, {"recordings": ["A"], "rows": 1000, "batch": 100},
                 roll_rows=1000)
    assert (await rt.run()).ok
    lake, paths, leftovers = await read_lake(hdfs_url, lake_root)
    assert keys(lake) == [("A", s) for s in range(1000)]
    assert [p.rsplit("/", 1)[1] for p in paths] == ["part-0000000000-0000000999.parquet"]
    assert not leftovers


async def test_start_fails_clearly_without_hdfs(lake_root: str) -> None:
    rt = runtime("http://127.0.0.1:9", lake_root, {"rows": 1},
                 http_retry={"max_attempts": 2, "backoff": 0.1})
    with pytest.raises(Exception, match=r"lake root .* on http://127.0.0.1:9: WebHDFS MKDIRS"):
        await rt.run()


# -- keep last: restarts the shared NameNode ---------------------------------------------------
async def test_zz_survives_a_namenode_restart(stack_service: Callable[[str], Service],
                                              hdfs_url: str, lake_root: str) -> None:
    from stack.services.hdfs import Hdfs

    svc = stack_service("hdfs")
    assert isinstance(svc, Hdfs)
    rows = 6000
    rt = runtime(hdfs_url, lake_root,
                 {"recordings": ["NN1", "NN2"], "rows": rows, "batch": 50, "interval": 0.02},
                 roll_rows=500, roll_interval=0.5)
    ready_again = 0.0
    outage_seen = False
    async with rt:
        lake = rt.handlers["lake"]
        await asyncio.sleep(2.0)                         # files are being written
        await asyncio.to_thread(svc.stop_namenode)
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < 6:             # writes keep failing meanwhile
                outage_seen = outage_seen or not lake.health()[0]
                await asyncio.sleep(0.2)
        finally:
            await asyncio.to_thread(svc.start_namenode)
        deadline = time.monotonic() + 90
        while not await asyncio.to_thread(svc.ready):
            assert time.monotonic() < deadline, "the NameNode did not come back"
            await asyncio.sleep(1)
        ready_again = time.monotonic() - t0
        while rt.handlers["src"].committed.__len__() < 2 * (rows // 50) + 2:
            assert time.monotonic() < deadline, "the pipeline did not catch up"
            await asyncio.sleep(0.5)
    report = rt.report
    assert report is not None and report.ok and report.unacked == 0, report
    assert outage_seen, "the sink never reported the outage (set_connected)"
    assert lake.health()[0]
    lake_rows, _, leftovers = await read_lake(hdfs_url, lake_root)
    assert keys(lake_rows) == [(r, s) for r in ("NN1", "NN2") for s in range(rows)]
    assert not leftovers
    assert rt.handlers["dlq"].row_count == 0
    print(f"NameNode back after {ready_again:.1f} s; "
          f"retries={rt.metrics.value('lake_flush_failures', 'lake')}")
