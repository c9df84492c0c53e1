"""Elasticsearch 9: Maven Central's minimal distribution, one node on loopback.

Maven Central serves ``org.elasticsearch.distribution.integ-test-zip:elasticsearch``
(the distribution Elasticsearch's own REST tests run against). It is the real
server with only a few modules (transport-netty4, x-pack-core, x-pack-security,
apm): indexing, get, bulk, search, core queries and aggregations, mappings and
cluster APIs work; APIs that live in the modules it lacks do not: ingest
processors, painless scripts, ``*_by_query`` and reindex, data streams, and
``GET /``. That last one (``client.info()``, ``client.ping()``) is restored by a
small plugin of ours compiled at install (``stack/poms/elasticsearch/root-plugin``).
It needs Java 21+ (Temurin 25 here)
and refuses to run as root: when the stack runs as root, the node runs as the
unprivileged system user ``elasticsearch`` (created if missing) via ``setpriv``,
and owns only its config, data, logs and tmp directories.
"""
from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import subprocess
import time
import zipfile
from pathlib import Path
from typing import TypeVar

from .. import maven
from ..config import ROOT
from ..service import Service, java_home, probe_ready, run_async

VERSION = "9.5.3"
ARTIFACT = f"org.elasticsearch.distribution.integ-test-zip:elasticsearch:{VERSION}:zip"
RUN_AS = "elasticsearch"
ROOT_PLUGIN = "gaitflow-root"
ROOT_PLUGIN_SRC = ROOT / "stack/poms/elasticsearch/root-plugin/GaitflowRootPlugin.java"

T = TypeVar("T")

YML = """\
# Written by `python -m stack` on every start; edit stack/services/elasticsearch.py instead.
cluster.name: gaitflow
node.name: gaitflow-es
path.data: {data}
path.logs: {logs}
network.host: 127.0.0.1
http.port: {port}
transport.port: {transport_port}
# One node, dev mode: no cluster bootstrapping, bootstrap checks not enforced.
discovery.type: single-node
# Plain HTTP, no users: the stack is on loopback only.
xpack.security.enabled: false
# A fullish developer disk must not turn indices read-only.
cluster.routing.allocation.disk.threshold_enabled: false
action.destructive_requires_name: false
"""

JVM_OPTIONS = """\
# Written by `python -m stack`; the heap comes from ES_JAVA_OPTS.
-XX:+UseG1GC
-Djava.io.tmpdir=${{ES_TMPDIR}}
20-:--add-modules=jdk.incubator.vector
23:-XX:CompileCommand=dontinline,java/lang/invoke/MethodHandle.setAsTypeCache
23:-XX:CompileCommand=dontinline,java/lang/invoke/MethodHandle.asTypeUncached
-Dorg.apache.lucene.store.defaultReadAdvice=normal
-Dorg.apache.lucene.store.MMapDirectory.sharedArenaMaxPermits=1
--add-opens=java.base/jdk.internal.misc=ALL-UNNAMED
-XX:+HeapDumpOnOutOfMemoryError
-XX:HeapDumpPath={logs}
-XX:+ExitOnOutOfMemoryError
-XX:ErrorFile={logs}/hs_err_pid%p.log
-Xlog:gc*,gc+age=trace,safepoint:file={logs}/gc.log:utctime,level,pid,tags:filecount=4,filesize=16m
"""


