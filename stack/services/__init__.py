"""The registry: every stack service by name, in start order.

Modules are imported on first use, and a module that fails to import is
reported as unavailable instead of breaking the CLI for every other service.
Each module defines one :class:`~stack.service.Service` subclass whose ``name``
is the registry key.
"""
from __future__ import annotations

import importlib
import inspect

from ..service import Service

#: start order (``down`` uses the reverse); light, fast services first.
ORDER: tuple[str, ...] = (
    "mosquitto", "kafka", "hdfs", "cassandra", "elasticsearch", "ferretdb", "spark")


class UnknownService(KeyError):
    pass


class Unavailable(RuntimeError):
    """The service's module is missing or fails to import."""


def get(name: str) -> type[Service]:
    if name not in ORDER:
        raise UnknownService(f"unknown service {name!r}; expected one of {', '.join(ORDER)}")
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except Exception as exc:
        raise Unavailable(f"{name}: cannot import stack.services.{name}: "
                          f"{type(exc).__name__}: {exc}") from exc
    for _, obj in inspect.getmembers(module, inspect.isclass):
        if issubclass(obj, Service) and obj is not Service and getattr(obj, "name", None) == name:
            return obj
    raise Unavailable(f"{name}: stack.services.{name} defines no Service subclass "
                      f"with name = {name!r}")


def select(names: list[str] | None) -> list[str]:
    """Validate and order ``names`` (all services when empty)."""
    if not names:
        return list(ORDER)
    unknown = [n for n in names if n not in ORDER]
    if unknown:
        raise UnknownService(f"unknown service(s) {', '.join(unknown)}; "
                             f"expected among {', '.join(ORDER)}")
    return [n for n in ORDER if n in names]


__all__ = ["ORDER", "Unavailable", "UnknownService", "get", "select"]
