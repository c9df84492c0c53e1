"""Typed settings: schemas as dataclasses, validated value by value.

A schema is a ``@dataclass`` whose fields are declared with :func:`setting`
(default, doc, secret, bounds, choices). :func:`build` turns one TOML table into
an instance, collecting every problem as an :class:`Issue` that names the file,
the section, the key, the value found and what was expected. Unknown keys are
errors, never silently dropped. Secret values are shown as ``***`` everywhere.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import json
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any, Literal, Union

__all__ = [
    "NO_VALUE",
    "Issue",
    "Secret",
    "SettingsError",
    "Text",
    "build",
    "check_schema",
    "describe_schema",
    "describe_type",
    "setting",
    "toml_value",
]

_MISSING: Any = dataclasses.MISSING


class _NoValue:
    def __repr__(self) -> str:
        return "<no value>"


#: an Issue about a key that has no value (missing key, whole section...)
NO_VALUE: Any = _NoValue()
_SECRET_NAME = re.compile(r"pass(word)?|secret|token|credential|api_?key|private", re.IGNORECASE)


class Secret:
    """A string that never shows itself: ``str()``/``repr()`` give ``***``; ``get()`` reveals."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))


class Text(str):
    """A string from the environment or ``--set``: may be read as a number or a boolean."""

    __slots__ = ()


class Unresolved(Text):
    """A value whose ``${VAR}`` could not be resolved: the interpolation already
    reported it, so the schema does not report the value a second time."""

    __slots__ = ()


