"""A headless Chromium driven over the Chrome DevTools Protocol (aiohttp websocket).

Just what the dashboard tests need: open a page, evaluate JavaScript, wait for a
condition, type and click like a user, take a full-page screenshot, and collect
the page's console errors and uncaught exceptions.

    async with Browser(chromium_path, width=1280, height=900) as page:
        await page.goto("http://127.0.0.1:8080/dashboard/")
        await page.wait_for("document.body.dataset.loaded === 'true'")
        await page.screenshot(path)

Chromium runs with its own throwaway profile (``--user-data-dir``), no network
services (``--disable-background-networking`` ...) and a DevTools port it picks
itself (read back from ``DevToolsActivePort``), so concurrent runs never collide.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Self

import aiohttp

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0")


class BrowserError(AssertionError):
    """The browser or the page did not do what the test expected."""


class Browser:
    """One Chromium process and its first page; an async context manager."""

    def __init__(self, executable: str, *, width: int = 1280, height: int = 900,
                 start_timeout: float = 30.0) -> None:
        self.executable, self.width, self.height = executable, width, height
        self.start_timeout = start_timeout
        self.console_errors: list[str] = []
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._events: list[tuple[str, dict[str, Any]]] = []
        self._profile: str | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._log: Any = None
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        self._profile = tempfile.mkdtemp(prefix="gaitflow-chromium-")
        self._log = Path(self._profile, "chromium.log").open("wb")  # noqa: ASYNC230, SIM115 - local, instant
        try:
            self._proc = await asyncio.create_subprocess_exec(
                self.executable, *FLAGS, f"--user-data-dir={self._profile}",
                f"--window-size={self.width},{self.height}", "about:blank",
                stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
                start_new_session=True)
            port = await self._devtools_port()
            self._http = aiohttp.ClientSession()
            async with self._http.get(f"http://127.0.0.1:{port}/json/list") as resp:
                targets = await resp.json()
            page = next(t for t in targets if t.get("type") == "page")
            self._ws = await self._http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
            self._reader = asyncio.create_task(self._read())
            await self.send("Page.enable")
            await self.send("Runtime.enable")
            await self.send("Emulation.setDeviceMetricsOverride", width=self.width,
                            height=self.height, deviceScaleFactor=1, mobile=False)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _devtools_port(self) -> int:
        assert self._profile is not None and self._proc is not None
        marker = Path(self._profile) / "DevToolsActivePort"
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.returncode is not None:
                raise BrowserError(f"chromium exited with {self._proc.returncode}: "
                                   f"{self.log_tail()}")
            with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
                return int(marker.read_text().splitlines()[0])
            await asyncio.sleep(0.05)
        raise BrowserError(f"chromium did not open its DevTools port in {self.start_timeout}s: "
                           f"{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        if self._profile is None:
            return ""
        path = Path(self._profile) / "chromium.log"
        try:
            text = path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def close(self) -> None:
        if self._ws is not None and not self._ws.closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.send("Browser.close"), 5)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._ws is not None:
            await self._ws.close()
        if self._http is not None:
            await self._http.close()
        if self._proc is not None:
            try:
                await asyncio.wait_for(self._proc.wait(), 10)
            except TimeoutError:
                self._proc.kill()
                await self._proc.wait()
        if self._log is not None:
            self._log.close()
        if self._profile is not None:
            shutil.rmtree(self._profile, ignore_errors=True)
        self._ws = self._http = self._proc = self._log = self._reader = None
        self._profile = None

    # -- protocol ---------------------------------------------------------------------
    async def _read(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
                continue
            method, params = data.get("method", ""), data.get("params", {})
            self._events.append((method, params))
            if method == "Runtime.exceptionThrown":
                d = params.get("exceptionDetails", {})
                self.console_errors.append(
                    (d.get("exception") or {}).get("description") or d.get("text", "exception"))
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                self.console_errors.append(" ".join(
                    str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(BrowserError("the DevTools connection closed"))

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its ``result``, or BrowserError with the protocol's error."""
        if self._ws is None:
            raise BrowserError("the browser is not running")
        msg_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        await self._ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
        reply = await asyncio.wait_for(fut, 30)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    # -- page -------------------------------------------------------------------------
    async def goto(self, url: str, timeout: float = 20.0) -> None:
        """Navigate and wait until the document finished loading (scripts ran)."""
        self._events.clear()
        reply = await self.send("Page.navigate", url=url)
        if reply.get("errorText"):
            raise BrowserError(f"navigating to {url}: {reply['errorText']}")
        await self.wait_for("document.readyState === 'complete' && location.href !== "
                            "'about:blank'", timeout=timeout)

    async def eval(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression (promises are awaited)."""
        reply = await self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                                awaitPromise=True)
        if "exceptionDetails" in reply:
            d = reply["exceptionDetails"]
            raise BrowserError(f"{expression!r} threw: "
                               f"{(d.get('exception') or {}).get('description') or d.get('text')}")
        return reply.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout: float = 15.0,
                       interval: float = 0.1) -> Any:
        """Poll ``expression`` until it is truthy; its value, or BrowserError on timeout."""
        deadline = time.monotonic() + timeout
        value: Any = None
        while True:
            try:
                value = await self.eval(expression)
            except BrowserError as exc:
                value = str(exc)  # e.g. the page is still navigating
            else:
                if value:
                    return value
            if time.monotonic() >= deadline:
                raise BrowserError(f"timed out after {timeout}s waiting for {expression!r} "
                                   f"(last value {value!r}); console errors: "
                                   f"{self.console_errors}")
            await asyncio.sleep(interval)

    async def text(self, selector: str) -> str:
        return await self.eval(f"(document.querySelector({json.dumps(selector)}) || "
                               "{}).textContent || ''")

    async def count(self, selector: str) -> int:
        return await self.eval(f"document.querySelectorAll({json.dumps(selector)}).length")

    async def type(self, selector: str, text: str, *, clear: bool = True) -> None:
        """Focus an input and type ``text`` as keyboard input (input events fire)."""
        found = await self.eval(f"""(() => {{
            const e = document.querySelector({json.dumps(selector)});
            if (!e) return false;
            e.focus();
            if ({json.dumps(clear)}) {{ e.select && e.select(); }}
            return true; }})()""")
        if not found:
            raise BrowserError(f"no element matches {selector!r}")
        if clear:
            await self.send("Input.dispatchKeyEvent", type="keyDown", key="Backspace",
                            code="Backspace", windowsVirtualKeyCode=8)
            await self.send("Input.dispatchKeyEvent", type="keyUp", key="Backspace",
                            code="Backspace", windowsVirtualKeyCode=8)
        await self.send("Input.insertText", text=text)

    async def select(self, selector: str, value: str) -> None:
        """Choose an option of a <select> as a user would (a change event fires)."""
        ok = await self.eval(f"""(() => {{
            const e = document.querySelector({json.dumps(selector)});
            if (!e) return false;
            e.value = {json.dumps(value)};
            e.dispatchEvent(new Event("change", {{bubbles: true}}));
            return e.value === {json.dumps(value)}; }})()""")
        if not ok:
            raise BrowserError(f"cannot select {value!r} in {selector!r}")

    async def click(self, selector: str) -> None:
        """A real mouse click at the centre of the element."""
        box = await self.box(selector)
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left",
                            clickCount=1)

    async def drag(self, selector: str, x_from: float, x_to: float, y: float = 0.5) -> None:
        """Press, move and release the mouse across the element (fractions of its box)."""
        box = await self.box(selector)
        py = box["y"] + box["height"] * y
        points = [box["x"] + box["width"] * (x_from + (x_to - x_from) * i / 8) for i in range(9)]
        await self.send("Input.dispatchMouseEvent", type="mousePressed", x=points[0], y=py,
                        button="left", clickCount=1)
        for px in points[1:]:
            await self.send("Input.dispatchMouseEvent", type="mouseMoved", x=px, y=py,
                            button="left", buttons=1)
        await self.send("Input.dispatchMouseEvent", type="mouseReleased", x=points[-1], y=py,
                        button="left", clickCount=1)

    async def box(self, selector: str) -> dict[str, float]:
        """The element's box in viewport CSS pixels (scrolled into view first)."""
        box = await self.eval(f"""(() => {{
            const e = document.querySelector({json.dumps(selector)});
            if (!e) return null;
            e.scrollIntoView({{block: "center"}});
            const r = e.getBoundingClientRect();
            return {{x: r.x, y: r.y, width: r.width, height: r.height}}; }})()""")
        if not box:
            raise BrowserError(f"no element matches {selector!r}")
        return box

    async def page_box(self, selector: str) -> dict[str, float]:
        """The element's box in document CSS pixels (for cropping a full-page screenshot)."""
        box = await self.eval(f"""(() => {{
            const e = document.querySelector({json.dumps(selector)});
            if (!e) return null;
            const r = e.getBoundingClientRect();
            return {{x: r.x + scrollX, y: r.y + scrollY, width: r.width, height: r.height}}; }})()""")
        if not box:
            raise BrowserError(f"no element matches {selector!r}")
        return box

    async def screenshot(self, path: Path, *, full_page: bool = True) -> bytes:
        """Save a PNG of the page (the whole document by default); return its bytes."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            # from the top, so sticky headers are drawn where they belong
            await self.eval("window.scrollTo(0, 0)")
            size = await self.eval("({w: document.documentElement.scrollWidth, "
                                   "h: document.documentElement.scrollHeight})")
            params.update(captureBeyondViewport=True, clip={
                "x": 0, "y": 0, "width": max(size["w"], self.width),
                "height": max(size["h"], self.height), "scale": 1})
        data = base64.b64decode((await self.send("Page.captureScreenshot", **params))["data"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return data
