"""mongo_sink on the real FerretDB of the local stack (MongoDB wire protocol, port 27017).

Each test uses its own database (``gaitflow_it_<random>``), dropped at the end.
"""
from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pyarrow as pa
import pytest
from pymongo import AsyncMongoClient
from stores_support import FeedSource, TcpProxy, diagnoses, feed, pipeline_doc, wait_for

from pipeline import Runtime, StartError

pytestmark = pytest.mark.integration

FAST_RETRY = {"max_attempts": 2, "backoff": 0.05, "max_backoff": 0.1, "jitter": 0.0}


@pytest.fixture
async def mongo(stack_service: Any) -> AsyncIterator[tuple[AsyncMongoClient[Any], str, str]]:
    """``(client, uri, database)``: a unique database, dropped afterwards."""
    uri = stack_service("ferretdb").address()
    client: AsyncMongoClient[Any] = AsyncMongoClient(uri, serverSelectionTimeoutMS=5000,
                                                     tz_aware=True)
    database = f"gaitflow_it_{uuid.uuid4().hex[:10]}"
    try:
        yield client, uri, database
    finally:
        await client.drop_database(database)
        await client.close()


def sink(uri: str, database: str, **extra: Any) -> dict[str, Any]:
    return {"type": "mongo_sink", "url": uri, "database": database, "collection": "diagnoses",
            "retry_policy": FAST_RETRY, "connect_timeout": 1.0, **extra}


async def test_upsert_twice_gives_one_document_per_key(mongo: Any) -> None:
    client, uri, database = mongo
    rows = diagnoses(5)
    second = diagnoses(5, version="v2")           # same keys, newer model
    rt = Runtime.from_dict(pipeline_doc({
        "src": {"type": "memory_source", "rows": rows + second, "batch_size": 5,
                "key": "recording", "outputs": ["mongo"]},
        "mongo": sink(uri, database),
    }))
    report = await rt.run()
    assert report.ok, report.errors
    assert rt.handlers["dlq"].row_count == 0  # type: ignore[attr-defined]
    assert len(rt.handlers["src"].committed) == 2  # type: ignore[attr-defined]
    coll = client[database]["diagnoses"]
    assert await coll.count_documents({}) == 5
    doc = await coll.find_one({"_id": "GaPt03_01"})
    assert doc is not None
    assert doc["recording"] == "GaPt03_01"
    assert doc["model_version"] == "v2"
    assert doc["window_probabilities"] == [0.25, 0.5, 0.75]
    assert doc["n_windows"] == 3
    # an Arrow timestamp[us, UTC] is a BSON date (millisecond precision)
    assert doc["diagnosed_at"] == dt.datetime(2026, 12, 4, 12, 30, 18, 123000, tzinfo=dt.UTC)
    indexes = await coll.index_information()
    assert {"label_1", "model_version_1", "diagnosed_at_-1"} <= set(indexes)
    assert indexes["diagnosed_at_-1"]["key"] == [("diagnosed_at", -1)]


@pytest.mark.parametrize("write_mode", ["auto", "upsert"])  # insert first / update commands
async def test_partial_failure_dead_letters_only_the_bad_rows(mongo: Any, write_mode: str,
                                                              ) -> None:
    client, uri, database = mongo
    rows = diagnoses(6)
    for i, row in enumerate(rows):
        row["patient"] = f"P{i}"
    rows[4]["patient"] = "P1"                     # violates the unique index on patient
    rows[2]["probability"] = float("nan")         # FerretDB cannot store NaN
    rows.append({**diagnoses(1, first=9)[0], "patient": "P9", "recording": None})  # no key
    rt = Runtime.from_dict(pipeline_doc({
        "src": {"type": "memory_source", "rows": rows, "batch_size": 10, "key": "recording",
                "outputs": ["mongo"]},
        "mongo": sink(uri, database, write_mode=write_mode,
                      indexes=[{"keys": ["patient"], "unique": True}]),
    }))
    report = await rt.run()
    assert report.ok, report.errors
    coll = client[database]["diagnoses"]
    stored = sorted([d["_id"] async for d in coll.find({}, {"_id": 1})])
    assert stored == ["GaPt00_01", "GaPt01_01", "GaPt03_01", "GaPt05_01"]
    dead = rt.handlers["dlq"].table().to_pylist()  # type: ignore[attr-defined]
    by_key = {d["key"]: d for d in dead}
    assert set(by_key) == {"GaPt04_01", "GaPt02_01", None}
    assert "duplicate key" in by_key["GaPt04_01"]["reason"]
    assert "code 11000" in by_key["GaPt04_01"]["reason"]
    assert '"recording": "GaPt04_01"' in by_key["GaPt04_01"]["payload"]
    assert "NaN" in by_key["GaPt02_01"]["reason"]
    assert "null" in by_key[None]["reason"]
    assert all(d["handler"] == "mongo" for d in dead)
    assert len(rt.handlers["src"].committed) == 1  # type: ignore[attr-defined]


