"""lake_sink: raw samples to Parquet files in HDFS (WebHDFS), each sample exactly once.

Input: raw sample batches (handlers/README.md §1: at least ``recording`` and ``seq``)
and, on the same input, recording-end events (§2, ``meta["event"] == "recording_end"``).
Output (optional ``segments``): one "segment committed" row per file made visible (§3).

Layout
    ``<root>/date=YYYY-MM-DD/recording=<id>/part-<seq_first:010d>-<seq_last:010d>.parquet``
    (zstd by default), rows sorted by ``seq``, the columns of the batches. Files never
    span a block: block ``k`` holds ``seq`` in ``[k * roll_rows, (k + 1) * roll_rows)``.
    A complete block is one file named by the block's range, so a replay after a
    crash writes the same name and overwrites it.

Date
    The UTC processing date on which the recording was first written, made sticky:
    before creating a recording's directory the sink looks for it under the previous
    ``date_lookback_days`` dates and keeps the one it finds. A replay after a crash
    that crosses midnight therefore writes into the same partition instead of
    duplicating the recording under the new date.

Rolling (when buffered rows become a file)
    * rows: a block is complete (``roll_rows`` distinct samples, counting those already
      in the lake) → all its files and buffered rows become the one file of the block;
    * time: rows buffered longer than ``roll_interval`` seconds are flushed as a
      partial file. Needed behind mqtt_source: its acknowledgement window is finite,
      and with ``roll_interval = 0`` a window smaller than the rows of the blocks in
      progress would never be acknowledged (the flow would stop);
    * bytes: a recording buffering ``roll_bytes`` is flushed the same way; while all
      buffers together exceed ``max_buffer_bytes`` the biggest is flushed and
      ``write`` waits (backpressure).

No duplicate is ever visible, nothing is lost
    The visible files of a recording always hold disjoint ``seq`` ranges. A flush
    merges its rows (deduplicated by ``seq``, the newest copy wins: MQTT redelivery,
    replays) with every visible file whose range overlaps them (the block's every
    file when the block is complete or ends the recording), writes the result under
    ``<root>/_tmp/...`` (invisible: Spark and Hive skip ``_`` directories), deletes
    the merged files, then renames the new file into place (deleting first whatever
    holds that name, since an HDFS rename never overwrites). Between the delete and
    the rename those rows are briefly absent, never twice. If the process dies in
    between, the complete temporary file still holds them: the next time the
    recording is written the sink lists ``_tmp`` and merges every leftover it can
    read (a half-written one cannot be read and is deleted; its rows were still
    visible or unacknowledged). Flushes of a recording run one after the other;
    one sink instance must own a recording (see mqtt_source on shared
    subscriptions). A file that replaces others is announced by its own segment
    event; the replaced paths are gone, so a consumer of segment events must
    tolerate a missing path (a later event covers its rows) and key its output by
    ``(recording, seq)`` or window.

Acknowledgement
    A batch stays uncommitted (``Deferred``) until every one of its rows is in a file
    made visible, and the "segment committed" event naming that file lists it as a
    parent: the source acknowledges upstream only after both. A flush that still
    fails after ``flush_attempts`` (each with the client's own HTTP retries) sends
    its batches to dead letter (or stops the pipeline, per ``on_failure``).

Recording end
    On the end event (``rows_total = n``) the sink waits until the recording's last
    block holds every ``seq`` below ``n`` (buffered or already in the lake), then
    flushes everything buffered for the recording and rewrites the last block as one
    file whose event has ``final = true``. Rows may still be on their way when the
    marker arrives (coalescing, reordering): if they do not come within
    ``end_timeout`` seconds (or the pipeline drains), the last block is written as
    final with what is there and a warning names the missing count. Later rows of
    that recording are still stored (merged into the same partition) with
    ``final = false``.

HDFS
    All I/O goes through :mod:`handlers.webhdfs` (aiohttp; the NameNode's redirect
    to the DataNode is followed by hand; connection errors, 5xx and safe mode are
    retried with backoff, which rides out a NameNode restart). ``write`` only
    buffers and schedules: files are written by background jobs, up to
    ``max_concurrent_flushes`` recordings at a time (HDFS needs ~0.4 s to close a
    file), while ``write`` waits only when the buffers exceed ``max_buffer_bytes``.
    Parquet encoding and decoding of more than ``thread_rows`` rows run in a worker
    thread. ``/readyz`` reports the sink disconnected while requests fail
    transiently.

Metrics: ``lake_files``, ``lake_rows``, ``lake_bytes``, ``lake_flush_failures``,
``lake_incomplete_recordings``, gauge ``lake_buffered_rows``, histogram
``lake_flush_seconds``.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import posixpath
import re
import time
import uuid
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import Batch, Deferred, Reject, RetryPolicy, Sink, setting

from .webhdfs import NotFound, WebHdfs, WebHdfsError, join

__all__ = ["SEGMENT_SCHEMA", "LakeSink", "LakeSinkSettings", "block_of", "part_name",
           "segment_bytes"]

SEGMENT_SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False),
    pa.field("recording", pa.string(), nullable=False),
    pa.field("seq_first", pa.int64(), nullable=False),
    pa.field("seq_last", pa.int64(), nullable=False),
    pa.field("rows", pa.int64(), nullable=False),
    pa.field("final", pa.bool_(), nullable=False),
])
_PART = re.compile(r"part-(\d{10,})-(\d{10,})\.parquet")
_TMP = re.compile(r"(part-(\d{10,})-(\d{10,})\.parquet)\.[0-9a-f]+\.tmp")
_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
IDLE_FORGET = 3600.0     # seconds: forget an idle recording's file list (re-listed when needed)


def part_name(first: int, last: int) -> str:
    return f"part-{first:010d}-{last:010d}.parquet"


def block_of(seq: int, roll_rows: int) -> tuple[int, int]:
    """The ``[first, last]`` seq range of the block holding ``seq``."""
    k = seq // roll_rows
    return k * roll_rows, (k + 1) * roll_rows - 1


@dataclasses.dataclass(frozen=True)
class LakeSinkSettings:
    url: str = setting("http://127.0.0.1:9870", doc="the NameNode's WebHDFS address")
    user: str | None = setting(None, doc="HDFS user name (user.name); default: the OS user")
    root: str = setting("/gaitflow/raw", doc="lake directory (absolute HDFS path)")
    roll_rows: int = setting(10_000, doc="samples per block: file boundaries are multiples of "
                                         "this in seq", min=1)
    roll_interval: float = setting(2.0, doc="flush rows buffered longer than this many "
                                            "seconds as a partial file (0 = never)", min=0)
    roll_bytes: int = setting(64 << 20, doc="flush a recording buffering this many bytes",
                              min=1024)
    max_buffer_bytes: int = setting(512 << 20, doc="flush the largest recording while all "
                                                   "buffers together exceed this", min=1024)
    compression: Literal["zstd", "snappy", "gzip", "lz4", "none"] = setting(
        "zstd", doc="Parquet compression codec")
    compression_level: int | None = setting(None, doc="codec level (default: the codec's)")
    date_lookback_days: int = setting(1, doc="previous dates searched for a recording's "
                                             "existing partition", min=0, max=366)
    end_timeout: float = setting(10.0, doc="seconds to wait for a recording's missing rows "
                                           "after its end marker", min=0)
    thread_rows: int = setting(2000, doc="encode/decode Parquet in a worker thread above "
                                         "this many rows", min=0)
    request_timeout: float = setting(30.0, doc="seconds per HTTP request", min=0.1)
    http_retry: RetryPolicy = setting(
        RetryPolicy(max_attempts=10, backoff=0.5, max_backoff=8.0, jitter=0.3),
        doc="retries of each WebHDFS request (transient errors only)")
    flush_attempts: int = setting(3, doc="attempts of a whole flush before its batches go "
                                         "to dead letter", min=1)
    max_concurrent_flushes: int = setting(8, doc="files written at the same time (different "
                                                 "recordings; a recording's are in order)",
                                          min=1, max=64)

    def __post_init__(self) -> None:
        root = self.root
        if not root.startswith("/") or posixpath.normpath(root) != root.rstrip("/") or \
                root == "/":
            raise ValueError(f"root {root!r}: expected an absolute, normalised path below /")


# --------------------------------------------------------------------------- state
@dataclasses.dataclass(eq=False)
class _File:
    path: str
    first: int
    last: int
    rows: int | None = None            # None until read
    hidden: bool = False               # a leftover under _tmp whose rows must be kept
    seqs: np.ndarray | None = None     # cached when the file has gaps

    def overlaps(self, lo: int, hi: int) -> bool:
        return self.first <= hi and self.last >= lo

    @property
    def gapless(self) -> bool:
        return self.rows == self.last - self.first + 1


class _Pending:
    """One input batch's deferred commit, shared by the blocks holding its rows."""

    __slots__ = ("deferred", "failed", "parts")

    def __init__(self, deferred: Deferred) -> None:
        self.deferred = deferred
        self.parts = 0
        self.failed = False

    def part_done(self) -> None:
        self.parts -= 1
        if self.parts <= 0 and not self.failed:
            self.deferred.commit()

    async def fail(self, error: BaseException, reason: str) -> None:
        if not self.failed:
            self.failed = True
            await self.deferred.fail(error, reason)


