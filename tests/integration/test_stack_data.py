"""One real client round trip against each data store of the local stack.

Cassandra (CQL), Elasticsearch (index and search) and FerretDB (MongoDB wire
protocol through PyMongo's AsyncMongoClient). A service that is not up fails its
test with the command that starts it (``stack_service`` in conftest.py): these
tests never skip.
"""
from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from stack.config import StackConfig

pytestmark = pytest.mark.integration


def _port(cfg: StackConfig, service: str) -> int:
    return int(cfg.svc(service)["port"])


# -- Cassandra ----------------------------------------------------------------------

@pytest.fixture
def cql_cluster(stack_cfg: StackConfig) -> Iterator[object]:
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
    from cassandra.policies import WhiteListRoundRobinPolicy

    profile = ExecutionProfile(load_balancing_policy=WhiteListRoundRobinPolicy(["127.0.0.1"]),
                               request_timeout=20)
    cluster = Cluster(["127.0.0.1"], port=_port(stack_cfg, "cassandra"), protocol_version=5,
                      connect_timeout=5, execution_profiles={EXEC_PROFILE_DEFAULT: profile})
    try:
        yield cluster
    finally:
        cluster.shutdown()


def test_cql_keyspace_table_insert_select(stack_service, cql_cluster) -> None:
    stack_service("cassandra")
    session = cql_cluster.connect()
    ks = f"it_{uuid.uuid4().hex[:12]}"
    session.execute(f"CREATE KEYSPACE {ks} WITH replication = "
                    "{'class': 'SimpleStrategy', 'replication_factor': 1}")
    try:
        session.execute(f"CREATE TABLE {ks}.features (recording text, window int, "
                        "cadence double, PRIMARY KEY (recording, window))")
        insert = session.prepare(
            f"INSERT INTO {ks}.features (recording, window, cadence) VALUES (?, ?, ?)")
        for w, cadence in enumerate([1.8, 1.9, 2.0]):
            session.execute(insert, ("GaPt03_01", w, cadence))
        # An upsert by key: the same primary key again replaces, never duplicates.
        session.execute(insert, ("GaPt03_01", 2, 2.1))
        rows = list(session.execute(
            f"SELECT window, cadence FROM {ks}.features WHERE recording = %s",
            ("GaPt03_01",)))
        assert [(r.window, r.cadence) for r in rows] == [(0, 1.8), (1, 1.9), (2, 2.1)]
    finally:
        session.execute(f"DROP KEYSPACE IF EXISTS {ks}")


# -- Elasticsearch ------------------------------------------------------------------

@pytest.fixture
async def es(stack_cfg: StackConfig) -> AsyncIterator[object]:
    from elasticsearch import AsyncElasticsearch

    client = AsyncElasticsearch(f"http://127.0.0.1:{_port(stack_cfg, 'elasticsearch')}", request_timeout=30,
                                max_retries=0)
    try:
        yield client
    finally:
        await client.close()


async def test_elasticsearch_index_and_search(stack_service, es) -> None:
    stack_service("elasticsearch")
    await es.cluster.health(wait_for_status="yellow", timeout="20s")
    assert await es.ping()
    assert (await es.info())["version"]["number"].startswith("9.")
    index = f"it-{uuid.uuid4().hex[:12]}"
    try:
        docs = [("GaPt03_01:0", "GaPt03_01", "parkinson", 0.91),
                ("GaCo01_01:0", "GaCo01_01", "control", 0.12),
                ("GaPt04_01:0", "GaPt04_01", "parkinson", 0.77)]
        for doc_id, rec, label, p in docs:
            await es.index(index=index, id=doc_id,
                           document={"recording": rec, "label": label, "p_pd": p})
        # Same id again: an upsert, not a second document.
        await es.index(index=index, id="GaPt04_01:0", refresh=True,
                       document={"recording": "GaPt04_01", "label": "parkinson", "p_pd": 0.8})
        got = await es.get(index=index, id="GaPt03_01:0")
        assert got["_source"]["label"] == "parkinson"
        res = await es.search(index=index, query={"term": {"label.keyword": "parkinson"}},
                              sort=[{"p_pd": "desc"}],
                              aggs={"mean_p": {"avg": {"field": "p_pd"}}})
        assert res["hits"]["total"]["value"] == 2
        assert [h["_id"] for h in res["hits"]["hits"]] == ["GaPt03_01:0", "GaPt04_01:0"]
        assert res["aggregations"]["mean_p"]["value"] == pytest.approx((0.91 + 0.8) / 2)
    finally:
        await es.indices.delete(index=index, ignore_unavailable=True)


# -- MongoDB wire protocol (FerretDB) -----------------------------------------------

@pytest.fixture
async def mongo(stack_cfg: StackConfig) -> AsyncIterator[object]:
    from pymongo import AsyncMongoClient

    client: AsyncMongoClient = AsyncMongoClient(
        f"mongodb://127.0.0.1:{_port(stack_cfg, 'ferretdb')}/", serverSelectionTimeoutMS=10000,
        directConnection=True)
    try:
        yield client
    finally:
        await client.close()


async def test_mongodb_insert_and_find(stack_service, mongo) -> None:
    stack_service("ferretdb")
    db_name = f"it_{uuid.uuid4().hex[:12]}"
    coll = mongo[db_name]["diagnoses"]
    try:
        await coll.insert_one({"_id": "GaPt03_01", "label": "parkinson", "p_pd": 0.91})
        await coll.insert_many([{"_id": "GaCo01_01", "label": "control", "p_pd": 0.12},
                                {"_id": "GaPt04_01", "label": "parkinson", "p_pd": 0.77}])
        # Idempotent write by key, as the sinks do it.
        await coll.replace_one({"_id": "GaPt04_01"},
                               {"_id": "GaPt04_01", "label": "parkinson", "p_pd": 0.8},
                               upsert=True)
        doc = await coll.find_one({"_id": "GaPt03_01"})
        assert doc == {"_id": "GaPt03_01", "label": "parkinson", "p_pd": 0.91}
        found = await coll.find({"label": "parkinson"}).sort("p_pd", -1).to_list()
        assert [(d["_id"], d["p_pd"]) for d in found] == [("GaPt03_01", 0.91),
                                                          ("GaPt04_01", 0.8)]
        assert await coll.count_documents({}) == 3
    finally:
        await mongo.drop_database(db_name)