class Elasticsearch(Service):
    name = "elasticsearch"

    @property
    def state(self) -> Path:
        """The state dir; relocated when the unprivileged node user could not reach it.

        Elasticsearch refuses to run as root, so as root the node runs as a system
        user that must traverse every parent of its files. A checkout under a
        private home (``/root/...``, mode 700) cannot be traversed: then the node's
        files live under ``/var/lib/gaitflow-stack/<hash of the state dir>/``.
        """
        base = super().state
        if os.geteuid() != 0 or _world_traversable(base):
            return base
        digest = hashlib.sha256(str(base).encode()).hexdigest()[:12]
        alt = RELOCATED / digest / self.name
        alt.mkdir(parents=True, exist_ok=True)
        for p in (RELOCATED, RELOCATED / digest, alt):
            p.chmod(0o755)
        return alt

    @property
    def home(self) -> Path:
        return self.state / f"elasticsearch-{VERSION}"

    def _stamp(self) -> str:
        # The plugin source is part of the install: editing it triggers a rebuild.
        src = hashlib.sha256(ROOT_PLUGIN_SRC.read_bytes()).hexdigest()[:16]
        return f"{VERSION} root-plugin={src}\n"

    def is_installed(self) -> bool:
        done = self.home / ".complete"
        return done.exists() and done.read_text() == self._stamp()

    def install(self) -> None:
        if self.is_installed():
            print(f"elasticsearch: {VERSION} already unpacked in {self.home}")
            return
        t0 = time.monotonic()
        if (self.home / ".complete").exists():  # only the plugin changed
            self._build_root_plugin()
            (self.home / ".complete").write_text(self._stamp())
            return
        print(f"elasticsearch: fetching {ARTIFACT} from Maven Central (~130 MB)", flush=True)
        dist = maven.fetch_artifact(self.cfg, self.name, ARTIFACT, subdir="dist")
        (zip_path,) = dist.glob(f"elasticsearch-{VERSION}*.zip")
        print(f"elasticsearch: unpacking into {self.home}", flush=True)
        tmp = self.state / f".unpack-{VERSION}"
        shutil.rmtree(tmp, ignore_errors=True)
        # zipfile, not mvn's unpack: the scripts under bin/ need their exec bits.
        with zipfile.ZipFile(zip_path) as zf:
            for info in zf.infolist():
                target = Path(zf.extract(info, tmp))
                mode = info.external_attr >> 16 & 0o777
                if mode and not info.is_dir():
                    target.chmod(mode)
        shutil.rmtree(self.home, ignore_errors=True)
        (tmp / f"elasticsearch-{VERSION}").rename(self.home)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(dist)  # ~/.m2 keeps the zip: a re-install stays offline
        self._build_root_plugin()
        (self.home / ".complete").write_text(self._stamp())
        print(f"elasticsearch: installed in {time.monotonic() - t0:.0f}s", flush=True)

    def _build_root_plugin(self) -> None:
        """Compile and install the GET/HEAD ``/`` plugin (see its source for why)."""
        print("elasticsearch: compiling the `GET /` plugin (the zip has no rest-root module)",
              flush=True)
        jdk = Path(java_home(21))
        dest = self.home / "plugins" / ROOT_PLUGIN
        build = self.state / ".build-root-plugin"
        shutil.rmtree(build, ignore_errors=True)
        shutil.rmtree(dest, ignore_errors=True)
        classes = build / "classes"
        _run([str(jdk / "bin" / "javac"), "--release", "21", "-proc:none", "-nowarn",
              "-d", str(classes), "-cp", f"{self.home / 'lib'}/*",
              str(ROOT_PLUGIN_SRC)])
        dest.mkdir(parents=True)
        _run([str(jdk / "bin" / "jar"), "--create", "--file", str(dest / f"{ROOT_PLUGIN}.jar"),
              "-C", str(classes), "."])
        (dest / "plugin-descriptor.properties").write_text(
            "description=GET / and HEAD / (info, ping) for the gaitflow stack\n"
            "version=1.0\n"
            f"name={ROOT_PLUGIN}\n"
            "classname=gaitflow.stack.es.GaitflowRootPlugin\n"
            "java.version=21\n"
            f"elasticsearch.version={VERSION}\n")
        shutil.rmtree(build, ignore_errors=True)

    def address(self) -> str:
        return f"http://127.0.0.1:{self.opts['port']}"

    def start(self) -> None:
        conf, data, logs, tmp = (self.state / d for d in ("config", "data", "logs", "tmp"))
        for d in (conf, data, logs, tmp):
            d.mkdir(parents=True, exist_ok=True)
        for f in ("log4j2.properties",):
            shutil.copy2(self.home / "config" / f, conf / f)
        (conf / "jvm.options.d").mkdir(exist_ok=True)
        (conf / "elasticsearch.yml").write_text(YML.format(
            data=data, logs=logs, port=self.opts["port"],
            transport_port=self.opts["transport_port"]))
        (conf / "jvm.options").write_text(JVM_OPTIONS.format(logs=logs))
        heap = str(self.opts["heap"])
        jhome = java_home(21)
        env = {
            "ES_JAVA_HOME": jhome,
            "ES_PATH_CONF": str(conf),
            "ES_TMPDIR": str(tmp),
            # Xms below Xmx (fine in dev mode): RSS grows only as far as the node needs.
            "ES_JAVA_OPTS": f"-Xms256m -Xmx{heap}",
            "HOME": str(self.state),
        }
        argv = [str(self.home / "bin" / "elasticsearch")]
        if os.geteuid() == 0:
            uid, gid = _service_user(RUN_AS)
            for d in (conf, data, logs, tmp):
                _chown_tree(d, uid, gid)
            _check_reachable(self.home, uid, gid)
            argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                    "--inh-caps=-all", "--", *argv]
        self.spawn(argv, env=env, cwd=self.home)

    def ready(self) -> bool:
        return probe_ready(int(self.opts["port"]), lambda: run_async(self._health, timeout=5.0))

    async def _health(self) -> bool:
        from elasticsearch import AsyncElasticsearch

        async with AsyncElasticsearch(self.address(), request_timeout=3,
                                      retry_on_timeout=False, max_retries=0) as es:
            health = await es.cluster.health(wait_for_status="yellow", timeout="2s")
            return health["status"] in ("green", "yellow")


RELOCATED = Path("/var/lib/gaitflow-stack")


def _world_traversable(path: Path) -> bool:
    """True when every directory from / down to ``path`` has the o+x bit."""
    return all(os.stat(p).st_mode & 0o001 for p in [path, *path.parents])


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{proc.stdout}{proc.stderr}")


def _service_user(name: str) -> tuple[int, int]:
    """uid/gid of the unprivileged user the node runs as; created if missing."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        print(f"elasticsearch: Elasticsearch refuses to run as root; creating system user "
              f"{name!r} to run it", flush=True)
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                        "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name],
                       check=True)
        pw = pwd.getpwnam(name)
    return pw.pw_uid, pw.pw_gid


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for n in dirs + files:
            os.chown(os.path.join(root, n), uid, gid, follow_symlinks=False)


def _check_reachable(path: Path, uid: int, gid: int) -> None:
    probe = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                            "test", "-r", str(path / "lib"), "-a", "-x", str(path / "lib")],
                           check=False)
    if probe.returncode != 0:
        raise RuntimeError(
            f"elasticsearch: user {RUN_AS!r} cannot read {path}; Elasticsearch refuses to run "
            f"as root, so every parent directory of the stack's state dir must be "
            f"world-executable (chmod o+x), or set STACK_DIR to such a place")
