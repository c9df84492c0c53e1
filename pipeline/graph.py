"""The wiring between handler instances: validation, start order, text and Mermaid views."""
from __future__ import annotations

import dataclasses

from .config import PipelineConfig
from .handler import Processor, Sink, Source
from .settings import NO_VALUE, Issue, SettingsError, suggest

__all__ = ["Edge", "Graph", "GraphError"]


class GraphError(SettingsError):
    """The wiring is invalid; ``issues`` lists every problem (file, section, key)."""


@dataclasses.dataclass(frozen=True)
class Edge:
    source: str
    output: str
    target: str


class Graph:
    """Handler instances as nodes, ``outputs`` as edges, plus dead-letter routes."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.file = config.file
        self.handlers = config.handlers
        self.edges: list[Edge] = [
            Edge(name, output, target)
            for name, h in self.handlers.items()
            for output, targets in h.outputs.items()
            for target in targets
        ]
        self.dead_letter_targets = {
            t for name in self.handlers if (t := self._dead_letter_setting(name))}

    # -- derived facts ------------------------------------------------------------
    def _dead_letter_setting(self, name: str) -> str | None:
        h = self.handlers[name]
        return h.common.dead_letter or self.config.dead_letter.target

    def dead_letter_of(self, name: str) -> str | None:
        """Where ``name`` sends dead letters; None for dead-letter targets themselves."""
        if name in self.dead_letter_targets and not self.handlers[name].common.dead_letter:
            return None
        target = self._dead_letter_setting(name)
        return target if target in self.handlers and target != name else None

    def on_failure(self, name: str) -> str:
        if self.dead_letter_of(name) is None:
            return "stop"
        return self.handlers[name].common.on_failure

    def targets(self, name: str) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for e in self.edges:
            if e.source == name and e.target in self.handlers:
                out.setdefault(e.output, []).append(e.target)
        return out

    def upstream(self, name: str) -> list[str]:
        return sorted({e.source for e in self.edges if e.target == name})

    def _dependencies(self) -> dict[str, set[str]]:
        """name -> the handlers it sends to (data and dead letters)."""
        deps: dict[str, set[str]] = {name: set() for name in self.handlers}
        for e in self.edges:
            if e.target in self.handlers:
                deps[e.source].add(e.target)
        for name in self.handlers:
            target = self.dead_letter_of(name)
            if target is not None:
                deps[name].add(target)
        return deps

    def start_order(self) -> list[str]:
        """Consumers before producers: every handler starts after all it sends to."""
        deps = self._dependencies()
        order: list[str] = []
        remaining = list(self.handlers)
        while remaining:
            ready = [n for n in remaining if deps[n] <= set(order)]
            if not ready:
                raise GraphError([Issue(self.file, "handlers", None,
                                        problem="cycle between " + ", ".join(remaining))])
            order.extend(ready)
            remaining = [n for n in remaining if n not in ready]
        return order

    # -- validation ---------------------------------------------------------------
    def validate(self) -> Graph:
        """Raise :class:`GraphError` listing every wiring problem; return self when sound."""
        issues: list[Issue] = []
        names = list(self.handlers)

        def issue(name: str, key: str | None, value: object, expected: str, problem: str) -> None:
            issues.append(Issue(self.file, f"handlers.{name}", key, value, expected, problem))

        for name, h in self.handlers.items():
            cls = h.cls
            declared = (*cls.outputs, *cls.optional_outputs)
            for output, targets in h.outputs.items():
                key = "outputs" if output == "default" else f"outputs.{output}"
                if output not in declared:
                    issue(name, key, list(targets),
                          "one of " + ", ".join(declared) if declared else "no outputs",
                          f"{h.type} has no output {output!r}")
                    continue
                for target in targets:
                    if target not in self.handlers:
                        issue(name, key, target, "a handler name: " + ", ".join(names),
                              f"unknown target{suggest(target, names)}")
                    elif issubclass(self.handlers[target].cls, Source):
                        issue(name, key, target, "a processor or a sink",
                              f"target {target!r} is a source, which takes no input")
                    elif target == name:
                        issue(name, key, target, "another handler", "a handler cannot "
                                                                    "feed itself")
                if len(set(targets)) != len(targets):
                    issue(name, key, list(targets), "each target once", "duplicate target")
            for output in cls.outputs:
                if not h.outputs.get(output):
                    key = "outputs" if output == "default" else f"outputs.{output}"
                    issue(name, key, [], f'{key} = ["<handler>", ...]',
                          f"output {output!r} is not connected: its batches would go nowhere")
            dl = h.common.dead_letter
            if dl is not None and dl not in self.handlers:
                issue(name, "dead_letter", dl, "a handler name: " + ", ".join(names),
                      f"unknown dead-letter target{suggest(dl, names)}")
            if (issubclass(cls, (Processor, Sink)) and not self.upstream(name)
                    and name not in self.dead_letter_targets):
                issue(name, None, NO_VALUE, "another handler's "
                      f'outputs to include "{name}", or this handler used as dead_letter target',
                      "nothing sends to this handler")
        target = self.config.dead_letter.target
        if target is not None and target not in self.handlers:
            issues.append(Issue(self.file, "dead_letter", "target", target,
                                "a handler name: " + ", ".join(names),
                                f"unknown dead-letter target{suggest(target, names)}"))
        for dl in sorted(self.dead_letter_targets):
            if dl in self.handlers:
                if not issubclass(self.handlers[dl].cls, Sink):
                    issue(dl, "type", self.handlers[dl].type, "a sink",
                          "a dead-letter target must be a sink")
                elif self.handlers[dl].common.dead_letter:
                    issue(dl, "dead_letter", self.handlers[dl].common.dead_letter,
                          "no dead_letter key", "a dead-letter target cannot dead-letter "
                                                "in turn: its failures stop the pipeline")
        for name, h in self.handlers.items():
            if (h.common.on_failure == "dead_letter" and name not in self.dead_letter_targets
                    and self._dead_letter_setting(name) is None):
                issue(name, "on_failure", "dead_letter",
                      'a [dead_letter] target = "<sink>", a dead_letter = "<sink>" key here, '
                      'or on_failure = "stop"', "no dead-letter target is configured")
        cycle = self.find_cycle()
        if cycle:
            issues.append(Issue(self.file, f"handlers.{cycle[0]}", "outputs", NO_VALUE, "an acyclic graph",
                                "cycle: " + " -> ".join(cycle)))
        if issues:
            raise GraphError(issues)
        return self

    def find_cycle(self) -> list[str] | None:
        deps = {n: sorted(d) for n, d in self._dependencies().items()}
        state: dict[str, int] = {}
        stack: list[str] = []

        def visit(node: str) -> list[str] | None:
            state[node] = 1
            stack.append(node)
            for nxt in deps.get(node, ()):
                if state.get(nxt) == 1:
                    return [*stack[stack.index(nxt):], nxt]
                if nxt not in state:
                    found = visit(nxt)
                    if found:
                        return found
            stack.pop()
            state[node] = 2
            return None

        for node in deps:
            if node not in state:
                found = visit(node)
                if found:
                    return found
        return None

    # -- rendering ----------------------------------------------------------------
    def _kind(self, name: str) -> str:
        cls = self.handlers[name].cls
        return getattr(cls, "kind", "handler")

    def render_text(self) -> str:
        lines = [(f"pipeline {self.file}: {len(self.handlers)} handlers, {len(self.edges)} "
                 "connections")]
        for name in reversed(self.start_order()):
            h = self.handlers[name]
            head = f"  {name} ({self._kind(name)}, {h.type})"
            outs = self.targets(name)
            if not outs:
                lines.append(head)
            for output, targets in outs.items():
                arrow = "-->" if output == "default" else f"--{output}-->"
                lines.append(f"{head} {arrow} {', '.join(targets)}")
                head = " " * len(head)
        routes: dict[str, list[str]] = {}
        for name in self.handlers:
            target = self.dead_letter_of(name)
            if target is not None:
                routes.setdefault(target, []).append(name)
        for target, sources in routes.items():
            lines.append(f"  dead letters: {', '.join(sources)} -.-> {target}")
        return "\n".join(lines)

    def render_mermaid(self) -> str:
        ids = {name: f"n{i}" for i, name in enumerate(self.handlers)}
        shapes = {"source": ('[/"', '"/]'), "processor": ('["', '"]'), "sink": ('[("', '")]')}
        lines = ["flowchart LR"]
        for name, h in self.handlers.items():
            left, right = shapes.get(self._kind(name), ('["', '"]'))
            label = f"{name}<br/><small>{h.type}</small>".replace('"', "'")
            lines.append(f"  {ids[name]}{left}{label}{right}")
        for e in self.edges:
            if e.target not in ids:
                continue
            arrow = "-->" if e.output == "default" else f"-- {e.output} -->"
            lines.append(f"  {ids[e.source]} {arrow} {ids[e.target]}")
        for name in self.handlers:
            target = self.dead_letter_of(name)
            if target is not None:
                lines.append(f"  {ids[name]} -. dead letter .-> {ids[target]}")
        return "\n".join(lines)
