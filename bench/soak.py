"""Soak: settings.toml's whole pipeline under a steady load for a set time.

    python bench/soak.py [--minutes 15] [--rate 1000] [--devices 10] [--model DIR]

Starts the model server and the pipeline (settings.toml, every store name unique to
this run, as the end-to-end test does), then plays gaitpdb recordings over MQTT the
way ``stack.replay`` does (batch payloads of ``--batch-rows`` samples, QoS 1) from
``--devices`` simulated insoles in a loop, each pass of a recording under a fresh id
(``GaCo01_01-r17``), at ``--rate`` samples per second in total. Every
``--report-every`` seconds one line: samples published, the pipeline's RSS (and its
Spark jobs'), the oldest unacknowledged MQTT message (ack lag), channel depths,
dead letters, Spark jobs, diagnoses stored. When the time is up the recordings in
progress are ended where they are, the pipeline finishes (every recording
diagnosed), stops with SIGTERM, and every store is audited: samples lost or
duplicated in the lake and Kafka, windows in Cassandra, diagnoses in MongoDB and
Elasticsearch. Rows lost must be 0. Everything the run created is removed (unless
``--keep``).

Needs the local stack (``make up``) and ``GAITPDB_DIR``. Without ``--model`` a
small model is trained first (about a minute). The helpers come from
``tests/reliability/reliability_support.py``.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# not bench/ itself: bench/cassandra.py would shadow the cassandra driver
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != HERE]
sys.path.insert(0, str(ROOT / "tests" / "reliability"))
sys.path.insert(0, str(ROOT))

import reliability_support as rs
from audit import RunNames, cleanup

DEFAULT_RECORDINGS = ("GaCo01_01", "GaPt03_01", "JuCo01_01", "JuPt01_01", "SiCo03_01",
                      "SiPt02_01", "GaCo02_01", "GaPt05_01", "JuCo02_01", "JuPt02_01")


def rss_mb(pid: int | None) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, TypeError):
        pass
    return 0.0


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{d}/stat").read_text()
                children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(d))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def strays_of(run: str) -> list[int]:
    """Spark jobs of this run in their own session (not our descendants any more)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError):
                if run in Path(f"/proc/{d}/cmdline").read_bytes().decode(errors="replace"):
                    out.append(int(d))
    return out


class Load:
    """``devices`` insoles, each playing recordings back to back under fresh ids."""

    def __init__(self, recs: dict[str, np.ndarray], topic: str, rate: float, devices: int,
                 batch_rows: int) -> None:
        self.recs, self.topic, self.rate = recs, topic, rate
        self.devices, self.batch_rows = devices, batch_rows
        self.sent_rows = 0
        self.sent_msgs = 0
        self.played: dict[str, np.ndarray] = {}     # fresh id -> the rows sent under it
        self.ended: set[str] = set()
        self._pass = Counter()
        self._next = 0

    def _fresh(self) -> tuple[str, np.ndarray]:
        base = list(self.recs)[self._next % len(self.recs)]
        self._next += 1
        self._pass[base] += 1
        return f"{base}-r{self._pass[base]}", self.recs[base]

    async def run(self, publisher: rs.Publisher, until: float) -> None:
        from stack.replay import end_message

        cursors: list[list[Any]] = []
        for _ in range(self.devices):
            rid, rows = self._fresh()
            cursors.append([rid, rows, 0])
        interval = self.batch_rows / self.rate
        next_at = time.monotonic()
        dev = 0
        async with publisher.client() as client:
            while time.monotonic() < until:
                cur = cursors[dev]
                rid, rows, pos = cur
                chunk = rows[pos:pos + self.batch_rows]
                payload = json.dumps({"device": f"insole-{rid}", "recording": rid, "seq": pos,
                                      "rows": chunk.tolist()}, separators=(",", ":")).encode()
                await client.publish(self.topic.format(recording=rid), payload, qos=1)
                self.sent_rows += len(chunk)
                self.sent_msgs += 1
                cur[2] = pos + len(chunk)
                self.played[rid] = rows[:cur[2]]
                if cur[2] >= len(rows):
                    await client.publish(self.topic.format(recording=rid),
                                         end_message(rid, len(rows)), qos=1)
                    self.ended.add(rid)
                    cursors[dev] = [*self._fresh(), 0]
                dev = (dev + 1) % self.devices
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                elif delay < -5:           # the broker (or this loop) fell behind: do not burst
                    next_at = time.monotonic()
            # the time is up: end every recording in progress where it is
            for rid, _rows, pos in cursors:
                if pos:
                    await client.publish(self.topic.format(recording=rid),
                                         end_message(rid, pos), qos=1)
                    self.ended.add(rid)
                else:
                    self.played.pop(rid, None)


