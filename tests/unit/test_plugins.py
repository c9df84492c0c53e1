"""Handler plugins: entry points (built-ins and a fake distribution), module:Class,
and validation errors that name the plugin and the problem."""
from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path
from typing import Any, ClassVar

import pytest

from pipeline import Batch, PluginError, Processor, Registry, Runtime, SettingsError, Sink, Source
from pipeline.plugins import UnknownHandlerType, validate_handler

BUILTINS = ["file_dead_letter", "jsonl_sink", "log_sink", "memory_sink", "memory_source",
            "passthrough"]


def test_builtins_come_through_the_entry_point_group() -> None:
    registry = Registry()
    for name in BUILTINS:
        assert name in registry.names()
        assert registry.origin(name).startswith(
            f"entry point {name} = pipeline.builtin:"), registry.origin(name)
        assert "[gaitflow.handlers] in gaitflow" in registry.origin(name)
    assert registry.resolve("memory_sink").__name__ == "MemorySink"


def test_a_registry_without_entry_points_knows_nothing() -> None:
    registry = Registry(entry_points=False)
    with pytest.raises(UnknownHandlerType, match="unknown handler type 'memory_sink'"):
        registry.resolve("memory_sink")


@pytest.fixture
def fake_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A distribution 'fakeplug 1.0' installed on sys.path, with three entry points."""
    (tmp_path / "fakeplug_handlers.py").write_text(textwrap.dedent("""
        import dataclasses
        from typing import ClassVar
        from pipeline import Sink, setting

        @dataclasses.dataclass(frozen=True)
        class UpperSettings:
            prefix: str = setting(">", doc="prepended to each value")

        class CollectSink(Sink):
            Settings: ClassVar[type] = UpperSettings
            seen: ClassVar[list] = []

            async def write(self, batch):
                CollectSink.seen.extend(self.settings.prefix + str(v)
                                        for v in batch.data.column("seq").to_pylist())

        class NotAsync(Sink):
            def write(self, batch):
                pass
    """))
    dist = tmp_path / "fakeplug-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplug\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent("""
        [gaitflow.handlers]
        collect_sink = fakeplug_handlers:CollectSink
        broken_sink = fakeplug_handlers:NotAsync
        missing_sink = fakeplug_missing:Thing
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


async def test_a_third_party_distribution_registers_through_its_entry_points(
        fake_distribution: Path) -> None:
    registry = Registry()
    assert {"collect_sink", "broken_sink", "missing_sink"} <= set(registry.names())
    assert registry.origin("collect_sink") == (
        "entry point collect_sink = fakeplug_handlers:CollectSink [gaitflow.handlers] in "
        "fakeplug 1.0")
    rt = Runtime.from_dict({
        "runtime": {"admin_enabled": False},
        "handlers": {
            "src": {"type": "memory_source", "count": 3, "outputs": ["c"], "on_failure": "stop"},
            "c": {"type": "collect_sink", "prefix": "#", "on_failure": "stop"},
        }}, registry=registry)
    assert (await rt.run()).ok
    assert type(rt.handlers["c"]).seen == ["#0", "#1", "#2"]


def test_an_invalid_entry_point_plugin_is_rejected_with_plugin_and_problem(
        fake_distribution: Path) -> None:
    registry = Registry()
    with pytest.raises(PluginError) as info:
        registry.resolve("broken_sink")
    assert str(info.value) == (
        "handler plugin 'broken_sink' (entry point broken_sink = fakeplug_handlers:NotAsync "
        "[gaitflow.handlers] in fakeplug 1.0): write must be a coroutine function: expected "
        "'async def write(self, batch)', found a plain function")
    with pytest.raises(PluginError, match=r"handler plugin 'missing_sink' \(entry point "
                       r"missing_sink = fakeplug_missing:Thing .*\): cannot be loaded: "
                       r"ModuleNotFoundError: No module named 'fakeplug_missing'"):
        registry.resolve("missing_sink")


