"""A complete processor plugin: split rows on a threshold, reject batches without the column.

Run it: ``python -m pipeline.examples.threshold``.
"""
from __future__ import annotations

import asyncio
import dataclasses
from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import Batch, Processor, Reject, Runtime, configure_logging, setting


@dataclasses.dataclass(frozen=True)
class ThresholdSettings:
    column: str = setting("value", doc="numeric column to test")
    limit: float = setting(100.0, doc="rows above this go to output 'high'")


class Threshold(Processor):
    """Rows <= limit go to "default", rows above it to "high"."""

    Settings: ClassVar[type] = ThresholdSettings
    optional_outputs = ("high",)

    async def process(self, batch: Batch) -> pa.Table | pa.RecordBatch:
        s = self.settings
        if s.column not in batch.schema.names:
            raise Reject(f"no column {s.column!r}")  # poison: straight to dead letter
        high = pc.greater(batch.data.column(s.column), s.limit)
        await self.emit(batch.data.filter(high), output="high")
        return batch.data.filter(pc.invert(high))


SETTINGS = {
    "runtime": {"admin_enabled": False},
    "dead_letter": {"target": "dlq"},
    "handlers": {
        "sensors": {"type": "memory_source", "count": 1000, "batch_size": 100,
                    "outputs": ["split"]},
        "split": {"type": "pipeline.examples.threshold:Threshold", "limit": 400.0,
                  "outputs": {"default": ["low"], "high": ["high"]}},
        "low": {"type": "memory_sink"},
        "high": {"type": "log_sink", "show_rows": 1},
        "dlq": {"type": "memory_sink"},
    },
}


async def main() -> None:
    configure_logging("info")
    runtime = Runtime.from_dict(SETTINGS, file="threshold example")
    print(runtime.graph.render_text())
    report = await runtime.run()
    low = runtime.handlers["low"]
    print(f"ok={report.ok} low rows={low.row_count} "  # type: ignore[attr-defined]
          f"acknowledged={len(runtime.handlers['sensors'].committed)} batches")  # type: ignore[attr-defined]


if __name__ == "__main__":
    asyncio.run(main())
