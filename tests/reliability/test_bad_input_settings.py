"""Bad settings files: random mutations of settings.toml are either valid or refused
with a SettingsError naming the file, the section and the key; never a traceback.

Hypothesis mutates the text of the repository's settings.toml (values replaced by
literals of every TOML type and some that are out of range, unset ``${VAR}``s,
lines deleted, duplicated or renamed, sections and unknown keys inserted, unknown
or hostile handler types, truncation, bytes that are not UTF-8) and runs
``run.py --check``'s code (``pipeline.cli.main``) in this process: it must return
0 or 1 without raising, and every problem line must start with the file's path.
When a single value was replaced by one of the wrong type, the error names that
value's section and key. A few mutated files also go through ``run.py --check`` as
a subprocess (exit status 0/1, no "Traceback").
"""
from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from pipeline.cli import main as cli_main

pytestmark = [pytest.mark.reliability]

ROOT = Path(__file__).resolve().parents[2]
ORIGINAL = (ROOT / "settings.toml").read_text()
LINES = ORIGINAL.splitlines()
KEY_LINE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$")
SECTION_LINE = re.compile(r"^\s*\[([^\]]+)\]")
KEY_LINES = [i for i, line in enumerate(LINES) if KEY_LINE.match(line)]
STATS: Counter[str] = Counter()

LITERALS = ['"abc"', '""', "-1", "0", "7", "65536", "99999999999999999999", "1.5", "-0.0",
            "nan", "inf", "-inf", "1e400", "true", "false", "[]", '["x"]', "[1, 2]",
            '[1, "a"]', "{}", "{ a = 1 }", '{ max_attempts = "x" }', "2026-12-04",
            "2026-12-04T10:00:00Z", '"${GAITFLOW_TEST_UNSET_VAR}"',
            '"${GAITFLOW_TEST_UNSET_VAR:-12}"', '"${GAITFLOW_TEST_UNSET_VAR-x}"', '"$${x}"',
            '"../../etc/passwd"', '"x' + "y" * 400 + '"', '"\\u0000"', '"\\n"',
            '"mqtt://user:pw@host"', "'literal'", '"""multi\nline"""']
#: literals of a type no setting in settings.toml accepts when it expects something else
WRONG_FOR = {"str": ["7", "true", "[]", "{}", "1.5"], "int": ['"abc"', "true", "[]", "1.5"],
             "float": ['"abc"', "true", "[]"], "bool": ['"abc"', "7", "[]"],
             "list": ['"abc"', "7", "true"]}
INSERTS = ["bogus = 1", "[handlers.extra]", '[handlers.extra]\ntype = "no_such_type"',
           '[handlers.extra]\ntype = "os:system"', '[handlers.extra]\ntype = "../x"',
           '[handlers.extra]\ntype = "pipeline.builtin:DoesNotExist"',
           '[handlers.extra]\ntype = "memory_sink"\noutputs = ["ghost"]',
           '[handlers."bad name!"]\ntype = "memory_sink"', "[nosuchsection]\nx = 1",
           "[handlers.lake]", "[runtime]", 'outputs = ["ghost"]', "retry = 3",
           'on_failure = "explode"', "capacity = 0", "concurrency = -2", "timeout = -1",
           'dead_letter = "ghost"', "= 1", "x = ", "[[handlers]]", "handlers = 3",
           '"quoted key" = 1', "a.b.c = 1", "\x7f = 1"]


def value_kind(text: str) -> str | None:
    t = text.split("#")[0].strip()
    if t.startswith('"') and "${" not in t:
        return "str"
    if t in ("true", "false"):
        return "bool"
    if re.fullmatch(r"-?\d+", t):
        return "int"
    if re.fullmatch(r"-?\d+\.\d*", t):
        return "float"
    if t.startswith("[") and t.endswith("]"):
        return "list"
    return None


mutation = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(KEY_LINES), st.sampled_from(LITERALS)),
    st.tuples(st.just("wrong_type"), st.sampled_from(KEY_LINES), st.integers(0, 10)),
    st.tuples(st.just("delete"), st.integers(0, len(LINES) - 1)),
    st.tuples(st.just("duplicate"), st.integers(0, len(LINES) - 1)),
    st.tuples(st.just("rename"), st.sampled_from(KEY_LINES),
              st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)),
    st.tuples(st.just("insert"), st.integers(0, len(LINES)), st.sampled_from(INSERTS)),
    st.tuples(st.just("garbage"), st.integers(0, len(LINES)),
              st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=30)),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("bytes"), st.integers(0, len(LINES)), st.binary(min_size=1, max_size=8)),
)


