"""A source handler for the processing-tier outage tests (``type = "feature_replay:FeatureReplay"``).

It stands where ``spark_job`` stands in settings.toml's pipeline and emits what the
Spark job would emit for a recording that ended (handlers/README.md §4: one batch
per recording, key ``window_key``, ``meta`` ``recording``/``final``/``job_id``),
computed with the same ``ml.features.features_frame`` from the first ``seconds``
of gaitpdb recordings. So Cassandra, the model server, MongoDB and Elasticsearch
can be stopped while real feature batches flow, without a Spark job (minutes on
two cores) in every test.

It starts emitting when ``start_file`` exists (the test stops a service first),
one recording every ``interval`` seconds, then stays up (a pipeline whose sources
all ended would shut down). Every acknowledged batch is appended to ``ack_log``.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline import Source, setting


@dataclasses.dataclass(frozen=True)
class FeatureReplaySettings:
    recordings: list[str] = setting(doc="gaitpdb recording ids (read from $GAITPDB_DIR)")
    start_file: Path = setting(doc="emit once this file exists")
    ack_log: Path = setting(doc="one JSON line per acknowledged batch")
    seconds: float = setting(20.0, doc="seconds of each recording", min=10)
    interval: float = setting(1.0, doc="seconds between two recordings", min=0)


def feature_batch(recording: str, rows: np.ndarray) -> pa.Table:
    """What spark_job emits for one ended recording (handlers/README.md §4)."""
    from ml.features import COLUMNS, DEFAULT_WINDOW_S, FEATURE_NAMES, FS, features_frame

    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    frame.insert(0, "seq", np.arange(len(rows), dtype=np.int64))
    frame.insert(0, "recording_id", recording)
    f = features_frame(frame)
    window_rows = round(DEFAULT_WINDOW_S * FS)
    out = pd.DataFrame({
        "recording": f["recording_id"].astype(str),
        "window": f["window"].astype("int64"),
        "window_key": f["key"].astype(str),
        "seq_first": f["start_seq"].astype("int64"),
        "seq_last": (f["start_seq"] + window_rows - 1).astype("int64"),
    })
    for name in FEATURE_NAMES:
        out[name] = f[name].astype("float64")
    return pa.Table.from_pandas(out, preserve_index=False)


class FeatureReplay(Source):
    """Emits one final feature batch per recording, paced; never ends by itself."""

    Settings: ClassVar[type] = FeatureReplaySettings
    settings: FeatureReplaySettings

    def __init__(self, name: str, settings: Any = None) -> None:
        super().__init__(name, settings)
        self._log: Any = None

    async def start(self) -> None:
        self._log = await asyncio.to_thread(open, self.settings.ack_log, "a", encoding="utf-8")

    async def run(self) -> None:
        import sys

        s = self.settings
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import reliability_support as rs

        recs = await asyncio.to_thread(rs.load_recordings, s.recordings, s.seconds)
        batches = {rec: await asyncio.to_thread(feature_batch, rec, rows)
                   for rec, rows in recs.items()}
        while not s.start_file.exists():
            await asyncio.sleep(0.1)
        for rec, table in batches.items():
            await self.emit(table, key="window_key", token=rec,
                            meta={"recording": rec, "final": True, "job_id": "feature-replay"})
            self.log.info("feature_replay.emitted", recording=rec, windows=table.num_rows)
            await asyncio.sleep(s.interval)
        await asyncio.Event().wait()

    async def commit(self, tokens: list[Any]) -> None:
        for rec in tokens:
            self._log.write(json.dumps({"recording": rec}) + "\n")
        self._log.flush()

    async def close(self) -> None:
        if self._log is not None:
            self._log.close()
