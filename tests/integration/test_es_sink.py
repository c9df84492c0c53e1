"""es_sink on the real Elasticsearch of the local stack (port 9200, no security).

Each test uses its own index (``gaitflow-it-<random>``) and template, deleted at the end.
"""
from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pytest
from elasticsearch import AsyncElasticsearch
from stores_support import FeedSource, TcpProxy, diagnoses, feed, pipeline_doc, wait_for

from pipeline import Runtime, StartError

pytestmark = pytest.mark.integration

FAST_RETRY = {"max_attempts": 2, "backoff": 0.05, "max_backoff": 0.1, "jitter": 0.0}


@pytest.fixture
async def es(stack_service: Any) -> AsyncIterator[tuple[AsyncElasticsearch, str, str]]:
    """``(client, url, index)``: a unique index name; index and template deleted afterwards."""
    url = stack_service("elasticsearch").address()
    client = AsyncElasticsearch(url, request_timeout=30)
    index = f"gaitflow-it-{uuid.uuid4().hex[:10]}"
    try:
        yield client, url, index
    finally:
        await client.options(ignore_status=404).indices.delete(index=f"{index}*")
        await client.options(ignore_status=404).indices.delete_index_template(name=index)
        await client.close()


def sink(url: str, index: str, **extra: Any) -> dict[str, Any]:
    return {"type": "es_sink", "hosts": [url], "index": index, "retry_policy": FAST_RETRY,
            "request_timeout": 5.0, "index_settings": {"number_of_replicas": 0}, **extra}


async def ids_in(client: AsyncElasticsearch, index: str) -> list[str]:
    await client.indices.refresh(index=index)
    found = await client.search(index=index, size=100, source=False)
    return sorted(hit["_id"] for hit in found["hits"]["hits"])


async def test_upsert_twice_gives_one_document_per_key(es: Any) -> None:
    client, url, index = es
    rt = Runtime.from_dict(pipeline_doc({
        "src": {"type": "memory_source", "rows": diagnoses(5) + diagnoses(5, version="v2"),
                "batch_size": 5, "key": "recording", "outputs": ["es"]},
        "es": sink(url, index, refresh="wait_for"),
    }))
    report = await rt.run()
    assert report.ok, report.errors
    assert rt.handlers["dlq"].row_count == 0  # type: ignore[attr-defined]
    assert len(rt.handlers["src"].committed) == 2  # type: ignore[attr-defined]
    assert (await client.count(index=index))["count"] == 5
    doc = (await client.get(index=index, id="GaPt03_01"))["_source"]
    assert doc["model_version"] == "v2"
    assert doc["diagnosed_at"] == "2026-12-04T12:30:18.123000+00:00"
    assert doc["window_probabilities"] == [0.25, 0.5, 0.75]
    # the mapping was created with the index
    props = (await client.indices.get_mapping(index=index))[index]["mappings"]["properties"]
    assert props["recording"]["type"] == "keyword"
    assert props["probability"]["type"] == "float"
    assert props["label"]["type"] == "keyword"
    assert props["model_version"]["type"] == "keyword"
    assert props["diagnosed_at"]["type"] == "date"
    assert props["window_probabilities"]["type"] == "float"
    # the date is a date: a range query finds it
    hits = await client.count(index=index, query={"range": {"diagnosed_at": {
        "gte": "2026-12-04T12:30:17Z", "lt": "2026-12-04T12:30:19Z"}}})
    assert hits["count"] == 2


async def test_partial_failure_dead_letters_only_the_bad_items(es: Any) -> None:
    client, url, index = es
    rows = diagnoses(6)
    for i, row in enumerate(rows):  # as strings: one of them will not parse as a date
        row["diagnosed_at"] = row["diagnosed_at"].isoformat()
    rows[4]["diagnosed_at"] = "yesterday-ish"     # 400 document_parsing_exception
    rows[2]["probability"] = float("nan")         # refused before sending
    rows[1]["recording"] = "x" * 600              # _id longer than 512 bytes: 400
    rt = Runtime.from_dict(pipeline_doc({
        "src": {"type": "memory_source", "rows": rows, "batch_size": 10, "key": "recording",
                "outputs": ["es"]},
        "es": sink(url, index),
    }))
    report = await rt.run()
    assert report.ok, report.errors
    assert await ids_in(client, index) == ["GaPt00_01", "GaPt03_01", "GaPt05_01"]
    dead = {d["key"]: d for d in rt.handlers["dlq"].table().to_pylist()}  # type: ignore[attr-defined]
    assert set(dead) == {"GaPt04_01", "GaPt02_01", "x" * 600}
    assert "(400)" in dead["GaPt04_01"]["reason"]
    assert "failed to parse field [diagnosed_at]" in dead["GaPt04_01"]["reason"]
    assert "yesterday-ish" in dead["GaPt04_01"]["payload"]
    assert "NaN" in dead["GaPt02_01"]["reason"]
    assert "longer than 512 bytes" in dead["x" * 600]["reason"]
    assert len(rt.handlers["src"].committed) == 1  # type: ignore[attr-defined]