async def sample(pipeline: rs.PipelineProcess, names: RunNames, load: Load, t0: float,
                 peak: dict[str, float]) -> str:
    status = await pipeline.status()
    hs = status.get("handlers") or {}
    ack = (hs.get("mqtt") or {}).get("ack") or {}
    lag = float(ack.get("lag_seconds") or 0.0)
    depths = {n: (h.get("input") or {}).get("depth", 0) for n, h in hs.items() if h.get("input")}
    busy = {n: d for n, d in depths.items() if d}
    dead = sum(int(h.get("dead_letter_rows") or 0) for h in hs.values())
    rss = rss_mb(pipeline.pid)
    spark = sum(rss_mb(p) for p in descendants(pipeline.pid or 0))
    mongo, _ = await rs.diagnosed(names)
    feats = (hs.get("features") or {}).get("detail", "")
    failures, reruns, arrow = 0.0, 0.0, 0.0
    for line in (await pipeline.metrics()).splitlines():
        if line.startswith("gaitflow_spark_job_failures"):
            failures += float(line.rsplit(" ", 1)[1])
        elif line.startswith("gaitflow_spark_job_input_reruns"):
            reruns += float(line.rsplit(" ", 1)[1])
        elif line.startswith("gaitflow_arrow_allocated_bytes"):
            arrow = float(line.rsplit(" ", 1)[1]) / 1e6
    peak["spark_reruns"] = reruns
    peak.setdefault("arrow_first", arrow)
    peak["arrow_last"] = arrow
    peak["arrow"] = max(peak.get("arrow", 0.0), arrow)
    peak["spark_failures"] = failures
    peak["rss"] = max(peak.get("rss", 0.0), rss)
    peak["lag"] = max(peak.get("lag", 0.0), lag)
    peak.setdefault("rss_first", rss)
    peak["rss_last"] = rss
    el = time.monotonic() - t0
    return (f"{el:6.0f}s sent {load.sent_rows:>8} rows ({load.sent_rows / max(el, 1e-9):6.0f}/s)"
            f" | RSS {rss:6.1f} MB (arrow {arrow:5.1f}, +spark {spark:6.1f}) | ack lag {lag:6.1f} s, "
            f"pending {ack.get('pending', 0)} | depth {busy or 0} | dead {dead} | "
            f"diagnosed {len(mongo)}/{len(load.ended)} ended | spark failed runs "
            f"{failures:.0f} | {str(feats)[:50]}")


