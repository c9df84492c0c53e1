"""The documented example works as written; misuse of the handler API fails loudly."""
from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pytest

from pipeline import Batch, Runtime, Sink, Source, StartError

ROOT = Path(__file__).resolve().parent.parent.parent


async def test_the_testing_example_from_handlers_md() -> None:
    # the same code as "Testing a handler" in pipeline/HANDLERS.md
    rt = Runtime.from_dict({
        "runtime": {"admin_enabled": False},
        "handlers": {
            "src": {"type": "memory_source", "count": 300, "outputs": ["t"], "on_failure": "stop"},
            "t": {"type": "pipeline.examples.threshold:Threshold", "limit": 100.0,
                  "outputs": {"default": ["low"], "high": ["high"]}, "on_failure": "stop"},
            "low": {"type": "memory_sink", "on_failure": "stop"},
            "high": {"type": "memory_sink", "on_failure": "stop"},
        }})
    report = await rt.run_until_idle(timeout=10)
    assert report.ok
    assert rt.handlers["low"].row_count + rt.handlers["high"].row_count == 300
    assert rt.handlers["low"].row_count == 201
    assert len(rt.handlers["src"].committed) == 3


def test_the_guide_documents_the_public_api() -> None:
    import pipeline

    guide = (ROOT / "pipeline" / "HANDLERS.md").read_text()
    for name in pipeline.__all__:
        assert name in guide, f"{name} is public but not in HANDLERS.md"


async def test_the_threshold_example_runs_as_a_module() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pipeline.examples.threshold",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert out.decode().strip().endswith("ok=True low rows=801 acknowledged=10 batches")


class EmitsOutside(Sink):
    """Emits from a task of its own without naming parents: refused."""

    optional_outputs: ClassVar[tuple[str, ...]] = ("events",)

    def __init__(self, name: str, settings: object = None) -> None:
        super().__init__(name, settings)
        self.errors: list[str] = []

    async def write(self, batch: Batch) -> None:
        try:
            await self.emit([{"a": 1}], output="nope")
        except ValueError as exc:
            self.errors.append(str(exc))

    async def drain(self) -> None:
        try:
            await self.emit([{"a": 1}], output="events")
        except RuntimeError as exc:
            self.errors.append(str(exc))


class EarlyEmitter(Source):
    def __init__(self, name: str, settings: object = None) -> None:
        super().__init__(name, settings)
        self.error = ""
        try:
            self.metrics  # noqa: B018 - the property raises before the runtime binds
        except RuntimeError as exc:
            self.error = str(exc)

    async def run(self) -> None:
        await self.emit(pa.table({"seq": [1]}))


async def test_api_misuse_is_reported(make_runtime) -> None:
    rt = make_runtime({
        "src": {"type": f"{__name__}:EarlyEmitter", "outputs": ["s"]},
        "s": {"type": f"{__name__}:EmitsOutside"},
    })
    assert rt.handlers["src"].error.startswith("handler 'src' is not bound to a runtime")
    assert (await rt.run()).ok
    assert rt.handlers["s"].errors == [
        "handler 's' has no output 'nope'; declared: events",
        ("handler 's': emit or dead_letter outside process()/write() needs parents=[...] (the "
        "batches or Deferred it derives from)"),
    ]


async def test_admin_port_in_use_is_a_start_error(make_runtime) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rt = make_runtime({"src": {"type": "memory_source", "outputs": ["s"]},
                           "s": {"type": "memory_sink"}},
                          runtime={"admin_enabled": True, "admin_port": port})
        with pytest.raises(StartError, match=rf"the admin server on 127.0.0.1:{port} failed to "
                                             r"start: OSError"):
            await rt.run()


def test_the_settings_example_in_handlers_md_is_valid(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli import main

    guide = (ROOT / "pipeline" / "HANDLERS.md").read_text()
    block = guide.split("## Settings file\n\n```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "settings.toml"
    path.write_text(block.replace('"dead_letters.jsonl"', f'"{tmp_path / "dl.jsonl"}"'))
    assert main(["--settings", str(path), "--check"]) == 0, capsys.readouterr().err
    assert main(["--settings", str(path), "--set", "runtime.admin_enabled=false"]) == 0
