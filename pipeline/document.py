"""Settings documents: TOML files, ``${VAR}`` interpolation and ``--set`` overrides.

These turn a file into plain tables; ``settings.build`` then types them.
"""
from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .settings import Issue, SettingsError, Text, Unresolved

__all__ = ["apply_overrides", "interpolate", "read_toml", "split_path"]


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a TOML file; a syntax error becomes a SettingsError naming file and line."""
    file = str(path)
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise SettingsError([Issue(file, "", None, problem="file not found")]) from None
    except IsADirectoryError:
        raise SettingsError([Issue(file, "", None, problem="is a directory, not a file")]) from None
    except UnicodeDecodeError as exc:
        raise SettingsError([Issue(file, "", None,
                                   problem=f"not UTF-8 text (byte {exc.start})")]) from None
    except OSError as exc:
        raise SettingsError([Issue(file, "", None,
                                   problem=f"cannot read: {exc.strerror or exc}")]) from None
    except tomllib.TOMLDecodeError as exc:
        text = str(exc)
        match = re.search(r"Cannot declare \('handlers', '([^']+)'\) twice", text)
        if match:
            problem = f"duplicate handler name {match.group(1)!r} ({text})"
            raise SettingsError([Issue(file, f"handlers.{match.group(1)}", None,
                                       problem=problem)]) from None
        raise SettingsError([Issue(file, "", None, problem=f"invalid TOML: {text}")]) from None


def split_path(path: Sequence[str]) -> tuple[str, str]:
    """``(section, key)`` of a value: ``handlers.<name>`` tables are sections of their own."""
    depth = 2 if path and path[0] == "handlers" else 1
    depth = min(depth, max(1, len(path) - 1))
    return ".".join(path[:depth]), ".".join(path[depth:])


_VAR = re.compile(r"\$(\$)|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}")


def interpolate(doc: Any, *, file: str, issues: list[Issue],
                env: Mapping[str, str] | None = None, path: tuple[str, ...] = ()) -> Any:
    """Replace ``${VAR}``, ``${VAR:-default}`` (unset or empty), ``${VAR-default}`` (unset).

    ``$$`` is a literal ``$``. Interpolated strings become :class:`Text`, so a
    ``port = "${PORT:-1883}"`` can still fill an integer field.
    """
    env = os.environ if env is None else env
    if isinstance(doc, dict):
        return {k: interpolate(v, file=file, issues=issues, env=env, path=(*path, k))
                for k, v in doc.items()}
    if isinstance(doc, list):
        return [interpolate(v, file=file, issues=issues, env=env, path=(*path, f"[{i}]"))
                for i, v in enumerate(doc)]
    if not isinstance(doc, str) or "$" not in doc:
        return doc
    textual = isinstance(doc, Text)
    unresolved = False

    def replace(match: re.Match[str]) -> str:
        nonlocal textual, unresolved
        if match.group(1):
            return "$"
        textual = True
        name, op, default = match.group(2), match.group(3), match.group(4)
        value = env.get(name)
        if op == ":-" and not value:
            return default or ""
        if op == "-" and value is None:
            return default or ""
        if value is None:
            section, key = split_path([p for p in path if not p.startswith("[")] or [""])
            issues.append(Issue(
                file, section, key + "".join(p for p in path if p.startswith("[")), doc,
                f"the variable set, or a default: ${{{name}:-default}}",
                f"environment variable {name} is not set"))
            unresolved = True
            return ""
        return value

    result = _VAR.sub(replace, doc)
    if unresolved:
        return Unresolved(result)
    return Text(result) if textual else result


def apply_overrides(doc: dict[str, Any], overrides: Iterable[str], issues: list[Issue],
                    applied: set[str] | None = None) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides; the value is read as TOML, else as text.
    The dotted paths applied are added to ``applied``."""
    for item in overrides:
        dotted, sep, raw = item.partition("=")
        parts = [p.strip() for p in dotted.split(".")]
        if not sep or len(parts) < 2 or not all(parts):
            issues.append(Issue("--set", "", None, item, "section.key=value",
                                "malformed override"))
            continue
        try:
            value: Any = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = Text(raw)
        target = doc
        for depth, part in enumerate(parts[:-1]):
            nxt = target.setdefault(part, {})
            if not isinstance(nxt, dict):
                issues.append(Issue("--set", ".".join(parts[:depth + 1]), None, item,
                                    "a path through tables", f"{part!r} is not a table"))
                break
            target = nxt
        else:
            target[parts[-1]] = value
            if applied is not None:
                applied.add(".".join(parts))
    return doc


def from_overrides(issues: list[Issue], file: str, applied: set[str]) -> list[Issue]:
    """``issues`` with those about a value that came from ``--set`` saying so."""
    def overridden(issue: Issue) -> bool:
        path = ".".join(p for p in (issue.section, issue.key) if p)
        return issue.file == file and any(
            path == a or path.startswith((a + ".", a + "["))
            or (issue.key is not None and a.startswith(path + ".")) for a in applied)

    return [dataclasses.replace(i, file=f"{file} (--set)") if overridden(i) else i
            for i in issues]
