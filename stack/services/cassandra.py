"""Apache Cassandra 5.0: one node from the Maven Central jars, on loopback.

``install`` copies ``org.apache.cassandra:cassandra-all`` and its dependencies
(``stack/poms/cassandra/pom.xml``) into ``<state>/lib``. ``start`` writes a
small ``cassandra.yaml`` and ``logback.xml`` under the state directory and runs
``CassandraDaemon`` in the foreground on Java 17, with the module flags of
Cassandra's own ``conf/jvm17-server.options`` (the jar does not ship them) and a
few start-up shortcuts that are safe for a single node.
"""
from __future__ import annotations

import time
from pathlib import Path

from .. import maven
from ..config import ROOT
from ..service import Service, _java_major, java_home, probe_ready

POM_DIR = ROOT / "stack" / "poms" / "cassandra"
CLUSTER = "gaitflow"
SUPPORTED_JAVA = (17, 11)

# From Cassandra's conf/jvm17-server.options: JPMS access Cassandra needs on Java 17.
JVM17_MODULE_FLAGS = [
    "-Djdk.attach.allowAttachSelf=true",
    "--add-exports", "java.base/jdk.internal.misc=ALL-UNNAMED",
    "--add-exports", "java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED",
    "--add-exports", "java.rmi/sun.rmi.registry=ALL-UNNAMED",
    "--add-exports", "java.rmi/sun.rmi.server=ALL-UNNAMED",
    "--add-exports", "java.sql/java.sql=ALL-UNNAMED",
    "--add-exports", "java.base/java.lang.ref=ALL-UNNAMED",
    "--add-exports", "jdk.unsupported/sun.misc=ALL-UNNAMED",
    "--add-exports", "jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED",
    "--add-exports", "jdk.attach/sun.tools.attach=ALL-UNNAMED",
    "--add-opens", "java.base/java.lang.module=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.loader=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.ref=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.reflect=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.math=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.module=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.util.jar=ALL-UNNAMED",
    "--add-opens", "jdk.management/com.sun.management.internal=ALL-UNNAMED",
    "--add-opens", "java.base/sun.nio.ch=ALL-UNNAMED",
    "--add-opens", "java.base/java.io=ALL-UNNAMED",
    "--add-opens", "java.base/java.lang.reflect=ALL-UNNAMED",
    "--add-opens", "jdk.compiler/com.sun.tools.javac=ALL-UNNAMED",
    "--add-opens", "java.base/java.lang=ALL-UNNAMED",
    "--add-opens", "java.base/java.util=ALL-UNNAMED",
    "-Dio.netty.tryReflectionSetAccessible=true",
    "-Dio.netty.allocator.useCacheForAllThreads=true",
    "-Dio.netty.allocator.maxOrder=11",
]

# Sized for a laptop-class dev node next to Kafka, HDFS, Elasticsearch and Spark.
YAML = """\
# Written by `python -m stack` on every start; edit stack/services/cassandra.py instead.
cluster_name: {cluster}
num_tokens: 1
auto_bootstrap: false
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
authenticator: AllowAllAuthenticator
authorizer: AllowAllAuthorizer
role_manager: CassandraRoleManager
endpoint_snitch: SimpleSnitch
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "127.0.0.1:{storage_port}"
listen_address: 127.0.0.1
rpc_address: 127.0.0.1
storage_port: {storage_port}
native_transport_port: {port}
start_native_transport: true
data_file_directories:
  - {data}/data
commitlog_directory: {data}/commitlog
saved_caches_directory: {data}/saved_caches
hints_directory: {data}/hints
cdc_raw_directory: {data}/cdc_raw
commitlog_sync: periodic
commitlog_sync_period: 10000ms
commitlog_segment_size: 8MiB
commitlog_total_space: 256MiB
memtable_heap_space: 128MiB
memtable_offheap_space: 64MiB
key_cache_size: 16MiB
counter_cache_size: 0MiB
row_cache_size: 0MiB
file_cache_size: 32MiB
concurrent_reads: 4
concurrent_writes: 4
concurrent_counter_writes: 2
concurrent_materialized_view_writes: 2
concurrent_compactors: 1
compaction_throughput: 32MiB/s
native_transport_max_threads: 32
disk_failure_policy: stop
commit_failure_policy: stop
auto_snapshot: false
snapshot_on_duplicate_row_detection: false
dynamic_snitch: false
hinted_handoff_enabled: false
read_request_timeout: 10000ms
write_request_timeout: 5000ms
request_timeout: 15000ms
"""

LOGBACK = """\
<configuration scan="false">
  <appender name="STDOUT" class="ch.qos.logback.core.ConsoleAppender">
    <encoder>
      <pattern>%-5level [%thread] %date{{ISO8601}} %F:%L - %msg%n</pattern>
    </encoder>
  </appender>
  <logger name="org.apache.cassandra" level="INFO"/>
  <logger name="com.datastax" level="WARN"/>
  <logger name="io.netty" level="WARN"/>
  <root level="INFO">
    <appender-ref ref="STDOUT"/>
  </root>
</configuration>
"""