def mutate(muts: list[tuple[Any, ...]]) -> tuple[bytes, tuple[str, str] | None]:
    """The mutated file, and (section, key) when it is one wrong-typed value."""
    lines = list(LINES)
    target = None
    tail: bytes = b""
    for m in muts:
        op = m[0]
        if op in ("set", "wrong_type", "rename") and m[1] < len(lines):
            match = KEY_LINE.match(lines[m[1]])
            if not match:
                continue
            key, value = match.groups()
            if op == "set":
                lines[m[1]] = f"{key} = {m[2]}"
            elif op == "wrong_type":
                kind = value_kind(value)
                if kind is None:
                    continue
                choices = WRONG_FOR[kind]
                lines[m[1]] = f"{key} = {choices[m[2] % len(choices)]}"
                if len(muts) == 1:
                    section = next((SECTION_LINE.match(lines[i]).group(1)
                                    for i in range(m[1], -1, -1)
                                    if SECTION_LINE.match(lines[i])), "")
                    target = (section, key)
            else:
                lines[m[1]] = f"{m[2]} = {value}"
        elif op == "delete" and m[1] < len(lines):
            del lines[m[1]]
        elif op == "duplicate" and m[1] < len(lines):
            lines.insert(m[1], lines[m[1]])
        elif op in ("insert", "garbage"):
            lines.insert(min(m[1], len(lines)), m[2])
        elif op == "truncate":
            text = "\n".join(lines)
            lines = text[: int(len(text) * m[1])].split("\n")
        elif op == "bytes":
            tail = m[2]
    data = "\n".join(lines).encode() + b"\n"
    if tail:
        data = data[: len(data) // 2] + tail + data[len(data) // 2:]
    return data, target


def check_file(path: Path, target: tuple[str, str] | None) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli_main(["--settings", str(path), "--check"])
        except SystemExit as exc:  # argparse
            rc = exc.code if isinstance(exc.code, int) else 2
        except BaseException as exc:
            raise AssertionError(f"run.py --check raised {type(exc).__name__}: {exc} on\n"
                                 f"{path.read_bytes()[:300]!r}...") from exc
    text = err.getvalue()
    assert rc in (0, 1), f"exit status {rc}: {text}"
    STATS["valid" if rc == 0 else "refused"] += 1
    if rc == 0:
        assert out.getvalue().startswith("ok: "), out.getvalue()
        return rc, text
    assert "Traceback" not in text, text
    problems = [line.strip() for line in text.splitlines()[1:] if line.strip()]
    assert text.startswith(f"{path}: ") and problems, text
    for line in problems:
        assert line.startswith((f"{path}:", "handler ")), (
            f"a problem that does not name the file: {line!r}")
    if target is not None:
        section, key = target
        assert any(f"[{section}]" in line and key in line for line in problems), (
            f"the error does not name [{section}] {key}:\n{text}")
    return rc, text


@pytest.mark.timeout(600)
@settings(max_examples=400, deadline=None, database=None,
          phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@example(muts=[("bytes", 3, b"\xff\xfe")])
@example(muts=[("truncate", 0.5)])
@given(muts=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_settings_are_valid_or_refused_with_the_file_section_and_key(
        tmp_path: Path, muts: list[tuple[Any, ...]]) -> None:
    data, target = mutate(muts)
    path = tmp_path / "mutated.toml"
    path.write_bytes(data)
    check_file(path, target)


@pytest.mark.parametrize("what", ["directory", "empty", "missing", "not_utf8"])
def test_a_settings_path_that_is_not_a_readable_file_is_one_clear_error(
        tmp_path: Path, what: str) -> None:
    path = tmp_path / "s.toml"
    if what == "directory":
        path.mkdir()
    elif what == "empty":
        path.write_text("")
    elif what == "not_utf8":
        path.write_bytes(b"[runtime]\nadmin_port = 8080 # \xe9t\xe9\n")
    check_file(path, None)


@pytest.mark.timeout(300)
def test_run_py_check_exits_0_or_1_without_a_traceback(tmp_path: Path) -> None:
    cases = {"original": ORIGINAL.encode(),
             "wrong_type": ORIGINAL.replace("port = 1883", 'port = "mqtt"').encode(),
             "unknown_key": ORIGINAL.replace("[handlers.lake]", "[handlers.lake]\nbogus = 1")
             .encode(),
             "unset_var": ORIGINAL.replace('"${MQTT_HOST:-127.0.0.1}"', '"${GAITFLOW_NOPE}"')
             .encode(),
             "broken_toml": ORIGINAL[: len(ORIGINAL) // 3].encode() + b"\n[[[",
             "not_utf8": ORIGINAL.encode()[:500] + b"\xff" + ORIGINAL.encode()[500:]}
    codes = {}
    for name, data in cases.items():
        path = tmp_path / f"{name}.toml"
        path.write_bytes(data)
        r = subprocess.run([sys.executable, "run.py", "--settings", str(path), "--check"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
        codes[name] = r.returncode
        assert r.returncode in (0, 1), f"{name}: exit {r.returncode}\n{r.stderr}"
        assert "Traceback" not in r.stderr, f"{name}:\n{r.stderr}"
        if r.returncode == 1:
            assert str(path) in r.stderr, r.stderr
    assert codes["original"] == 0 and all(v == 1 for k, v in codes.items() if k != "original")
    print("run.py --check exit statuses:", codes, "fuzz:", dict(STATS))
