"""HDFS: one NameNode and one DataNode, WebHDFS on, everything on 127.0.0.1.

Jars come from Maven Central (stack/poms/hadoop/pom.xml). The web UI's
``webapps/`` tree (which the HTTP servers must find on the classpath even to
serve WebHDFS) is not in the published hadoop-hdfs jar, so it is unpacked from
the hadoop-client-minicluster jar of the same version.

Two processes, each with its own pid and log; :meth:`Hdfs.stop_namenode` and
:meth:`Hdfs.start_namenode` let reliability tests restart the NameNode alone.
"""
from __future__ import annotations

import getpass
import http.client
import shutil
import subprocess
import uuid
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

from .. import maven
from ..config import ROOT
from ..jvm import classpath, java_argv
from ..service import Service

POM_DIR = ROOT / "stack" / "poms" / "hadoop"
HADOOP_VERSION = "3.4.2"  # keep in step with stack/poms/hadoop/pom.xml
WEBAPPS = f"org.apache.hadoop:hadoop-client-minicluster:{HADOOP_VERSION}:jar"

NAMENODE = "org.apache.hadoop.hdfs.server.namenode.NameNode"
DATANODE = "org.apache.hadoop.hdfs.server.datanode.DataNode"

# Hadoop 3.4 reflects into JDK internals that Java 17 closes by default.
JAVA17_OPENS = [f"--add-opens=java.base/{p}=ALL-UNNAMED" for p in (
    "java.lang", "java.lang.reflect", "java.io", "java.net", "java.nio", "java.util",
    "java.util.concurrent", "java.util.concurrent.atomic", "java.util.regex",
    "sun.nio.ch", "sun.nio.cs", "sun.security.action", "sun.util.calendar")] + [
    "--add-exports=java.base/sun.net.dns=ALL-UNNAMED",
    "--add-exports=java.base/sun.net.util=ALL-UNNAMED"]

LOG4J = """# written by `python -m stack up`: everything to stdout (the stack's log file)
log4j.rootLogger=INFO,console
log4j.appender.console=org.apache.log4j.ConsoleAppender
log4j.appender.console.target=System.out
log4j.appender.console.layout=org.apache.log4j.PatternLayout
log4j.appender.console.layout.ConversionPattern=%d{ISO8601} %p %c{2}: %m%n
# per-block and per-request lines: useful only when debugging HDFS itself
log4j.logger.BlockStateChange=WARN
log4j.logger.org.apache.hadoop.hdfs.StateChange=WARN
log4j.logger.org.apache.hadoop.hdfs.server.namenode.FSNamesystem.audit=WARN
log4j.logger.org.apache.hadoop.hdfs.server.datanode.DataNode.clienttrace=WARN
log4j.logger.org.apache.hadoop.util.NativeCodeLoader=ERROR
# one access-log line per HTTP request: the pipeline makes thousands
log4j.logger.http.requests.namenode=WARN
log4j.logger.http.requests.datanode=WARN
log4j.logger.datanode.webhdfs=WARN
"""