async def test_template_mode_puts_a_template_the_index_picks_up(es: Any) -> None:
    client, url, index = es
    rt = Runtime.from_dict(pipeline_doc({
        "src": {"type": "memory_source", "rows": diagnoses(2), "key": "recording",
                "outputs": ["es"]},
        "es": sink(url, index, manage="template", refresh="true"),
    }))
    report = await rt.run()
    assert report.ok, report.errors
    templates = await client.indices.get_index_template(name=index)
    (tpl,) = templates["index_templates"]
    assert tpl["index_template"]["index_patterns"] == [index]
    props = (await client.indices.get_mapping(index=index))[index]["mappings"]["properties"]
    assert props["diagnosed_at"]["type"] == "date"
    assert props["probability"]["type"] == "float"
    assert (await client.count(index=index))["count"] == 2


async def test_existing_index_with_other_types_fails_start(es: Any) -> None:
    client, url, index = es
    await client.indices.create(index=index, mappings={"properties": {
        "probability": {"type": "keyword"}}})
    rt = Runtime.from_dict(pipeline_doc({
        "src": {"type": "memory_source", "rows": diagnoses(1), "outputs": ["es"]},
        "es": sink(url, index),
    }))
    with pytest.raises(StartError, match=r"other field types: probability: keyword"):
        await rt.run()


async def test_outage_retries_then_dead_letters_and_recovers(es: Any) -> None:
    client, url, index = es
    assert FeedSource  # the runtime loads it as stores_support:FeedSource
    target = urlsplit(url)
    async with TcpProxy(target.hostname or "127.0.0.1", target.port or 9200) as proxy:
        doc = pipeline_doc({
            "src": {"type": "stores_support:FeedSource", "outputs": ["es"]},
            "es": {**sink(f"http://127.0.0.1:{proxy.port}", index), "health_interval": 0.1,
                   "retry": {"max_attempts": 2, "backoff": 0.05, "jitter": 0.0}},
        })
        async with Runtime.from_dict(doc) as rt:
            es_sink, dlq = rt.handlers["es"], rt.handlers["dlq"]
            feed("src", diagnoses(2))
            await wait_for(lambda: len(rt.handlers["src"].committed) == 1,  # type: ignore[attr-defined]
                           what="first batch committed")
            await proxy.cut()
            feed("src", diagnoses(3, first=10))
            await wait_for(lambda: dlq.row_count == 3, what="rows dead-lettered")  # type: ignore[attr-defined]
            connected, detail = es_sink.health()
            assert not connected and "unreachable" in detail
            assert not rt.readiness()[0]
            reasons = {r["reason"] for r in dlq.table().to_pylist()}  # type: ignore[attr-defined]
            assert all("failed after 2 attempts" in r for r in reasons), reasons
            await proxy.restore()
            await wait_for(lambda: es_sink.health()[0], what="reconnected")
            assert rt.readiness()[0]
            feed("src", diagnoses(2, first=20))
            await wait_for(lambda: len(rt.handlers["src"].committed) == 3,  # type: ignore[attr-defined]
                           what="third batch committed")
    assert await ids_in(client, index) == ["GaPt00_01", "GaPt01_01", "GaPt20_01", "GaPt21_01"]
    assert rt.report is not None and rt.report.ok, rt.report


def test_rows_carry_arrow_timestamps() -> None:
    table = pa.Table.from_pylist(diagnoses(1))
    assert table.schema.field("diagnosed_at").type == pa.timestamp("us", tz="UTC")
