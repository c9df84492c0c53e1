"""Stack settings: where state lives, which ports and heap sizes each service uses.

Defaults can be overridden by a `[stack]` section (and `[stack.<service>]`
sub-tables) in the file named by ``STACK_CONFIG`` (default ``stack.toml`` at the
repository root, optional) and by ``STACK_DIR`` for the state directory.
"""
from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

DEFAULTS: dict[str, dict[str, object]] = {
    "mosquitto": {"port": 1883, "secure_port": 8883, "tls_port": 8884},
    "kafka": {"port": 9092, "controller_port": 9093, "heap": "512m"},
    "hdfs": {"namenode_http": 9870, "namenode_rpc": 8020, "datanode_http": 9864,
             "datanode_port": 9866, "datanode_ipc": 9867, "heap": "384m"},
    "cassandra": {"port": 9042, "storage_port": 7000, "heap": "1024m"},
    "elasticsearch": {"port": 9200, "transport_port": 9300, "heap": "768m"},
    "ferretdb": {"port": 27017},
    "spark": {"master": "local[*]"},
}


HEAP_RE = re.compile(r"[1-9][0-9]*[kKmMgG]")


class StackConfigError(ValueError):
    pass


@dataclass(frozen=True)
class StackConfig:
    dir: Path
    services: dict[str, dict[str, object]] = field(default_factory=dict)

    def svc(self, name: str) -> dict[str, object]:
        return self.services[name]

    def state(self, name: str) -> Path:
        """Per-service state directory (data, config, pid, log)."""
        p = self.dir / name
        p.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def downloads(self) -> Path:
        p = self.dir / "downloads"
        p.mkdir(parents=True, exist_ok=True)
        return p


def load(path: str | os.PathLike[str] | None = None) -> StackConfig:
    path = Path(path or os.environ.get("STACK_CONFIG") or ROOT / "stack.toml")
    services = {k: dict(v) for k, v in DEFAULTS.items()}
    state_dir = Path(os.environ.get("STACK_DIR") or ROOT / ".stack")
    if path.exists():
        with path.open("rb") as fh:
            doc = tomllib.load(fh)
        section = doc.get("stack", {})
        for key, value in section.items():
            if key == "dir":
                state_dir = Path(value) if Path(value).is_absolute() else ROOT / value
            elif key in services and isinstance(value, dict):
                for k, v in value.items():
                    if k not in services[key]:
                        raise StackConfigError(
                            f"{path}: [stack.{key}] unknown key {k!r}; "
                            f"expected one of {sorted(services[key])}")
                    if type(v) is not type(services[key][k]):
                        raise StackConfigError(
                            f"{path}: [stack.{key}] {k} = {v!r}: expected "
                            f"{type(services[key][k]).__name__}")
                    if k == "heap" and not HEAP_RE.fullmatch(v):
                        raise StackConfigError(
                            f"{path}: [stack.{key}] heap = {v!r}: expected a JVM size "
                            "such as '512m' or '1g'")
                    services[key][k] = v
            else:
                raise StackConfigError(
                    f"{path}: [stack] unknown key {key!r}; expected 'dir' or a service "
                    f"table among {sorted(services)}")
    return StackConfig(dir=state_dir, services=services)


__all__ = ["DEFAULTS", "ROOT", "StackConfig", "StackConfigError", "load"]
