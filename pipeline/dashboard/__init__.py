"""The pipeline dashboard: a live page served by the runtime's admin server.

Enable it with the admin extension hook (it is not mounted unless asked for, so
an admin port exposed for probes serves nothing else)::

    [runtime]
    admin_port = 8080
    admin_extensions = ["pipeline.dashboard:setup"]

then open ``http://127.0.0.1:8080/`` (redirects to ``/dashboard/``). The page
draws the pipeline graph as SVG (handlers and channels, laid out in the browser
by ``static/dashboard.js``, no network access beyond this server), and polls
``/dashboard/api/state`` every 1.5 s (``?interval=<seconds>`` changes it) for
rows/s in and out per handler, input channel depth against capacity, errors,
retries, dead letters, acknowledgement lag, connected/ready state, and
handler-specific status.

Routes (``setup`` is idempotent: another extension may call it too):

=========================  ======================================================
``/``                      redirect to ``/dashboard/``
``/dashboard/``            the page (public: a static shell holding no data)
``/dashboard/static/*``    its JS and CSS (public), shared by extension pages
``/dashboard/api/state``   ``runtime.status()`` plus each handler's own metrics,
                           progress and status (needs the admin token, if any)
=========================  ======================================================

**Admin token.** With ``[runtime] admin_token`` set, the page asks for it
in a login field, keeps it in ``sessionStorage`` (this tab only) and sends it as
``Authorization: Bearer``; ``/dashboard/#token=...`` signs in directly (the
fragment never reaches a server or a log and is removed from the address bar).

**Handler-specific status**, shown on the handler's card, comes from either:

* metrics: every metric a handler registered through ``self.metrics`` beside
  the standard ones is listed; a pair ``<x>_done`` / ``<x>_total`` (gauges, or
  a counter ``<x>_done`` which renders as ``<x>_done_total``) becomes a progress
  bar, e.g. ``spark_tasks_done`` / ``spark_tasks_total`` → "spark tasks 12/40";
* an optional ``dashboard_status()`` (or else ``status()``) plain (not async),
  cheap method on the handler returning a JSON-able dict (spark_job's ``status()``: jobs running and recent);
  a ``"progress": {"done": d, "total": t, "label": "..."}`` entry (or a list of
  them) is drawn as a bar, other entries as key/value lines (nested values
  folded).

Extensions add their pages to the navigation bar with :func:`add_link`, and
serve their shells with :func:`page` (same header, token handling and CSS: a shell
starts with a `{{top}}` line, the top every page shares, `static/page_top.html`).
"""
from __future__ import annotations

import html
import inspect
import json
import math
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..admin import PUBLIC_PATHS_KEY
from ..log import get_logger, scrub

if TYPE_CHECKING:
    from ..runtime import Runtime

__all__ = ["LINKS_KEY", "STATIC_DIR", "add_link", "handler_extras", "page", "setup"]

STATIC_DIR = Path(__file__).resolve().parent / "static"
#: navigation links shown on every dashboard page: ``(title, href)``, in order
LINKS_KEY: web.AppKey[list[tuple[str, str]]] = web.AppKey("gaitflow_dashboard_links", list)
_RUNTIME_KEY: web.AppKey[Runtime] = web.AppKey("gaitflow_dashboard_runtime")
# Content-Security-Policy of every page: nothing but this server, no inline script.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
log = get_logger(component="dashboard")

# Metrics every handler has; anything else labelled with a handler is its own.
STANDARD_METRICS = frozenset({
    "batches_in_total", "rows_in_total", "batches_out_total", "rows_out_total", "errors_total",
    "retries_total", "dead_letters_total", "dead_letter_rows_total", "handle_seconds_bucket",
    "handle_seconds_sum", "handle_seconds_count", "channel_depth", "channel_capacity",
    "channel_max_depth", "channel_blocked_seconds_total", "ack_pending", "ack_lag_seconds",
    "acked_total", "ack_failed_total", "handler_up", "ready"})
_SAMPLE = re.compile(r"^gaitflow_([A-Za-z0-9_]+?)(\{.*\})? (\S+)$")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')
_DONE = re.compile(r"^(.+)_done(?:_total)?$")


def setup(app: web.Application, runtime: Runtime) -> None:
    """Mount the dashboard on the admin ``app`` (the ``admin_extensions`` hook)."""
    if _RUNTIME_KEY in app:
        return
    app[_RUNTIME_KEY] = runtime
    if LINKS_KEY not in app:
        app[LINKS_KEY] = []
    app[LINKS_KEY].insert(0, ("Pipeline", "/dashboard/"))
    public = app.get(PUBLIC_PATHS_KEY)
    if public is not None:
        public.update({"/", "/dashboard", "/dashboard/", "/dashboard/static/*"})
    app.router.add_get("/", _redirect)
    app.router.add_get("/dashboard", _redirect)
    app.router.add_get("/dashboard/", _index)
    app.router.add_get("/dashboard/api/state", _state)
    app.router.add_static("/dashboard/static/", STATIC_DIR, follow_symlinks=False)


def add_link(app: web.Application, title: str, href: str) -> None:
    """Add a page of an extension to the navigation bar of every dashboard page."""
    if LINKS_KEY not in app:
        app[LINKS_KEY] = []
    app[LINKS_KEY].append((title, href))