async def test_existing_index_with_other_definition_fails_start(mongo: Any) -> None:
    client, uri, database = mongo
    await client[database]["diagnoses"].create_index([("label", 1)], name="label_1",
                                                     unique=True)
    rt = Runtime.from_dict(pipeline_doc({
        "src": {"type": "memory_source", "rows": diagnoses(1), "outputs": ["mongo"]},
        "mongo": sink(uri, database),
    }))
    with pytest.raises(StartError, match=r"index 'label_1' .* exists with keys"):
        await rt.run()


async def test_outage_retries_then_dead_letters_and_recovers(mongo: Any) -> None:
    client, uri, database = mongo
    assert FeedSource  # the runtime loads it as stores_support:FeedSource
    async with TcpProxy("127.0.0.1", int(uri.rsplit(":", 1)[1].strip("/"))) as proxy:
        doc = pipeline_doc({
            "src": {"type": "stores_support:FeedSource", "outputs": ["mongo"]},
            "mongo": {**sink(f"mongodb://127.0.0.1:{proxy.port}/", database),
                      "health_interval": 0.1,
                      "retry": {"max_attempts": 2, "backoff": 0.05, "jitter": 0.0}},
        })
        async with Runtime.from_dict(doc) as rt:
            mongo_sink, dlq = rt.handlers["mongo"], rt.handlers["dlq"]
            feed("src", diagnoses(2))
            await wait_for(lambda: len(rt.handlers["src"].committed) == 1,  # type: ignore[attr-defined]
                           what="first batch committed")
            await proxy.cut()                                    # the outage
            feed("src", diagnoses(3, first=10))
            await wait_for(lambda: dlq.row_count == 3, what="rows dead-lettered")  # type: ignore[attr-defined]
            connected, detail = mongo_sink.health()
            assert not connected and "unreachable" in detail
            assert not rt.readiness()[0]
            reasons = {r["reason"] for r in dlq.table().to_pylist()}  # type: ignore[attr-defined]
            assert all("failed after 2 attempts" in r for r in reasons), reasons
            await proxy.restore()                                # the server is back
            await wait_for(lambda: mongo_sink.health()[0], what="reconnected")
            assert rt.readiness()[0]
            feed("src", diagnoses(2, first=20))
            await wait_for(lambda: len(rt.handlers["src"].committed) == 3,  # type: ignore[attr-defined]
                           what="third batch committed")
    coll = client[database]["diagnoses"]
    assert sorted([d["_id"] async for d in coll.find({}, {"_id": 1})]) == [
        "GaPt00_01", "GaPt01_01", "GaPt20_01", "GaPt21_01"]
    assert rt.report is not None and rt.report.ok, rt.report


def test_arrow_batches_convert_column_types() -> None:
    # guard for the fixtures above: the rows really carry Arrow timestamps and lists
    table = pa.Table.from_pylist(diagnoses(1))
    assert table.schema.field("diagnosed_at").type == pa.timestamp("us", tz="UTC")
    assert pa.types.is_list(table.schema.field("window_probabilities").type)
