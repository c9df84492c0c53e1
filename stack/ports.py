"""Who holds a port: so "port in use" errors name the process, not just the number."""
from __future__ import annotations

import os
import socket


def in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True if something accepts connections on host:port or holds it bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        if s.connect_ex((host, port)) == 0:
            return True
    # Connect misses a listener bound to another local address; a bind test
    # catches that. SO_REUSEADDR so a socket lingering in TIME_WAIT is not "in use".
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def holder(port: int) -> str:
    """'pid 123 (java -cp ...)' for the process listening on ``port``, if it can be found."""
    inodes = _listening_inodes(port)
    if not inodes:
        return "an unknown process"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                return f"pid {pid} ({_cmdline(pid)})"
    return "a process this user cannot see"


def _listening_inodes(port: int) -> set[str]:
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                next(fh)
                for line in fh:
                    f = line.split()
                    # f[1] local address "HEX_IP:HEX_PORT", f[3] state 0A = LISTEN
                    if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                        out.add(f[9])
        except OSError:
            pass
    return out


def _cmdline(pid: str, limit: int = 120) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            text = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"
    return text if len(text) <= limit else text[:limit] + "..."


__all__ = ["holder", "in_use"]
