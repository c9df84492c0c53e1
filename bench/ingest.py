"""Ingest throughput: gaitpdb replayed over MQTT into the lake (HDFS) and Kafka.

    python bench/ingest.py                        # 1-row and 100-row messages, ~2 min
    python bench/ingest.py --samples 40000 --recordings 16 --no-kafka
    python bench/ingest.py --scenarios ceiling1,pipeline1

Needs Mosquitto, HDFS and Kafka of the local stack (``python -m stack up``) and
GAITPDB_DIR. Every figure comes from the same run, on the same messages:

ceiling
    a bare aiomqtt subscriber (QoS 1, automatic PUBACK) that only counts messages:
    what one Python process can take from the broker at all.
pipeline
    ``mqtt_source`` → ``lake_sink`` (Parquet on HDFS via WebHDFS) + ``kafka_sink``
    (+ ``events`` → ``lake_sink``), PUBACK only after both committed. Timed from the
    first message read to the last one acknowledged; the lake is read back and
    checked (every sample exactly once) after each run.
tutorial
    the original design on ``--tutorial-messages`` per-sample messages: decode each
    JSON message, append one line to a local CSV file, upload the whole file to
    HDFS (WebHDFS CREATE, overwrite) after every message; consumed live while the
    publisher sends.

For the ceiling and the pipeline, the messages are first published into the
consumer's persistent session (the broker queues them, as for a pipeline that
was down), then the consumer connects and drains them: the figure is the
consumer's, not the publisher's (whose own rate is printed beside it).

Messages: "1-row" is the tutorial's per-sample JSON (``{"Patient", "time", "L1".."R"}``,
the first ``--samples`` samples taken evenly from the recordings, at most 6000 per
recording so that ``round(time * 100)`` stays unique, see mqtt_source); "100-row" is
the batch payload (``{"device", "recording", "seq", "rows"}``) of ``--recordings``
whole recordings. Each recording ends with its end marker. A separate process
publishes (paho, QoS 1, 1000 in flight) as fast as the broker takes it.

Everything the bench creates (MQTT sessions, HDFS directory, Kafka topic) is
removed at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from stack.progress import ProgressLine

MAX_SAMPLES_PER_RECORDING = 6000


# --------------------------------------------------------------------------- messages
def load_messages(fmt: str, samples: int, recordings: int, tutorial: int,
                  topic: str) -> list[tuple[str, bytes]]:
    """(topic, payload) in publish order; ``{recording}`` in ``topic`` is filled in."""
    from ml.data import list_recordings, load_recording
    from stack.replay import encode_messages, end_message

    table = list_recordings(None)
    out: list[tuple[str, bytes]] = []
    if fmt == "batch":
        for row in table.head(recordings).itertuples(index=False):
            data = load_recording(row.path)
            t = topic.format(recording=row.id)
            out += [(t, p) for _, p in encode_messages(row.id, data, "batch", 100)]
            out.append((t, end_message(row.id, len(data))))
        return out
    wanted = tutorial if fmt == "tutorial" else samples
    n_recs = max(1, -(-wanted // MAX_SAMPLES_PER_RECORDING))
    per = -(-wanted // n_recs)
    for row in table.head(n_recs).itertuples(index=False):
        data = load_recording(row.path)[:per]
        t = topic.format(recording=row.id)
        out += [(t, p) for _, p in encode_messages(row.id, data, "sample", 1)]
        if fmt != "tutorial":
            out.append((t, end_message(row.id, len(data))))
    return out[:wanted] if fmt == "tutorial" else out


def rows_of(messages: list[tuple[str, bytes]]) -> int:
    n = 0
    for _, p in messages:
        obj = json.loads(p)
        n += len(obj["rows"]) if "rows" in obj else (0 if "end" in obj else 1)
    return n


def publisher_main(args: argparse.Namespace) -> int:
    """The child process: publish every message with QoS 1, pipelined, and report."""
    import paho.mqtt.client as mqtt

    messages = load_messages(args.fmt, args.samples, args.recordings, args.tutorial_messages,
                             args.topic)
    print(f"total {len(messages)}", flush=True)   # the consumer waits for this line
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                         client_id=f"bench-pub-{uuid.uuid4().hex[:8]}")
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect(args.host, args.port)
    client.loop_start()
    try:
        t0 = time.perf_counter()
        infos = [client.publish(t, p, qos=1) for t, p in messages]
        for info in infos:
            info.wait_for_publish(timeout=args.timeout)
        seconds = time.perf_counter() - t0
    finally:
        client.disconnect()
        client.loop_stop()
    print(json.dumps({"messages": len(messages), "seconds": seconds}), flush=True)
    return 0


def start_publisher(args: argparse.Namespace, fmt: str, topic: str) -> subprocess.Popen[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--publisher", "--fmt", fmt,
            "--topic", topic, "--host", args.host, "--port", str(args.port),
            "--samples", str(args.samples), "--recordings", str(args.recordings),
            "--tutorial-messages", str(args.tutorial_messages), "--timeout", str(args.timeout)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=ROOT)


def publisher_result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=60)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"messages": 0, "seconds": float("nan")}


# --------------------------------------------------------------------------- results
@dataclass
class Result:
    scenario: str
    messages: int
    rows: int
    seconds: float
    note: str = ""

    def line(self) -> str:
        rate = (lambda n: f"{n / self.seconds:>10,.0f}") if self.seconds > 0 else \
            (lambda n: f"{'-':>10}")
        return (f"{self.scenario:<44} {self.messages:>8,} {self.rows:>9,} {self.seconds:>8.2f} "
                f"{rate(self.messages)} {rate(self.rows)}  {self.note}")


HEADER = (f"{'scenario':<44} {'messages':>8} {'rows':>9} {'seconds':>8} {'msgs/s':>10} "
          f"{'rows/s':>10}")


class Progress:
    def __init__(self, label: str, total: int) -> None:
        self.label, self.total = label, total
        self.t0 = time.monotonic()
        self.line = ProgressLine(sys.stderr, tty_every=1.0)

    def show(self, done: int, final: bool = False) -> None:
        rate = done / max(time.monotonic() - self.t0, 1e-9)
        self.line.update(f"  {self.label}: {done:,}/{self.total:,} messages ({rate:,.0f}/s)",
                         final=final)  # fmt: skip


async def wait_for(started: Callable[[], bool], count: Callable[[], int], total: int,
                   progress: Progress, timeout: float) -> tuple[float, bool]:
    """Seconds from ``started()`` to ``count() >= total``; False when ``timeout`` hit first."""
    deadline = time.monotonic() + timeout
    first = None
    while True:
        if first is None and started():
            first = time.monotonic()
        done = count()
        progress.show(done)
        if done >= total:
            progress.show(done, final=True)
            return time.monotonic() - (first or time.monotonic()), True
        if time.monotonic() > deadline:
            progress.show(done, final=True)
            return time.monotonic() - (first or deadline), False
        await asyncio.sleep(0.005)


def session_options(args: argparse.Namespace) -> dict[str, Any]:
    """MQTT 5, persistent session, Receive Maximum = the pipeline's in-flight window."""
    import aiomqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 600
    props.ReceiveMaximum = min(args.inflight, 65535)
    return {"protocol": aiomqtt.ProtocolVersion.V5, "clean_start": False, "properties": props}