def setting(
    default: Any = _MISSING,
    *,
    doc: str = "",
    secret: bool = False,
    min: float | None = None,
    max: float | None = None,
    choices: Sequence[Any] | None = None,
) -> Any:
    """Declare a settings field. No default means the key is required."""
    metadata = {"doc": doc, "secret": secret, "min": min, "max": max,
                "choices": tuple(choices) if choices is not None else None}
    if isinstance(default, (list, dict, set)):
        snapshot = default
        return dataclasses.field(
            default_factory=lambda: type(snapshot)(snapshot), metadata=metadata)
    if dataclasses.is_dataclass(default) and not isinstance(default, type) \
            and getattr(type(default), "__hash__", None) is None:
        # a nested settings table that is not frozen: each instance gets its own copy
        nested = default
        return dataclasses.field(default_factory=lambda: copy.deepcopy(nested), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# --------------------------------------------------------------------------- issues
@dataclasses.dataclass(frozen=True)
class Issue:
    """One settings problem, with everything a user needs to fix it."""

    file: str
    section: str
    key: str | None
    value: Any = NO_VALUE
    expected: str = ""
    problem: str = ""
    secret: bool = False

    def __str__(self) -> str:
        where = [f"[{self.section}]"] if self.section else []
        if self.key:
            where.append(self.key)
        if self.value is not NO_VALUE:
            where.append(f"= {show(self.value, self.secret or _looks_secret(self.key))}")
        parts = [p for p in (self.problem, f"expected {self.expected}" if self.expected else "")
                 if p]
        head = " ".join([f"{self.file}:", *where])
        return f"{head}: {'; '.join(parts)}" if where else f"{head} {'; '.join(parts)}"


class SettingsError(ValueError):
    """Settings could not be loaded; ``issues`` lists every problem found."""

    def __init__(self, issues: Iterable[Issue]) -> None:
        self.issues = list(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


def _looks_secret(key: str | None) -> bool:
    return bool(key) and bool(_SECRET_NAME.search(key or ""))


def show(value: Any, secret: bool = False) -> str:
    """A value as it would be written in TOML, redacted when secret, shortened."""
    if secret or isinstance(value, Secret):
        return '"***"'
    try:
        text = json.dumps(value, default=str, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def suggest(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------- types
def describe_type(tp: Any, meta: Mapping[str, Any] | None = None) -> str:
    """What a value of ``tp`` looks like, in words, with bounds and choices."""
    meta = meta or {}
    text = _describe(tp)
    lo, hi, choices = meta.get("min"), meta.get("max"), meta.get("choices")
    if choices:
        text = "one of " + ", ".join(show(c) for c in choices)
    if lo is not None and hi is not None:
        text += f" between {lo} and {hi}"
    elif lo is not None:
        text += f" >= {lo}"
    elif hi is not None:
        text += f" <= {hi}"
    return text


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return "any value"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin is Literal:
        return "one of " + ", ".join(show(a) for a in args)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        inner = _describe(args[0]) if args else "values"
        return f"a list of {_plural(inner)}"
    if origin in (dict, Mapping) or tp is dict:
        inner = _describe(args[1]) if len(args) == 2 else "values"
        return f"a table of {_plural(inner)}"
    if isinstance(tp, type):
        if issubclass(tp, enum.Enum):
            return "one of " + ", ".join(show(m.value) for m in tp)
        if dataclasses.is_dataclass(tp):
            return f"a table ({', '.join(f.name for f in dataclasses.fields(tp))})"
        simple = {bool: "true or false", int: "an integer", float: "a number",
                  str: "a string", Secret: "a string (secret)"}
        if tp in simple:
            return simple[tp]
        if issubclass(tp, PurePath):
            return "a path"
    return getattr(tp, "__name__", str(tp))


def _plural(text: str) -> str:
    if " or " in text:
        return f"values that are each {text}"
    for article in ("an ", "a "):
        if text.startswith(article):
            word, _, rest = text[len(article):].partition(" ")
            return f"{word}s {rest}".strip()
    return text


_SUPPORTED_SCALARS = (bool, int, float, str, Secret, Path, PurePath)


def _unsupported(tp: Any) -> str | None:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object or tp in _SUPPORTED_SCALARS:
        return None
    if origin in (Union, types.UnionType):
        return next((u for a in args if a is not type(None) if (u := _unsupported(a))), None)
    if origin is Literal:
        return None
    if origin in (list, tuple, Sequence):
        return _unsupported(args[0]) if args else None
    if origin in (dict, Mapping):
        return _unsupported(args[1]) if len(args) == 2 else None
    if isinstance(tp, type) and (issubclass(tp, enum.Enum) or dataclasses.is_dataclass(tp)):
        return None if not dataclasses.is_dataclass(tp) else next(iter(check_schema(tp)), None)
    return f"unsupported type {tp!r}"


def check_schema(cls: Any) -> list[str]:
    """Problems that make ``cls`` unusable as a settings schema (empty when fine)."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        return [f"Settings must be a @dataclass, found {cls!r}"]
    try:
        hints = typing.get_type_hints(cls)
    except Exception as exc:  # noqa: BLE001 - any failure makes the schema unusable
        return [f"Settings type hints cannot be resolved: {exc}"]
    problems = []
    for f in dataclasses.fields(cls):
        problem = _unsupported(hints.get(f.name, Any))
        if problem:
            problems.append(f"Settings field {f.name!r}: {problem}")
    return problems


def toml_value(value: Any, secret: bool = False) -> str:
    """``value`` written as TOML would write it (enums by value, nested settings as
    inline tables, secrets as ``"***"``): what ``--describe`` prints as a default."""
    if secret or isinstance(value, Secret):
        return '"***"'
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, PurePath)):
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: (getattr(value, f.name), bool(f.metadata.get("secret")))
                 for f in dataclasses.fields(value) if getattr(value, f.name) is not None}
        return "{" + ", ".join(f"{k} = {toml_value(v, sec)}" for k, (v, sec) in value.items()) + "}"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value), ensure_ascii=False)


def _toml_key(key: Any) -> str:
    key = str(key)
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


def describe_schema(cls: Any, prefix: str = "",
                    base: Any = None) -> list[tuple[str, str, str, str]]:  # fmt: skip
    """``(key, expected, default, doc)`` rows for documentation and ``--describe``; the
    keys of a nested settings table follow it as ``key.sub``, with the defaults they
    take when the table is partly given. A default of ``(unset)`` is ``None``: leave
    the key out (or give it an empty ``${VAR:-}``)."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        secret = bool(meta.get("secret"))
        if base is not None:
            value = getattr(base, f.name)
            default = toml_value(value, secret) if value is not None else "(unset)"
        elif f.default is not _MISSING:
            default = toml_value(f.default, secret) if f.default is not None else "(unset)"
        elif f.default_factory is not _MISSING:
            default = toml_value(f.default_factory(), secret)
        else:
            default = "(required)"
        tp = hints.get(f.name, Any)
        rows.append((prefix + f.name, describe_type(tp, meta), default, meta.get("doc", "")))
        nested = _optional_of(tp) or tp
        if isinstance(nested, type) and dataclasses.is_dataclass(nested):
            inner = getattr(base, f.name) if base is not None else _field_default(f)
            rows.extend(describe_schema(nested, f"{prefix}{f.name}.",
                                        inner if isinstance(inner, nested) else None))
    return rows


# --------------------------------------------------------------------------- conversion
class _Builder:
    def __init__(self, file: str, section: str, issues: list[Issue]) -> None:
        self.file, self.section, self.issues = file, section, issues
        self.unresolved = 0  # values skipped because their ${VAR} is already reported

    def fail(self, key: str, value: Any, expected: str, problem: str = "",
             secret: bool = False) -> None:
        self.issues.append(Issue(self.file, self.section, key, value, expected, problem, secret))

    def build(self, cls: Any, table: Any, prefix: str = "", check_unknown: bool = True,
              base: Any = None) -> Any:  # fmt: skip
        """An instance of ``cls`` from ``table``; keys it leaves out take their values
        from ``base`` (the field's default, for a nested table) or the class defaults."""
        key_name = prefix.rstrip(".") or None
        if not isinstance(table, Mapping):
            self.fail(key_name or "", table, _describe(cls))
            return _MISSING
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        before, skipped = len(self.issues), self.unresolved
        if check_unknown:
            for key in table:
                if key not in fields:
                    self.fail(f"{prefix}{key}", table[key],
                              "one of " + ", ".join(fields) if fields else "no keys",
                              f"unknown key{suggest(key, fields)}")
        kwargs = {}
        for name, f in fields.items():
            meta = f.metadata
            if name in table:
                value = self.convert(table[name], hints.get(name, Any), meta, f"{prefix}{name}",
                                     base=_field_default(f))
                if value is not _MISSING:
                    kwargs[name] = value
            elif base is not None:
                kwargs[name] = getattr(base, name)
            elif f.default is _MISSING and f.default_factory is _MISSING:
                doc = meta.get("doc")
                self.fail(f"{prefix}{name}", NO_VALUE,
                          describe_type(hints.get(name, Any), meta) + (f" ({doc})" if doc else ""),
                          "missing")
        if len(self.issues) > before or self.unresolved > skipped:
            return _MISSING
        try:
            return cls(**kwargs)
        except (ValueError, TypeError) as exc:
            self.fail(key_name or "", NO_VALUE, "", str(exc))
            return _MISSING
        except Exception as exc:  # noqa: BLE001 - a schema's own check failed unexpectedly
            self.fail(key_name or "", NO_VALUE, "",
                      f"the settings check raised {type(exc).__name__}: {exc}".rstrip(": "))
            return _MISSING

    def convert(self, value: Any, tp: Any, meta: Mapping[str, Any], key: str,
                base: Any = None) -> Any:  # fmt: skip
        if isinstance(value, Unresolved):
            self.unresolved += 1
            return _MISSING
        secret = bool(meta.get("secret")) or tp is Secret or _optional_of(tp) is Secret
        expected = describe_type(tp, meta)
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if tp is Any or tp is object:
            return value
        if origin in (Union, types.UnionType):
            options = [a for a in args if a is not type(None)]
            for option in sorted(options, key=_union_rank):
                trial = _Builder(self.file, self.section, [])
                result = trial.convert(value, option, meta, key, base)
                self.unresolved += trial.unresolved
                if result is not _MISSING:
                    return result
                if len(options) == 1 and not _blank(value):
                    self.issues.extend(trial.issues)
                    return _MISSING
            if type(None) in args and _blank(value):
                return None  # e.g. "${ACK_LOG:-}" for an optional path: unset
            self.fail(key, value, expected, secret=secret)
            return _MISSING
        if origin is Literal:
            for choice in args:
                same_kind = type(value) is type(choice) or (
                    isinstance(value, str) and isinstance(choice, str))
                if value == choice and same_kind:
                    return choice
            self.fail(key, value, expected, secret=secret)
            return _MISSING
        if origin in (list, tuple, Sequence) or tp in (list, tuple):
            if not isinstance(value, list):
                self.fail(key, value, expected, secret=secret)
                return _MISSING
            inner = args[0] if args else Any
            items = [self.convert(v, inner, {}, f"{key}[{i}]") for i, v in enumerate(value)]
            if any(i is _MISSING for i in items):
                return _MISSING
            return tuple(items) if origin is tuple else items
        if origin in (dict, Mapping) or tp is dict:
            if not isinstance(value, Mapping):
                self.fail(key, value, expected, secret=secret)
                return _MISSING
            inner = args[1] if len(args) == 2 else Any
            out = {k: self.convert(v, inner, {}, f"{key}.{k}") for k, v in value.items()}
            return _MISSING if any(v is _MISSING for v in out.values()) else out
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            return self.build(tp, value, prefix=f"{key}.",
                              base=base if isinstance(base, tp) else None)
        result = self._scalar(value, tp)
        if result is _MISSING:
            self.fail(key, value, expected, secret=secret)
            return _MISSING
        return self._bounds(result, meta, key, expected, secret)

    @staticmethod
    def _scalar(value: Any, tp: Any) -> Any:
        textual = isinstance(value, Text)
        if tp is bool:
            if isinstance(value, bool):
                return value
            if textual and value.strip().lower() in _BOOLS:
                return _BOOLS[value.strip().lower()]
            return _MISSING
        if tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if textual:
                try:
                    return int(value.strip())
                except ValueError:
                    return _MISSING
            return _MISSING
        if tp is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if textual:
                try:
                    return float(value.strip())
                except ValueError:
                    return _MISSING
            return _MISSING
        if tp is str:
            return str(value) if isinstance(value, str) else _MISSING
        if tp is Secret:
            return Secret(str(value)) if isinstance(value, str) else _MISSING
        if isinstance(tp, type) and issubclass(tp, PurePath):
            return tp(value) if isinstance(value, str) and value else _MISSING
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            for member in tp:
                if value == member.value or value == member.name:
                    return member
            return _MISSING
        return _MISSING

    def _bounds(self, value: Any, meta: Mapping[str, Any], key: str, expected: str,
                secret: bool) -> Any:
        lo, hi, choices = meta.get("min"), meta.get("max"), meta.get("choices")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            self.fail(key, value, expected, "out of range", secret)
            return _MISSING
        if choices and value not in choices:
            self.fail(key, value, expected, secret=secret)
            return _MISSING
        return value


_BOOLS = {"true": True, "yes": True, "on": True, "1": True,
          "false": False, "no": False, "off": False, "0": False}


def _field_default(f: dataclasses.Field[Any]) -> Any:
    """A field's default value (made by its factory if it has one), or None."""
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return None


def _blank(value: Any) -> bool:
    return isinstance(value, str) and not value.strip()


def _optional_of(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        return rest[0] if len(rest) == 1 else None
    return None


def _union_rank(tp: Any) -> int:
    # try the most specific interpretation first: a bool is never read as an int
    order = {bool: 0, int: 1, float: 2}
    return order.get(tp, 3)


def build(cls: Any, table: Mapping[str, Any], *, file: str, section: str,
          issues: list[Issue], check_unknown: bool = True) -> Any:
    """An instance of schema ``cls`` from ``table``, or ``MISSING`` with ``issues`` appended."""
    return _Builder(file, section, issues).build(cls, table, check_unknown=check_unknown)


MISSING = _MISSING
