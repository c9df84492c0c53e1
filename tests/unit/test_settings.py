"""Settings loading: every kind of mistake is reported with file, section, key, value
and what was expected; interpolation, overrides and typed schemas."""
from __future__ import annotations

import dataclasses
import enum
from pathlib import Path
from typing import Literal

import pytest

from pipeline import Secret, SettingsError, load_config, setting
from pipeline.config import config_from_dict
from pipeline.document import interpolate
from pipeline.settings import Issue, Text, build, describe_schema, describe_type

BASE = """
[dead_letter]
target = "dlq"
[handlers.dlq]
type = "memory_sink"
"""

SRC = '[handlers.src]\ntype = "memory_source"\noutputs = ["dlq"]\n'

# (name, settings text, the exact message; {f} is the file)
MISTAKES = [
    ("toml syntax", '[handlers.src]\ntype = "memory_source\n',
     "{f}: invalid TOML: Illegal character '\\n' (at line 2, column 22)"),
    ("unknown key with a suggestion", BASE + SRC + "batchsize = 10\n",
     ("{f}: [handlers.src] batchsize = 10: unknown key (did you mean 'batch_size'?); expected "
     "one of type, outputs, retry, on_failure, dead_letter, capacity, concurrency, timeout, "
     "ack_log, batch_size, count, forever, interval, key, rows, start")),
    ("wrong type", BASE + SRC + 'count = "many"\n',
     '{f}: [handlers.src] count = "many": expected an integer >= 0'),
    ("float for an integer", BASE + SRC + "count = 1.5\n",
     "{f}: [handlers.src] count = 1.5: expected an integer >= 0"),
    ("missing required key", BASE + '[handlers.out]\ntype = "jsonl_sink"\n',
     ("{f}: [handlers.out] path: missing; expected a path (file to append JSON lines to; its "
     "directory is created)")),
    ("misspelt type", BASE + '[handlers.src]\ntpye = "memory_source"\n',
     ('{f}: [handlers.src] tpye = "memory_source": unknown key (did you mean \'type\'?); '
      'expected type = "..."\n'
      "{f}: [handlers.src] type: missing; expected a string (handler type: a registered name "
      "or 'package.module:Class')")),
    ("missing type", BASE + "[handlers.src]\ncount = 3\n",
     ("{f}: [handlers.src] type: missing; expected a string (handler type: a registered name "
     "or 'package.module:Class')")),
    ("unset environment variable", BASE + '[handlers.out]\ntype = "jsonl_sink"\n'
     'path = "${OUT_DIR}/x.jsonl"\n',
     ('{f}: [handlers.out] path = "${OUT_DIR}/x.jsonl": environment variable OUT_DIR is not '
     "set; expected the variable set, or a default: ${OUT_DIR:-default}")),
    ("unset environment variable for a number: reported once", BASE + SRC
     + 'count = "${NCOUNT}"\n',
     ('{f}: [handlers.src] count = "${NCOUNT}": environment variable NCOUNT is not set; '
      "expected the variable set, or a default: ${NCOUNT:-default}")),
    ("value not among the choices", BASE + SRC + 'on_failure = "retry"\n',
     '{f}: [handlers.src] on_failure = "retry": expected one of "dead_letter", "stop"'),
    ("nested value out of range", BASE + SRC + "retry = {max_attempts = 0}\n",
     "{f}: [handlers.src] retry.max_attempts = 0: out of range; expected an integer >= 1"),
    ("nested unknown key", BASE + SRC + "retry = {max_tries = 3}\n",
     ("{f}: [handlers.src] retry.max_tries = 3: unknown key (did you mean 'max_attempts'?); "
     "expected one of max_attempts, backoff, max_backoff, multiplier, jitter")),
    ("unknown runtime key", BASE + "[runtime]\nadmin_prot = 8080\n",
     ("{f}: [runtime] admin_prot = 8080: unknown key (did you mean 'admin_port'?); expected "
     "one of admin_enabled, admin_host, admin_port, admin_token, admin_extensions, "
     "drain_timeout, start_timeout, capacity, log_level, log_format, uvloop")),
    ("port out of range", BASE + "[runtime]\nadmin_port = 70000\n",
     ("{f}: [runtime] admin_port = 70000: out of range; expected an integer between 0 and "
     "65535")),
    ("string for a boolean", BASE + SRC + 'forever = "yes"\n',
     '{f}: [handlers.src] forever = "yes": expected true or false'),
    ("unknown section", BASE + '[handler.src]\ntype = "memory_source"\n',
     ("{f}: [handler]: unknown section (did you mean 'handlers'?); expected one of [runtime], "
     "[dead_letter], [handlers.<name>]")),
    ("secret of the wrong type is not shown", BASE + "[runtime]\nadmin_token = 12345\n",
     '{f}: [runtime] admin_token = "***": expected a string (secret)'),
    ("handler that is not a table", BASE + "[handlers]\nsrc = 3\n",
     '{f}: [handlers] src = 3: expected a table [handlers.src] with at least type = "..."'),
    ("list item of the wrong type", BASE + '[runtime]\nadmin_extensions = ["a:b", 1]\n',
     "{f}: [runtime] admin_extensions[1] = 1: expected a string"),
    ("invalid handler name", BASE + '[handlers."my sink"]\ntype = "memory_sink"\n',
     ("{f}: [handlers.my sink]: invalid handler name; expected letters, digits, '_' or '-', "
     "starting with a letter or '_', at most 64 characters")),
    ("module:Class that cannot be imported", BASE + '[handlers.x]\ntype = "nosuchmod:Thing"\n',
     ('{f}: [handlers.x] type = "nosuchmod:Thing": handler plugin \'nosuchmod:Thing\' (type = '
     "'nosuchmod:Thing'): cannot be imported: ModuleNotFoundError: No module named "
     "'nosuchmod'; expected a valid handler plugin")),
    ("duplicate handler table", BASE + '[handlers.dlq]\ntype = "memory_sink"\n',
     ("{f}: [handlers.dlq]: duplicate handler name 'dlq' (Cannot declare ('handlers', 'dlq') "
     "twice (at line 6, column 14))")),
]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "settings.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "message"), [m[1:] for m in MISTAKES],
                         ids=[m[0] for m in MISTAKES])
