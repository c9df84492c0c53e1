"""``python run.py``: --check, --graph, --set, --list, --describe, start failures,
and signals: SIGTERM drains and exits 0 losing nothing; a second SIGINT forces exit."""
from __future__ import annotations

import asyncio
import datetime
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main

ROOT = Path(__file__).resolve().parent.parent.parent

GOOD = """
[runtime]
admin_enabled = false
[dead_letter]
target = "dlq"
[handlers.src]
type = "memory_source"
count = 30
batch_size = 10
outputs = ["split"]
[handlers.split]
type = "runtime_fakes:SplitProcessor"
outputs = { default = ["even"], odd = ["odd"] }
[handlers.even]
type = "memory_sink"
[handlers.odd]
type = "log_sink"
[handlers.dlq]
type = "file_dead_letter"
path = "{dlq}"
"""


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "settings.toml"
    path.write_text(GOOD.replace("{dlq}", str(tmp_path / "dlq.jsonl")))
    return path


def test_check_ok(good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--settings", str(good), "--check"]) == 0
    assert capsys.readouterr().out == f"ok: {good}: 5 handlers, 3 connections\n"


def test_check_reports_every_problem_and_exits_1(
        good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good.write_text(good.read_text().replace("count = 30", "count = -1\ncolour = 1")
                    .replace('outputs = ["split"]', 'outputs = ["splt"]'))
    assert main(["--settings", str(good), "--check"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"{good}: 2 problem(s):"
    assert f"  {good}: [handlers.src] count = -1: out of range; expected an integer >= 0" in err
    assert any(line.startswith(f"  {good}: [handlers.src] colour = 1: unknown key") for line in err)
    # wiring is checked once the sections themselves are valid
    good.write_text(good.read_text().replace("count = -1\ncolour = 1", "count = 3"))
    assert main(["--settings", str(good), "--check"]) == 1
    assert "unknown target (did you mean 'split'?)" in capsys.readouterr().err


def test_check_exit_codes_from_a_subprocess(good: Path, subprocess_env: dict[str, str]) -> None:
    ok = subprocess.run([sys.executable, "run.py", "--settings", str(good), "--check"],
                        cwd=ROOT, env=subprocess_env, capture_output=True, text=True, timeout=60,
                        check=False)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ok: ")
    bad = subprocess.run([sys.executable, "run.py", "--settings", str(good), "--check",
                          "--set", "handlers.src.type=nope"],
                         cwd=ROOT, env=subprocess_env, capture_output=True, text=True, timeout=60,
                        check=False)
    assert bad.returncode == 1
    assert 'type = "nope": unknown handler type' in bad.stderr


def test_python_m_pipeline_finds_a_handler_module_in_the_working_directory(
        tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    (tmp_path / "myplugin.py").write_text(
        "from pipeline import Processor\n\n"
        "class Upper(Processor):\n"
        "    async def process(self, batch):\n"
        "        return batch.data\n")
    (tmp_path / "s.toml").write_text(
        '[handlers.src]\ntype = "memory_source"\noutputs = ["up"]\non_failure = "stop"\n'
        '[handlers.up]\ntype = "myplugin:Upper"\noutputs = ["out"]\non_failure = "stop"\n'
        '[handlers.out]\ntype = "memory_sink"\non_failure = "stop"\n')
    env = {**subprocess_env, "PYTHONPATH": str(ROOT)}  # not the test directory
    ok = subprocess.run([sys.executable, "-m", "pipeline", "--settings", "s.toml", "--check"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
                        check=False)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "ok: s.toml: 3 handlers, 2 connections\n"


def test_set_overrides_apply_before_validation(
        good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--settings", str(good), "--check", "--set", "handlers.src.count=-5"]) == 1
    assert "[handlers.src] count = -5: out of range" in capsys.readouterr().err


def test_graph_prints_text_and_mermaid(good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--settings", str(good), "--graph"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"pipeline {good}: 5 handlers, 3 connections\n")
    assert "  src (source, memory_source) --> split\n" in out
    assert "--odd--> odd" in out
    assert "\nflowchart LR\n" in out and "  n1 -- odd --> n3\n" in out
    assert main(["--settings", str(good), "--graph", "mermaid"]) == 0
    assert capsys.readouterr().out.startswith("flowchart LR\n")


def test_list_and_describe(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--list"]) == 0
    listing = capsys.readouterr().out
    assert "memory_source" in listing and "entry point memory_source" in listing
    assert main(["--describe", "jsonl_sink"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("jsonl_sink: sink pipeline.builtin:JsonlSink\n")
    assert "    path = (required)  # a path; file to append JSON lines to" in out
    assert main(["--describe", "memory_source"]) == 0
    out = capsys.readouterr().out
    assert "    ack_log = (unset)  # a path" in out  # None: not a value to paste back
    assert main(["--describe", "jsonl_snk"]) == 1
    assert "did you mean 'jsonl_sink'?" in capsys.readouterr().err


def test_run_to_completion_exits_0(good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--settings", str(good)]) == 0
    err = capsys.readouterr().err
    assert "event=runtime.ready" in err and "event=runtime.stopped ok=true" in err


def test_dead_letter_file_lines_carry_iso_8601_times(good: Path) -> None:
    good.write_text(good.read_text().replace("count = 30", "rows = [{x = 1}]\ncount = 30"))
    assert main(["--settings", str(good)]) == 0
    (line,) = (good.parent / "dlq.jsonl").read_text().splitlines()
    letter = json.loads(line)
    assert letter["reason"] == "no seq column" and json.loads(letter["payload"]) == {"x": 1}
    when = datetime.datetime.fromisoformat(letter["time"])
    assert "T" in letter["time"] and when.tzinfo is not None


def test_start_failure_exits_1_naming_handler_and_cause(
        good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good.write_text(good.read_text().replace('[handlers.odd]\ntype = "log_sink"',
                                             '[handlers.odd]\ntype = "runtime_fakes:LifecycleProbe"'
                                             "\nfail_start = true"))
    assert main(["--settings", str(good)]) == 1
    err = capsys.readouterr().err
    assert ("handler 'odd' (runtime_fakes:LifecycleProbe) failed to start: "
            "ConnectionRefusedError: cannot reach the server of odd") in err
    assert "event=handler.closed handler=even" in err


# -- signals, in real subprocesses ------------------------------------------------------
STREAM = """
[runtime]
admin_enabled = false
drain_timeout = {drain}
[dead_letter]
target = "dlq"
[handlers.src]
type = "memory_source"
forever = true
batch_size = 10
interval = 0.002
ack_log = "{acks}"
outputs = ["slow"]
[handlers.slow]
type = "runtime_fakes:SlowJsonlSink"
path = "{out}"
delay = {delay}
capacity = 8
[handlers.dlq]
type = "file_dead_letter"
path = "{dlq}"
"""


def stream_settings(tmp_path: Path, *, delay: float, drain: float) -> Path:
    path = tmp_path / "stream.toml"
    path.write_text(STREAM.format(drain=drain, delay=delay, acks=tmp_path / "acks.jsonl",
                                  out=tmp_path / "out.jsonl", dlq=tmp_path / "dlq.jsonl"))
    return path


async def start(settings: Path, env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "run.py", "--settings", str(settings), cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def read_until(proc: asyncio.subprocess.Process, marker: str, seen: list[str],
                     timeout: float = 30) -> None:
    assert proc.stderr is not None
    async with asyncio.timeout(timeout):
        while True:
            line = (await proc.stderr.readline()).decode()
            if not line:
                raise AssertionError(f"{marker!r} never logged:\n{''.join(seen)}")
            seen.append(line)
            if marker in line:
                return


async def test_sigterm_mid_stream_drains_exits_0_and_loses_nothing(
        tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    settings = stream_settings(tmp_path, delay=0.02, drain=30)
    out = tmp_path / "out.jsonl"
    proc = await start(settings, subprocess_env)
    seen: list[str] = []
    try:
        await read_until(proc, "event=runtime.ready", seen)
        async with asyncio.timeout(30):
            while not out.exists() or len(out.read_text().splitlines()) < 100:
                await asyncio.sleep(0.02)
        written_at_signal = len(out.read_text().splitlines())
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    log = "".join(seen) + err.decode()
    assert proc.returncode == 0, log
    assert 'stopped_by="signal SIGTERM"' in log and "event=drain.done" in log
    rows = [json.loads(line)["seq"] for line in out.read_text().splitlines()]
    acks = [json.loads(line) for line in (tmp_path / "acks.jsonl").read_text().splitlines()]
    acked = [seq for a in acks for seq in range(a["first"], a["first"] + a["n"])]
    assert len(rows) > written_at_signal, "batches in flight at the signal were drained"
    assert acked == list(range(len(acked))), "acknowledged in order, without gaps"
    assert sorted(rows) == acked, "every acknowledged row is in the sink, and nothing else"
    assert len(set(rows)) == len(rows)
    assert not (tmp_path / "dlq.jsonl").read_text()


async def test_second_sigint_forces_exit(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    settings = stream_settings(tmp_path, delay=10, drain=120)
    proc = await start(settings, subprocess_env)
    seen: list[str] = []
    try:
        await read_until(proc, "event=runtime.ready", seen)
        await asyncio.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        await read_until(proc, "event=drain.started", seen)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 10)
        elapsed = loop.time() - t0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    log = "".join(seen) + err.decode()
    assert proc.returncode == 128 + signal.SIGINT, log
    assert elapsed < 5, "the second signal must not wait for the 120 s drain"
    assert "event=runtime.forced_exit signal=SIGINT" in log


@pytest.mark.parametrize("settings", ["settings.toml", "pipeline/examples/split/ingest.toml",
                                      "pipeline/examples/split/processing.toml"])
def test_shipped_settings_files_check(settings: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The default pipeline and the split example stay valid (the e2e tests run them)."""
    assert main(["--settings", str(ROOT / settings), "--check"]) == 0
    assert capsys.readouterr().out.startswith(f"ok: {ROOT / settings}: ")