class Hdfs(Service):
    name = "hdfs"
    processes = ("namenode", "datanode")
    ready_timeout = 120.0

    # -- install ------------------------------------------------------------
    def is_installed(self) -> bool:
        return (maven.is_fetched(self.cfg, self.name, POM_DIR)
                and maven.is_artifact_fetched(self.cfg, self.name, WEBAPPS, unpack=True,
                                              includes="webapps/**", subdir="web"))

    def install(self) -> None:
        maven.fetch_pom(self.cfg, self.name, POM_DIR)
        maven.fetch_artifact(self.cfg, self.name, WEBAPPS, unpack=True,
                             includes="webapps/**", subdir="web")

    # -- configuration -------------------------------------------------------
    def address(self) -> str:
        return f"hdfs://127.0.0.1:{self.opts['namenode_rpc']}"

    def webhdfs(self) -> str:
        """Base URL of the REST API, e.g. ``http://127.0.0.1:9870/webhdfs/v1``."""
        return f"http://127.0.0.1:{self.opts['namenode_http']}/webhdfs/v1"

    def _write_config(self) -> None:
        o, st = self.opts, self.state
        conf = st / "conf"
        conf.mkdir(exist_ok=True)
        core = {
            "fs.defaultFS": self.address(),
            "hadoop.tmp.dir": str(st / "tmp"),
            "hadoop.http.staticuser.user": getpass.getuser(),
        }
        hdfs = {
            "dfs.replication": "1",
            "dfs.permissions.enabled": "false",
            "dfs.webhdfs.enabled": "true",
            "dfs.namenode.name.dir": f"file://{st / 'name'}",
            "dfs.datanode.data.dir": f"file://{st / 'data'}",
            "dfs.namenode.rpc-address": f"127.0.0.1:{o['namenode_rpc']}",
            "dfs.namenode.http-address": f"127.0.0.1:{o['namenode_http']}",
            "dfs.datanode.address": f"127.0.0.1:{o['datanode_port']}",
            "dfs.datanode.http.address": f"127.0.0.1:{o['datanode_http']}",
            "dfs.datanode.ipc.address": f"127.0.0.1:{o['datanode_ipc']}",
            # WebHDFS redirects clients to the DataNode by this name: keep it loopback
            # rather than whatever the machine's hostname resolves to.
            "dfs.datanode.hostname": "127.0.0.1",
            "dfs.namenode.datanode.registration.ip-hostname-check": "false",
            # Leave safe mode as soon as the blocks are reported (default waits 30 s),
            # and heartbeat every second so a restarted NameNode hears from us fast.
            "dfs.namenode.safemode.extension": "0",
            "dfs.heartbeat.interval": "1",
            # One DataNode: there is never another to swap into a failed append pipeline.
            "dfs.client.block.write.replace-datanode-on-failure.enable": "false",
            "dfs.namenode.secondary.http-address": "127.0.0.1:0",
            # WebHDFS writes go through the DataNode's own DFS client, which waits
            # 400 ms before its first "is the file complete?" poll: most of a small
            # file's CREATE time. Poll sooner.
            "dfs.client.block.write.locateFollowingBlock.initial.delay.ms": "20",
        }
        (conf / "core-site.xml").write_text(_site_xml(core))
        (conf / "hdfs-site.xml").write_text(_site_xml(hdfs))
        (conf / "log4j.properties").write_text(LOG4J)

    def _java(self, main: str, proc: str, *args: str) -> list[str]:
        st = self.state
        return java_argv(
            main, heap=str(self.opts["heap"]), args=args,
            # conf first: our *-site.xml and log4j.properties win over jar defaults
            cp=classpath(st / "conf", st / "web", st / "lib"),
            opts=[*JAVA17_OPENS, f"-Dhadoop.log.dir={st / 'logs'}",
                  f"-Dhadoop.log.file={proc}.log", f"-Dhadoop.home.dir={st}",
                  f"-Dhadoop.id.str={getpass.getuser()}", f"-Dproc_{proc}"])

    def _format(self) -> None:
        """First start only: format the NameNode (and drop DataNode blocks of an old id)."""
        if (self.state / "name" / "current" / "VERSION").exists():
            return
        shutil.rmtree(self.state / "data", ignore_errors=True)
        r = subprocess.run(self._java(NAMENODE, "format", "-format", "-nonInteractive",
                                      "-clusterid", "gaitflow-stack"),
                           capture_output=True, text=True, timeout=180, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"namenode -format failed (exit {r.returncode}):\n"
                               + (r.stdout + r.stderr)[-3000:])

    # -- processes -----------------------------------------------------------
    def start(self) -> None:
        """Start whichever of the two processes is not running."""
        self._write_config()
        self._format()
        running = self.pids()
        if "namenode" not in running:
            self.start_namenode()
        if "datanode" not in running:
            self.spawn(self._java(DATANODE, "datanode"), proc="datanode")

    def start_namenode(self) -> None:
        self._write_config()
        self.spawn(self._java(NAMENODE, "namenode"), proc="namenode")

    def stop_namenode(self, timeout: float = 30.0) -> None:
        self.stop_proc("namenode", timeout)

    # -- health --------------------------------------------------------------
    def ready(self) -> bool:
        """WebHDFS: create (following the redirect to the DataNode), read, delete."""
        try:
            return self._round_trip()
        except (OSError, http.client.HTTPException):
            return False

    def _round_trip(self) -> bool:
        user = getpass.getuser()
        path = f"/tmp/.stack-ready-{uuid.uuid4().hex}"
        base = f"{self.webhdfs()}{path}?user.name={user}"
        status, headers, _ = _http("PUT", f"{base}&op=CREATE&overwrite=true")
        if status != 307:  # e.g. 403 SafeModeException while the NameNode starts
            return False
        status, _, _ = _http("PUT", headers["Location"], body=b"ok")
        if status != 201:  # no DataNode registered yet
            return False
        try:
            status, headers, _ = _http("GET", f"{base}&op=OPEN")
            if status != 307:
                return False
            status, _, data = _http("GET", headers["Location"])
            return status == 200 and data == b"ok"
        finally:
            _http("DELETE", f"{base}&op=DELETE")


def _http(method: str, url: str, body: bytes | None = None,
          timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """One request, no redirect following (WebHDFS's 307s are handled by hand)."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request(method, f"{u.path}?{u.query}", body=body,
                     headers={"Content-Type": "application/octet-stream"} if body else {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def _site_xml(props: dict[str, str]) -> str:
    items = "".join(f"  <property><name>{k}</name><value>{escape(v)}</value></property>\n"
                    for k, v in props.items())
    return ('<?xml version="1.0"?>\n<!-- written by `python -m stack up`; '
            f'edits are overwritten -->\n<configuration>\n{items}</configuration>\n')


__all__ = ["Hdfs"]
