"""The pipeline settings document: ``[runtime]``, ``[dead_letter]``, ``[handlers.<name>]``.

Loading collects every problem in the file before failing, so ``--check``
reports them all at once.
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from .document import apply_overrides, from_overrides, interpolate, read_toml
from .log import register_secret
from .plugins import COMMON_KEYS, PluginError, Registry, UnknownHandlerType
from .retry import RetryPolicy
from .settings import (
    MISSING,
    Issue,
    Secret,
    SettingsError,
    build,
    setting,
    suggest,
)

__all__ = ["CommonSettings", "DeadLetterSettings", "HandlerConfig", "PipelineConfig",
           "RuntimeSettings", "config_from_dict", "load_config"]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
SECTIONS = ("runtime", "dead_letter", "handlers")


@dataclasses.dataclass(frozen=True)
class RuntimeSettings:
    """The ``[runtime]`` section."""

    admin_enabled: bool = setting(True, doc="serve /healthz, /readyz, /metrics, /api/status")
    admin_host: str = setting("127.0.0.1", doc="admin server address")
    admin_port: int = setting(8080, doc="admin server port (0 picks a free port)", min=0,
                              max=65535)
    admin_token: Secret | None = setting(
        None, doc="bearer token required by /metrics and /api/* (health probes stay open)",
        secret=True)
    admin_extensions: list[str] = setting(
        [], doc="'module:function' called as function(app, runtime) to add admin routes")
    drain_timeout: float = setting(30.0, doc="seconds to wait for in-flight batches on "
                                             "shutdown", min=0)
    start_timeout: float = setting(60.0, doc="seconds each handler may take to start", min=0)
    capacity: int = setting(16, doc="default input channel capacity, in batches", min=1)
    log_level: Literal["debug", "info", "warning", "error"] = setting("info", doc="log level")
    log_format: Literal["text", "json"] = setting("text", doc="one line per event: logfmt "
                                                              "or JSON")
    uvloop: bool = setting(True, doc="use uvloop when it is installed")


@dataclasses.dataclass(frozen=True)
class DeadLetterSettings:
    """The ``[dead_letter]`` section."""

    target: str | None = setting(None, doc="default dead-letter sink (a handler name)")


@dataclasses.dataclass(frozen=True)
class CommonSettings:
    """Keys every ``[handlers.<name>]`` section understands, beside the handler's own."""

    type: str = setting(doc="handler type: a registered name or 'package.module:Class'")
    outputs: str | list[str] | dict[str, str | list[str]] = setting(
        [], doc='targets of the default output, or a table {output = ["target", ...]}')
    retry: RetryPolicy = setting(RetryPolicy(), doc="retry policy for process/write")
    on_failure: Literal["dead_letter", "stop"] = setting(
        "dead_letter", doc="after the last retry: dead-letter the batch, or stop the pipeline")
    dead_letter: str | None = setting(None, doc="dead-letter target (default: "
                                                "[dead_letter] target)")
    capacity: int | None = setting(None, doc="input channel capacity in batches "
                                             "(default: [runtime] capacity)", min=1)
    concurrency: int = setting(1, doc="batches handled at once (order is kept only with 1)",
                               min=1)
    timeout: float | None = setting(None, doc="seconds one process/write may take before it "
                                              "counts as a failed attempt", min=0)

    def output_map(self) -> dict[str, tuple[str, ...]]:
        if isinstance(self.outputs, str):
            return {"default": (self.outputs,)}
        if isinstance(self.outputs, list):
            return {"default": tuple(self.outputs)} if self.outputs else {}
        return {k: (v,) if isinstance(v, str) else tuple(v) for k, v in self.outputs.items()}


@dataclasses.dataclass(frozen=True)
class HandlerConfig:
    name: str
    type: str
    cls: type | None  # None when the type could not be resolved
    common: CommonSettings
    settings: Any
    origin: str = ""

    @property
    def outputs(self) -> dict[str, tuple[str, ...]]:
        return self.common.output_map()


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    file: str
    runtime: RuntimeSettings
    dead_letter: DeadLetterSettings
    handlers: dict[str, HandlerConfig]

    def redacted(self) -> dict[str, Any]:
        """The effective settings with every secret replaced by ``***``."""
        return {
            "runtime": _plain(self.runtime),
            "dead_letter": _plain(self.dead_letter),
            "handlers": {name: {"type": h.type, **_plain(h.common, skip=("type",)),
                                **(_plain(h.settings) if h.settings is not None else {})}
                         for name, h in self.handlers.items()},
        }


def _plain(obj: Any, skip: Iterable[str] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        value = getattr(obj, f.name)
        if f.metadata.get("secret") or isinstance(value, Secret):
            out[f.name] = None if value is None else "***"
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            out[f.name] = _plain(value)
        elif isinstance(value, os.PathLike):
            out[f.name] = os.fspath(value)
        else:
            out[f.name] = value
    return out


def _register_secrets(obj: Any) -> None:
    if obj is None or not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, Secret) or (f.metadata.get("secret") and isinstance(value, str)):
            register_secret(value)
        elif dataclasses.is_dataclass(value):
            _register_secrets(value)