def test_each_mistake_has_a_precise_message(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(SettingsError) as info:
        load_config(path, env={})
    assert [str(i) for i in info.value.issues] == message.replace("{f}", str(path)).split("\n")


def test_unknown_type_suggests_and_lists_the_known_types(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + '[handlers.src]\ntype = "memory_sauce"\n')
    with pytest.raises(SettingsError) as info:
        load_config(path, env={})
    (issue,) = info.value.issues
    assert (issue.file, issue.section, issue.key, issue.value) == (
        str(path), "handlers.src", "type", "memory_sauce")
    assert str(issue).startswith(f'{path}: [handlers.src] type = "memory_sauce": unknown handler '
                                 "type (did you mean 'memory_source'?); expected one of ")
    assert "memory_sink" in issue.expected and "'package.module:Class'" in issue.expected


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + SRC + 'count = "x"\nforever = 1\nbogus = 2\n'
                 "[runtime]\ndrain_timeout = -1\n")
    with pytest.raises(SettingsError) as info:
        load_config(path, env={})
    keys = sorted((i.section, i.key) for i in info.value.issues)
    assert keys == [("handlers.src", "bogus"), ("handlers.src", "count"),
                    ("handlers.src", "forever"), ("runtime", "drain_timeout")]
    assert str(info.value).count("\n") == 3, "one line per problem"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"nope\.toml: file not found"):
        load_config(tmp_path / "nope.toml")


# -- interpolation ---------------------------------------------------------------------
@pytest.mark.parametrize(("value", "env", "expected"), [
    ("${HOST}", {"HOST": "broker"}, "broker"),
    ("mqtt://${HOST}:${PORT}", {"HOST": "h", "PORT": "1"}, "mqtt://h:1"),
    ("${HOST:-localhost}", {}, "localhost"),
    ("${HOST:-localhost}", {"HOST": ""}, "localhost"),
    ("${HOST-localhost}", {"HOST": ""}, ""),
    ("${HOST-localhost}", {}, "localhost"),
    ("${EMPTY:-}", {}, ""),
    ("cost: $$5 and $${HOST}", {"HOST": "x"}, "cost: $5 and ${HOST}"),
    ("no variables", {}, "no variables"),
])
def test_interpolation(value: str, env: dict[str, str], expected: str) -> None:
    issues: list[Issue] = []
    assert interpolate({"a": value}, file="f", issues=issues, env=env) == {"a": expected}
    assert issues == []


