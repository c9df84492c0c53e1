"""What the CLI verbs do: install, up, status, down, logs over the registry.

``up`` starts services in registry order, at most ``jobs`` booting at once (on
two cores, five JVMs booting together make each one slower than running them a
few at a time), and waits for each until its ready() succeeds, its process
dies, or its timeout passes.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass

from . import ports, services
from .config import StackConfig
from .service import Service, _terminate_group

HEARTBEAT_S = 10.0


@dataclass
class Outcome:
    name: str
    address: str = "-"
    state: str = "failed"
    seconds: float | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.state in ("ready", "already running")


class _Printer:
    """Thread-safe progress lines."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __call__(self, msg: str) -> None:
        with self._lock:
            print(msg, flush=True)


say = _Printer()


def _instances(cfg: StackConfig, names: list[str]) -> tuple[list[Service], list[Outcome]]:
    """Service objects for ``names``, and an Outcome for each that cannot be loaded."""
    loaded, failed = [], []
    for n in names:
        try:
            loaded.append(services.get(n)(cfg))
        except services.Unavailable as exc:
            failed.append(Outcome(n, error=str(exc), state="unavailable"))
    return loaded, failed


# -- install -----------------------------------------------------------------
def install(cfg: StackConfig, names: list[str]) -> int:
    svcs, failed = _instances(cfg, services.select(names))
    t_all = time.monotonic()
    for o in failed:
        say(f"!! {o.error}")
    for svc in svcs:
        if svc.is_installed():
            say(f"== {svc.name}: installed")
            continue
        say(f"== {svc.name}: installing")
        t0 = time.monotonic()
        try:
            svc.install()
        except Exception as exc:  # noqa: BLE001 - report and go on with the others
            failed.append(Outcome(svc.name, error=f"{type(exc).__name__}: {exc}"))
            say(f"!! {svc.name}: install failed: {exc}")
            continue
        say(f"== {svc.name}: installed in {time.monotonic() - t0:.1f}s")
    say(f"install finished in {time.monotonic() - t_all:.1f}s"
        + (f"; FAILED: {', '.join(o.name for o in failed)}" if failed else ""))
    return 1 if failed else 0


# -- up ----------------------------------------------------------------------
def up(cfg: StackConfig, names: list[str], jobs: int = 3) -> int:
    svcs, results = _instances(cfg, services.select(names))
    gate = threading.Semaphore(max(1, jobs))
    waiting: dict[str, float] = {}
    lock = threading.Lock()
    t_all = time.monotonic()

    def run(svc: Service) -> None:
        o = _bring_up(svc, gate, waiting, lock)
        with lock:
            results.append(o)

    threads = [threading.Thread(target=run, args=(s,), name=f"up-{s.name}") for s in svcs]
    for t in threads:
        t.start()
    last_beat = time.monotonic()
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(timeout=0.2)
        now = time.monotonic()
        if now - last_beat >= HEARTBEAT_S:
            last_beat = now
            with lock:
                pending = dict(waiting)
            if pending:
                say("   waiting for " + ", ".join(f"{n} ({now - t0:.0f}s)"
                                                   for n, t0 in pending.items()))
    total = time.monotonic() - t_all
    order = {n: i for i, n in enumerate(services.ORDER)}
    results.sort(key=lambda o: order[o.name])
    _table(["service", "address", "state", "seconds"],
           [[o.name, o.address, o.state, "-" if o.seconds is None else f"{o.seconds:.1f}"]
            for o in results])
    bad = [o for o in results if not o.ok]
    for o in bad:
        print(f"\n!! {o.name}: {o.error}", file=sys.stderr)
    say(f"up: {len(results) - len(bad)}/{len(results)} ready in {total:.1f}s")
    if bad:
        print(f"up FAILED: {', '.join(o.name for o in bad)}", file=sys.stderr)
    return 1 if bad else 0


def _bring_up(svc: Service, gate: threading.Semaphore, waiting: dict[str, float],
              lock: threading.Lock) -> Outcome:
    o = Outcome(svc.name)
    try:
        o.address = svc.address()
        if not svc.is_installed():
            o.error = f"not installed: run `python -m stack install {svc.name}`"
            return o
        if not svc.daemon:
            t0 = time.monotonic()
            if svc.ready():
                o.state, o.seconds = "ready", time.monotonic() - t0
            else:
                o.error = "installed but not usable"
            return o
        if svc.running() and svc.ready():
            o.state = "already running"
            return o
        with gate:
            t0 = time.monotonic()
            with lock:
                waiting[svc.name] = t0
            try:
                if not svc.pids():  # partly running (HDFS): its own ports are busy
                    busy = [p for p in svc.ports() if ports.in_use(p)]
                    if busy:
                        o.error = (f"port {busy[0]} is already in use by "
                                   f"{ports.holder(busy[0])}; stop that process or change "
                                   f"the port under [stack.{svc.name}] in stack.toml")
                        return o
                if not svc.running():
                    say(f"   {svc.name}: starting")
                    svc.start()
                ok, why = _wait_ready(svc, t0 + svc.ready_timeout)
            finally:
                with lock:
                    waiting.pop(svc.name, None)
            o.seconds = time.monotonic() - t0
            if ok:
                o.state = "ready"
                say(f"   {svc.name}: ready in {o.seconds:.1f}s")
                return o
            o.error = f"{why}\n{svc.log_tail(30)}"
            svc.stop()  # a half-started service would make the next `up` wait on it
            o.error += f"\n(stopped {svc.name}; full log: python -m stack logs {svc.name})"
            return o
    except Exception as exc:  # noqa: BLE001 - one service's failure must not hide others
        o.error = f"{type(exc).__name__}: {exc}\n{svc.log_tail(30)}"
        try:
            svc.stop()
        except Exception as stop_exc:  # noqa: BLE001 - the start error matters more
            o.error += f"\n(and stopping it failed: {stop_exc})"
        return o