async def soak(args: argparse.Namespace) -> int:
    recs = rs.load_recordings(args.recordings.split(","), None)
    names = RunNames("soak" + uuid.uuid4().hex[:8])
    tmp = Path(tempfile.mkdtemp(prefix="gaitflow-soak-"))
    print(f"soak {names.run}: {args.minutes} min at {args.rate:.0f} samples/s from "
          f"{args.devices} devices ({len(recs)} recordings looped), logs in {tmp}", flush=True)
    model = Path(args.model) if args.model else None
    if model is None:
        print("training a small model...", flush=True)
        (tmp / "subset").mkdir()
        model = rs.train_small_model(tmp / "subset", tmp / "model")
    server = rs.ModelServer(model, tmp / "serve.log")
    await server.start()
    pipeline = rs.PipelineProcess(names, model_url=server.url, dead_letters=tmp / "dead.jsonl",
                                  log=tmp / "pipeline.log",
                                  sets=["handlers.features.max_wait=60.0"])  # settings.toml's
    rc = 1
    try:
        pipeline.start()
        await pipeline.wait_ready()
        load = Load(recs, names.mqtt_topic, args.rate, args.devices, args.batch_rows)
        t0 = time.monotonic()
        until = t0 + args.minutes * 60
        peak: dict[str, float] = {}
        producer = asyncio.create_task(load.run(rs.Publisher(), until))
        print(await sample(pipeline, names, load, t0, peak), flush=True)
        while not producer.done():
            await asyncio.wait([producer], timeout=args.report_every)
            print(await sample(pipeline, names, load, t0, peak), flush=True)
        await producer
        expected = {rid: rows for rid, rows in load.played.items() if rid in load.ended}
        windows = rs.expected_windows(expected)
        to_diagnose = {rid for rid, w in windows.items() if w}
        print(f"load done: {load.sent_rows} samples in {load.sent_msgs} messages, "
              f"{len(expected)} recordings ({len(to_diagnose)} long enough to diagnose); "
              "waiting for the pipeline to finish", flush=True)
        t_end = last = time.monotonic()
        while time.monotonic() - t_end < args.finish_timeout:
            mongo, es = await rs.diagnosed(names)
            if to_diagnose <= mongo and to_diagnose <= es:
                break
            await asyncio.sleep(5)
            if time.monotonic() - last >= args.report_every:
                last = time.monotonic()
                print(await sample(pipeline, names, load, t0, peak), flush=True)
        print(await sample(pipeline, names, load, t0, peak), flush=True)
        print(f"finished {time.monotonic() - t_end:.0f} s after the load stopped", flush=True)
        stop_rc = pipeline.stop(timeout=300)
        result = await rs.audit_stores(names, expected)
        dead = pipeline.dead_letter_records()
        lost = sum(sum(s.missing.values()) for s in result.stores if s.store in ("lake", "kafka"))
        dup = sum(sum(s.duplicated.values()) for s in result.stores)
        print("\n".join(f"  {s}" for s in result.stores))
        print(f"SOAK SUMMARY {names.run}: {args.minutes} min, target {args.rate:.0f} samples/s, "
              f"sent {load.sent_rows} samples ({load.sent_rows / (args.minutes * 60):.0f}/s), "
              f"{len(expected)} recordings")
        print(f"  pipeline RSS start {peak.get('rss_first', 0):.1f} MB, end "
              f"{peak.get('rss_last', 0):.1f} MB, peak {peak.get('rss', 0):.1f} MB; of which "
              f"Arrow's pool start {peak.get('arrow_first', 0):.1f} MB, end "
              f"{peak.get('arrow_last', 0):.1f} MB, peak {peak.get('arrow', 0):.1f} MB")
        print(f"  peak ack lag {peak.get('lag', 0):.1f} s; dead letters {len(dead)}; "
              f"Spark runs failed (retried) {peak.get('spark_failures', 0):.0f}, rerun "
              f"because an input was merged away {peak.get('spark_reruns', 0):.0f}; "
              f"exit status {stop_rc}")
        print(f"  samples lost {lost}, duplicated {dup}; every store exact: {result.ok}")
        reasons = Counter((d["handler"], d["reason"][:160]) for d in dead)
        for (handler, reason), n in reasons.most_common(5):
            print(f"  dead letter x{n} from {handler}: {reason}")
        rc = 0 if result.ok and not dead and lost == 0 and stop_rc == 0 else 1
    finally:
        pipeline.kill()
        server.stop()
        for pid in strays_of(names.run):
            with contextlib.suppress(OSError):
                os.kill(pid, 9)
        await rs.forget_mqtt_session(f"gaitflow-{names.run}")
        if not args.keep:
            await cleanup(names)
    return rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/soak.py", description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--rate", type=float, default=1000.0, help="samples per second, in total")
    ap.add_argument("--devices", type=int, default=10, help="simulated insoles at once")
    ap.add_argument("--batch-rows", type=int, default=100, help="samples per MQTT message")
    ap.add_argument("--recordings", default=",".join(DEFAULT_RECORDINGS),
                    help="gaitpdb recording ids to loop over")
    ap.add_argument("--model", help="model directory (default: train a small one)")
    ap.add_argument("--report-every", type=int, default=30, help="seconds between lines")
    ap.add_argument("--finish-timeout", type=float, default=900.0,
                    help="seconds to wait for the last diagnoses after the load")
    ap.add_argument("--keep", action="store_true", help="keep what the run stored")
    a = ap.parse_args(argv)
    if a.minutes <= 0 or a.rate <= 0 or a.devices < 1 or a.batch_rows < 1:
        ap.error("--minutes, --rate, --devices and --batch-rows must be positive")
    if not os.environ.get("GAITPDB_DIR"):
        ap.error("GAITPDB_DIR is not set")
    return asyncio.run(soak(a))


if __name__ == "__main__":
    raise SystemExit(main())
