"""Counters, gauges and histograms with labels, rendered as Prometheus text."""
from __future__ import annotations

import bisect
import contextlib
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = ["HandlerMetrics", "MetricsRegistry", "process_samples", "register_process_metrics"]

PREFIX = "gaitflow_"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0)
_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class _Value:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = value


class _Histogram:
    __slots__ = ("buckets", "count", "counts", "sum")

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1


class Family:
    """One metric name with its label names; ``labels(...)`` gives a child to update."""

    def __init__(self, name: str, doc: str, kind: str, labelnames: Sequence[str],
                 buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.name, self.doc, self.kind = name, doc, kind
        self.labelnames = tuple(labelnames)
        self.buckets = tuple(buckets)
        self.children: dict[tuple[str, ...], Any] = {}
        self.function: Callable[[], Iterable[tuple[Sequence[str], float]]] | None = None

    def labels(self, *values: str) -> Any:
        key = tuple(str(v) for v in values)
        child = self.children.get(key)
        if child is None:
            if len(key) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {key}")
            child = _Histogram(self.buckets) if self.kind == "histogram" else _Value()
            self.children[key] = child
        return child

    def set_function(self, fn: Callable[[], Iterable[tuple[Sequence[str], float]]]) -> None:
        """Compute samples at scrape time (channel depth, ack lag...)."""
        self.function = fn

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} {self.kind}"]
        if self.function is not None:
            for values, value in self.function():
                lines.append(f"{self.name}{_labels(self.labelnames, values)} {_num(value)}")
            return lines
        for values, child in sorted(self.children.items()):
            if isinstance(child, _Histogram):
                cumulative = 0
                for bound, count in zip((*child.buckets, math.inf), child.counts, strict=True):
                    cumulative += count
                    le = f'le="{_num(bound)}"'
                    lines.append(f"{self.name}_bucket{_labels(self.labelnames, values, le)} "
                                 f"{cumulative}")
                lines.append(f"{self.name}_sum{_labels(self.labelnames, values)} "
                             f"{_num(child.sum)}")
                lines.append(f"{self.name}_count{_labels(self.labelnames, values)} "
                             f"{child.count}")
            else:
                lines.append(f"{self.name}{_labels(self.labelnames, values)} "
                             f"{_num(child.value)}")
        return lines


class MetricsRegistry:
    """All metric families of one runtime."""

    def __init__(self) -> None:
        self._families: dict[str, Family] = {}

    def family(self, name: str, doc: str, kind: str, labelnames: Sequence[str] = (),
               buckets: Sequence[float] = LATENCY_BUCKETS) -> Family:
        full = name if name.startswith(PREFIX) else PREFIX + name
        if kind == "counter" and not full.endswith("_total"):
            full += "_total"
        if not _NAME.match(full):
            raise ValueError(f"invalid metric name {full!r}")
        existing = self._families.get(full)
        if existing is not None:
            if existing.kind != kind or existing.labelnames != tuple(labelnames):
                raise ValueError(f"metric {full!r} already registered as {existing.kind} "
                                 f"with labels {existing.labelnames}")
            return existing
        fam = Family(full, doc, kind, labelnames, buckets)
        self._families[full] = fam
        return fam

    def render(self) -> str:
        lines: list[str] = []
        for name in sorted(self._families):
            lines.extend(self._families[name].render())
        return "\n".join(lines) + "\n"

    def value(self, name: str, *labels: str) -> float:
        """Current value of a counter or gauge (tests, status)."""
        full = name if name.startswith(PREFIX) else PREFIX + name
        fam = self._families.get(full) or self._families.get(full + "_total")
        if fam is None:
            return 0.0
        child = fam.children.get(tuple(labels))
        if child is None:
            return 0.0
        return float(child.count if isinstance(child, _Histogram) else child.value)


