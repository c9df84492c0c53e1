"""Read back every store of one pipeline run and count what each holds per recording.

Used by the end-to-end and reliability tests: after a replay (with or without
crashes), each store must hold each sample and each derived row exactly once.
"""
from __future__ import annotations

import asyncio
import dataclasses
import io
from collections import Counter
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from handlers.webhdfs import FileStatus, WebHdfs


@dataclasses.dataclass(frozen=True)
class RunNames:
    """The unique names one run uses in every store, so runs never collide."""

    run: str

    @property
    def topic_prefix(self) -> str:
        return f"gaitflow-test/{self.run}"

    @property
    def mqtt_topic(self) -> str:
        return f"{self.topic_prefix}/{{recording}}"

    @property
    def lake_root(self) -> str:
        return f"/gaitflow-test/{self.run}/raw"

    @property
    def features_root(self) -> str:
        return f"/gaitflow-test/{self.run}/features"

    @property
    def kafka_topic(self) -> str:
        return f"gaitflow.test.{self.run}.samples"

    @property
    def segments_topic(self) -> str:
        return f"gaitflow.test.{self.run}.segments"

    @property
    def keyspace(self) -> str:
        return f"test_{self.run}"

    @property
    def mongo_db(self) -> str:
        return f"test_{self.run}"

    @property
    def es_index(self) -> str:
        return f"test-{self.run}-diagnoses"

    def _ingest_sets(self) -> list[str]:
        return [
            f'handlers.mqtt.topics=["{self.topic_prefix}/+"]',
            f'handlers.mqtt.client_id="gaitflow-{self.run}"',
            f'handlers.lake.root="{self.lake_root}"',
            f'handlers.raw_kafka.topic="{self.kafka_topic}"',
        ]

    def _processing_sets(self, model_url: str) -> list[str]:
        return [
            f'handlers.features.features_root="{self.features_root}"',
            "handlers.features.max_wait=5.0",
            f'handlers.feature_store.keyspace="{self.keyspace}"',
            f'handlers.diagnose.url="{model_url}"',
            f'handlers.diagnoses_mongo.database="{self.mongo_db}"',
            f'handlers.diagnoses_es.index="{self.es_index}"',
        ]

    def overrides(self, *, admin_port: int, model_url: str, dead_letters: str) -> list[str]:
        """``--set`` arguments pointing settings.toml's pipeline at this run's names."""
        return [f"runtime.admin_port={admin_port}", "runtime.admin_extensions=[]",
                *self._ingest_sets(), *self._processing_sets(model_url),
                f'handlers.dead_letters.path="{dead_letters}"']  # fmt: skip

    def split_overrides(self, *, admin_ports: tuple[int, int], model_url: str,
                        dead_letters: str) -> tuple[list[str], list[str]]:  # fmt: skip
        """``--set`` arguments pointing pipeline/examples/split's ingest and processing
        tiers at this run's names."""
        dead = f'handlers.dead_letters.path="{dead_letters}"'
        ingest = [f"runtime.admin_port={admin_ports[0]}", *self._ingest_sets(),
                  f'handlers.segments_kafka.topic="{self.segments_topic}"', dead]  # fmt: skip
        processing = [f"runtime.admin_port={admin_ports[1]}", "runtime.admin_extensions=[]",
                      f'handlers.segments.topics=["{self.segments_topic}"]',
                      f'handlers.segments.group_id="gaitflow-{self.run}"',
                      *self._processing_sets(model_url), dead]  # fmt: skip
        return ingest, processing


async def lake_entries(fs: WebHdfs, root: str) -> AsyncIterator[FileStatus]:
    """Every file and directory under ``root``, depth first (a vanished directory: skipped)."""
    from handlers.webhdfs import NotFound

    todo = [root]
    while todo:
        path = todo.pop()
        try:
            entries = await fs.list_status(path)
        except NotFound:
            continue
        for st in entries:
            yield st
            if st.is_dir:
                todo.append(st.path)


async def lake_samples(webhdfs_url: str, root: str) -> pa.Table:
    """Every Parquet file under ``root`` (recursively), concatenated."""
    from handlers.webhdfs import WebHdfs

    tables: list[pa.Table] = []
    async with WebHdfs(webhdfs_url) as fs:
        async for st in lake_entries(fs, root):
            if not st.is_dir and st.path.endswith(".parquet"):
                tables.append(pq.read_table(io.BytesIO(await fs.open(st.path)),
                                            columns=["recording", "seq"]))
    if not tables:
        return pa.table({"recording": pa.array([], pa.string()), "seq": pa.array([], pa.int64())})
    return pa.concat_tables(tables)


