"""Fetch jars from Maven Central with the ordinary `mvn` client.

Two helpers, both idempotent (a marker file records what was fetched, so a
second call needs no network and no mvn):

``fetch_pom(cfg, name, pom_dir) -> Path``
    Copies every dependency (transitively) of ``pom_dir/pom.xml`` into
    ``<state>/<name>/lib`` and returns that directory; put ``lib/*`` on a
    classpath. The pom is a plain ``<packaging>pom</packaging>`` dependency list
    (see ``stack/poms/kafka/pom.xml``). Editing the pom triggers a re-fetch.

``fetch_artifact(cfg, name, coord, *, unpack=False, includes=None, subdir=...) -> Path``
    Copies one artifact ``group:artifact:version[:type[:classifier]]`` (no
    dependencies) into ``<state>/<name>/<subdir>``, or unpacks it there when
    ``unpack`` (zip/jar/tar.gz), optionally only the paths matching ``includes``
    (an Ant pattern such as ``"webapps/**"``). Returns the directory.

Downloads go through the user's ``~/.m2`` cache (or whatever ``MAVEN_OPTS`` /
settings.xml say), so a re-install after ``rm -rf .stack`` is offline.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path

from .config import StackConfig

# Pinned: mvn 3.8's default dependency plugin (2.8) predates some options we use.
PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
MARKER = ".fetched"


class MavenError(RuntimeError):
    pass


def fetch_pom(cfg: StackConfig, name: str, pom_dir: Path) -> Path:
    """Copy the dependencies of ``pom_dir/pom.xml`` into ``.stack/<name>/lib``."""
    pom = Path(pom_dir) / "pom.xml"
    lib = cfg.state(name) / "lib"
    key = hashlib.sha256(pom.read_bytes()).hexdigest()
    if _marked(lib, key):
        return lib
    # A changed pom must not leave stale jars (two versions of one library) behind.
    shutil.rmtree(lib, ignore_errors=True)
    lib.mkdir(parents=True)
    _run_mvn(name, ["-f", str(pom), f"{PLUGIN}:copy-dependencies",
                    f"-DoutputDirectory={lib}", "-DincludeScope=runtime"])
    (lib / MARKER).write_text(key)
    return lib


def is_fetched(cfg: StackConfig, name: str, pom_dir: Path, subdir: str = "lib") -> bool:
    pom = Path(pom_dir) / "pom.xml"
    return _marked(cfg.dir / name / subdir, hashlib.sha256(pom.read_bytes()).hexdigest())


def fetch_artifact(cfg: StackConfig, name: str, coord: str, *, unpack: bool = False,
                   includes: str | None = None, subdir: str = "dist") -> Path:
    """Copy (or unpack) a single artifact into ``.stack/<name>/<subdir>``."""
    dest = cfg.state(name) / subdir
    key = f"{coord} unpack={unpack} includes={includes}"
    if _marked(dest, key):
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    goal = "unpack" if unpack else "copy"
    args = [f"{PLUGIN}:{goal}", f"-Dartifact={coord}", f"-DoutputDirectory={dest}"]
    if includes:
        args.append(f"-Dmdep.unpack.includes={includes}")
    # These goals need no project; an empty directory keeps a stray pom.xml in the
    # caller's working directory from being picked up.
    with tempfile.TemporaryDirectory() as empty:
        _run_mvn(name, args, cwd=Path(empty))
    (dest / MARKER).write_text(key)
    return dest


def is_artifact_fetched(cfg: StackConfig, name: str, coord: str, *, unpack: bool = False,
                        includes: str | None = None, subdir: str = "dist") -> bool:
    return _marked(cfg.dir / name / subdir, f"{coord} unpack={unpack} includes={includes}")


def _marked(d: Path, key: str) -> bool:
    m = d / MARKER
    return m.exists() and m.read_text() == key


def _run_mvn(name: str, args: list[str], cwd: Path | None = None) -> None:
    """Run mvn in batch mode, echoing one short line per downloaded jar/zip."""
    if shutil.which("mvn") is None:
        raise MavenError("mvn not found: install Maven (apt-get install -y maven)")
    # Batch mode logs one "Downloaded from" line per file; we echo the jars only
    # (poms and checksums are noise) and keep the rest for an error report.
    argv = ["mvn", "-B", *args]
    tail: deque[str] = deque(maxlen=60)
    count = 0
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=str(cwd) if cwd else None)
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        tail.append(line)
        if "Downloaded from" in line and line.split(" (")[0].endswith(
                (".jar", ".zip", ".tar.gz")):
            count += 1
            url = line.split(": ", 1)[1].split(" (")[0]
            size = line.rsplit("(", 1)[-1].rstrip(")")
            print(f"  [{name}] {count:>3} {url.rsplit('/', 1)[-1]} ({size})",
                  flush=True)
    if proc.wait() != 0:
        sys.stderr.write("\n".join(tail) + "\n")
        raise MavenError(f"{name}: mvn {' '.join(args[:2])} failed (exit {proc.returncode}); "
                         "its output ends above")
    if count == 0:
        print(f"  [{name}] all artifacts already in the local Maven cache", flush=True)


__all__ = ["MavenError", "fetch_artifact", "fetch_pom", "is_artifact_fetched", "is_fetched"]
