"""mongo_sink and es_sink throughput: documents/s upserted, beside one request per document.

    python bench/stores.py                               # 5000 diagnoses, batches of 1..1000
    python bench/stores.py --docs 20000 --batch-sizes 100,1000,5000 --stores es
    python bench/stores.py --naive-docs 200 --overwrite-docs 100

Needs FerretDB on 127.0.0.1:27017 and Elasticsearch on 127.0.0.1:9200
(``python -m stack up ferretdb elasticsearch``). Documents are diagnoses
(handlers/README.md §5: recording, probability, label, model_version, n_windows,
window_probabilities of 20 floats, diagnosed_at), one per recording key.

Figures, in the same run, on a database / index of its own (dropped at the end):

sink, batch N
    the pipeline path: a source emits batches of N rows into the sink, each batch
    size into a collection / index of its own (new keys); documents/s from the
    first emit to the last upstream acknowledgement (every document written and
    acknowledged by the server).
overwrite
    ``--overwrite-docs`` of those keys written again (a replay), at the largest
    batch size, into the collection / index already holding ``--docs`` documents.
    On FerretDB 1.24 each overwrite scans the collection (see mongo_sink's notes).
naive
    one request per document, one after the other: ``replace_one(..., upsert=True)``
    with PyMongo, ``index(id=...)`` with the Elasticsearch client, on ``--naive-docs``
    new keys.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
import time
import uuid
from pathlib import Path
from typing import Any, ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import pyarrow as pa

from pipeline import NoSettings, Runtime, Source
from pipeline.log import configure_logging

MONGO_URL = "mongodb://127.0.0.1:27017/"
ES_URL = "http://127.0.0.1:9200"

_TABLE: pa.Table | None = None
_BATCH = 100


def diagnoses(n: int) -> pa.Table:
    rng = np.random.default_rng(7)
    p = rng.random(n)
    at = dt.datetime(2026, 12, 4, 12, tzinfo=dt.UTC)
    return pa.table({
        "recording": [f"Bench{i:07d}_01" for i in range(n)],
        "probability": p,
        "label": np.where(p >= 0.5, "parkinson", "control"),
        "model_version": ["bench-1"] * n,
        "n_windows": np.full(n, 20, dtype=np.int64),
        "window_probabilities": pa.array(list(rng.random((n, 20))), pa.list_(pa.float64())),
        "diagnosed_at": pa.array([at + dt.timedelta(seconds=i) for i in range(n)],
                                 pa.timestamp("us", tz="UTC")),
    })


class TableSource(Source):
    """Emits the bench table in slices; remembers when it began and the last commit."""

    Settings: ClassVar[type] = NoSettings
    first_emit = 0.0
    last_commit = 0.0

    async def run(self) -> None:
        assert _TABLE is not None
        TableSource.first_emit = time.perf_counter()
        for first in range(0, _TABLE.num_rows, _BATCH):
            await self.emit(_TABLE.slice(first, _BATCH), key="recording", token=first)

    async def commit(self, tokens: list[Any]) -> None:
        TableSource.last_commit = time.perf_counter()


async def through_sink(sink: dict[str, Any], table: pa.Table, batch: int) -> float:
    global _TABLE, _BATCH
    _TABLE, _BATCH = table, batch
    rt = Runtime.from_dict({
        "runtime": {"admin_enabled": False, "drain_timeout": 600.0},
        "dead_letter": {"target": "dlq"},
        "handlers": {
            "src": {"type": f"{TableSource.__module__}:TableSource", "outputs": ["sink"]},
            "sink": {**sink, "on_failure": "stop"},
            "dlq": {"type": "memory_sink"},
        }}, file="bench/stores.py")
    report = await rt.run()
    if not report.ok or rt.handlers["dlq"].row_count:  # type: ignore[attr-defined]
        raise SystemExit(f"bench run failed: {report.errors}")
    return table.num_rows / (TableSource.last_commit - TableSource.first_emit)


async def naive_mongo(database: str, docs: list[dict[str, Any]]) -> float:
    from pymongo import AsyncMongoClient

    client: AsyncMongoClient[Any] = AsyncMongoClient(MONGO_URL, tz_aware=True)
    try:
        coll = client[database]["naive"]
        t0 = time.perf_counter()
        for doc in docs:
            await coll.replace_one({"_id": doc["recording"]}, doc, upsert=True)
        return len(docs) / (time.perf_counter() - t0)
    finally:
        await client.drop_database(database)
        await client.close()


async def naive_es(index: str, docs: list[dict[str, Any]]) -> float:
    from elasticsearch import AsyncElasticsearch

    client = AsyncElasticsearch(ES_URL, request_timeout=60)
    try:
        t0 = time.perf_counter()
        for doc in docs:
            await client.index(index=index, id=doc["recording"], document=doc)
        return len(docs) / (time.perf_counter() - t0)
    finally:
        await client.options(ignore_status=404).indices.delete(index=index)
        await client.close()


async def drop(store: str, name: str) -> None:
    if store == "mongo":
        from pymongo import AsyncMongoClient

        client: AsyncMongoClient[Any] = AsyncMongoClient(MONGO_URL)
        await client.drop_database(name)
        await client.close()
    else:
        from elasticsearch import AsyncElasticsearch

        es = AsyncElasticsearch(ES_URL)
        await es.options(ignore_status=404).indices.delete(index=name)
        await es.close()


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=5000, help="documents per sink run")
    ap.add_argument("--naive-docs", type=int, default=500,
                    help="documents for the one-request-per-document writer")
    ap.add_argument("--overwrite-docs", type=int, default=200,
                    help="documents written again into a full collection / index")
    ap.add_argument("--batch-sizes", default="1,10,100,1000", help="rows per batch")
    ap.add_argument("--stores", default="mongo,es", help="mongo, es or both")
    args = ap.parse_args()
    configure_logging("warning")
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    table = diagnoses(args.docs)
    naive_docs = diagnoses(args.naive_docs).to_pylist()
    run_id = uuid.uuid4().hex[:8]
    print(f"{args.docs} diagnoses per sink run, {args.overwrite_docs} overwritten, "
          f"{args.naive_docs} for the naive writer; loopback; run {run_id}", flush=True)
    print(f"{'store':<14}{'path':<22}{'documents/s':>12}")
    for store in args.stores.split(","):
        if store == "mongo":
            name = f"gaitflow_bench_{run_id}"
            sink = {"type": "mongo_sink", "url": MONGO_URL, "database": name,
                    "bulk_size": 1000}
            where, label = "collection", "mongo_sink"
        elif store == "es":
            name = f"gaitflow-bench-{run_id}"
            sink = {"type": "es_sink", "hosts": [ES_URL], "bulk_size": 1000,
                    "index_settings": {"number_of_replicas": 0}}
            where, label = "index", "es_sink"
        else:
            raise SystemExit(f"unknown store {store!r}: mongo or es")
        try:
            for size in sizes:
                target = f"{name if store == 'es' else 'diagnoses'}-b{size}"
                rate = await through_sink({**sink, where: target}, table, size)
                print(f"{label:<14}{f'sink, batch {size}':<22}{rate:>12,.0f}", flush=True)
            again = table.slice(0, args.overwrite_docs).set_column(
                3, "model_version", pa.array(["bench-2"] * min(args.overwrite_docs, args.docs)))
            rate = await through_sink({**sink, where: target}, again, sizes[-1])
            print(f"{label:<14}{f'overwrite, batch {sizes[-1]}':<22}{rate:>12,.0f}",
                  flush=True)
        finally:
            await drop(store, name if store == "mongo" else f"{name}-b*")
        naive = await (naive_mongo(name + "_naive", naive_docs) if store == "mongo"
                       else naive_es(name + "-naive", naive_docs))
        print(f"{label:<14}{'naive, 1 req/doc':<22}{naive:>12,.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