async def kafka_samples(bootstrap: str, topic: str, timeout: float = 20.0) -> pa.Table:
    """Every row in a kafka_sink topic, decoded."""
    from aiokafka import AIOKafkaConsumer

    from handlers.arrow_codec import decode

    empty = pa.table({"recording": pa.array([], pa.string()), "seq": pa.array([], pa.int64())})
    # subscribed without a group: aiokafka fetches the topic's metadata and assigns every
    # partition (partitions_for_topic() right after start() knows no topic yet)
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    try:
        await consumer.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if topic not in await consumer.topics():
            return empty
        while not consumer.assignment():
            if loop.time() > deadline:
                raise TimeoutError(f"kafka topic {topic}: no partition assigned in {timeout} s")
            await asyncio.sleep(0.1)
        tps = sorted(consumer.assignment())
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        tables = []
        while any([await consumer.position(tp) < end[tp] for tp in tps]):
            if loop.time() > deadline:
                raise TimeoutError(f"kafka topic {topic}: not read to its end in {timeout} s")
            batch = await consumer.getmany(timeout_ms=1000)
            for msgs in batch.values():
                for m in msgs:
                    data = decode(m.value).data
                    if isinstance(data, pa.RecordBatch):
                        data = pa.Table.from_batches([data])
                    tables.append(data.select(["recording", "seq"]))
        return pa.concat_tables(tables) if tables else empty
    finally:
        await consumer.stop()


def cassandra_windows(keyspace: str, table: str = "window_features") -> Counter[str]:
    """Windows per recording in the features table (blocking: call in a thread)."""
    return Counter(rec for rec, _ in cassandra_window_keys(keyspace, table))


def _cassandra_cluster() -> Any:
    """A driver Cluster for 127.0.0.1 (an execution profile: the legacy load-balancing
    argument is deprecated, and warnings are errors in the tests)."""
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
    from cassandra.policies import RoundRobinPolicy

    profile = ExecutionProfile(load_balancing_policy=RoundRobinPolicy(), request_timeout=30)
    return Cluster(["127.0.0.1"], protocol_version=5,
                   execution_profiles={EXEC_PROFILE_DEFAULT: profile})


def cassandra_window_keys(keyspace: str, table: str = "window_features") -> list[tuple[str, int]]:
    """Every ``(recording, window)`` primary key in the features table (blocking)."""
    cluster = _cassandra_cluster()
    try:
        session = cluster.connect()
        rows = session.execute(f'SELECT recording, "window" FROM "{keyspace}"."{table}"')
        return [(r.recording, r.window) for r in rows]
    finally:
        cluster.shutdown()


async def mongo_diagnoses(db: str, collection: str = "diagnoses") -> dict[str, dict[str, Any]]:
    from pymongo import AsyncMongoClient

    client: AsyncMongoClient = AsyncMongoClient("mongodb://127.0.0.1:27017/")
    try:
        docs = await client[db][collection].find({}).to_list()
        return {d["_id"]: d for d in docs}
    finally:
        await client.close()


async def es_diagnoses(index: str) -> dict[str, dict[str, Any]]:
    from elasticsearch import AsyncElasticsearch, NotFoundError

    es = AsyncElasticsearch("http://127.0.0.1:9200")
    try:
        try:
            await es.indices.refresh(index=index)
        except NotFoundError:
            return {}
        resp = await es.search(index=index, size=10000, query={"match_all": {}})
        return {h["_id"]: h["_source"] for h in resp["hits"]["hits"]}
    finally:
        await es.close()


def per_recording(table: pa.Table) -> tuple[Counter[str], Counter[str]]:
    """(rows per recording, duplicated (recording, seq) rows per recording)."""
    rows: Counter[str] = Counter(table.column("recording").to_pylist())
    pairs = Counter(zip(table.column("recording").to_pylist(), table.column("seq").to_pylist()))
    dups: Counter[str] = Counter()
    for (rec, _), n in pairs.items():
        if n > 1:
            dups[rec] += n - 1
    return rows, dups


async def cleanup(names: RunNames) -> None:
    """Drop everything a run created (best effort, each store independently)."""
    import contextlib

    from aiokafka.admin import AIOKafkaAdminClient
    from elasticsearch import AsyncElasticsearch
    from pymongo import AsyncMongoClient

    from handlers.webhdfs import WebHdfs

    with contextlib.suppress(Exception):
        async with WebHdfs("http://127.0.0.1:9870") as fs:
            await fs.delete(f"/gaitflow-test/{names.run}", recursive=True)
    with contextlib.suppress(Exception):
        admin = AIOKafkaAdminClient(bootstrap_servers="127.0.0.1:9092")
        await admin.start()
        try:
            for topic in (names.kafka_topic, names.segments_topic):  # each may be absent
                with contextlib.suppress(Exception):
                    await admin.delete_topics([topic])
        finally:
            await admin.close()
    with contextlib.suppress(Exception):
        mc: AsyncMongoClient = AsyncMongoClient("mongodb://127.0.0.1:27017/")
        try:
            await mc.drop_database(names.mongo_db)
        finally:
            await mc.close()
    with contextlib.suppress(Exception):
        es = AsyncElasticsearch("http://127.0.0.1:9200")
        try:
            await es.indices.delete(index=names.es_index, ignore_unavailable=True)
        finally:
            await es.close()

    def drop_keyspace() -> None:
        cluster = _cassandra_cluster()
        try:
            cluster.connect().execute(f'DROP KEYSPACE IF EXISTS "{names.keyspace}"')
        finally:
            cluster.shutdown()

    with contextlib.suppress(Exception):
        await asyncio.to_thread(drop_keyspace)
