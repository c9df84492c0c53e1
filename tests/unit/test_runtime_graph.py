"""Wiring validation (unknown type/target, cycle, unconnected output, duplicate name...),
start order, and the text and Mermaid views."""
from __future__ import annotations

from typing import Any

import pytest

from pipeline import GraphError, SettingsError
from pipeline.config import config_from_dict
from pipeline.graph import Graph

FAKES = "runtime_fakes"


def graph(handlers: dict[str, dict[str, Any]], dead_letter: str | None = "dlq") -> Graph:
    doc: dict[str, Any] = {"handlers": handlers}
    if dead_letter:
        doc["dead_letter"] = {"target": dead_letter}
        handlers.setdefault(dead_letter, {"type": "memory_sink"})
    return Graph(config_from_dict(doc, file="g.toml"))


def problems(handlers: dict[str, dict[str, Any]], **kw: Any) -> list[str]:
    with pytest.raises(GraphError) as info:
        graph(handlers, **kw).validate()
    return [str(i) for i in info.value.issues]


def test_unknown_type_is_reported_before_wiring() -> None:
    with pytest.raises(SettingsError) as info:
        graph({"src": {"type": "no_such_type", "outputs": ["dlq"]}})
    assert str(info.value.issues[0]).startswith(
        'g.toml: [handlers.src] type = "no_such_type": unknown handler type; expected one of ')


def test_unknown_target() -> None:
    assert problems({"src": {"type": "memory_source", "outputs": ["sinc"]},
                     "sink": {"type": "memory_sink"}}) == [
        ('g.toml: [handlers.src] outputs = "sinc": unknown target (did you mean \'sink\'?); '
        "expected a handler name: src, sink, dlq"),
        ("g.toml: [handlers.sink]: nothing sends to this handler; expected another handler's "
        'outputs to include "sink", or this handler used as dead_letter target'),
    ]


def test_cycle() -> None:
    assert problems({
        "src": {"type": "memory_source", "outputs": ["p1"]},
        "p1": {"type": "passthrough", "outputs": ["p2"]},
        "p2": {"type": "passthrough", "outputs": ["p1", "dlq"]},
    }) == ["g.toml: [handlers.p1] outputs: cycle: p1 -> p2 -> p1; expected an acyclic graph"]


def test_self_loop() -> None:
    assert problems({"src": {"type": "memory_source", "outputs": ["p"]},
                     "p": {"type": "passthrough", "outputs": ["p"]}}) == [
        ('g.toml: [handlers.p] outputs = "p": a handler cannot feed itself; expected another '
        "handler"),
        "g.toml: [handlers.p] outputs: cycle: p -> p; expected an acyclic graph",
    ]


def test_unconnected_output() -> None:
    assert problems({"src": {"type": "memory_source"}}) == [
        ("g.toml: [handlers.src] outputs = []: output 'default' is not connected: its batches "
        'would go nowhere; expected outputs = ["<handler>", ...]'),
    ]


def test_duplicate_name_differing_only_in_case() -> None:
    with pytest.raises(SettingsError) as info:
        graph({"src": {"type": "memory_source", "outputs": ["sink"]},
               "sink": {"type": "memory_sink"}, "Sink": {"type": "memory_sink"}})
    assert [str(i) for i in info.value.issues] == [
        ("g.toml: [handlers.Sink]: duplicate handler name 'Sink' (same as 'sink' once case and "
        "'-' are ignored); expected unique handler names")]


def test_undeclared_output_and_source_as_target() -> None:
    assert problems({
        "a": {"type": "memory_source", "outputs": {"default": ["s"], "high": ["s"]}},
        "b": {"type": "memory_source", "outputs": ["a"]},
        "s": {"type": "memory_sink"},
    }) == [
        ('g.toml: [handlers.a] outputs.high = ["s"]: memory_source has no output \'high\'; '
        "expected one of default"),
        ('g.toml: [handlers.b] outputs = "a": target \'a\' is a source, which takes no input; '
        "expected a processor or a sink"),
    ]