def test_interpolated_strings_fill_numbers_but_literal_strings_do_not(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + SRC + 'count = "${COUNT:-7}"\nforever = "${FOREVER}"\n'
                 "interval = \"${INTERVAL:-0.5}\"\n")
    config = load_config(path, env={"FOREVER": "false"})
    s = config.handlers["src"].settings
    assert (s.count, s.forever, s.interval) == (7, False, 0.5)
    with pytest.raises(SettingsError, match='count = "7": expected an integer'):
        load_config(write(tmp_path, BASE + SRC + 'count = "7"\n'), env={})
    with pytest.raises(SettingsError, match=r'count = "seven": expected an integer >= 0'):
        load_config(write(tmp_path, BASE + SRC + 'count = "${N}"\n'), env={"N": "seven"})


def test_secrets_come_from_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + SRC + '[runtime]\nadmin_token = "${TOKEN}"\n')
    config = load_config(path, env={"TOKEN": "s3cr3t-value"})
    token = config.runtime.admin_token
    assert isinstance(token, Secret) and token.get() == "s3cr3t-value"
    assert str(token) == "***" and repr(token) == "Secret('***')"
    assert "s3cr3t" not in repr(config) and "s3cr3t" not in str(config.redacted())


# -- overrides -----------------------------------------------------------------------------
def test_overrides_are_typed_and_validated(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + SRC)
    config = load_config(path, [
        "handlers.src.count=5", "runtime.log_level=debug", "handlers.src.forever=true",
        'handlers.src.outputs=["dlq"]', "runtime.admin_host=0.0.0.0",
    ], env={})
    s = config.handlers["src"].settings
    assert (s.count, s.forever) == (5, True)
    assert config.runtime.log_level == "debug" and config.runtime.admin_host == "0.0.0.0"
    with pytest.raises(SettingsError) as info:
        load_config(path, ["handlers.src.count=-3", "nonsense", "handlers.src.retry.x.y=1"],
                    env={})
    assert sorted(str(i) for i in info.value.issues) == sorted([
        '--set: = "nonsense": malformed override; expected section.key=value',
        f"{path} (--set): [handlers.src] count = -3: out of range; expected an integer >= 0",
        (f"{path} (--set): [handlers.src] retry.x = {{\"y\": 1}}: unknown key; expected one of "
        "max_attempts, backoff, max_backoff, multiplier, jitter"),
    ])
    # a mistake in the file itself is still the file's
    with pytest.raises(SettingsError) as info:
        load_config(write(tmp_path, BASE + SRC + "count = -1\n"), ["handlers.src.forever=true"],
                    env={})
    assert [str(i) for i in info.value.issues] == [
        f"{path}: [handlers.src] count = -1: out of range; expected an integer >= 0"]


# -- schemas -------------------------------------------------------------------------------
class Mode(enum.Enum):
    FAST = "fast"
    SAFE = "safe"


@dataclasses.dataclass(frozen=True)
class Inner:
    level: int = setting(1, min=0, max=9)


@dataclasses.dataclass(frozen=True)
class Schema:
    name: str = setting(doc="required")
    mode: Mode = setting(Mode.SAFE)
    path: Path | None = setting(None)
    tags: dict[str, int] = setting({})
    inner: Inner = setting(Inner())
    kind: Literal["a", "b"] = setting("a")
    ratio: float = setting(0.5, min=0, max=1)

    def __post_init__(self) -> None:
        if self.name == "forbidden":
            raise ValueError("name 'forbidden' is reserved")


def test_schema_builds_typed_values() -> None:
    issues: list[Issue] = []
    value = build(Schema, {"name": "x", "mode": "fast", "path": "/tmp/a", "tags": {"a": 1},
                           "inner": {"level": 3}, "kind": "b", "ratio": 1},
                  file="f", section="s", issues=issues)
    assert issues == []
    assert value == Schema("x", Mode.FAST, Path("/tmp/a"), {"a": 1}, Inner(3), "b", 1.0)


def test_schema_errors_and_post_init_checks() -> None:
    issues: list[Issue] = []
    build(Schema, {"name": "x", "mode": "slow", "tags": {"a": "1"}, "inner": {"level": 10},
                   "kind": 1}, file="f", section="s", issues=issues)
    assert [str(i) for i in issues] == [
        'f: [s] mode = "slow": expected one of "fast", "safe"',
        'f: [s] tags.a = "1": expected an integer',
        "f: [s] inner.level = 10: out of range; expected an integer between 0 and 9",
        'f: [s] kind = 1: expected one of "a", "b"',
    ]
    issues = []
    build(Schema, {"name": "forbidden"}, file="f", section="s", issues=issues)
    assert [str(i) for i in issues] == ["f: [s]: name 'forbidden' is reserved"]


