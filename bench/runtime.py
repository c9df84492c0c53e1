"""Runtime throughput: rows/s through source -> processor -> two sinks, in memory.

    python bench/runtime.py                    # batch sizes 1, 100, 1000, uvloop if installed
    python bench/runtime.py --loop asyncio --seconds 2

Every row is acknowledged end to end (the source's commit hook runs), so the
figure includes channels, fan-out, ack tracking and in-order commits.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import Runtime
from pipeline.log import configure_logging


def settings(rows: int, batch_size: int) -> dict:
    return {
        "runtime": {"admin_enabled": False, "capacity": 16},
        "dead_letter": {"target": "dlq"},
        "handlers": {
            "source": {"type": "memory_source", "count": rows, "batch_size": batch_size,
                       "outputs": ["process"]},
            "process": {"type": "passthrough", "outputs": ["sink_a", "sink_b"]},
            "sink_a": {"type": "memory_sink", "keep": False},
            "sink_b": {"type": "memory_sink", "keep": False},
            "dlq": {"type": "memory_sink"},
        },
    }


async def run_once(rows: int, batch_size: int, progress: bool) -> tuple[float, int]:
    runtime = Runtime.from_dict(settings(rows, batch_size), file="bench")
    sink = runtime.handlers["sink_b"]

    async def report() -> None:
        while True:
            await asyncio.sleep(1.0)
            done = sink.row_count  # type: ignore[attr-defined]
            print(f"    ... {done:>10,} / {rows:,} rows ({100 * done / rows:5.1f}%)", flush=True)

    ticker = asyncio.create_task(report()) if progress else None
    t0 = time.perf_counter()
    result = await runtime.run()
    elapsed = time.perf_counter() - t0
    if ticker is not None:
        ticker.cancel()
    assert result.ok and result.unacked == 0, result
    for name in ("sink_a", "sink_b"):
        assert runtime.handlers[name].row_count == rows  # type: ignore[attr-defined]
    acked = len(runtime.handlers["source"].committed)  # type: ignore[attr-defined]
    return elapsed, acked


async def main(args: argparse.Namespace) -> None:
    loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
    print(f"gaitflow runtime bench: memory_source -> passthrough -> 2 x memory_sink "
          f"(fan-out), acks on; loop={loop}, python {sys.version.split()[0]}")
    await run_once(1000, 10, progress=False)  # warm-up: imports, first Arrow conversions
    results = []
    for batch_size in args.batch_sizes:
        # calibrate on a small run, then size the measured run to about --seconds
        elapsed, _ = await run_once(max(batch_size * 200, 2000), batch_size, progress=False)
        rate = max(batch_size * 200, 2000) / elapsed
        rows = max(batch_size * 10, int(rate * args.seconds) // batch_size * batch_size)
        print(f"  batch size {batch_size:>5}: {rows:,} rows ...", flush=True)
        elapsed, acked = await run_once(rows, batch_size, progress=True)
        results.append((batch_size, rows, elapsed, acked))
        print(f"  batch size {batch_size:>5}: {rows / elapsed:>14,.0f} rows/s   "
              f"{acked / elapsed:>10,.0f} batches/s   ({rows:,} rows in {elapsed:.2f} s)",
              flush=True)
    print("\nsummary (rows/s through source -> processor -> two sinks, every batch acked):")
    for batch_size, rows, elapsed, _ in results:
        print(f"  batch {batch_size:>5}: {rows / elapsed:>14,.0f} rows/s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 100, 1000])
    parser.add_argument("--seconds", type=float, default=3.0, help="target duration per run")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args()
    configure_logging("warning")
    factory = None
    if args.loop == "uvloop":
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            print("uvloop not installed: using asyncio", file=sys.stderr)
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main(args))
