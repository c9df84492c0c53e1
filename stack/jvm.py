"""The java command line the JVM services share (Kafka, HDFS)."""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from .service import java_home

# Small heaps on a 2-core box: start the heap small so RSS grows only as far as
# the service needs (Xmx is the cap), cap GC threads so idle JVMs do not steal
# both cores, and die on OOM instead of limping on.
COMMON_OPTS = (
    "-XX:+UseG1GC",
    "-XX:ParallelGCThreads=2",
    "-XX:ConcGCThreads=1",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
    "-Djava.net.preferIPv4Stack=true",
)


def classpath(*entries: Path | str) -> str:
    """Join entries; a directory named ``lib`` becomes ``lib/*`` (all its jars)."""
    parts = []
    for e in entries:
        p = Path(e)
        parts.append(f"{p}/*" if p.name == "lib" else str(p))
    return os.pathsep.join(parts)


def java_argv(main: str, *, heap: str, cp: str, args: Sequence[str] = (),
              opts: Iterable[str] = (), min_version: int = 17) -> list[str]:
    """``java -Xmx<heap> <opts> -cp <cp> <main> <args>`` with a suitable JDK."""
    java = str(Path(java_home(min_version), "bin", "java"))
    xms = heap if _mb(heap) < 64 else "64m"  # Xms above Xmx would not start
    return [java, f"-Xms{xms}", f"-Xmx{heap}", *COMMON_OPTS, *opts, "-cp", cp, main, *args]


def _mb(size: str) -> float:
    """'512m' -> 512, '1g' -> 1024 (JVM size syntax, as validated by stack.config)."""
    n, unit = float(size[:-1]), size[-1].lower()
    return n * {"k": 1 / 1024, "m": 1, "g": 1024}[unit]


__all__ = ["COMMON_OPTS", "classpath", "java_argv"]
