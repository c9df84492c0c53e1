"""Apache Kafka 4.x in KRaft mode: one process that is both broker and controller.

Jars come from Maven Central (stack/poms/kafka/pom.xml). The storage directory
is formatted once with a generated cluster id; later starts reuse it.
"""
from __future__ import annotations

import asyncio
import base64
import socket
import subprocess
import uuid

from .. import maven
from ..config import ROOT
from ..jvm import classpath, java_argv
from ..service import Service

POM_DIR = ROOT / "stack" / "poms" / "kafka"

LOG4J2 = """<?xml version="1.0" encoding="UTF-8"?>
<!-- Everything to stdout, which the stack redirects to kafka.log. -->
<Configuration status="WARN">
  <Appenders>
    <Console name="out" target="SYSTEM_OUT">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Logger name="kafka" level="INFO"/>
    <Logger name="org.apache.kafka" level="INFO"/>
    <!-- per-request and per-partition chatter that drowns the useful lines -->
    <Logger name="kafka.request.logger" level="WARN"/>
    <Logger name="state.change.logger" level="WARN"/>
    <Logger name="org.apache.kafka.storage.internals.log" level="WARN"/>
    <Logger name="kafka.log" level="WARN"/>
    <Root level="INFO"><AppenderRef ref="out"/></Root>
  </Loggers>
</Configuration>
"""


def new_cluster_id() -> str:
    """A random Kafka cluster id: a UUID in URL-safe base64, as ``kafka-storage
    random-uuid`` makes it, and like Kafka never one starting with ``-`` (one in 64
    does; the tools' argument parser would take it for an option)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


class Kafka(Service):
    name = "kafka"
    ready_timeout = 120.0

    # -- install ------------------------------------------------------------
    def is_installed(self) -> bool:
        return maven.is_fetched(self.cfg, self.name, POM_DIR)

    def install(self) -> None:
        maven.fetch_pom(self.cfg, self.name, POM_DIR)

    # -- run ----------------------------------------------------------------
    def address(self) -> str:
        return f"127.0.0.1:{self.opts['port']}"

    @property
    def data_dir(self):
        return self.state / "data"

    def _write_config(self) -> None:
        port, cport = self.opts["port"], self.opts["controller_port"]
        conf = self.state / "config"
        conf.mkdir(exist_ok=True)
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            # Static quorum of one voter: no dynamic-quorum bootstrap step needed.
            "controller.quorum.voters": f"1@127.0.0.1:{cport}",
            "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": "3",
            "auto.create.topics.enable": "true",
            # A single broker: every internal topic must accept replication factor 1.
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "min.insync.replicas": "1",
            # Tests start many consumer groups: do not wait 3 s for more members.
            "group.initial.rebalance.delay.ms": "0",
            "num.network.threads": "2",
            "num.io.threads": "4",
            "log.retention.hours": "24",
        }
        (conf / "server.properties").write_text(
            "# written by `python -m stack up`; edits are overwritten\n"
            + "".join(f"{k}={v}\n" for k, v in props.items()))
        (conf / "log4j2.xml").write_text(LOG4J2)

    def _java(self, main: str, *args: str) -> list[str]:
        lib = self.state / "lib"
        conf = self.state / "config"
        return java_argv(main, heap=str(self.opts["heap"]), cp=classpath(lib), args=args,
                         opts=[f"-Dlog4j2.configurationFile={conf / 'log4j2.xml'}",
                               f"-Dkafka.logs.dir={self.state / 'logs'}"])

    def _format(self) -> None:
        """First start only: write meta.properties with a fresh cluster id."""
        if (self.data_dir / "meta.properties").exists():
            return
        cluster_id = new_cluster_id()
        props = str(self.state / "config" / "server.properties")
        r = subprocess.run(self._java("kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}",
                                      "-c", props, "--ignore-formatted"),
                           capture_output=True, text=True, timeout=120, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"kafka storage format failed:\n{r.stdout}\n{r.stderr}")

    def start(self) -> None:
        self._write_config()
        self._format()
        self.spawn(self._java("kafka.Kafka", str(self.state / "config" / "server.properties")))

    def ready(self) -> bool:
        """A produce and a consume of one message on an internal topic."""
        # Cheap TCP probe first: while the broker boots, spinning up aiokafka
        # clients every second only fills the terminal with connection errors.
        if not _accepts("127.0.0.1", int(self.opts["port"])):
            return False
        try:
            return asyncio.run(asyncio.wait_for(self._round_trip(), 8))
        except Exception:  # noqa: BLE001 - any failure means "not ready yet"
            return False

    async def _round_trip(self) -> bool:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

        topic, token = "_stack_ready", uuid.uuid4().bytes
        producer = AIOKafkaProducer(bootstrap_servers=self.address(),
                                    request_timeout_ms=5000)
        try:
            await producer.start()
            md = await producer.send_and_wait(topic, token, partition=0)
        finally:
            await producer.stop()  # also after a failed start: no "Unclosed" noise
        consumer = AIOKafkaConsumer(bootstrap_servers=self.address(),
                                    enable_auto_commit=False, request_timeout_ms=5000)
        try:
            await consumer.start()
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            consumer.seek(tp, md.offset)
            msg = await consumer.getone()
            return msg.value == token
        finally:
            await consumer.stop()


def _accepts(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0