async def preload(args: argparse.Namespace, fmt: str, run: str,
                  client_id: str) -> tuple[int, dict[str, Any]]:
    """Make ``client_id``'s persistent session, then publish every message into it."""
    import aiomqtt

    async with aiomqtt.Client(args.host, args.port, identifier=client_id,
                              **session_options(args)) as client:
        await client.subscribe(f"bench/{run}/+", qos=1)
    proc = start_publisher(args, fmt, f"bench/{run}/{{recording}}")
    total = await asyncio.to_thread(_first_line_total, proc)
    sys.stderr.write(f"  publishing {total:,} messages into the session...\n")
    pub = await asyncio.to_thread(publisher_result, proc)
    return total, pub


async def forget_session(args: argparse.Namespace, client_id: str) -> None:
    import aiomqtt

    async with aiomqtt.Client(args.host, args.port, identifier=client_id,
                              protocol=aiomqtt.ProtocolVersion.V5, clean_start=True):
        pass


def _pub_note(pub: dict[str, Any]) -> str:
    return f"publisher {pub['messages'] / pub['seconds']:,.0f} msgs/s"


# --------------------------------------------------------------------------- scenarios
async def ceiling(args: argparse.Namespace, fmt: str, label: str) -> Result:
    """A bare aiomqtt subscriber that does nothing with the messages (automatic PUBACK)."""
    import aiomqtt

    run = uuid.uuid4().hex[:8]
    client_id = f"bench-ceiling-{run}"
    total, pub = await preload(args, fmt, run, client_id)
    count = 0
    try:
        async with aiomqtt.Client(args.host, args.port, identifier=client_id,
                                  **session_options(args)) as client:
            async def consume() -> None:
                nonlocal count
                async for _ in client.messages:
                    count += 1

            task = asyncio.create_task(consume())
            try:
                seconds, ok = await wait_for(lambda: count > 0, lambda: count, total,
                                             Progress(label, total), args.timeout)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
    finally:
        await forget_session(args, client_id)
    return Result(label, total, args.rows_cache.get(fmt, 0), seconds,
                  _pub_note(pub) + ("" if ok else " TIMEOUT"))