_TEMPLATES: dict[Path, str] = {}
#: the top of every dashboard page (head, header bar with navigation and sign-in): ``{{top}}``
TOP_TEMPLATE = STATIC_DIR / "page_top.html"


def _template(path: Path) -> str:
    text = _TEMPLATES.get(path)
    if text is None:
        text = _TEMPLATES[path] = path.read_text(encoding="utf-8")
    return text


def page(request: web.Request, template: Path, *, title: str = "", status: str = "loading…",
         stylesheets: tuple[str, ...] = (), **values: str) -> web.Response:
    """Serve an HTML shell: ``{{nav}}`` and ``{{name}}`` placeholders filled, HTML-escaped.

    A ``{{top}}`` line becomes the top every dashboard page shares (``page_top.html``):
    ``<head>`` with ``title``, dashboard.css and then ``stylesheets``, and the header bar
    (navigation, sign-in, a connection pill reading ``status`` until the script runs).
    The shell holds no data (its script fetches it with the token), so it may be
    public.
    """
    text = _template(template)
    if "{{top}}\n" in text:
        links = "".join(f'<link rel="stylesheet" href="{html.escape(href)}">\n'
                        for href in stylesheets)
        top = _template(TOP_TEMPLATE).replace("{{stylesheets}}", links)
        text = text.replace("{{top}}\n", top, 1)
        values = {"title": title, "status": status, **values}
    nav = "".join(_link(request.path, label, href) for label, href in
                  request.app.get(LINKS_KEY, []))
    text = text.replace("{{nav}}", nav)
    for name, value in values.items():
        text = text.replace("{{" + name + "}}", html.escape(value))
    return web.Response(text=text, content_type="text/html", headers={
        "Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"})


def _link(current: str, title: str, href: str) -> str:
    active = current == href or (href.endswith("/") and current.startswith(href))
    attr = ' class="active" aria-current="page"' if active else ""
    return f'<a href="{html.escape(href)}"{attr}>{html.escape(title)}</a>'


async def _redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound("/dashboard/")


async def _index(request: web.Request) -> web.Response:
    return page(request, STATIC_DIR / "index.html", title="pipeline", status="connecting…")


async def _state(request: web.Request) -> web.Response:
    runtime = request.app[_RUNTIME_KEY]
    state = runtime.status()
    extras = handler_extras(runtime)
    settings = state.pop("settings", {}).get("handlers", {})
    for name, entry in state["handlers"].items():
        entry.update(extras.get(name, {}))
        entry["settings"] = settings.get(name, {})
    state["time"] = time.time()
    body = scrub(json.dumps(state, default=str, allow_nan=False))
    return web.Response(text=body, content_type="application/json",
                        headers={"Cache-Control": "no-store"})


def handler_extras(runtime: Runtime) -> dict[str, dict[str, Any]]:
    """Per handler: its own metrics, progress bars, latency totals and ``dashboard_status()``."""
    extras: dict[str, dict[str, Any]] = {
        name: {"metrics": {}, "progress": [], "info": {}, "latency_sum": 0.0,
               "latency_count": 0.0} for name in runtime.handlers}
    for line in runtime.metrics.render().splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        name, labels_text, raw = m.groups()
        labels = dict(_LABEL.findall(labels_text or ""))
        handler = labels.pop("handler", None)
        if handler not in extras:
            continue
        try:
            value = float(raw)
        except ValueError:
            continue
        if not math.isfinite(value):
            continue  # NaN/Inf cannot travel as JSON
        entry = extras[handler]
        if name == "handle_seconds_sum":
            entry["latency_sum"] = value
        elif name == "handle_seconds_count":
            entry["latency_count"] = value
        elif name not in STANDARD_METRICS and not name.endswith("_bucket"):
            suffix = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
            entry["metrics"][f"{name}{{{suffix}}}" if suffix else name] = value
    for name, entry in extras.items():
        metrics = entry["metrics"]
        for key, value in metrics.items():
            m = _DONE.match(key)
            total = metrics.get(f"{m.group(1)}_total") if m else None
            if m and total is not None:
                entry["progress"].append({"label": m.group(1).replace("_", " "),
                                          "done": value, "total": total,
                                          "metrics": [key, f"{m.group(1)}_total"]})
        handler = runtime.handlers[name]
        hook = getattr(handler, "dashboard_status", None) or getattr(handler, "status", None)
        if callable(hook) and not inspect.iscoroutinefunction(hook):  # a plain method only
            try:
                info = hook()
                info = json.loads(json.dumps(info, default=str)) if info else {}
                entry["info"] = info if isinstance(info, dict) else {"status": info}
            except Exception as exc:  # noqa: BLE001 - a broken hook must not break the page
                entry["info"] = {"error": f"status failed: {type(exc).__name__}: {exc}"}
                log.warning("dashboard.status_hook_failed", handler=name, error=str(exc))
        progress = entry["info"].get("progress") if isinstance(entry["info"], dict) else None
        for p in progress if isinstance(progress, list) else [progress] if progress else []:
            if isinstance(p, dict) and "done" in p and "total" in p:
                entry["progress"].append({"label": str(p.get("label", "progress")),
                                          "done": p["done"], "total": p["total"]})
    return extras