def _wait_ready(svc: Service, deadline: float) -> tuple[bool, str]:
    while True:
        dead = svc.crashed()
        if dead:
            return False, f"process {', '.join(dead)} exited during start"
        if svc.ready():
            return True, ""
        if time.monotonic() >= deadline:
            return False, f"not ready after {svc.ready_timeout:.0f}s"
        time.sleep(1.0)


# -- status ------------------------------------------------------------------
def status(cfg: StackConfig) -> int:
    svcs, unavailable = _instances(cfg, list(services.ORDER))
    rows: dict[str, list[str]] = {o.name: [o.name, "-", "unavailable", "-", "-"]
                                  for o in unavailable}

    def probe(svc: Service) -> None:
        pids = svc.pids()
        if not svc.is_installed():
            state = "not installed"
        elif not svc.daemon:
            state = "ready (no daemon)" if svc.ready() else "not usable"
        elif svc.running():
            state = "running, ready" if svc.ready() else "running, NOT ready"
        elif pids:
            state = f"partial: only {', '.join(pids)} running"
        elif svc.crashed():
            state = f"crashed: {', '.join(svc.crashed())}"
        else:
            state = "stopped"
        rss = svc.rss_bytes()
        rows[svc.name] = [svc.name, svc.address(), state,
                          f"{rss / 2**20:.0f}" if pids else "-",
                          " ".join(f"{p}={pid}" for p, pid in pids.items()) or "-"]

    threads = [threading.Thread(target=probe, args=(s,)) for s in svcs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _table(["service", "address", "state", "RSS MB", "pids"],
           [rows[n] for n in services.ORDER if n in rows])
    for o in unavailable:
        print(f"   {o.error}")
    return 0


# -- down --------------------------------------------------------------------
def down(cfg: StackConfig, names: list[str]) -> int:
    selected = services.select(names)
    svcs, _ = _instances(cfg, selected)  # unloadable ones: see the stray sweep
    for svc in reversed(svcs):
        pids = svc.pids()
        if not pids:
            for proc in svc.crashed():  # stale pid file of a dead process
                svc.pid_path(proc).unlink(missing_ok=True)
            continue
        t0 = time.monotonic()
        svc.stop()
        say(f"   stopped {svc.name} ({', '.join(pids)}) in {time.monotonic() - t0:.1f}s")
    if not names:
        # Processes of this stack whose pid file was lost (state dir edited,
        # a module that fails to import): nothing may survive a full `down`.
        for pid, cmd in stray_processes(cfg):
            say(f"   stopping stray stack process {pid}: {cmd[:100]}")
            _terminate_group(pid, 15.0)
    left = stray_processes(cfg) if not names else []
    for pid, cmd in left:
        print(f"!! still running: {pid} {cmd[:100]}", file=sys.stderr)
    say("down: " + ("done" if not left else "processes remain"))
    return 1 if left else 0


def stray_processes(cfg: StackConfig) -> list[tuple[int, str]]:
    """Processes started by the stack: running in its state dir and naming it."""
    root = str(cfg.dir.resolve()) + os.sep
    me = os.getpid()
    out = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        pid = int(d)
        if pid == me:
            continue
        try:
            cwd = os.readlink(f"/proc/{d}/cwd") + os.sep
            with open(f"/proc/{d}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cwd.startswith(root) and root in cmd:
            out.append((pid, cmd))
    return out


# -- logs --------------------------------------------------------------------
def logs(cfg: StackConfig, name: str, lines: int, follow: bool) -> int:
    svc = services.get(services.select([name])[0])(cfg)
    paths = [svc.log_path(p) for p in svc.proc_names() if svc.log_path(p).exists()]
    if not paths:
        print(f"no log yet under {svc.state}", file=sys.stderr)
        return 1
    if follow:
        os.execvp("tail", ["tail", "-n", str(lines), "-F", *map(str, paths)])
    print(svc.log_tail(lines, width=1 << 20))
    return 0


def _table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    say(line.format(*headers).rstrip())
    say(line.format(*("-" * w for w in widths)))
    for r in rows:
        say(line.format(*r).rstrip())


__all__ = ["down", "install", "logs", "status", "stray_processes", "up"]
