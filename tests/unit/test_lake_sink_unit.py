"""lake_sink on the runtime, against an in-memory HDFS that checks the lake after
every change: no (recording, seq) may ever be visible twice."""
from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import posixpath
from collections import Counter
from collections.abc import Iterator
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import handlers.lake_sink as lake_mod
from handlers.webhdfs import FileStatus, NotFound, WebHdfsError
from pipeline import Runtime, Source, setting

ROOT = "/lake"


class FakeHdfs:
    """The subset of :class:`handlers.webhdfs.WebHdfs` the sink uses, in memory."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.dirs: set[str] = {"/"}
        self.fail: Counter[str] = Counter()          # op -> failures to inject
        self.fail_paths: Counter[str] = Counter()    # path substring -> failures to inject
        self.torn_creates = 0                        # creates that write half, then fail
        self.lost_renames = 0                        # renames done whose answer is lost
        self.ops: Counter[str] = Counter()
        self.max_visible_dups = 0
        self._cache: dict[bytes, list[tuple[str, int]]] = {}

    # the client API -------------------------------------------------------------
    async def open_session(self) -> None: ...
    async def close(self) -> None: ...

    def _op(self, op: str, path: str) -> None:
        self.ops[op] += 1
        hit = next((p for p, n in self.fail_paths.items() if n and p in path), None)
        if self.fail[op] or hit:
            if hit:
                self.fail_paths[hit] -= 1
            else:
                self.fail[op] -= 1
            raise WebHdfsError(op, path, "injected failure", status=503, transient=True)

    async def mkdirs(self, path: str) -> bool:
        self._op("MKDIRS", path)
        while path not in ("/", ""):
            self.dirs.add(path)
            path = posixpath.dirname(path)
        return True

    async def exists(self, path: str) -> bool:
        self._op("GETFILESTATUS", path)
        return path in self.files or path in self.dirs

    async def list_status(self, path: str) -> list[FileStatus]:
        self._op("LISTSTATUS", path)
        if path not in self.dirs:
            raise NotFound("LISTSTATUS", path, "no such directory", status=404)
        out = []
        for p in sorted(self.dirs | set(self.files)):
            if posixpath.dirname(p) == path and p != path:
                kind = "DIRECTORY" if p in self.dirs else "FILE"
                out.append(FileStatus(p, posixpath.basename(p), kind,
                                      len(self.files.get(p, b"")), 0.0))
        return out

    async def create(self, path: str, data: bytes, *, overwrite: bool = True) -> None:
        self._op("CREATE", path)
        await self.mkdirs(posixpath.dirname(path))
        if self.torn_creates:
            self.torn_creates -= 1
            self.files[path] = bytes(data[: len(data) // 2])
            raise WebHdfsError("CREATE", path, "connection reset by the DataNode",
                               transient=True)
        self.files[path] = bytes(data)
        self.check()

    async def open(self, path: str) -> bytes:
        self._op("OPEN", path)
        if path not in self.files:
            raise NotFound("OPEN", path, "File does not exist", status=404)
        return self.files[path]

    async def delete(self, path: str, *, recursive: bool = False) -> bool:
        self._op("DELETE", path)
        found = self.files.pop(path, None) is not None
        self.check()
        return found

    async def rename(self, src: str, dst: str) -> bool:
        self._op("RENAME", src)
        if src not in self.files or dst in self.files or posixpath.dirname(dst) not in self.dirs:
            return False
        self.files[dst] = self.files.pop(src)
        self.check()
        if self.lost_renames:
            self.lost_renames -= 1
            raise WebHdfsError("RENAME", src, "read timed out", transient=True)
        return True

    # checks -------------------------------------------------------------------
    def _rows(self, data: bytes) -> list[tuple[str, int]]:
        if data not in self._cache:
            t = pq.read_table(pa.BufferReader(data), columns=["recording", "seq"])
            self._cache[data] = list(zip(t.column("recording").to_pylist(),
                                         t.column("seq").to_pylist(), strict=True))
        return self._cache[data]

    def visible(self) -> dict[str, bytes]:
        return {p: d for p, d in self.files.items()
                if p.startswith(ROOT + "/date=") and p.endswith(".parquet")}

    def check(self) -> None:
        seen = Counter(r for d in self.visible().values() for r in self._rows(d))
        dups = sum(n - 1 for n in seen.values() if n > 1)
        self.max_visible_dups = max(self.max_visible_dups, dups)
        assert dups == 0, f"{dups} sample(s) visible twice"

    def lake(self) -> pa.Table:
        tables = [pq.read_table(pa.BufferReader(d)) for d in self.visible().values()]
        return pa.concat_tables(tables).sort_by([("recording", "ascending"),
                                                 ("seq", "ascending")])

    def names(self, rec: str | None = None) -> list[str]:
        return sorted(p.rsplit("/", 1)[1] for p in self.visible()
                      if rec is None or f"/recording={rec}/" in p)

    def leftovers(self) -> list[str]:
        return [p for p in self.files if "/_tmp/" in p]


@pytest.fixture
def fs(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHdfs]:
    fake = FakeHdfs()
    monkeypatch.setattr(lake_mod, "WebHdfs", lambda *a, **kw: fake)
    yield fake


# -- a scripted source: sample batches and end events ---------------------------------
@dataclasses.dataclass(frozen=True)
class ScriptSettings:
    steps: list[dict[str, Any]] = setting([], doc="rows / end / sleep steps")


class ScriptSource(Source):
    Settings: ClassVar[type] = ScriptSettings
    optional_outputs: ClassVar[tuple[str, ...]] = ("events",)

    def __init__(self, name: str, settings: Any = None) -> None:
        super().__init__(name, settings)
        self.committed: list[int] = []

    async def run(self) -> None:
        for i, step in enumerate(self.settings.steps):
            if step.get("sleep"):
                await asyncio.sleep(step["sleep"])
            if "end" in step:
                rec, total = step["end"]
                await self.emit(pa.table({"recording": [rec], "rows_total": [total]}),
                                output="events", meta={"event": "recording_end"}, token=i)
            elif "rows" in step:
                await self.emit(pa.Table.from_pylist(step["rows"]), key="seq", token=i)

    async def commit(self, tokens: list[Any]) -> None:
        self.committed.extend(tokens)


def rows(rec: str, seqs: Any) -> list[dict[str, Any]]:
    return [{"recording": rec, "seq": int(s), "time": int(s) / 100, "L": float(s)}
            for s in seqs]


def steps(rec: str, seqs: Any, per: int) -> list[dict[str, Any]]:
    seqs = list(seqs)
    return [{"rows": rows(rec, seqs[i:i + per])} for i in range(0, len(seqs), per)]


def pipeline(script: list[dict[str, Any]], **lake: Any) -> Runtime:
    return Runtime.from_dict({
        "runtime": {"admin_enabled": False, "drain_timeout": 10},
        "dead_letter": {"target": "dlq"},
        "handlers": {
            "src": {"type": "test_lake_sink_unit:ScriptSource", "steps": script,
                    "outputs": {"default": ["lake"], "events": ["lake"]}},
            "lake": {"type": "lake_sink", "root": ROOT, "roll_interval": 0,
                     "outputs": {"segments": ["segs"]}, **lake},
            "segs": {"type": "memory_sink"},
            "dlq": {"type": "memory_sink"},
        }})


def assert_exactly(fs: FakeHdfs, expected: dict[str, Any]) -> None:
    lake = fs.lake()
    got = list(zip(lake.column("recording").to_pylist(), lake.column("seq").to_pylist(),
                   strict=True))
    want = sorted((r, int(s)) for r, seqs in expected.items() for s in seqs)
    assert got == want


# -- tests ------------------------------------------------------------------------------
async def test_blocks_become_aligned_files_and_segments(fs: FakeHdfs) -> None:
    rt = pipeline(steps("A", range(250), 30) + steps("B", range(100, 160), 7), roll_rows=100)
    report = await rt.run()
    assert report.ok and report.unacked == 0
    assert fs.names("A") == ["part-0000000000-0000000099.parquet",
                             "part-0000000100-0000000199.parquet",
                             "part-0000000200-0000000249.parquet"]
    assert fs.names("B") == ["part-0000000100-0000000159.parquet"]
    assert_exactly(fs, {"A": range(250), "B": range(100, 160)})
    segs = rt.handlers["segs"].rows()
    assert {s["path"].rsplit("/", 1)[1] for s in segs} >= set(fs.names())
    today = dt.datetime.now(dt.UTC).date().isoformat()
    assert segs[0]["path"].startswith(f"{ROOT}/date={today}/recording=")
    assert all(not s["final"] for s in segs)
    assert not fs.leftovers()
    assert len(rt.handlers["src"].committed) == len(rt.config.handlers["src"].settings.steps)


async def test_parquet_is_zstd_sorted_and_keeps_columns(fs: FakeHdfs) -> None:
    rt = pipeline(steps("A", [5, 3, 4, 3, 1], 5), roll_rows=100)
    assert (await rt.run()).ok
    (data,) = fs.visible().values()
    meta = pq.ParquetFile(pa.BufferReader(data)).metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"
    t = fs.lake()
    assert t.column("seq").to_pylist() == [1, 3, 4, 5]           # sorted, deduplicated
    assert t.schema.names == ["recording", "seq", "time", "L"]


async def test_time_roll_writes_partials_that_the_full_block_replaces(fs: FakeHdfs) -> None:
    script = []
    for part in (range(30), range(30, 55), range(55, 100), range(100, 120)):
        script += steps("A", part, 10) + [{"sleep": 0.35}]
    rt = pipeline(script, roll_rows=100, roll_interval=0.2)
    assert (await rt.run()).ok
    assert fs.names("A") == ["part-0000000000-0000000099.parquet",
                             "part-0000000100-0000000119.parquet"]
    assert_exactly(fs, {"A": range(120)})
    paths = [s["path"].rsplit("/", 1)[1] for s in rt.handlers["segs"].rows()]
    assert "part-0000000000-0000000029.parquet" in paths      # a partial was visible
    assert fs.max_visible_dups == 0 and not fs.leftovers()


async def test_duplicates_and_redelivery_are_stored_once(fs: FakeHdfs) -> None:
    script = steps("A", range(60), 20) + steps("A", range(10, 40), 15) + \
        steps("A", [59, 0, 60, 61], 4)
    rt = pipeline(script, roll_rows=50)
    assert (await rt.run()).ok
    assert_exactly(fs, {"A": range(62)})


async def test_a_replay_overwrites_the_same_files(fs: FakeHdfs) -> None:
    assert (await pipeline(steps("A", range(230), 40), roll_rows=100).run()).ok
    first = fs.names()
    assert (await pipeline(steps("A", range(230), 17), roll_rows=100).run()).ok
    assert fs.names() == first
    assert_exactly(fs, {"A": range(230)})


async def test_replay_of_a_partial_block_merges_with_what_is_there(fs: FakeHdfs) -> None:
    # a crashed run left 0..29 visible; the replay brings 20..69 in other batches
    assert (await pipeline(steps("A", range(30), 30), roll_rows=100).run()).ok
    assert (await pipeline(steps("A", range(20, 70), 9), roll_rows=100).run()).ok
    assert fs.names() == ["part-0000000000-0000000069.parquet"]
    assert_exactly(fs, {"A": range(70)})


def _parquet(rec: str, seqs: Any) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows(rec, seqs)), sink)
    return sink.getvalue().to_pybytes()


async def test_recovers_a_flush_interrupted_between_delete_and_rename(fs: FakeHdfs) -> None:
    today = dt.datetime.now(dt.UTC).date().isoformat()
    vis = f"{ROOT}/date={today}/recording=A"
    tmp = f"{ROOT}/_tmp/date={today}/recording=A"
    # 0..29 were visible; a flush merged them with 30..49, wrote the tmp file, deleted
    # the visible file and died before the rename: rows 0..49 exist only in _tmp
    await fs.mkdirs(vis)
    await fs.mkdirs(tmp)
    fs.files[f"{tmp}/part-0000000000-0000000049.parquet.0123456789ab.tmp"] = _parquet(
        "A", range(50))
    fs.files[f"{tmp}/part-0000000060-0000000069.parquet.ba9876543210.tmp"] = b"PAR1 torn"
    fs.files[f"{vis}/part-0000000070-0000000079.parquet"] = _parquet("A", range(70, 80))
    # the source redelivers what was never acknowledged: 30..49, then 50..59 is new
    rt = pipeline(steps("A", range(30, 60), 10), roll_rows=100)
    assert (await rt.run()).ok
    assert_exactly(fs, {"A": [*range(60), *range(70, 80)]})
    assert fs.names() == ["part-0000000000-0000000059.parquet",
                          "part-0000000070-0000000079.parquet"]
    assert not fs.leftovers()


async def test_end_marker_flushes_the_recording_and_marks_it_final(fs: FakeHdfs) -> None:
    script = steps("A", range(150), 25) + [{"end": ["A", 150]}] + steps("B", range(10), 10)
    rt = pipeline(script, roll_rows=100, roll_interval=60)
    assert (await rt.run()).ok
    segs = rt.handlers["segs"].rows()
    final = [s for s in segs if s["final"]]
    assert [(s["recording"], s["seq_first"], s["seq_last"], s["rows"]) for s in final] == \
        [("A", 100, 149, 50)]
    assert fs.names("A") == ["part-0000000000-0000000099.parquet",
                             "part-0000000100-0000000149.parquet"]


async def test_end_marker_before_its_last_rows_waits_for_them(fs: FakeHdfs) -> None:
    script = steps("A", range(90), 30) + [{"end": ["A", 100]}, {"sleep": 0.3}] + \
        steps("A", range(90, 100), 10)
    rt = pipeline(script, roll_rows=40, end_timeout=5)
    assert (await rt.run()).ok
    final = [s for s in rt.handlers["segs"].rows() if s["final"]]
    assert [(s["seq_first"], s["seq_last"]) for s in final] == [(80, 99)]
    assert rt.metrics.value("lake_incomplete_recordings", "lake") == 0


async def test_end_marker_times_out_when_rows_never_come(fs: FakeHdfs) -> None:
    script = steps("A", [*range(45), *range(46, 48)], 50) + [{"end": ["A", 50]},
                                                              {"sleep": 0.6}]
    rt = pipeline(script, roll_rows=40, end_timeout=0.2)
    assert (await rt.run()).ok
    final = [s for s in rt.handlers["segs"].rows() if s["final"]]
    assert [(s["seq_first"], s["seq_last"], s["rows"]) for s in final] == [(40, 47, 7)]
    assert rt.metrics.value("lake_incomplete_recordings", "lake") == 1


async def test_end_marker_after_everything_was_flushed_reannounces_the_file(
        fs: FakeHdfs) -> None:
    assert (await pipeline(steps("A", range(30), 30), roll_rows=100).run()).ok
    rt = pipeline([{"end": ["A", 30]}], roll_rows=100)
    assert (await rt.run()).ok
    (seg,) = rt.handlers["segs"].rows()
    assert seg["final"] and seg["rows"] == 30 and seg["path"].endswith(
        "part-0000000000-0000000029.parquet")


async def test_transient_failures_are_retried(fs: FakeHdfs) -> None:
    fs.fail.update({"RENAME": 1, "CREATE": 1})
    rt = pipeline(steps("A", range(100), 50), roll_rows=50, flush_attempts=3)
    assert (await rt.run()).ok
    assert_exactly(fs, {"A": range(100)})
    assert rt.handlers["dlq"].row_count == 0
    assert rt.metrics.value("lake_flush_failures", "lake") == 2


async def test_a_half_written_temporary_file_is_cleaned_up(fs: FakeHdfs) -> None:
    fs.torn_creates = 2
    rt = pipeline(steps("A", range(100), 50), roll_rows=50, flush_attempts=3)
    assert (await rt.run()).ok
    assert_exactly(fs, {"A": range(100)})
    assert not fs.leftovers() and rt.handlers["dlq"].row_count == 0


async def test_a_rename_whose_answer_was_lost_loses_nothing(fs: FakeHdfs) -> None:
    # 0..29 visible; the merge with 30..59 is renamed into place but the answer never
    # comes: the retry must find the new file, not overwrite it with 30..59 alone
    assert (await pipeline(steps("A", range(30), 30), roll_rows=100).run()).ok
    fs.lost_renames = 1
    rt = pipeline(steps("A", range(30, 60), 30), roll_rows=100, flush_attempts=3)
    assert (await rt.run()).ok
    assert_exactly(fs, {"A": range(60)})
    assert not fs.leftovers() and rt.handlers["dlq"].row_count == 0


async def test_a_flush_that_keeps_failing_dead_letters_its_batches(fs: FakeHdfs) -> None:
    rt = pipeline(steps("A", range(20), 10) + steps("B", range(20), 20), roll_rows=20,
                  flush_attempts=2, http_retry={"max_attempts": 1, "backoff": 0})
    fs.fail_paths["recording=A/part-"] = 2     # both attempts of A's flush (CREATE in _tmp)
    report = await rt.run()
    assert report.ok and report.unacked == 0
    dl = rt.handlers["dlq"].rows()
    assert len(dl) == 20 and all("lake flush of A block 0 failed" in r["reason"] for r in dl)
    assert_exactly(fs, {"B": range(20)})


async def test_unsafe_recording_ids_are_dead_lettered(fs: FakeHdfs) -> None:
    nulls = [{"recording": None, "seq": 5, "time": 0.05, "L": 1.0},
             {"recording": "A", "seq": -1, "time": 0.0, "L": 1.0}]
    rt = pipeline([{"rows": rows("A", [1, 2]) + rows("../etc", [3]) + rows("x/y", [4])},
                   {"rows": rows("B", [7]) + nulls}], roll_rows=10)
    assert (await rt.run()).ok
    assert_exactly(fs, {"A": [1, 2], "B": [7]})
    dl = rt.handlers["dlq"].rows()
    assert len(dl) == 4 and "unsafe recording id" in dl[0]["reason"]
    assert "null recording or seq; negative seq" in dl[2]["reason"]


async def test_a_recording_keeps_its_partition_across_midnight(fs: FakeHdfs) -> None:
    yesterday = (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)).isoformat()
    old = f"{ROOT}/date={yesterday}/recording=A"
    await fs.mkdirs(old)
    fs.files[f"{old}/part-0000000000-0000000009.parquet"] = _parquet("A", range(10))
    assert (await pipeline(steps("A", range(5, 20), 15), roll_rows=100).run()).ok
    assert list(fs.visible()) == [f"{old}/part-0000000000-0000000019.parquet"]
    assert_exactly(fs, {"A": range(20)})


async def test_missing_columns_are_rejected(fs: FakeHdfs) -> None:
    rt = pipeline([{"rows": [{"recording": "A", "value": 1.0}]}], roll_rows=10)
    assert (await rt.run()).ok
    (dl,) = rt.handlers["dlq"].rows()
    assert "needs columns 'recording' and 'seq'" in dl["reason"]


# -- the guarantee, on random inputs -------------------------------------------------------
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_sample_exactly_once_whatever_the_batching(
        data: st.DataObject, monkeypatch: pytest.MonkeyPatch) -> None:
    roll = data.draw(st.sampled_from([7, 25, 100]), label="roll_rows")
    runs = data.draw(st.integers(1, 3), label="runs")     # replays over the same lake
    fake = FakeHdfs()
    monkeypatch.setattr(lake_mod, "WebHdfs", lambda *a, **kw: fake)
    expected: dict[str, set[int]] = {}
    for _ in range(runs):
        script: list[dict[str, Any]] = []
        for _ in range(data.draw(st.integers(1, 6), label="batches")):
            rec = data.draw(st.sampled_from(["A", "B", "C"]))
            lo = data.draw(st.integers(0, 150))
            seqs = data.draw(st.lists(st.integers(lo, lo + 60), min_size=1, max_size=40))
            expected.setdefault(rec, set()).update(seqs)
            script.append({"rows": rows(rec, seqs)})
            if data.draw(st.booleans()):
                script.append({"sleep": 0.06})
        fake.fail["RENAME"] = data.draw(st.integers(0, 1))
        rt = pipeline(script, roll_rows=roll, roll_interval=0.05, flush_attempts=3,
                      http_retry={"max_attempts": 1, "backoff": 0})
        report = asyncio.run(rt.run())
        assert report.ok and report.unacked == 0, report
    assert_exactly(fake, {r: sorted(s) for r, s in expected.items()})
    assert fake.max_visible_dups == 0 and not fake.leftovers()
    for name in fake.names():
        first, last = (int(x) for x in name[5:-8].split("-"))
        assert first // roll == last // roll          # a file never spans two blocks
