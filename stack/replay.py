"""Sensor replay: plays gaitpdb recordings over MQTT as insole devices would.

    python -m stack.replay [--data DIR] [--speed 1|N|0] [--format sample|batch]
                           [--batch-rows 100] [--limit N] [--recordings ID,...]
                           [--loss P] [--duplicate P] [--reorder P] [--jitter MS]

One simulated device per recording, all concurrent. ``--speed 1`` is real time
(100 samples/s per device), ``--speed 10`` ten times faster, ``--speed 0`` as
fast as the broker takes it. Messages are published with QoS 1.

Payload formats (the mqtt_source handler accepts both):

* ``sample``: one JSON object per sample, as the original tutorial sent them, plus
  the sample's sequence number:
  ``{"Patient": "GaCo01_01", "seq": 1, "time": 0.01, "L1": ..., "R8": ..., "L": ..., "R": ...}``
* ``batch``: ``{"device": "insole-GaCo01_01", "recording": "GaCo01_01",
  "seq": <first sequence number>, "rows": [[19 numbers], ...]}``

When a device has sent its last sample it publishes an end marker
``{"device": ..., "recording": ..., "end": true, "rows_total": n}`` so the
pipeline can close the recording (flush the lake, trigger feature extraction).

The fault options exercise the pipeline's guarantees: ``--loss`` drops
messages, ``--duplicate`` sends some twice, ``--reorder`` swaps neighbours,
``--jitter`` delays each message by up to that many milliseconds. They are
seeded (``--seed``) so a run is reproducible.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .progress import ProgressLine

COLUMNS = ["time", *(f"L{i}" for i in range(1, 9)), *(f"R{i}" for i in range(1, 9)), "L", "R"]
SAMPLE_HZ = 100


@dataclass(frozen=True)
class ReplayOptions:
    host: str = "127.0.0.1"
    port: int = 1883
    topic: str = "gaitflow/insoles/{recording}"
    fmt: str = "batch"
    batch_rows: int = 100
    speed: float = 0.0
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    jitter_ms: float = 0.0
    seed: int = 0
    end_marker: bool = True
    username: str | None = None
    password: str | None = None


def encode_messages(recording: str, rows: np.ndarray, fmt: str,
                    batch_rows: int) -> Iterator[tuple[float, bytes]]:
    """(offset in seconds from the recording's start, payload) for each message."""
    device = f"insole-{recording}"
    if fmt == "sample":
        for seq, r in enumerate(rows):
            # "seq" is our addition to the tutorial's format: gaitpdb's clock is not
            # exactly 100 Hz, so round(time * 100) collides about 50 times a recording
            obj = {"Patient": recording, "seq": seq,
                   **{c: float(v) for c, v in zip(COLUMNS, r)}}
            yield float(r[0]), json.dumps(obj, separators=(",", ":")).encode()
    elif fmt == "batch":
        for start in range(0, len(rows), batch_rows):
            chunk = rows[start:start + batch_rows]
            obj = {"device": device, "recording": recording, "seq": start,
                   "rows": chunk.tolist()}
            # offset of the chunk's last sample: a device sends a batch once it is full
            yield float(chunk[-1, 0]), json.dumps(obj, separators=(",", ":")).encode()
    else:
        raise ValueError(f"--format must be 'sample' or 'batch', not {fmt!r}")


def end_message(recording: str, n_rows: int) -> bytes:
    return json.dumps({"device": f"insole-{recording}", "recording": recording,
                       "end": True, "rows_total": n_rows}).encode()


def apply_faults(msgs: list[tuple[float, bytes]], opts: ReplayOptions,
                 rng: random.Random) -> list[tuple[float, bytes]]:
    """Loss, duplication and neighbour swaps, applied to the message list."""
    out: list[tuple[float, bytes]] = []
    for m in msgs:
        if opts.loss and rng.random() < opts.loss:
            continue
        out.append(m)
        if opts.duplicate and rng.random() < opts.duplicate:
            out.append(m)
    if opts.reorder:
        i = 0
        while i < len(out) - 1:
            if rng.random() < opts.reorder:
                out[i], out[i + 1] = out[i + 1], out[i]
                i += 1
            i += 1
    return out


class Progress:
    """A progress bar on stderr (messages and rows sent): one line redrawn on a
    terminal, a line every 10 s in a log (:class:`stack.progress.ProgressLine`)."""

    def __init__(self, total_msgs: int, total_rows: int) -> None:
        self.total_msgs, self.total_rows = total_msgs, total_rows
        self.msgs = self.rows = 0
        self.t0 = time.monotonic()
        self.line = ProgressLine(sys.stderr)

    def add(self, rows: int) -> None:
        self.msgs += 1
        self.rows += rows
        self.line.update(self.text)  # formatted only when a line is due

    def text(self) -> str:
        frac = self.msgs / self.total_msgs if self.total_msgs else 1.0
        bar = "#" * int(frac * 30)
        dt = max(time.monotonic() - self.t0, 1e-9)
        return (f"[{bar:<30}] {self.msgs}/{self.total_msgs} msgs "
                f"{self.rows} rows {self.rows / dt:,.0f} rows/s")

    def finish(self) -> None:
        self.line.update(self.text(), final=True)


async def replay(recordings: dict[str, np.ndarray], opts: ReplayOptions,
                 show_progress: bool = True) -> dict[str, int]:
    """Publish every recording concurrently; returns messages sent per recording."""
    import aiomqtt

    rng = random.Random(opts.seed)
    plans = {}
    for rec, rows in recordings.items():
        msgs = list(encode_messages(rec, rows, opts.fmt, opts.batch_rows))
        plans[rec] = apply_faults(msgs, opts, rng)
    rows_per_msg = {"sample": 1, "batch": opts.batch_rows}[opts.fmt]
    progress = Progress(sum(len(p) for p in plans.values()),
                        sum(len(r) for r in recordings.values()))
    sent: dict[str, int] = {}

    async with aiomqtt.Client(opts.host, opts.port, username=opts.username,
                              password=opts.password, max_queued_outgoing_messages=None,
                              identifier=f"gaitflow-replay-{opts.seed}") as client:
        # every device has a QoS 1 publish in flight: only warn well beyond that
        client.pending_calls_threshold = max(100, 4 * len(plans))

        async def device(rec: str) -> None:
            t0 = time.monotonic()
            jitter = random.Random(f"{opts.seed}-{rec}")
            n = 0
            for offset, payload in plans[rec]:
                if opts.speed > 0:
                    delay = t0 + offset / opts.speed - time.monotonic()
                    if opts.jitter_ms:
                        delay += jitter.random() * opts.jitter_ms / 1000
                    if delay > 0:
                        await asyncio.sleep(delay)
                await client.publish(opts.topic.format(recording=rec), payload, qos=1)
                n += 1
                if show_progress:
                    progress.add(rows_per_msg)
            if opts.end_marker:
                await client.publish(opts.topic.format(recording=rec),
                                     end_message(rec, len(recordings[rec])), qos=1)
            sent[rec] = n

        async with asyncio.TaskGroup() as tg:
            for rec in plans:
                tg.create_task(device(rec))
    if show_progress:
        progress.finish()
    return sent


def load(data: str | None, limit: int | None, ids: list[str] | None) -> dict[str, np.ndarray]:
    from ml.data import list_recordings, load_recording

    table = list_recordings(data)
    if ids:
        missing = sorted(set(ids) - set(table["id"]))
        if missing:
            raise SystemExit(f"error: unknown recording(s): {', '.join(missing)}")
        table = table[table["id"].isin(ids)]
    if limit:
        table = table.head(limit)
    return {row.id: load_recording(row.path) for row in table.itertuples(index=False)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stack.replay", description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="gaitpdb directory (default: $GAITPDB_DIR)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--username")
    ap.add_argument("--password")
    ap.add_argument("--topic", default=ReplayOptions.topic,
                    help="topic template; {recording} is replaced (default: %(default)s)")
    ap.add_argument("--format", dest="fmt", choices=["sample", "batch"], default="batch")
    ap.add_argument("--batch-rows", type=int, default=100)
    ap.add_argument("--speed", type=float, default=0.0,
                    help="1 = real time, N = N times faster, 0 = as fast as possible")
    ap.add_argument("--limit", type=int, help="replay only the first N recordings")
    ap.add_argument("--recordings", help="comma-separated recording ids")
    ap.add_argument("--loss", type=float, default=0.0, help="probability of dropping a message")
    ap.add_argument("--duplicate", type=float, default=0.0, help="probability of a duplicate")
    ap.add_argument("--reorder", type=float, default=0.0, help="probability of a swap")
    ap.add_argument("--jitter", type=float, default=0.0, help="max extra delay per message, ms")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-end-marker", action="store_true")
    a = ap.parse_args(argv)
    for name in ("loss", "duplicate", "reorder"):
        if not 0.0 <= getattr(a, name) <= 1.0:
            ap.error(f"--{name} must be a probability in [0, 1], got {getattr(a, name)}")
    if a.batch_rows < 1:
        ap.error("--batch-rows must be >= 1")
    ids = [s.strip() for s in a.recordings.split(",")] if a.recordings else None
    recs = load(a.data, a.limit, ids)
    opts = ReplayOptions(host=a.host, port=a.port, topic=a.topic, fmt=a.fmt,
                         batch_rows=a.batch_rows, speed=a.speed, loss=a.loss,
                         duplicate=a.duplicate, reorder=a.reorder, jitter_ms=a.jitter,
                         seed=a.seed, end_marker=not a.no_end_marker,
                         username=a.username, password=a.password)
    print(f"replaying {len(recs)} recordings ({sum(map(len, recs.values()))} samples) "
          f"to mqtt://{a.host}:{a.port} as {a.fmt}", file=sys.stderr)
    asyncio.run(replay(recs, opts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