def _first_line_total(proc: subprocess.Popen[str]) -> int:
    """The publisher's message count, announced before it publishes."""
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("the publisher exited before announcing its messages")
        if line.startswith("total "):
            return int(line.split()[1])


async def pipeline(args: argparse.Namespace, fmt: str, label: str) -> Result:
    from handlers.webhdfs import WebHdfs
    from pipeline import Runtime

    run = uuid.uuid4().hex[:8]
    root = f"/tmp/gaitflow-bench/{run}"
    client_id = f"bench-pipeline-{run}"
    kafka_topic = f"bench.samples.{run}"
    targets = ["lake"] + ([] if args.no_kafka else ["kafka"])
    handlers: dict[str, Any] = {
        "mqtt": {"type": "mqtt_source", "host": args.host, "port": args.port,
                 "topics": [f"bench/{run}/+"], "client_id": client_id, "session_expiry": 600,
                 "max_inflight": args.inflight, "batch_rows": 2000, "linger_ms": 20,
                 "outputs": {"default": targets, "events": ["lake"]}},
        "lake": {"type": "lake_sink", "url": args.webhdfs, "root": root, "roll_rows": 10_000,
                 "roll_interval": 1.0, "end_timeout": 5.0},
        "dlq": {"type": "memory_sink"},
    }
    if not args.no_kafka:
        handlers["kafka"] = {"type": "kafka_sink", "bootstrap_servers": [args.kafka],
                             "topic": kafka_topic, "partitions": 3}
    try:
        total, pub = await preload(args, fmt, run, client_id)
        rt = Runtime.from_dict({"runtime": {"admin_enabled": False, "drain_timeout": 60},
                                "dead_letter": {"target": "dlq"}, "handlers": handlers})
        async with rt:
            seconds, ok = await wait_for(
                lambda: rt.metrics.value("mqtt_messages", "mqtt") > 0,
                lambda: int(rt.metrics.value("mqtt_acked_messages", "mqtt")), total,
                Progress(label, total), args.timeout)
        async with WebHdfs(args.webhdfs) as fs:
            stored, dups = await count_lake(fs, root)
        note = (f"lake {stored:,} rows, {dups} duplicates; dead letters "
                f"{rt.handlers['dlq'].row_count}; " + _pub_note(pub)
                + ("" if ok else " TIMEOUT"))
        return Result(label, total, args.rows_cache.get(fmt, 0), seconds, note)
    finally:
        await cleanup(args, root, client_id, None if args.no_kafka else kafka_topic)


