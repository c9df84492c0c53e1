"""A minimal Prometheus text-format registry (counters, gauges, histograms).

Enough for the model server's ``/metrics``; no dependency on prometheus_client.
Not thread-safe by design: it is only touched from the event loop.
"""

from __future__ import annotations

import bisect
from collections import defaultdict

__all__ = ["Registry"]

Labels = tuple[tuple[str, str], ...]

DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _labels(labels: dict[str, str] | None) -> Labels:
    return tuple(sorted((labels or {}).items()))


def _fmt_labels(labels: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = labels + extra
    if not items:
        return ""
    esc = [(k, v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")) for k, v in items]
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc) + "}"


class Registry:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._help: dict[str, tuple[str, str]] = {}
        self._values: dict[str, dict[Labels, float]] = defaultdict(dict)
        self._hist: dict[str, dict[Labels, list[float]]] = defaultdict(dict)
        self._buckets: dict[str, tuple[float, ...]] = {}

    def _declare(self, name: str, kind: str, help_: str) -> str:
        full = f"{self.prefix}_{name}"
        self._help.setdefault(full, (kind, help_))
        return full

    def inc(self, name: str, help_: str, value: float = 1.0,
            labels: dict[str, str] | None = None) -> None:  # fmt: skip
        full = self._declare(name, "counter", help_)
        key = _labels(labels)
        self._values[full][key] = self._values[full].get(key, 0.0) + value

    def set(self, name: str, help_: str, value: float,
            labels: dict[str, str] | None = None) -> None:  # fmt: skip
        full = self._declare(name, "gauge", help_)
        self._values[full][_labels(labels)] = value

    def clear(self, name: str) -> None:
        self._values.pop(f"{self.prefix}_{name}", None)

    def observe(self, name: str, help_: str, value: float, labels: dict[str, str] | None = None,
                buckets: tuple[float, ...] = DEFAULT_BUCKETS) -> None:  # fmt: skip
        full = self._declare(name, "histogram", help_)
        b = self._buckets.setdefault(full, buckets)
        key = _labels(labels)
        # per-bucket counts, then sum and count
        h = self._hist[full].setdefault(key, [0.0] * (len(b) + 2))
        i = bisect.bisect_left(b, value)
        if i < len(b):
            h[i] += 1
        h[-2] += value
        h[-1] += 1

    def get(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self._values.get(f"{self.prefix}_{name}", {}).get(_labels(labels), 0.0)

    def render(self) -> str:
        out: list[str] = []
        for full, (kind, help_) in sorted(self._help.items()):
            out.append(f"# HELP {full} {help_}")
            out.append(f"# TYPE {full} {kind}")
            if kind == "histogram":
                b = self._buckets[full]
                for key, h in sorted(self._hist[full].items()):
                    cum = 0.0
                    for le, c in zip(b, h[: len(b)], strict=True):
                        cum += c
                        out.append(f"{full}_bucket{_fmt_labels(key, (('le', repr(le)),))} {cum:g}")
                    out.append(f"{full}_bucket{_fmt_labels(key, (('le', '+Inf'),))} {h[-1]:g}")
                    out.append(f"{full}_sum{_fmt_labels(key)} {h[-2]:.6f}")
                    out.append(f"{full}_count{_fmt_labels(key)} {h[-1]:g}")
            else:
                for key, v in sorted(self._values.get(full, {}).items()):
                    out.append(f"{full}{_fmt_labels(key)} {v:g}")
        return "\n".join(out) + "\n"