def load_config(path: str | os.PathLike[str], overrides: Iterable[str] = (), *,
                registry: Registry | None = None,
                env: Mapping[str, str] | None = None) -> PipelineConfig:
    """Read, interpolate, override and validate a settings file."""
    return config_from_dict(read_toml(path), file=str(path), overrides=overrides,
                            registry=registry, env=env)


def config_from_dict(doc: Mapping[str, Any], *, file: str = "<settings>",
                     overrides: Iterable[str] = (), registry: Registry | None = None,
                     env: Mapping[str, str] | None = None) -> PipelineConfig:
    """Validate an already parsed document (tests, programmatic pipelines)."""
    registry = registry or Registry()
    issues: list[Issue] = []
    applied: set[str] = set()
    raw = apply_overrides(_copy(doc), overrides, issues, applied)
    raw = interpolate(raw, file=file, issues=issues, env=env)

    for section in raw:
        if section not in SECTIONS:
            issues.append(Issue(file, section, None, problem=f"unknown section{suggest(section, SECTIONS)}",
                                expected="one of [runtime], [dead_letter], [handlers.<name>]"))
    runtime = build(RuntimeSettings, _table(raw, "runtime", file, issues), file=file,
                    section="runtime", issues=issues)
    dead_letter = build(DeadLetterSettings, _table(raw, "dead_letter", file, issues), file=file,
                        section="dead_letter", issues=issues)
    handlers: dict[str, HandlerConfig] = {}
    seen: dict[str, str] = {}
    for name, table in _table(raw, "handlers", file, issues).items():
        section = f"handlers.{name}"
        if not _NAME.match(name):
            issues.append(Issue(file, section, None, problem="invalid handler name",
                                expected="letters, digits, '_' or '-', starting with a letter "
                                         "or '_', at most 64 characters"))
            continue
        folded = name.lower().replace("-", "_")
        if folded in seen:
            issues.append(Issue(file, section, None,
                                problem=f"duplicate handler name {name!r} (same as "
                                        f"{seen[folded]!r} once case and '-' are ignored)",
                                expected="unique handler names"))
            continue
        seen[folded] = name
        if not isinstance(table, Mapping):
            issues.append(Issue(file, "handlers", name, table,
                                f"a table [handlers.{name}] with at least type = \"...\""))
            continue
        config = _handler(name, table, file, registry, issues)
        if config is not None:
            handlers[name] = config
    if issues:
        raise SettingsError(from_overrides(issues, file, applied))
    for h in handlers.values():
        _register_secrets(h.settings)
    _register_secrets(runtime)
    return PipelineConfig(file, runtime, dead_letter, handlers)


def _copy(doc: Any) -> Any:
    if isinstance(doc, Mapping):
        return {k: _copy(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_copy(v) for v in doc]
    return doc


def _table(raw: Mapping[str, Any], name: str, file: str, issues: list[Issue]) -> Mapping[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, Mapping):
        issues.append(Issue(file, "", name, value, f"a table [{name}]"))
        return {}
    return value


def _handler(name: str, table: Mapping[str, Any], file: str, registry: Registry,
             issues: list[Issue]) -> HandlerConfig | None:
    section = f"handlers.{name}"
    cls = None
    type_name = table.get("type")
    origin = ""
    if isinstance(type_name, str):
        try:
            cls = registry.resolve(type_name)
            origin = registry.origin(type_name)
        except UnknownHandlerType as exc:
            issues.append(Issue(file, section, "type", type_name, exc.expected + " or "
                                "'package.module:Class'", "unknown handler type" + exc.hint))
        except PluginError as exc:
            issues.append(Issue(file, section, "type", type_name, "a valid handler plugin",
                                f"{exc}"))
    elif "type" not in table:  # a misspelt "type" is the likely cause: name it
        for key in table:
            hint = suggest(key, ("type",)) if key not in COMMON_KEYS else ""
            if hint:
                issues.append(Issue(file, section, key, table[key], "type = \"...\"",
                                    f"unknown key{hint}"))
    own_fields = dataclasses.fields(cls.Settings) if cls is not None else ()
    own = {f.name for f in own_fields}
    if cls is not None:
        for key in table:
            if key not in COMMON_KEYS and key not in own:
                allowed = ", ".join((*COMMON_KEYS, *sorted(own)))
                issues.append(Issue(file, section, key, table[key], f"one of {allowed}",
                                    f"unknown key{suggest(key, (*COMMON_KEYS, *own))}"))
    common = build(CommonSettings, {k: v for k, v in table.items() if k in COMMON_KEYS},
                   file=file, section=section, issues=issues)
    if cls is None:
        return None
    settings = build(cls.Settings, {k: v for k, v in table.items() if k in own}, file=file,
                     section=section, issues=issues, check_unknown=False)
    if common is MISSING or settings is MISSING:
        return None
    return HandlerConfig(name, type_name, cls, common, settings, origin)