@dataclasses.dataclass(frozen=True)
class Retrying:
    retry: Inner = setting(Inner(7), doc="a nested table whose default is not the class's")
    seed: int | None = setting(None)
    note: str | None = setting(None)


@dataclasses.dataclass(frozen=True)
class Two:
    level: int = setting(1)
    width: int = setting(2)


@dataclasses.dataclass(frozen=True)
class Outer:
    two: Two = setting(Two(5, 6))


def test_a_partial_nested_table_keeps_the_fields_default_for_the_keys_it_leaves_out() -> None:
    issues: list[Issue] = []
    assert build(Outer, {"two": {"width": 9}}, file="f", section="s", issues=issues) == Outer(
        Two(5, 9))
    assert build(Outer, {}, file="f", section="s", issues=issues) == Outer(Two(5, 6))
    assert issues == []


def test_an_empty_interpolation_leaves_an_optional_setting_unset() -> None:
    issues: list[Issue] = []
    built = build(Retrying, {"seed": Text(""), "note": Text("")}, file="f", section="s",
                  issues=issues)
    assert issues == []
    assert built.seed is None and built.note == ""  # a string may be empty: it stays ""
    build(Retrying, {"seed": Text("x")}, file="f", section="s", issues=issues)
    assert [str(i) for i in issues] == ['f: [s] seed = "x": expected an integer']


def test_any_exception_of_a_schema_check_is_reported_not_raised() -> None:
    @dataclasses.dataclass(frozen=True)
    class Asserting:
        n: int = setting(1)

        def __post_init__(self) -> None:
            if self.n <= 0:
                raise AssertionError
            if self.n > 5:
                raise KeyError("n too large")

    issues: list[Issue] = []
    build(Asserting, {"n": 0}, file="f", section="s", issues=issues)
    build(Asserting, {"n": 6}, file="f", section="s", issues=issues)
    assert [str(i) for i in issues] == ["f: [s]: the settings check raised AssertionError",
                                        "f: [s]: the settings check raised KeyError: 'n too large'"]


def test_describe_schema_prints_defaults_as_toml_and_the_nested_keys() -> None:
    rows = {key: default for key, _, default, _ in describe_schema(Schema)}
    assert rows["mode"] == '"safe"'  # the value a user writes, not Mode.SAFE
    assert rows["path"] == "(unset)"
    assert rows["inner"] == "{level = 1}" and rows["inner.level"] == "1"
    assert rows["name"] == "(required)" and rows["tags"] == "{}"
    nested = {key: default for key, _, default, _ in describe_schema(Retrying)}
    assert nested["retry"] == "{level = 7}" and nested["retry.level"] == "7"


def test_describe_type_in_words() -> None:
    assert describe_type(list[str]) == "a list of strings"
    assert describe_type(int, {"min": 1}) == "an integer >= 1"
    assert describe_type(Secret | None) == "a string (secret)"
    assert describe_type(dict[str, float]) == "a table of numbers"


def test_text_marks_coercible_strings() -> None:
    issues: list[Issue] = []
    assert build(Inner, {"level": Text(" 4 ")}, file="f", section="s", issues=issues) == Inner(4)


def test_config_from_dict_matches_files() -> None:
    config = config_from_dict({"handlers": {
        "src": {"type": "memory_source", "outputs": "sink", "on_failure": "stop"},
        "sink": {"type": "memory_sink", "on_failure": "stop"}}})
    assert config.handlers["src"].outputs == {"default": ("sink",)}
    assert config.handlers["sink"].cls.__name__ == "MemorySink"


@dataclasses.dataclass
class Mutable:  # not frozen: unhashable, so Python refuses it as a plain default
    level: int = setting(1)
    width: int = setting(2)


@dataclasses.dataclass(frozen=True)
class HoldsMutable:
    inner: Mutable = setting(Mutable(3, 4))


def test_a_nested_settings_default_that_is_not_frozen_is_copied_per_instance() -> None:
    issues: list[Issue] = []
    a = build(HoldsMutable, {}, file="f", section="s", issues=issues)
    b = build(HoldsMutable, {"inner": {"width": 9}}, file="f", section="s", issues=issues)
    assert issues == []
    assert a.inner == Mutable(3, 4) and b.inner == Mutable(3, 9)
    assert a.inner is not HoldsMutable().inner
    rows = {key: default for key, _, default, _ in describe_schema(HoldsMutable)}
    assert rows["inner"] == "{level = 3, width = 4}" and rows["inner.width"] == "4"
