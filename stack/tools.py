"""Tools the tests need beside the services: Debian's headless Chromium.

``python -m stack install`` (every service, no names given) also calls
:func:`ensure_tools`, so CI gets the browser the dashboard's e2e tests drive
(``tests/e2e/test_dashboard.py``). It is idempotent and offline once done:

* ``chromium`` found (``/usr/bin/chromium`` or on ``PATH``): nothing to do;
* otherwise ``apt-get update && apt-get install -y chromium chromium-driver``
  as root (or through ``sudo -n``); any other system gets a clear error that
  says what to install.
"""
from __future__ import annotations

import os
import shutil
import subprocess

__all__ = ["ToolError", "chromium_path", "ensure_chromium", "ensure_tools"]

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
APT_PACKAGES = ("chromium", "chromium-driver")


class ToolError(RuntimeError):
    """A tool is missing and could not be installed."""


def chromium_path() -> str | None:
    """The Chromium executable (``CHROMIUM`` env var first), or None."""
    override = os.environ.get("CHROMIUM")
    if override:
        return override if os.access(override, os.X_OK) else None
    for path in CHROMIUM_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _apt_prefix() -> list[str]:
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], check=False,
                                               capture_output=True).returncode == 0:
        return ["sudo", "-n"]
    raise ToolError("chromium is missing and installing it needs root: run "
                    f"`sudo apt-get install -y {' '.join(APT_PACKAGES)}`")


def ensure_chromium(say: object = print) -> str:
    """Return Chromium's path, installing Debian's package first when it is missing."""
    found = chromium_path()
    if found:
        return found
    if not shutil.which("apt-get"):
        raise ToolError("chromium is missing and this system has no apt-get: install "
                        "Chromium and set CHROMIUM=/path/to/chromium")
    prefix = _apt_prefix()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    say(f"== chromium: installing {' '.join(APT_PACKAGES)} with apt-get")  # type: ignore[operator]
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", *APT_PACKAGES]):
        proc = subprocess.run([*prefix, *cmd], check=False, env=env, capture_output=True,
                              text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
            raise ToolError(f"`{' '.join(cmd)}` failed with exit code {proc.returncode}:\n{tail}")
    found = chromium_path()
    if not found:
        raise ToolError("apt-get installed chromium but no chromium executable was found")
    return found


def ensure_tools(say: object = print) -> int:
    """Install every tool; 0 on success, 1 (after printing why) on failure."""
    try:
        path = ensure_chromium(say)
    except ToolError as exc:
        say(f"!! chromium: {exc}")  # type: ignore[operator]
        return 1
    say(f"== chromium: installed ({path})")  # type: ignore[operator]
    return 0
