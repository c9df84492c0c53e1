"""Shared fixtures for tests against the local stack (`python -m stack up`)."""
from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from lake_support import PATIENT

from handlers.webhdfs import WebHdfs
from pipeline import Runtime
from stack import services
from stack.config import StackConfig, load
from stack.service import Service


@pytest.fixture(scope="session")
def stack_cfg() -> StackConfig:
    """The stack's settings: ports, state directory (as `python -m stack` sees them)."""
    return load()


@pytest.fixture(scope="session")
def stack_service(stack_cfg: StackConfig) -> Callable[[str], Service]:
    """Factory: ``stack_service("kafka")`` returns the Service, or FAILS the test.

    The check is a TCP connect to each of the service's ports: one clear line
    naming the port and the command that starts it. (A client library that
    cannot connect tends to leave sockets behind, which -W error turns into a
    confusing second failure.)
    """

    def get(name: str) -> Service:
        svc = services.get(name)(stack_cfg)
        for port in svc.ports():
            try:
                socket.create_connection(("127.0.0.1", port), timeout=3).close()
            except OSError as exc:
                pytest.fail(f"{name} is not listening on 127.0.0.1:{port} ({exc}); "
                            f"start it with `python -m stack up {name}`", pytrace=False)
        return svc

    return get


@pytest.fixture
def hdfs_url(stack_service: Callable[[str], Service]) -> str:
    """WebHDFS of the stack's NameNode."""
    return f"http://127.0.0.1:{stack_service('hdfs').opts['namenode_http']}"


@pytest.fixture
async def lake_root(request: pytest.FixtureRequest, hdfs_url: str) -> AsyncIterator[str]:
    """A fresh lake root, deleted afterwards: ``/tmp/gaitflow-it/<what>-<uuid>``, where
    ``<what>`` is the module's name up to its next ``_`` (``test_lake_sink``: ``lake``)."""
    what = request.module.__name__.removeprefix("test_").split("_")[0]
    root = f"/tmp/gaitflow-it/{what}-{uuid.uuid4().hex[:12]}"
    yield root
    async with WebHdfs(hdfs_url, retry=PATIENT) as fs:
        await fs.delete(root, recursive=True)


@pytest.fixture
def runtime_settings() -> dict[str, Any]:
    """The ``[runtime]`` table of what ``runtimes`` builds (a test module may override it)."""
    return {"admin_enabled": False, "drain_timeout": 30.0}


@pytest.fixture
async def runtimes(request: pytest.FixtureRequest, runtime_settings: dict[str, Any],
                   ) -> AsyncIterator[Callable[..., Runtime]]:
    """``runtimes(handlers, **runtime)`` → a Runtime, ``file`` named after the test module.

    A ``memory_sink`` named ``dlq`` is added as the dead-letter target; ``runtime``
    adds to ``runtime_settings``. Runtimes still running at the end of the test are
    stopped and awaited.
    """
    built: list[Runtime] = []

    def make(handlers: dict[str, Any], **runtime: Any) -> Runtime:
        doc = {"runtime": {**runtime_settings, **runtime},
               "dead_letter": {"target": "dlq"},
               "handlers": {**handlers, "dlq": {"type": "memory_sink"}}}
        rt = Runtime.from_dict(doc, file=f"{request.module.__name__}.toml")
        built.append(rt)
        return rt

    yield make
    for rt in built:
        if rt._main is not None and not rt._main.done():
            rt.request_stop("test teardown")
            await asyncio.wait_for(rt._main, 30)