class _Block:
    __slots__ = ("chunks", "distinct", "nbytes", "pendings", "rows", "seen", "since")

    def __init__(self, roll_rows: int) -> None:
        self.chunks: list[pa.Table] = []
        self.pendings: list[_Pending] = []
        self.seen = np.zeros(roll_rows, dtype=bool)
        self.distinct = 0
        self.rows = 0
        self.nbytes = 0
        self.since = 0.0

    def add(self, piece: pa.Table, offsets: np.ndarray, nbytes: int) -> None:
        if not self.chunks:
            self.since = time.monotonic()
        self.chunks.append(piece)
        self.seen[offsets] = True
        self.distinct = int(np.count_nonzero(self.seen))
        self.rows += piece.num_rows
        self.nbytes += nbytes


@dataclasses.dataclass(eq=False)
class _End:
    rows_total: int
    deadline: float
    pending: _Pending


@dataclasses.dataclass(eq=False)
class _Recording:
    id: str
    dir: str = ""
    tmp_dir: str = ""
    files: list[_File] = dataclasses.field(default_factory=list)
    blocks: dict[int, _Block] = dataclasses.field(default_factory=dict)
    ends: list[_End] = dataclasses.field(default_factory=list)
    orphans: list[str] = dataclasses.field(default_factory=list)   # failed writes to delete
    opened: bool = False
    io: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)  # HDFS work, in order
    scheduled: set[int] = dataclasses.field(default_factory=set)        # blocks with a job
    end_scheduled: bool = False
    touched: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.blocks.values())


