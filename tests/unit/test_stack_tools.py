"""stack.tools: finding (and only when missing, installing) headless Chromium."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from stack import tools


def test_chromium_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exe = tmp_path / "chromium"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.setenv("CHROMIUM", str(exe))
    assert tools.chromium_path() == str(exe)
    monkeypatch.setenv("CHROMIUM", str(tmp_path / "missing"))
    assert tools.chromium_path() is None


def test_present_chromium_is_not_reinstalled(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    exe = tmp_path / "chromium"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.setenv("CHROMIUM", str(exe))

    def no_apt(*args: object, **kwargs: object) -> None:
        raise AssertionError("apt-get must not run when chromium is present")

    monkeypatch.setattr(subprocess, "run", no_apt)
    lines: list[str] = []
    assert tools.ensure_tools(lines.append) == 0
    assert lines == [f"== chromium: installed ({exe})"]


def test_missing_chromium_without_apt_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tools, "chromium_path", lambda: None)
    monkeypatch.setattr(tools.shutil, "which", lambda name: None)
    lines: list[str] = []
    assert tools.ensure_tools(lines.append) == 1
    assert "no apt-get" in lines[0] and "CHROMIUM=" in lines[0]