class Cassandra(Service):
    name = "cassandra"

    @property
    def lib(self) -> Path:
        return self.state / "lib"

    def is_installed(self) -> bool:
        return maven.is_fetched(self.cfg, self.name, POM_DIR)

    def install(self) -> None:
        if self.is_installed():
            print(f"cassandra: jars already in {self.lib}")
            return
        print("cassandra: fetching org.apache.cassandra:cassandra-all 5.0 and dependencies "
              "from Maven Central (~70 MB)", flush=True)
        t0 = time.monotonic()
        maven.fetch_pom(self.cfg, self.name, POM_DIR)
        n = len(list(self.lib.glob("*.jar")))
        print(f"cassandra: {n} jars in {self.lib} ({time.monotonic() - t0:.0f}s)", flush=True)

    def address(self) -> str:
        return f"127.0.0.1:{self.opts['port']}"

    def start(self) -> None:
        conf = self.state / "conf"
        data = self.state / "data"
        logs = self.state / "logs"
        for d in (conf, conf / "triggers", data, logs):
            d.mkdir(parents=True, exist_ok=True)
        (conf / "cassandra.yaml").write_text(YAML.format(
            cluster=CLUSTER, port=self.opts["port"], storage_port=self.opts["storage_port"],
            data=data))
        (conf / "logback.xml").write_text(LOGBACK.format())
        heap = str(self.opts["heap"])
        jamm = next(self.lib.glob("jamm-*.jar"))
        jhome = _java_for_cassandra()
        argv = [
            f"{jhome}/bin/java",
            # Xms below Xmx: RSS grows only as far as the node needs.
            "-Xms256m", f"-Xmx{heap}",
            "-XX:+UseG1GC", "-XX:+ParallelRefProcEnabled", "-XX:MaxTenuringThreshold=1",
            "-XX:MaxGCPauseMillis=300", "-XX:+PerfDisableSharedMem",
            "-XX:ParallelGCThreads=2", "-XX:ConcGCThreads=1",
            "-XX:+HeapDumpOnOutOfMemoryError", f"-XX:HeapDumpPath={logs}",
            "-XX:+ExitOnOutOfMemoryError", f"-XX:ErrorFile={logs}/hs_err_%p.log",
            "-Xss256k",
            f"-javaagent:{jamm}",
            *JVM17_MODULE_FLAGS,
            "-Djava.net.preferIPv4Stack=true",
            "-Dcassandra-foreground=yes",
            f"-Dcassandra.config=file://{conf}/cassandra.yaml",
            f"-Dlogback.configurationFile=file://{conf}/logback.xml",
            f"-Dcassandra.storagedir={data}",
            f"-Dcassandra.logdir={logs}",
            f"-Dcassandra.triggers_dir={conf / 'triggers'}",
            # One node that is its own seed: nothing to gossip with, nothing to stream.
            "-Dcassandra.skip_wait_for_gossip_to_settle=0",
            "-Dcassandra.ring_delay_ms=1000",
            "-cp", f"{conf}:{self.lib}/*",
            "org.apache.cassandra.service.CassandraDaemon",
        ]
        self.spawn(argv, env={"JAVA_HOME": jhome})

    def ready(self) -> bool:
        return probe_ready(int(self.opts["port"]), self._query)

    def _query(self) -> bool:
        from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
        from cassandra.policies import WhiteListRoundRobinPolicy

        profile = ExecutionProfile(
            load_balancing_policy=WhiteListRoundRobinPolicy(["127.0.0.1"]), request_timeout=3)
        cluster = Cluster(["127.0.0.1"], port=int(self.opts["port"]), protocol_version=5,
                          connect_timeout=2, control_connection_timeout=2,
                          execution_profiles={EXEC_PROFILE_DEFAULT: profile})
        try:
            session = cluster.connect()
            row = session.execute("SELECT release_version FROM system.local").one()
            return row is not None and str(row.release_version).startswith("5.")
        finally:
            cluster.shutdown()


def _java_for_cassandra() -> str:
    """Cassandra 5.0 runs on Java 11 or 17 only (not 21+, whatever JAVA_HOME says)."""
    home = java_home(17)
    if _java_major(home) in SUPPORTED_JAVA:
        return home
    for cand in sorted(Path("/usr/lib/jvm").glob("*"), reverse=True):
        if (cand / "bin" / "java").exists() and _java_major(str(cand)) in SUPPORTED_JAVA:
            return str(cand)
    raise RuntimeError("cassandra: Cassandra 5.0 needs Java 17 (or 11); none found under "
                       "/usr/lib/jvm (apt-get install openjdk-17-jre-headless)")
