"""One real client round trip per stack service: Mosquitto (plain, password, TLS),
Kafka, HDFS through WebHDFS, and a spark-submit job reading from HDFS.

The data stores (Cassandra, Elasticsearch, FerretDB) are in test_stack_data.py.
A service that is not up fails its test with the command that starts it.
"""
from __future__ import annotations

import asyncio
import getpass
import os
import ssl
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import aiohttp
import aiomqtt
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from stack.services.mosquitto import ca_file, credentials
from stack.services.spark import spark_submit

pytestmark = pytest.mark.integration


# -- MQTT ----------------------------------------------------------------------

async def _mqtt_round_trip(client: aiomqtt.Client) -> None:
    topic = f"test/stack/{uuid.uuid4().hex}"
    async with client:
        await client.subscribe(topic, qos=1)
        await client.publish(topic, b"hello", qos=1)
        async with asyncio.timeout(10):
            async for msg in client.messages:
                assert msg.payload == b"hello"
                assert str(msg.topic) == topic
                break


async def test_mqtt_anonymous_publish_subscribe(stack_service):
    svc = stack_service("mosquitto")
    await _mqtt_round_trip(aiomqtt.Client("127.0.0.1", int(svc.opts["port"])))


async def test_mqtt_password_listener(stack_service, stack_cfg):
    svc = stack_service("mosquitto")
    port = int(svc.opts["secure_port"])
    user, password = credentials(stack_cfg)
    await _mqtt_round_trip(aiomqtt.Client("127.0.0.1", port, username=user, password=password))
    # the same listener refuses a wrong password and anonymous clients
    for kwargs in ({"username": user, "password": "wrong"}, {}):
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client("127.0.0.1", port, **kwargs):
                pass


async def test_mqtt_tls_listener_verifies_with_stack_ca(stack_service, stack_cfg):
    svc = stack_service("mosquitto")
    port = int(svc.opts["tls_port"])
    user, password = credentials(stack_cfg)
    ctx = ssl.create_default_context(cafile=str(ca_file(stack_cfg)))  # verifies host + chain
    await _mqtt_round_trip(aiomqtt.Client("127.0.0.1", port, username=user, password=password,
                                          tls_context=ctx))
    # The certificate is really checked: a client trusting only the system CAs
    # fails the handshake. (Plain asyncio here: paho leaks the socket of a failed
    # TLS handshake, which -W error would report instead.)
    with pytest.raises(ssl.SSLCertVerificationError):
        _, writer = await asyncio.open_connection("127.0.0.1", port,
                                                  ssl=ssl.create_default_context())
        writer.close()


# -- Kafka ---------------------------------------------------------------------

async def test_kafka_produce_consume(stack_service):
    svc = stack_service("kafka")
    topic = f"test-stack-{uuid.uuid4().hex[:12]}"
    sent = [f"m{i}".encode() for i in range(10)]
    producer = AIOKafkaProducer(bootstrap_servers=svc.address(), acks="all")
    await producer.start()
    try:
        for value in sent:
            await producer.send_and_wait(topic, value, key=b"k")  # one key: one partition
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=svc.address(),
                                group_id=f"g-{topic}", auto_offset_reset="earliest")
    await consumer.start()
    try:
        got: list[bytes] = []
        async with asyncio.timeout(30):
            async for msg in consumer:
                got.append(msg.value)
                if len(got) == len(sent):
                    break
        await consumer.commit()
    finally:
        await consumer.stop()
    assert got == sent


# -- HDFS (WebHDFS) --------------------------------------------------------------

class WebHdfs:
    """The few WebHDFS calls the test needs; 307s to the DataNode followed by hand."""

    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.http, self.base, self.user = http, base, getpass.getuser()

    def url(self, path: str, op: str, **params: str) -> str:
        q = "".join(f"&{k}={v}" for k, v in params.items())
        return f"{self.base}{path}?op={op}&user.name={self.user}{q}"

    async def write(self, method: str, path: str, op: str, data: bytes, **params: str) -> int:
        async with self.http.request(method, self.url(path, op, **params),
                                     allow_redirects=False) as r:
            assert r.status == 307, await r.text()
            location = r.headers["Location"]
        assert location.startswith("http://127.0.0.1:"), location  # loopback DataNode
        async with self.http.request(method, location, data=data) as r:
            assert r.status in (200, 201), await r.text()
            return r.status

    async def call(self, method: str, path: str, op: str, **params: str) -> dict:
        async with self.http.request(method, self.url(path, op, **params)) as r:
            assert r.status == 200, await r.text()
            return await r.json()

    async def read(self, path: str) -> bytes:
        async with self.http.get(self.url(path, "OPEN")) as r:  # follows the 307
            assert r.status == 200, await r.text()
            return await r.read()


async def test_webhdfs_create_append_read_rename_delete(stack_service):
    svc = stack_service("hdfs")
    d = f"/tmp/test-stack/{uuid.uuid4().hex}"
    async with aiohttp.ClientSession() as http:
        fs = WebHdfs(http, svc.webhdfs())
        assert await fs.write("PUT", f"{d}/a.txt", "CREATE", b"one\n", overwrite="true") == 201
        await fs.write("POST", f"{d}/a.txt", "APPEND", b"two\n")
        assert await fs.read(f"{d}/a.txt") == b"one\ntwo\n"
        assert (await fs.call("PUT", f"{d}/a.txt", "RENAME", destination=f"{d}/b.txt")
                == {"boolean": True})
        assert await fs.read(f"{d}/b.txt") == b"one\ntwo\n"
        status = await fs.call("GET", f"{d}/b.txt", "GETFILESTATUS")
        assert status["FileStatus"]["length"] == 8
        assert await fs.call("DELETE", d, "DELETE", recursive="true") == {"boolean": True}
        async with http.get(fs.url(f"{d}/b.txt", "GETFILESTATUS")) as r:
            assert r.status == 404


# -- Spark -----------------------------------------------------------------------

JOB = textwrap.dedent("""
    import sys
    from pyspark.sql import SparkSession

    spark = SparkSession.builder.appName("stack-test").getOrCreate()
    print("COUNT=%d" % spark.read.text(sys.argv[1]).count())
    spark.stop()
""")


async def test_spark_submit_reads_hdfs(stack_service, tmp_path: Path):
    stack_service("spark")
    hdfs = stack_service("hdfs")
    path = f"/tmp/test-stack/{uuid.uuid4().hex}/lines.txt"
    async with aiohttp.ClientSession() as http:
        fs = WebHdfs(http, hdfs.webhdfs())
        await fs.write("PUT", path, "CREATE", b"".join(b"line %d\n" % i for i in range(42)))
    job = tmp_path / "count_lines.py"
    job.write_text(JOB)
    # A subprocess, as the pipeline's spark_job handler runs it: local master,
    # small driver, no UI port to collide with a concurrent job.
    proc = await asyncio.create_subprocess_exec(
        str(spark_submit()), "--master", "local[1]", "--driver-memory", "512m",
        "--conf", "spark.ui.enabled=false", str(job), f"{hdfs.address()}{path}",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYSPARK_PYTHON": sys.executable})
    out, err = await asyncio.wait_for(proc.communicate(), 100)
    assert proc.returncode == 0, err.decode()[-3000:]
    assert "COUNT=42" in out.decode().splitlines(), out.decode()
    async with aiohttp.ClientSession() as http:
        await WebHdfs(http, hdfs.webhdfs()).call("DELETE", path.rsplit("/", 1)[0], "DELETE",
                                                 recursive="true")
