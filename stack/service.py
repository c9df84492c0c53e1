"""What every stack service implements, and the process plumbing they share.

A service is a small class: ``install`` fetches what is missing (idempotent,
offline once done), ``start`` launches the daemon in the background with its
log under the state directory, ``ready`` answers True only after a real client
request succeeded, ``stop`` ends it. Pids are kept in ``<state>/<name>.pid`` so
``status`` and ``down`` work from another process.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import ClassVar, Sequence

from .config import StackConfig


class Service:
    name: ClassVar[str]
    #: processes the service runs as (one pid file each): usually just [name]
    processes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: StackConfig) -> None:
        self.cfg = cfg
        self.opts = cfg.services.get(self.name, {})

    # -- to implement -------------------------------------------------------
    def install(self) -> None:
        """Fetch binaries/jars if missing. Must print progress; idempotent."""
        raise NotImplementedError

    def start(self) -> None:
        """Configure (first start: format storage etc.) and launch in the background."""
        raise NotImplementedError

    def ready(self) -> bool:
        """True once a real client request succeeded. Must not block > ~5 s."""
        raise NotImplementedError

    def address(self) -> str:
        raise NotImplementedError

    def is_installed(self) -> bool:
        raise NotImplementedError

    # -- shared plumbing ----------------------------------------------------
    @property
    def state(self) -> Path:
        return self.cfg.state(self.name)

    def log_path(self, proc: str | None = None) -> Path:
        return self.state / f"{proc or self.name}.log"

    def pid_path(self, proc: str | None = None) -> Path:
        return self.state / f"{proc or self.name}.pid"

    def proc_names(self) -> tuple[str, ...]:
        return self.processes or (self.name,)

    def spawn(self, argv: Sequence[str], *, proc: str | None = None,
              env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
        """Start ``argv`` detached in its own session; log to the state dir."""
        log = self.log_path(proc).open("ab")
        full_env = {**os.environ, **(env or {})}
        p = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, env=full_env,
                             cwd=str(cwd or self.state), start_new_session=True)
        self.pid_path(proc).write_text(str(p.pid))
        return p.pid

    def pids(self) -> dict[str, int]:
        out = {}
        for proc in self.proc_names():
            pf = self.pid_path(proc)
            if pf.exists():
                try:
                    pid = int(pf.read_text().strip())
                except ValueError:
                    continue
                if _alive(pid):
                    out[proc] = pid
        return out

    def running(self) -> bool:
        return len(self.pids()) == len(self.proc_names())

    def rss_bytes(self) -> int:
        total = 0
        for pid in self.pids().values():
            for p in _tree(pid):
                try:
                    with open(f"/proc/{p}/statm") as fh:
                        total += int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
                except OSError:
                    pass
        return total

    def stop(self, timeout: float = 30.0) -> None:
        for proc, pid in reversed(list(self.pids().items())):
            _terminate_group(pid, timeout)
            self.pid_path(proc).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _tree(pid: int) -> list[int]:
    """pid and its descendants (via /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _terminate_group(pid: int, timeout: float) -> None:
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            break
        time.sleep(0.2)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def java_home(min_version: int = 17) -> str:
    """A JAVA_HOME with at least ``min_version`` (the default JDK, or Temurin 25)."""
    candidates = [os.environ.get("JAVA_HOME", ""), "/usr/lib/jvm/java-17-openjdk-amd64",
                  "/usr/lib/jvm/temurin-25-jdk-amd64"]
    if min_version > 17:
        candidates = ["/usr/lib/jvm/temurin-25-jdk-amd64", *sorted(
            str(p) for p in Path("/usr/lib/jvm").glob("*") if p.is_dir())]
    for c in candidates:
        if c and Path(c, "bin", "java").exists() and _java_major(c) >= min_version:
            return c
    raise RuntimeError(f"no JDK >= {min_version} found under /usr/lib/jvm or JAVA_HOME")


def _java_major(home: str) -> int:
    try:
        out = subprocess.run([f"{home}/bin/java", "-version"], capture_output=True,
                             text=True, timeout=20).stderr
        v = out.split('"')[1]
        return int(v.split(".")[0]) if not v.startswith("1.") else int(v.split(".")[1])
    except (OSError, IndexError, ValueError, subprocess.SubprocessError):
        return 0