# --------------------------------------------------------------------------- the sink
class LakeSink(Sink):
    """Buffers samples per recording and block; writes Parquet through WebHDFS."""

    Settings: ClassVar[type] = LakeSinkSettings
    settings: LakeSinkSettings
    outputs: ClassVar[tuple[str, ...]] = ()
    optional_outputs: ClassVar[tuple[str, ...]] = ("segments",)

    def __init__(self, name: str, settings: LakeSinkSettings | None = None) -> None:
        super().__init__(name, settings)
        self.root = self.settings.root.rstrip("/")
        self.fs: WebHdfs | None = None
        self._recs: dict[str, _Recording] = {}
        self._jobs: set[asyncio.Task[None]] = set()
        self._slots: asyncio.Semaphore | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._m: dict[str, Any] = {}

    # -- lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        m = self.metrics
        self._m = {
            "files": m.counter("lake_files", "Parquet files made visible"),
            "rows": m.counter("lake_rows", "Rows written in visible files (rewrites included)"),
            "bytes": m.counter("lake_bytes", "Parquet bytes written"),
            "failures": m.counter("lake_flush_failures", "Flush attempts that failed"),
            "incomplete": m.counter("lake_incomplete_recordings",
                                    "Recordings closed with rows missing after end_timeout"),
            "buffered": m.gauge("lake_buffered_rows", "Rows buffered, not yet in a file"),
            "flush": m.histogram("lake_flush_seconds", "Time to make one file visible"),
        }
        self._slots = asyncio.Semaphore(s.max_concurrent_flushes)
        self.fs = WebHdfs(s.url, user=s.user, retry=s.http_retry, timeout=s.request_timeout,
                          connections=s.max_concurrent_flushes * 2,
                          on_state=self._on_hdfs_state, on_retry=self._on_retry)
        await self.fs.open_session()
        try:
            await self.fs.mkdirs(self.root)
        except WebHdfsError as exc:
            await self.fs.close()
            raise ConnectionError(f"lake root {self.root} on {s.url}: {exc}") from None
        self.log.info("lake.started", url=s.url, root=self.root, roll_rows=s.roll_rows,
                      roll_interval_s=s.roll_interval, compression=s.compression)
        self._ticker = asyncio.create_task(self._tick(), name=f"lake-roll:{self.name}")

    async def drain(self) -> None:
        await self._stop_ticker()
        await self._wait_jobs()
        for state in list(self._recs.values()):
            if state.ends:
                self._schedule_end(state, force=True)
            elif any(b.chunks for b in state.blocks.values()):
                self._schedule_flush(state, None)
        await self._wait_jobs()
        self._update_gauge()

    async def close(self) -> None:
        await self._stop_ticker()
        for job in list(self._jobs):
            job.cancel()
        await asyncio.gather(*self._jobs, return_exceptions=True)
        if self.fs is not None:
            await self.fs.close()

    async def _stop_ticker(self) -> None:
        task, self._ticker = self._ticker, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _wait_jobs(self) -> None:
        while self._jobs:
            await asyncio.gather(*list(self._jobs), return_exceptions=True)

    def _on_hdfs_state(self, connected: bool, detail: str) -> None:
        self.set_connected(connected, "" if connected else f"WebHDFS: {detail}")

    def _on_retry(self, op: str, attempt: int, exc: BaseException, pause: float) -> None:
        self.log.warning("lake.http_retry", op=op, attempt=attempt, error=str(exc),
                         retry_in_s=round(pause, 2))

    # -- jobs: HDFS work runs in tasks, one at a time per recording -------------------------
    def _spawn(self, state: _Recording, work: Any, what: str) -> None:
        async def job() -> None:
            assert self._slots is not None
            try:
                async with self._slots, state.io:
                    await work()
            except Exception as exc:  # noqa: BLE001 - a job must not die silently
                self.log.error("lake.job_failed", recording=state.id, job=what,
                               error=f"{type(exc).__name__}: {exc}")
            finally:
                self._update_gauge()

        task = asyncio.create_task(job(), name=f"lake:{self.name}:{state.id}:{what}")
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    def _schedule_flush(self, state: _Recording, ks: list[int] | None) -> None:
        """Flush blocks ``ks`` (None: every buffered block) of ``state`` in a job."""
        todo = sorted(state.blocks) if ks is None else ks
        todo = [k for k in todo if k not in state.scheduled]
        if not todo:
            return
        state.scheduled.update(todo)

        async def work() -> None:
            for k in todo:
                state.scheduled.discard(k)
                block = state.blocks.get(k)
                if block is not None and block.chunks:
                    await self._flush_block(state, k, compact=self._complete(state, k))

        self._spawn(state, work, "flush")

    def _schedule_end(self, state: _Recording, force: bool = False) -> None:
        if state.end_scheduled and not force:
            return
        state.end_scheduled = True

        async def work() -> None:
            state.end_scheduled = False
            if state.ends:
                await self._check_end(state, force=force)

        self._spawn(state, work, "end")

    # -- input -------------------------------------------------------------------
    async def write(self, batch: Batch) -> None:
        if batch.meta.get("event") == "recording_end":
            await self._end_event(batch)
        else:
            await self._samples(batch)
        self._update_gauge()
        # backpressure: while the buffers hold too much, flush the biggest and wait (jobs
        # are few: at most a flush and an end check per recording)
        limit = self.settings.max_buffer_bytes
        while self._buffered_bytes() > limit:
            self._schedule_flush(max(self._recs.values(), key=lambda r: r.nbytes), None)
            if not self._jobs:
                break
            await asyncio.wait(list(self._jobs), return_when=asyncio.FIRST_COMPLETED)

    def _buffered_bytes(self) -> int:
        return sum(r.nbytes for r in self._recs.values())

    async def _samples(self, batch: Batch) -> None:
        s = self.settings
        table = batch.to_table()
        names = table.schema.names
        if "recording" not in names or "seq" not in names:
            raise Reject("lake_sink needs columns 'recording' and 'seq' (handlers/README.md §1)"
                         f"; found {names}")
        if not pa.types.is_integer(table.schema.field("seq").type):
            raise Reject(f"column 'seq' must be an integer, not {table.schema.field('seq').type}")
        if table.num_rows == 0:
            return
        recs = pc.dictionary_encode(table.column("recording").combine_chunks())
        codes = recs.indices.fill_null(-1).to_numpy(zero_copy_only=False)
        ids = recs.dictionary.to_pylist()
        bad = self._bad_rows(table, codes, ids)
        if bad is not None:
            await self.dead_letter(batch, reason=bad[1], rows=np.flatnonzero(bad[0]).tolist())
            keep = ~bad[0]
            table, codes = table.filter(pa.array(keep)), codes[keep]
            if table.num_rows == 0:
                return
        states = [await self._recording(rec) if rec is not None and _safe_id(rec) else None
                  for rec in ids]                       # all opened before buffering
        seqs = table.column("seq").to_numpy().astype(np.int64, copy=False)
        if len(ids) > 1 or (len(seqs) > 1 and (np.diff(seqs) < 0).any()):
            order = np.lexsort((seqs, codes))
            codes, seqs = codes[order], seqs[order]
            table = table.take(pa.array(order))
        blocks = seqs // s.roll_rows
        if blocks[0] == blocks[-1] and codes[0] == codes[-1]:
            starts, ends = [0], [len(seqs)]            # the usual case: one recording, block
        else:
            cut = np.flatnonzero((np.diff(codes) != 0) | (np.diff(blocks) != 0)) + 1
            starts, ends = np.r_[0, cut].tolist(), np.r_[cut, len(seqs)].tolist()
        row_bytes = max(1, table.nbytes // max(1, table.num_rows))
        pending = _Pending(self.defer(batch))
        touched: dict[str, _Recording] = {}
        now = time.monotonic()
        # no await from here on: the buffers change atomically for the jobs
        for a, b in zip(starts, ends, strict=True):
            state = states[codes[a]]
            assert state is not None
            k = int(blocks[a])
            block = state.blocks.get(k)
            if block is None:
                block = state.blocks[k] = _Block(s.roll_rows)
            block.add(table.slice(a, b - a), seqs[a:b] - k * s.roll_rows, (b - a) * row_bytes)
            block.pendings.append(pending)
            pending.parts += 1
            state.touched = now
            touched[state.id] = state
        for state in touched.values():
            complete = [k for k in sorted(state.blocks) if self._complete(state, k)]
            if state.nbytes >= s.roll_bytes:
                self._schedule_flush(state, None)
            elif complete:
                self._schedule_flush(state, complete)
            if state.ends:
                self._schedule_end(state)

    @staticmethod
    def _bad_rows(table: pa.Table, codes: np.ndarray,
                  ids: list[str | None]) -> tuple[np.ndarray, str] | None:
        """Rows that cannot be stored (null or unsafe id, null or negative seq), and why."""
        seq = table.column("seq")
        unsafe = [i for i, rec in enumerate(ids) if rec is None or not _safe_id(rec)]
        nulls = table.column("recording").null_count + seq.null_count
        negative = pc.min(seq).as_py()
        if not unsafe and not nulls and (negative is None or negative >= 0):
            return None
        bad = np.zeros(table.num_rows, dtype=bool)
        reasons = []
        if nulls:
            bad |= np.asarray(pc.or_(pc.is_null(table.column("recording")), pc.is_null(seq)),
                              dtype=bool)
            reasons.append("null recording or seq")
        seq_np = np.asarray(pc.fill_null(seq, 0).to_numpy(zero_copy_only=False))
        if (seq_np < 0).any():
            bad |= seq_np < 0
            reasons.append("negative seq")
        if any(ids[i] is not None for i in unsafe):
            bad |= np.isin(codes, [i for i in unsafe if ids[i] is not None])
            reasons.append("unsafe recording id (expected [A-Za-z0-9_.-]{1,64}, no '..')")
        return bad, "; ".join(reasons)

    async def _end_event(self, batch: Batch) -> None:
        table = batch.to_table()
        if "recording" not in table.schema.names or "rows_total" not in table.schema.names:
            raise Reject("recording_end event needs columns 'recording' and 'rows_total'")
        ends = []
        for row in table.select(["recording", "rows_total"]).to_pylist():
            rec, total = row["recording"], row["rows_total"]
            if not isinstance(rec, str) or not _safe_id(rec) or \
                    not isinstance(total, int) or total < 0:
                self.log.warning("lake.bad_end_event", recording=rec, rows_total=total)
                continue
            ends.append((await self._recording(rec), total))
        pending = _Pending(self.defer(batch))
        deadline = time.monotonic() + self.settings.end_timeout
        for state, total in ends:
            pending.parts += 1
            state.ends.append(_End(total, deadline, pending))
            self._schedule_end(state)
        pending.parts += 1
        pending.part_done()      # commits at once when the event named no valid recording

    # -- recordings ------------------------------------------------------------------
    async def _recording(self, rec: str) -> _Recording:
        state = self._recs.get(rec)
        if state is None:
            state = self._recs[rec] = _Recording(rec)
        if not state.opened:
            async with state.io:
                if not state.opened:
                    await self._open_recording(state)
        return state

    def _dirs(self, date: dt.date, rec: str) -> tuple[str, str]:
        part = f"date={date.isoformat()}/recording={rec}"
        return join(self.root, part), join(self.root, "_tmp", part)

    async def _open_recording(self, state: _Recording) -> None:
        """Pick the partition date, list the files, pick up leftovers of a crashed flush."""
        fs = self.fs
        assert fs is not None
        rec = state.id
        today = dt.datetime.now(dt.UTC).date()
        date = today
        for back in range(self.settings.date_lookback_days, 0, -1):
            day = today - dt.timedelta(days=back)
            if await fs.exists(self._dirs(day, rec)[0]):
                date = day
                break
        state.dir, state.tmp_dir = self._dirs(date, rec)
        await self._list_files(state)
        state.opened = True
        if any(f.hidden for f in state.files):
            self.log.warning("lake.recovering", recording=rec,
                             leftovers=[f.path for f in state.files if f.hidden])

    async def _list_files(self, state: _Recording) -> None:
        """What HDFS holds for the recording: visible files and leftovers under _tmp."""
        fs = self.fs
        assert fs is not None
        await fs.mkdirs(state.dir)  # from the first listing on, the date choice is on disk
        known = {f.path: f for f in state.files}
        files = []
        for st in await fs.list_status(state.dir):
            m = _PART.fullmatch(st.name)
            if m and not st.is_dir:
                files.append(known.get(st.path) or _File(st.path, int(m[1]), int(m[2])))
        try:
            leftovers = await fs.list_status(state.tmp_dir)
        except NotFound:
            leftovers = []
        for st in leftovers:
            m = _TMP.fullmatch(st.name)
            if m and not st.is_dir:
                files.append(known.get(st.path) or
                             _File(st.path, int(m[2]), int(m[3]), hidden=True))
        state.files = files
        state.orphans = [p for p in state.orphans if p not in {f.path for f in files}]

    def _complete(self, state: _Recording, k: int) -> bool:
        """Block ``k`` (probably) holds ``roll_rows`` distinct samples, lake included."""
        block = state.blocks.get(k)
        if block is None or not block.chunks:
            return False
        lo, hi = k * self.settings.roll_rows, (k + 1) * self.settings.roll_rows - 1
        known = 0
        for f in state.files:
            if not f.hidden and f.overlaps(lo, hi):
                known += f.rows if f.rows is not None else (min(f.last, hi) - max(f.first, lo) + 1)
        return block.distinct + known >= self.settings.roll_rows

    # -- recording end (in a job: the recording's io lock is held) -------------------------
    async def _check_end(self, state: _Recording, force: bool = False) -> None:
        n = max(e.rows_total for e in state.ends)
        roll = self.settings.roll_rows
        if n == 0:
            await self._finalize(state, None)
            return
        k = (n - 1) // roll
        need = n - k * roll
        try:
            have = await self._coverage(state, k, need)
        except WebHdfsError as exc:
            if not force:   # the roll timer checks again
                self.log.warning("lake.end_check_failed", recording=state.id, error=str(exc))
                return
            have = 0
        if have < need and not force and time.monotonic() < min(e.deadline for e in state.ends):
            return
        if have < need:
            self._m["incomplete"].inc()
            self.log.warning("lake.recording_incomplete", recording=state.id, rows_total=n,
                             missing_in_last_block=need - have)
        await self._finalize(state, k)

    async def _coverage(self, state: _Recording, k: int, need: int) -> int:
        """Distinct samples of block ``k`` below ``need`` (offset), buffered or in the lake."""
        lo = k * self.settings.roll_rows
        hi = lo + self.settings.roll_rows - 1
        block = state.blocks.get(k)
        seen = block.seen.copy() if block is not None else np.zeros(hi - lo + 1, dtype=bool)
        for f in list(state.files):
            if not f.overlaps(lo, hi):
                continue
            if f.rows is None or not f.gapless:
                if f.seqs is None:
                    table = await self._read(state, f)
                    if table is None:
                        continue
                    f.seqs = table.column("seq").to_numpy()
                offsets = f.seqs[(f.seqs >= lo) & (f.seqs <= hi)] - lo
                seen[offsets] = True
            else:
                seen[max(f.first, lo) - lo: min(f.last, hi) - lo + 1] = True
        return int(np.count_nonzero(seen[:need]))

    async def _finalize(self, state: _Recording, k: int | None) -> None:
        ends, state.ends = state.ends, []
        pendings = [e.pending for e in ends]
        for j in sorted(state.blocks):
            block = state.blocks.get(j)
            if j != k and block is not None and block.chunks:
                await self._flush_block(state, j, compact=self._complete(state, j))
        if k is not None:
            roll = self.settings.roll_rows
            lo, hi = k * roll, (k + 1) * roll - 1
            block = state.blocks.get(k)
            files = [f for f in state.files if f.overlaps(lo, hi)]
            if (block is not None and block.chunks) or len(files) > 1 or \
                    any(f.hidden for f in files):
                await self._flush_block(state, k, compact=True, final=True,
                                        also_parents=pendings)
            elif files:   # already one file: announce it as final, no rewrite
                f = files[0]
                if f.rows is None:
                    await self._read(state, f)
                await self._announce(state, f, True,
                                     [p.deferred for p in pendings if not p.failed])
            else:
                self.log.warning("lake.recording_end_without_rows", recording=state.id,
                                 rows_total=max(e.rows_total for e in ends))
        for p in pendings:
            p.part_done()

    # -- flushing ----------------------------------------------------------------------
    async def _flush_block(self, state: _Recording, k: int, *, compact: bool,
                           final: bool = False, also_parents: Sequence[_Pending] = ()) -> None:
        """Make block ``k``'s buffered rows visible; never raises (failures dead-letter).

        ``also_parents``: further commits the segment event derives from (the end
        marker), failed with the block's batches if the flush fails.
        """
        s = self.settings
        block = state.blocks.pop(k, None) or _Block(s.roll_rows)
        state.scheduled.discard(k)
        pendings = [*block.pendings, *also_parents]
        error: BaseException | None = None
        for attempt in range(1, s.flush_attempts + 1):
            t0 = time.perf_counter()
            try:
                if attempt > 1:   # a failed attempt may have changed HDFS halfway: look again
                    await self._list_files(state)
                written = await self._rewrite(state, k, block, compact)
            except Exception as exc:  # noqa: BLE001 - every failure: retry, then dead letter
                error = exc
                self._m["failures"].inc()
                self.log.warning("lake.flush_failed", recording=state.id, block=k,
                                 attempt=attempt, of=s.flush_attempts,
                                 error=f"{type(exc).__name__}: {exc}")
                if attempt < s.flush_attempts:
                    await asyncio.sleep(s.http_retry.delay(attempt))
                continue
            self._m["flush"].observe(time.perf_counter() - t0)
            if written is not None:
                await self._announce(state, written, final,
                                     [p.deferred for p in pendings if not p.failed])
            for p in block.pendings:
                p.part_done()
            return
        assert error is not None
        reason = f"lake flush of {state.id} block {k} failed after {s.flush_attempts} " \
                 f"attempts: {type(error).__name__}: {error}"
        self.log.error("lake.flush_gave_up", recording=state.id, block=k,
                       error=f"{type(error).__name__}: {error}")
        for p in pendings:
            await p.fail(error, reason)

    async def _announce(self, state: _Recording, f: _File, final: bool,
                        parents: list[Deferred]) -> None:
        event = pa.table({"path": [f.path], "recording": [state.id], "seq_first": [f.first],
                          "seq_last": [f.last], "rows": [f.rows or 0], "final": [final]},
                         schema=SEGMENT_SCHEMA)
        await self.emit(event, output="segments", key="path", parents=parents,
                        meta={"event": "segment_committed", "recording": state.id,
                              "final": final})

    async def _rewrite(self, state: _Recording, k: int, block: _Block,
                       compact: bool) -> _File | None:
        """One attempt: merge, write under _tmp, delete what it replaces, rename into place."""
        fs = self.fs
        assert fs is not None
        roll = self.settings.roll_rows
        lo, hi = k * roll, (k + 1) * roll - 1
        sources = [f for f in state.files if f.overlaps(lo, hi) and (f.hidden or compact)]
        if block.chunks and not compact:
            bseqs = np.concatenate([c.column("seq").to_numpy() for c in block.chunks])
            a, b = int(bseqs.min()), int(bseqs.max())
            grew = True
            while grew:   # the visible files overlapping the rows, and what they overlap
                grew = False
                for f in state.files:
                    if not f.hidden and f not in sources and f.overlaps(a, b):
                        sources.append(f)
                        a, b = min(a, f.first), max(b, f.last)
                        grew = True
        if not block.chunks and not sources:
            return None
        tables, merged_files = [], []
        for f in sources:
            table = await self._read(state, f)   # None: vanished or torn (then forgotten)
            if table is not None:
                tables.append(table)
                merged_files.append(f)
        sources = merged_files
        merged = _dedup(tables + block.chunks)
        if merged.num_rows == 0:
            return None
        seq = merged.column("seq")
        first, last = int(seq[0].as_py()), int(seq[-1].as_py())
        name = part_name(first, last)
        dest = join(state.dir, name)
        data = await self._encode(merged)
        tmp = join(state.tmp_dir, f"{name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            await fs.create(tmp, data, overwrite=True)
        except BaseException:
            # maybe half written (or written, the answer lost): its rows are still in the
            # buffer and the sources, so it is only garbage to remove later
            state.orphans.append(tmp)
            raise
        staged = _File(tmp, first, last, merged.num_rows, hidden=True)
        state.files.append(staged)   # from here on its rows must survive a failed attempt
        for f in sources:
            if not f.hidden:
                await fs.delete(f.path)
                state.files.remove(f)
        # a False rename with tmp gone: an earlier try went through, its answer was lost
        if not await fs.rename(tmp, dest) and await fs.exists(tmp):
            # dest is held by a file this sink did not know of: never delete rows unseen;
            # the next attempt lists the directory again and merges it
            raise WebHdfsError("RENAME", tmp, f"{dest} exists and was not known; merging it "
                                              "on the next attempt")
        state.files.remove(staged)
        written = _File(dest, first, last, merged.num_rows)
        state.files.append(written)
        for f in sources:
            if f.hidden:
                try:
                    await fs.delete(f.path)
                    state.files.remove(f)
                except WebHdfsError as exc:  # its rows are visible now; retried next flush
                    self.log.warning("lake.cleanup_failed", path=f.path, error=str(exc))
        for path in list(state.orphans):
            try:
                await fs.delete(path)
                state.orphans.remove(path)
            except WebHdfsError as exc:
                self.log.warning("lake.cleanup_failed", path=path, error=str(exc))
        self._m["files"].inc()
        self._m["rows"].inc(merged.num_rows)
        self._m["bytes"].inc(len(data))
        self.log.debug("lake.file", path=dest, rows=merged.num_rows, bytes=len(data),
                       merged=len(sources))
        return written

    async def _read(self, state: _Recording, f: _File) -> pa.Table | None:
        """A file's rows; None (and forgotten) when it vanished or is a torn leftover."""
        fs = self.fs
        assert fs is not None
        try:
            data = await fs.open(f.path)
        except NotFound:
            self.log.warning("lake.file_vanished", path=f.path)
            state.files.remove(f)
            return None
        try:
            if len(data) > 64 * self.settings.thread_rows:
                table = await asyncio.to_thread(_decode, data)
            else:
                table = _decode(data)
        except (pa.ArrowException, OSError) as exc:
            if not f.hidden:
                raise WebHdfsError("OPEN", f.path, f"unreadable lake file: {exc}") from exc
            self.log.warning("lake.torn_leftover_deleted", path=f.path, error=str(exc))
            await fs.delete(f.path)
            state.files.remove(f)
            return None
        f.rows = table.num_rows
        return table

    async def _encode(self, table: pa.Table) -> bytes:
        s = self.settings
        codec = None if s.compression == "none" else s.compression
        if table.num_rows > s.thread_rows:
            return await asyncio.to_thread(_encode, table, codec, s.compression_level)
        return _encode(table, codec, s.compression_level)

    # -- time-based rolling --------------------------------------------------------------
    async def _tick(self) -> None:
        s = self.settings
        period = min(1.0, s.roll_interval / 4) if s.roll_interval else 1.0
        period = max(period, 0.05)
        while True:
            await asyncio.sleep(period)
            try:
                self._roll_due()
            except Exception as exc:  # noqa: BLE001 - the roller must survive
                self.log.error("lake.roll_error", error=f"{type(exc).__name__}: {exc}")

    def _roll_due(self) -> None:
        s = self.settings
        now = time.monotonic()
        for state in list(self._recs.values()):
            if s.roll_interval:
                due = [k for k, b in state.blocks.items()
                       if b.chunks and now - b.since >= s.roll_interval]
                if due:
                    self._schedule_flush(state, sorted(due))
            if state.ends:
                self._schedule_end(state)
            elif not state.blocks and not state.io.locked() and not state.scheduled and \
                    now - state.touched > IDLE_FORGET:
                self._recs.pop(state.id, None)

    def _update_gauge(self) -> None:
        if self._m:
            self._m["buffered"].set(sum(b.rows for r in self._recs.values()
                                        for b in r.blocks.values()))


# --------------------------------------------------------------------------- helpers
def _safe_id(rec: str) -> bool:
    return bool(_ID.fullmatch(rec)) and ".." not in rec


def _dedup(tables: list[pa.Table]) -> pa.Table:
    """Concatenate, keep the last row of each seq, sort by seq."""
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return pa.table({})
    merged = tables[0] if len(tables) == 1 else pa.concat_tables(
        tables, promote_options="permissive")
    seqs = merged.column("seq").to_numpy()
    order = np.argsort(seqs, kind="stable")
    s = seqs[order]
    keep = np.ones(len(s), dtype=bool)
    keep[:-1] = s[:-1] != s[1:]        # the last of each run of equal seqs
    idx = order[keep]
    if len(idx) == merged.num_rows and (np.diff(seqs) > 0).all():
        return merged.combine_chunks()
    return merged.take(pa.array(idx)).combine_chunks()


def _encode(table: pa.Table, codec: str | None, level: int | None) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=codec or "none", compression_level=level)
    return sink.getvalue().to_pybytes()


def segment_bytes(recording: str, values: np.ndarray, first_seq: int = 0, *,
                  compression: str = "zstd") -> bytes:
    """Rows ``values`` ((n, 19), ``COLUMNS`` order) of a recording, seq from ``first_seq``,
    as the Parquet file of a raw segment (handlers/README.md §1): for tests, benchmarks
    and backfills that write the lake without the sink."""
    from .mqtt_source import Samples, samples_batch

    seq = np.arange(first_seq, first_seq + len(values), dtype=np.int64)
    batch = samples_batch([Samples(recording, f"insole-{recording}", seq,
                                   np.asarray(values, dtype=np.float64))])
    return _encode(pa.Table.from_batches([batch]), None if compression == "none" else
                   compression, None)


def _decode(data: bytes) -> pa.Table:
    return pq.read_table(pa.BufferReader(data))
