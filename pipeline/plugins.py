"""Handler types: found by name in the ``gaitflow.handlers`` entry-point group, or by
``"package.module:Class"``; validated when they register.

Entry points are read when the registry is created but imported only when a
type is first used, so a pipeline that does not use Cassandra never imports
its driver. Validation names the plugin, where it came from, and what is wrong.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import re
from collections.abc import Iterable
from typing import Any

from .handler import Handler, Processor, Sink, Source
from .log import error_text
from .settings import check_schema, suggest

__all__ = ["ENTRY_POINT_GROUP", "PluginError", "Registry", "UnknownHandlerType",
           "validate_handler"]

ENTRY_POINT_GROUP = "gaitflow.handlers"
_TYPE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_OUTPUT_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
# keys every handler section understands; a handler's own settings may not reuse them
COMMON_KEYS = ("type", "outputs", "retry", "on_failure", "dead_letter", "capacity",
               "concurrency", "timeout")

_REQUIRED = {Source: ("run", 0), Processor: ("process", 1), Sink: ("write", 1)}
_OPTIONAL_ASYNC = ("start", "drain", "close", "commit")


class PluginError(Exception):
    """A handler plugin is unusable; the message names the plugin and the problem."""

    def __init__(self, plugin: str, origin: str, problem: str) -> None:
        self.plugin, self.origin, self.problem = plugin, origin, problem
        super().__init__(f"handler plugin {plugin!r} ({origin}): {problem}")


class UnknownHandlerType(LookupError):
    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        known = sorted(known)
        self.expected = "one of " + ", ".join(known) if known else "a registered handler type"
        self.hint = suggest(name, known)
        super().__init__(f"unknown handler type {name!r}{self.hint}; expected {self.expected} "
                         "or 'package.module:Class'")


def _kind_of(cls: type) -> type | None:
    kinds = [base for base in (Source, Processor, Sink) if issubclass(cls, base)]
    return kinds[0] if len(kinds) == 1 else None


def validate_handler(cls: Any, plugin: str, origin: str) -> type[Handler]:
    """Check that ``cls`` can be run as a handler; raise :class:`PluginError` if not."""
    def fail(problem: str) -> PluginError:
        return PluginError(plugin, origin, problem)

    if not inspect.isclass(cls):
        raise fail(f"expected a class, found {type(cls).__name__} {cls!r}")
    kind = _kind_of(cls)
    if kind is None:
        raise fail(f"{cls.__qualname__} must subclass exactly one of pipeline.Source, "
                   "pipeline.Processor, pipeline.Sink")
    method, nargs = _REQUIRED[kind]
    fn = getattr(cls, method, None)
    if fn is getattr(kind, method):
        raise fail(f"{cls.__qualname__} does not implement {method}(); expected "
                   f"'async def {method}(self{', batch' if nargs else ''})'")
    if not inspect.iscoroutinefunction(fn):
        raise fail(f"{method} must be a coroutine function: expected "
                   f"'async def {method}(self{', batch' if nargs else ''})', "
                   f"found a plain {type(fn).__name__}")
    try:
        inspect.signature(fn).bind(*([None] * (nargs + 1)))
    except TypeError:
        found = inspect.signature(fn).replace(return_annotation=inspect.Signature.empty)
        raise fail(f"{method}{found} has the wrong signature: expected "
                   f"'async def {method}(self{', batch' if nargs else ''})'") from None
    for hook in _OPTIONAL_ASYNC:
        impl = getattr(cls, hook, None)
        if impl is not None and not inspect.iscoroutinefunction(impl):
            raise fail(f"{hook} must be a coroutine function ('async def {hook}(...)')")
    problems = check_schema(getattr(cls, "Settings", None))
    if problems:
        raise fail("; ".join(problems))
    clash = sorted(set(COMMON_KEYS) & {f for f in cls.Settings.__dataclass_fields__})
    if clash:
        raise fail(f"Settings field(s) {', '.join(clash)} clash with the keys every handler "
                   f"section uses ({', '.join(COMMON_KEYS)})")
    for attr in ("outputs", "optional_outputs"):
        names = getattr(cls, attr)
        if not isinstance(names, tuple) or not all(
                isinstance(n, str) and _OUTPUT_NAME.match(n) for n in names):
            raise fail(f"{attr} must be a tuple of lower_case names, found {names!r}")
    if set(cls.outputs) & set(cls.optional_outputs):
        raise fail("an output cannot be both required and optional")
    try:
        inspect.signature(cls).bind("name", None)
    except TypeError:
        raise fail(f"{cls.__qualname__}{inspect.signature(cls)} cannot be constructed as "
                   "cls(name, settings)") from None
    return cls


def _import(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class Registry:
    """Handler types by name. ``resolve`` loads and validates on first use."""

    def __init__(self, group: str = ENTRY_POINT_GROUP, *, entry_points: bool = True) -> None:
        self.group = group
        self._types: dict[str, type[Handler]] = {}
        self._origins: dict[str, str] = {}
        self._entry_points: dict[str, importlib.metadata.EntryPoint] = {}
        if entry_points:
            for ep in importlib.metadata.entry_points(group=group):
                self._entry_points.setdefault(ep.name, ep)

    def register(self, name: str, cls: Any, *, origin: str = "registered in code") -> None:
        if not _TYPE_NAME.match(name):
            raise PluginError(name, origin, "the type name must be lower_case letters, digits "
                                            "and underscores, starting with a letter")
        if name in self._types and self._types[name] is not cls:
            raise PluginError(name, origin,
                              f"the name is already taken by {self._origins[name]}")
        self._types[name] = validate_handler(cls, name, origin)
        self._origins[name] = origin

    def names(self) -> list[str]:
        return sorted(set(self._types) | set(self._entry_points))

    def origin(self, name: str) -> str:
        if name in self._origins:
            return self._origins[name]
        ep = self._entry_points.get(name)
        return self._ep_origin(ep) if ep is not None else "unknown"

    def _ep_origin(self, ep: importlib.metadata.EntryPoint) -> str:
        dist = getattr(ep, "dist", None)
        where = f" in {dist.name} {dist.version}" if dist is not None else ""
        return f"entry point {ep.name} = {ep.value} [{self.group}]{where}"

    def resolve(self, name: str) -> type[Handler]:
        """The handler class for a type name or ``module:Class``."""
        if name in self._types:
            return self._types[name]
        if ":" in name:
            origin = f"type = {name!r}"
            try:
                cls = _import(name)
            except Exception as exc:
                raise PluginError(name, origin,
                                  f"cannot be imported: {error_text(exc)}") from exc
            self._types[name] = validate_handler(cls, name, origin)
            self._origins[name] = origin
            return self._types[name]
        ep = self._entry_points.get(name)
        if ep is None:
            raise UnknownHandlerType(name, self.names())
        origin = self._ep_origin(ep)
        try:
            cls = ep.load()
        except Exception as exc:
            raise PluginError(name, origin,
                              f"cannot be loaded: {error_text(exc)}") from exc
        self.register(name, cls, origin=origin)
        return self._types[name]
