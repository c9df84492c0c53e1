"""Shared fixtures for tests against the local stack (`python -m stack up`)."""
from __future__ import annotations

import socket
from collections.abc import Callable

import pytest

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