def test_dead_letter_problems() -> None:
    assert problems({"src": {"type": "memory_source", "outputs": ["s"]},
                     "s": {"type": "memory_sink"}}, dead_letter=None) == [
        ('g.toml: [handlers.src] on_failure = "dead_letter": no dead-letter target is '
        'configured; expected a [dead_letter] target = "<sink>", a dead_letter = "<sink>" key '
        'here, or on_failure = "stop"'),
        ('g.toml: [handlers.s] on_failure = "dead_letter": no dead-letter target is configured; '
        'expected a [dead_letter] target = "<sink>", a dead_letter = "<sink>" key here, or '
        'on_failure = "stop"'),
    ]
    assert problems({"src": {"type": "memory_source", "outputs": ["s"],
                             "dead_letter": "dql"},
                     "s": {"type": "memory_sink"}}) == [
        ('g.toml: [handlers.src] dead_letter = "dql": unknown dead-letter target (did you mean '
        "'dlq'?); expected a handler name: src, s, dlq")]
    assert problems({"src": {"type": "memory_source", "outputs": ["p"]},
                     "p": {"type": "passthrough", "outputs": ["s"], "on_failure": "stop"},
                     "s": {"type": "memory_sink", "dead_letter": "p"}}) == [
        ('g.toml: [handlers.p] type = "passthrough": a dead-letter target must be a sink; '
        "expected a sink"),
        "g.toml: [handlers.p] outputs: cycle: p -> s -> p; expected an acyclic graph"]


def test_every_handler_may_opt_out_of_dead_letters() -> None:
    g = graph({"src": {"type": "memory_source", "outputs": ["s"], "on_failure": "stop"},
               "s": {"type": "memory_sink", "on_failure": "stop"}}, dead_letter=None).validate()
    assert g.on_failure("s") == "stop" and g.dead_letter_of("s") is None


def test_start_order_and_dead_letter_routes() -> None:
    g = graph({
        "src": {"type": "memory_source", "outputs": ["p"]},
        "p": {"type": "passthrough", "outputs": ["a", "b"]},
        "a": {"type": "memory_sink", "dead_letter": "dlq2"},
        "b": {"type": "memory_sink"},
        "dlq2": {"type": "memory_sink"},
    }).validate()
    order = g.start_order()
    for producer, consumer in [("src", "p"), ("p", "a"), ("p", "b"), ("a", "dlq2"),
                               ("b", "dlq"), ("src", "dlq")]:
        assert order.index(consumer) < order.index(producer)
    assert g.dead_letter_of("a") == "dlq2" and g.dead_letter_of("b") == "dlq"
    assert g.dead_letter_of("dlq") is None and g.on_failure("dlq") == "stop"


def test_text_and_mermaid_rendering() -> None:
    g = graph({
        "src": {"type": "memory_source", "outputs": ["split"]},
        "split": {"type": f"{FAKES}:SplitProcessor",
                  "outputs": {"default": ["even"], "odd": ["odd"]}},
        "even": {"type": "memory_sink"},
        "odd": {"type": "memory_sink"},
    }).validate()
    assert g.render_text().splitlines() == [
        "pipeline g.toml: 5 handlers, 3 connections",
        "  src (source, memory_source) --> split",
        f"  split (processor, {FAKES}:SplitProcessor) --> even",
        f"  {' ' * len(f'split (processor, {FAKES}:SplitProcessor)')} --odd--> odd",
        "  odd (sink, memory_sink)",
        "  even (sink, memory_sink)",
        "  dlq (sink, memory_sink)",
        "  dead letters: src, split, even, odd -.-> dlq",
    ]
    mermaid = g.render_mermaid().splitlines()
    assert mermaid[0] == "flowchart LR"
    assert '  n0[/"src<br/><small>memory_source</small>"/]' in mermaid
    assert '  n2[("even<br/><small>memory_sink</small>")]' in mermaid
    assert "  n0 --> n1" in mermaid and "  n1 -- odd --> n3" in mermaid
    assert "  n1 -. dead letter .-> n4" in mermaid
