"""Fixtures for the runtime tests: factories that tear down what they built."""
from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline import Runtime
from pipeline.log import configure_logging

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

if str(HERE) not in sys.path:  # runtime_fakes is loaded as "runtime_fakes:Class"
    sys.path.insert(0, str(HERE))


@pytest.fixture(autouse=True)
def _logs_to_stderr() -> None:
    # the runtime logs through its own handler: route it where capsys/capfd can see it
    configure_logging("debug")


@pytest.fixture
def probe_events() -> Iterator[list[tuple[str, str]]]:
    import runtime_fakes

    runtime_fakes.EVENTS.clear()
    yield runtime_fakes.EVENTS
    runtime_fakes.EVENTS.clear()


@pytest.fixture
async def make_runtime() -> AsyncIterator[Callable[..., Runtime]]:
    """``make_runtime(handlers, runtime={...}, dead_letter="dlq")`` → a Runtime.

    Admin is off unless asked for; a ``memory_sink`` named ``dlq`` is added as the
    dead-letter target unless ``dead_letter=None``. Runtimes still running at the
    end of the test are stopped and awaited.
    """
    built: list[Runtime] = []

    def make(handlers: dict[str, dict[str, Any]], *, runtime: dict[str, Any] | None = None,
             dead_letter: str | None = "dlq", env: dict[str, str] | None = None,
             overrides: tuple[str, ...] = ()) -> Runtime:
        doc: dict[str, Any] = {
            "runtime": {"admin_enabled": False, "drain_timeout": 5.0, **(runtime or {})},
            "handlers": {k: dict(v) for k, v in handlers.items()},
        }
        if dead_letter:
            doc["dead_letter"] = {"target": dead_letter}
            doc["handlers"].setdefault(dead_letter, {"type": "memory_sink"})
        rt = Runtime.from_dict(doc, file="test.toml", env=env if env is not None else {},
                               overrides=overrides)
        built.append(rt)
        return rt

    yield make
    for rt in built:
        main = rt._main
        if main is not None and not main.done():
            rt.request_stop("test teardown")
            try:
                await asyncio.wait_for(main, 10)
            except Exception:  # noqa: BLE001, S110 - the test already reported its failure
                pass


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """Environment for ``python run.py`` subprocesses: fakes importable, no buffering."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT)])
    env["PYTHONUNBUFFERED"] = "1"
    return env