class HandlerMetrics:
    """The standard metrics of one handler, plus factories for its own."""

    def __init__(self, registry: MetricsRegistry, handler: str) -> None:
        self.registry, self.handler = registry, handler
        r = registry
        self.batches_in = r.family("batches_in", "Batches received", "counter",
                                   ["handler"]).labels(handler)
        self.rows_in = r.family("rows_in", "Rows received", "counter", ["handler"]).labels(handler)
        self._batches_out = r.family("batches_out", "Batches emitted", "counter",
                                     ["handler", "output"])
        self._rows_out = r.family("rows_out", "Rows emitted", "counter", ["handler", "output"])
        self._out: dict[str, tuple[Any, Any]] = {}
        self.errors = r.family("errors", "Failed attempts (exceptions) while handling",
                               "counter", ["handler"]).labels(handler)
        self.retries = r.family("retries", "Retried attempts", "counter",
                                ["handler"]).labels(handler)
        self.dead_letters = r.family("dead_letters", "Batches sent to dead letter", "counter",
                                     ["handler"]).labels(handler)
        self.dead_letter_rows = r.family("dead_letter_rows", "Rows sent to dead letter",
                                         "counter", ["handler"]).labels(handler)
        self.latency = r.family("handle_seconds", "Time to process or write one batch",
                                "histogram", ["handler"]).labels(handler)

    def out(self, output: str, rows: int) -> None:
        pair = self._out.get(output)
        if pair is None:
            pair = self._out[output] = (self._batches_out.labels(self.handler, output),
                                        self._rows_out.labels(self.handler, output))
        pair[0].value += 1
        pair[1].value += rows

    # -- for handler authors -------------------------------------------------
    def counter(self, name: str, doc: str = "") -> Any:
        """A counter labelled with this handler: ``.inc(n)``."""
        return self.registry.family(name, doc or name, "counter", ["handler"]).labels(self.handler)

    def gauge(self, name: str, doc: str = "") -> Any:
        """A gauge labelled with this handler: ``.set(v)``, ``.inc()``, ``.dec()``."""
        return self.registry.family(name, doc or name, "gauge", ["handler"]).labels(self.handler)

    def histogram(self, name: str, doc: str = "",
                  buckets: Sequence[float] = LATENCY_BUCKETS) -> Any:
        """A histogram labelled with this handler: ``.observe(v)``."""
        return self.registry.family(name, doc or name, "histogram", ["handler"],
                                    buckets).labels(self.handler)


def process_samples() -> dict[str, float]:
    """This process's resident memory, CPU time, open descriptors and the bytes held by
    Arrow's memory pool (memory the pool keeps for reuse shows in RSS, not here)."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/statm") as f:
            out["resident_memory_bytes"] = float(int(f.read().split()[1]) * _PAGE)
    except (OSError, IndexError, ValueError):
        pass
    t = os.times()
    out["cpu_seconds"] = t.user + t.system
    with contextlib.suppress(OSError):
        out["open_fds"] = float(len(os.listdir("/proc/self/fd")))
    pa = sys.modules.get("pyarrow")  # only when something already uses Arrow
    if pa is not None:
        out["arrow_allocated_bytes"] = float(pa.total_allocated_bytes())
    return out


def register_process_metrics(registry: MetricsRegistry) -> None:
    """``gaitflow_process_*`` and ``gaitflow_arrow_allocated_bytes``, read at scrape time."""
    families = {
        "resident_memory_bytes": ("process_resident_memory_bytes",
                                  "Resident memory of the pipeline process", "gauge"),
        "cpu_seconds": ("process_cpu_seconds", "User and system CPU time", "counter"),
        "open_fds": ("process_open_fds", "Open file descriptors", "gauge"),
        "arrow_allocated_bytes": ("arrow_allocated_bytes", "Bytes held in Arrow's memory pool",
                                  "gauge"),
    }
    for key, (name, doc, kind) in families.items():
        registry.family(name, doc, kind).set_function(
            lambda key=key: [([], v)] if (v := process_samples().get(key)) is not None else [])