async def count_lake(fs: Any, root: str) -> tuple[int, int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from handlers.webhdfs import NotFound

    seen: set[tuple[str, int]] = set()
    rows = 0

    async def walk(path: str) -> None:
        nonlocal rows
        try:
            entries = await fs.list_status(path)
        except NotFound:
            return
        for st in entries:
            if st.is_dir and st.name != "_tmp":
                await walk(st.path)
            elif st.name.endswith(".parquet"):
                t = pq.read_table(pa.BufferReader(await fs.open(st.path)),
                                  columns=["recording", "seq"])
                rows += t.num_rows
                seen.update(zip(t.column("recording").to_pylist(), t.column("seq").to_pylist(),
                                strict=True))

    await walk(root)
    return rows, rows - len(seen)


async def tutorial(args: argparse.Namespace, label: str) -> Result:
    """The original design: per-sample JSON, local CSV append, whole-file upload each time."""
    import tempfile

    import aiomqtt

    from handlers.webhdfs import WebHdfs

    run = uuid.uuid4().hex[:8]
    topic = f"bench/{run}/{{recording}}"
    hdfs_path = f"/tmp/gaitflow-bench/{run}/tutorial.csv"
    count = 0
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "samples.csv"
        async with WebHdfs(args.webhdfs) as fs, \
                aiomqtt.Client(args.host, args.port, identifier=f"bench-tut-{run}") as client:
            await client.subscribe(f"bench/{run}/+", qos=1)
            proc = start_publisher(args, "tutorial", topic)

            async def consume() -> None:
                nonlocal count
                async for msg in client.messages:
                    sample = json.loads(msg.payload)
                    with local.open("a") as f:     # one CSV line per message
                        f.write(",".join(str(v) for v in sample.values()) + "\n")
                    await fs.create(hdfs_path, local.read_bytes(), overwrite=True)
                    count += 1

            task = asyncio.create_task(consume())
            try:
                total = await asyncio.to_thread(_first_line_total, proc)
                seconds, ok = await wait_for(lambda: count > 0, lambda: count, total,
                                             Progress(label, total), args.timeout)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                publisher_result(proc)
                await fs.delete(f"/tmp/gaitflow-bench/{run}", recursive=True)
    return Result(label, total, total, seconds, "" if ok else "TIMEOUT")


async def cleanup(args: argparse.Namespace, root: str, client_id: str,
                  kafka_topic: str | None) -> None:
    from handlers.webhdfs import WebHdfs

    await forget_session(args, client_id)
    async with WebHdfs(args.webhdfs) as fs:
        await fs.delete(root, recursive=True)
    if kafka_topic:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=args.kafka)
        await admin.start()
        try:
            await admin.delete_topics([kafka_topic])
        finally:
            await admin.close()


# --------------------------------------------------------------------------- main
async def bench(args: argparse.Namespace) -> None:
    from pipeline.log import configure_logging

    configure_logging("warning")
    print("loading messages...", file=sys.stderr)
    args.rows_cache = {fmt: rows_of(load_messages(fmt, args.samples, args.recordings,
                                                  args.tutorial_messages, "t/{recording}"))
                       for fmt in ("sample", "batch")}
    results: list[Result] = []
    plan: list[tuple[str, str, Callable[..., Any], tuple[Any, ...]]] = [
        ("ceiling1", "ceiling: bare aiomqtt subscriber, 1-row", ceiling, ("sample",)),
        ("pipeline1", "pipeline: MQTT → lake + Kafka, 1-row", pipeline, ("sample",)),
        ("ceiling100", "ceiling: bare aiomqtt subscriber, 100-row", ceiling, ("batch",)),
        ("pipeline100", "pipeline: MQTT → lake + Kafka, 100-row", pipeline, ("batch",)),
        ("tutorial", f"tutorial: CSV + whole-file upload, {args.tutorial_messages} msgs",
         tutorial, ()),
    ]
    wanted = set(args.scenarios.split(","))
    unknown = wanted - {key for key, *_ in plan}
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    for key, label, fn, extra in plan:
        if key not in wanted:
            continue
        if args.no_kafka:
            label = label.replace(" + Kafka", "")
        print(label, file=sys.stderr)
        results.append(await fn(args, *extra, label))
    print()
    print(HEADER)
    for r in results:
        print(r.line())
    sink = "lake only" if args.no_kafka else "lake + Kafka"
    print(f"\npipeline = mqtt_source → {sink}, PUBACK after commit; max_inflight "
          f"{args.inflight}; lake roll_rows 10000, roll_interval 1 s; "
          f"{os.cpu_count()} cores, everything on this machine.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/ingest.py",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--webhdfs", default="http://127.0.0.1:9870")
    ap.add_argument("--kafka", default="127.0.0.1:9092")
    ap.add_argument("--no-kafka", action="store_true", help="lake only")
    ap.add_argument("--samples", type=int, default=30_000, help="1-row messages")
    ap.add_argument("--recordings", type=int, default=12,
                    help="whole recordings sent as 100-row messages")
    ap.add_argument("--tutorial-messages", type=int, default=300)
    ap.add_argument("--inflight", type=int, default=20_000, help="mqtt_source max_inflight")
    ap.add_argument("--timeout", type=float, default=240, help="seconds per scenario at most")
    ap.add_argument("--scenarios", default="ceiling1,pipeline1,ceiling100,pipeline100,tutorial",
                    help="which to run (default: all), comma-separated")
    ap.add_argument("--publisher", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--fmt", default="sample", help=argparse.SUPPRESS)
    ap.add_argument("--topic", default="bench/{recording}", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not os.environ.get("GAITPDB_DIR"):
        ap.error("set GAITPDB_DIR to the gaitpdb directory")
    if args.publisher:
        return publisher_main(args)
    asyncio.run(bench(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