def test_invalid_plugin_in_settings_names_file_section_and_plugin(
        fake_distribution: Path) -> None:
    with pytest.raises(SettingsError) as info:
        Runtime.from_dict({"handlers": {"x": {"type": "broken_sink", "on_failure": "stop"}}},
                          file="s.toml", registry=Registry())
    assert str(info.value).startswith(
        's.toml: [handlers.x] type = "broken_sink": handler plugin \'broken_sink\' (entry point')


async def test_module_colon_class_loads_a_users_class() -> None:
    registry = Registry()
    cls = registry.resolve("runtime_fakes:ScriptedSink")
    assert cls.__name__ == "ScriptedSink"
    assert registry.origin("runtime_fakes:ScriptedSink") == "type = 'runtime_fakes:ScriptedSink'"
    with pytest.raises(PluginError, match=r"cannot be imported: AttributeError"):
        registry.resolve("runtime_fakes:NoSuchClass")


# -- validation at registration ----------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ClashSettings:
    timeout: float = 1.0


@dataclasses.dataclass(frozen=True)
class UnsupportedSettings:
    callback: Any = None
    things: set[int] = dataclasses.field(default_factory=set)


class Good(Sink):
    async def write(self, batch: Batch) -> None:
        pass


class NoWrite(Sink):
    pass


class WrongArity(Sink):
    async def write(self) -> None:  # type: ignore[override]
        pass


class SyncStart(Good):
    def start(self) -> None:  # type: ignore[override]
        pass


class NotADataclass(Good):
    class Settings:
        pass


class Clash(Good):
    Settings: ClassVar[type] = ClashSettings


class Unsupported(Good):
    Settings: ClassVar[type] = UnsupportedSettings


class BadOutputs(Good):
    optional_outputs = ("Bad-Name",)


class NeedsMore(Good):
    def __init__(self, name: str, settings: Any, client: Any) -> None:
        super().__init__(name, settings)


class Both(Source, Sink):  # type: ignore[misc]
    async def run(self) -> None:
        pass


class ProcessorWithoutProcess(Processor):
    pass


@pytest.mark.parametrize(("cls", "problem"), [
    (42, "expected a class, found int 42"),
    (dict, ("dict must subclass exactly one of pipeline.Source, pipeline.Processor, "
           "pipeline.Sink")),
    (Both, ("Both must subclass exactly one of pipeline.Source, pipeline.Processor, "
           "pipeline.Sink")),
    (NoWrite, "NoWrite does not implement write(); expected 'async def write(self, batch)'"),
    (ProcessorWithoutProcess, ("ProcessorWithoutProcess does not implement process(); "
                              "expected 'async def process(self, batch)'")),
    (WrongArity, ("write(self) has the wrong signature: expected 'async def write(self, "
                 "batch)'")),
    (SyncStart, "start must be a coroutine function ('async def start(...)')"),
    (NotADataclass, "Settings must be a @dataclass, found <class"),
    (Clash, "Settings field(s) timeout clash with the keys every handler section uses"),
    (Unsupported, "Settings field 'things': unsupported type set[int]"),
    (BadOutputs, "optional_outputs must be a tuple of lower_case names, found ('Bad-Name',)"),
    (NeedsMore, "cannot be constructed as cls(name, settings)"),
])
def test_validation_names_plugin_origin_and_problem(cls: Any, problem: str) -> None:
    with pytest.raises(PluginError) as info:
        validate_handler(cls, "my_plugin", "tests")
    assert str(info.value).startswith("handler plugin 'my_plugin' (tests): ")
    assert problem in str(info.value)


def test_register_checks_name_and_conflicts() -> None:
    registry = Registry(entry_points=False)
    registry.register("good_sink", Good)
    registry.register("good_sink", Good)  # same class again is fine
    with pytest.raises(PluginError, match="the name is already taken by registered in code"):
        registry.register("good_sink", Clash)
    with pytest.raises(PluginError, match="type name must be lower_case"):
        registry.register("Good Sink", Good)
    assert registry.resolve("good_sink") is Good
