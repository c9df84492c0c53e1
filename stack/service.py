"""What every stack service implements, and the process plumbing they share.

A service is a small class: ``install`` fetches what is missing (idempotent,
offline once done), ``start`` launches the daemon in the background with its
log under the state directory, ``ready`` answers True only after a real client
request succeeded, ``stop`` ends it. Pids are kept in ``<state>/<name>.pid`` so
``status`` and ``down`` work from another process.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import ClassVar, TypeVar

from .config import StackConfig

T = TypeVar("T")

#: first line of each start in a service's log (see spawn, log_tail)
START_MARK = "==== stack start"


class Service:
    name: ClassVar[str]
    #: processes the service runs as (one pid file each): usually just [name]
    processes: ClassVar[tuple[str, ...]] = ()
    #: seconds `stack up` waits for ready() after start() before it gives up
    ready_timeout: ClassVar[float] = 120.0
    #: False for a service with nothing to keep running (Spark's local master):
    #: start() is a no-op and ready() only checks the install
    daemon: ClassVar[bool] = True

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

    def ports(self) -> list[int]:
        """Ports the service listens on; `up` refuses to start if one is taken."""
        return [v for v in self.opts.values() if isinstance(v, int) and not isinstance(v, bool)]

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
        """Start ``argv`` detached in its own session; log to the state dir.

        A throw-away ``sh`` backgrounds the daemon and exits at once (the classic
        double fork), so the daemon is not our child: it outlives the caller, and
        the caller (say, a test that restarts the NameNode) holds no Popen whose
        finalizer would warn "subprocess still running".
        """
        log = self.log_path(proc)
        with log.open("ab") as fh:  # a header per start, so a tail shows which run
            fh.write(f"\n{START_MARK} {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                     f"{' '.join(map(str, argv))}\n".encode())
        full_env = {**os.environ, **(env or {})}
        sh = subprocess.run(
            ["/bin/sh", "-c", 'log="$1"; shift; "$@" >>"$log" 2>&1 </dev/null & echo $!',
             "sh", str(log), *map(str, argv)],
            env=full_env, cwd=str(cwd or self.state), start_new_session=True,
            capture_output=True, text=True, check=True)
        pid = int(sh.stdout.strip())
        self.pid_path(proc).write_text(str(pid))
        return pid

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
        for proc in reversed(self.proc_names()):
            self.stop_proc(proc, timeout)

    def stop_proc(self, proc: str, timeout: float = 30.0) -> None:
        """Stop one process of the service (SIGTERM, then SIGKILL after timeout)."""
        pid = self.pids().get(proc)
        if pid is not None:
            _terminate_group(pid, timeout)
        self.pid_path(proc).unlink(missing_ok=True)

    def crashed(self) -> list[str]:
        """Processes that were started (pid file present) but are no longer alive."""
        alive = self.pids()
        return [p for p in self.proc_names() if self.pid_path(p).exists() and p not in alive]

    def log_tail(self, lines: int = 25, width: int = 400) -> str:
        """The end of each process's log, from its latest start only."""
        out = []
        for proc in self.proc_names():
            lp = self.log_path(proc)
            if not lp.exists():
                continue
            with lp.open("rb") as fh:
                fh.seek(max(0, lp.stat().st_size - 64 * 1024))
                text = fh.read().decode(errors="replace").splitlines()
            starts = [i for i, line in enumerate(text) if line.startswith(START_MARK)]
            text = text[starts[-1]:] if starts else text
            text = [t if len(t) <= width else t[:width] + " ..." for t in text[-lines:]]
            out.append(f"--- last {len(text)} lines of {lp} ---\n" + "\n".join(text))
        return "\n".join(out) or f"(no log under {self.state})"


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
                             text=True, timeout=20, check=False).stderr
        v = out.split('"')[1]
        return int(v.split(".")[0]) if not v.startswith("1.") else int(v.split(".")[1])
    except (OSError, IndexError, ValueError, subprocess.SubprocessError):
        return 0


def run_async(fn: Callable[[], Awaitable[T]], timeout: float) -> T:
    """Run ``fn()`` on a private event loop, also when called from inside one."""
    async def bounded() -> T:
        return await asyncio.wait_for(fn(), timeout)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(bounded())
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(bounded()))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            error.append(exc)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout + 1)
    if error:
        raise error[0]
    if not result:
        raise TimeoutError(f"no answer within {timeout}s")
    return result[0]


def listening(port: int) -> bool:
    """True when something accepts a TCP connection on ``127.0.0.1:port``."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def probe_ready(port: int, check: Callable[[], bool]) -> bool:
    """``check()`` (a real client request) once ``port`` listens; any failure: not ready yet.

    The cheap TCP probe comes before the client: a client library retrying against a
    closed port logs tracebacks on every poll while the server boots.
    """
    if not listening(port):
        return False
    try:
        return check()
    except Exception:  # noqa: BLE001 - any failure means "not ready yet"
        return False
