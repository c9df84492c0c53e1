"""``python run.py``: run, check or draw a pipeline from a settings file."""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence

from .config import PipelineConfig, load_config
from .graph import Graph
from .log import configure_logging, get_logger
from .plugins import COMMON_KEYS, PluginError, Registry, UnknownHandlerType
from .runtime import Runtime, StartError
from .settings import SettingsError, describe_schema

__all__ = ["main"]

log = get_logger()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run.py", description="Run a gaitflow pipeline described by a settings file.")
    p.add_argument("--settings", default="settings.toml", metavar="PATH",
                   help="the settings file (default: settings.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE",
                   help="override a setting, e.g. --set handlers.mqtt.port=1884 (repeatable)")
    p.add_argument("--check", action="store_true",
                   help="validate the settings and the graph, then exit (0 ok, 1 errors)")
    p.add_argument("--graph", nargs="?", const="both", choices=("text", "mermaid", "both"),
                   help="print the pipeline graph as text and/or Mermaid, then exit")
    p.add_argument("--list", action="store_true", help="list the known handler types")
    p.add_argument("--describe", metavar="TYPE", help="print the settings of a handler type")
    return p


def _describe(registry: Registry, name: str) -> int:
    try:
        cls = registry.resolve(name)
    except (UnknownHandlerType, PluginError) as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{name}: {cls.kind} {cls.__module__}:{cls.__qualname__}")
    doc = (cls.__doc__ or "").strip()
    if doc:
        print(f"  {doc.splitlines()[0]}")
    outs = ", ".join([*cls.outputs, *(f"{o} (optional)" for o in cls.optional_outputs)])
    print(f"  outputs: {outs or 'none'}")
    print("  settings:")
    for key, expected, default, help_text in describe_schema(cls.Settings):
        print(f"    {key} = {default}  # {expected}{'; ' + help_text if help_text else ''}")
    print(f"  and the keys of every handler section: {', '.join(COMMON_KEYS)}")
    return 0


def _load(path: str, overrides: Sequence[str], registry: Registry) -> tuple[
        PipelineConfig, Graph] | None:
    try:
        config = load_config(path, overrides, registry=registry)
        graph = Graph(config).validate()
        Runtime(config)  # constructors run too: they must not touch the outside world
    except SettingsError as exc:  # GraphError included
        print(f"{path}: {len(exc.issues)} problem(s):", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return None
    except StartError as exc:
        print(str(exc), file=sys.stderr)
        return None
    return config, graph


async def _serve(config: PipelineConfig) -> int:
    runtime = Runtime(config)
    loop = asyncio.get_running_loop()
    received: list[int] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig)
        if len(received) == 1:
            runtime.request_stop(f"signal {sig.name}")
            return
        log.error("runtime.forced_exit", signal=sig.name, reason="second signal")
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(128 + sig)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        report = await runtime.run()
    except StartError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    for error in report.errors:
        print(f"error: {error}", file=sys.stderr)
    return 0 if report.ok else 1


def _loop_factory(config: PipelineConfig):
    if not config.runtime.uvloop:
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    registry = Registry()
    if args.list:
        for name in registry.names():
            print(f"{name:24} {registry.origin(name)}")
        return 0
    if args.describe:
        return _describe(registry, args.describe)
    loaded = _load(args.settings, args.overrides, registry)
    if loaded is None:
        return 1
    config, graph = loaded
    if args.check or args.graph:
        if args.check:
            print(f"ok: {config.file}: {len(graph.handlers)} handlers, "
                  f"{len(graph.edges)} connections")
        if args.graph in ("text", "both"):
            print(graph.render_text())
        if args.graph in ("mermaid", "both"):
            print(graph.render_mermaid())
        return 0
    configure_logging(config.runtime.log_level, config.runtime.log_format)
    with asyncio.Runner(loop_factory=_loop_factory(config)) as runner:
        return runner.run(_serve(config))
