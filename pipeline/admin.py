"""The admin HTTP server: /healthz, /readyz, /metrics, /api/status, /api/graph.

``create_admin_app`` builds the application (what runs); ``AdminServer`` binds
it to a host and port for the runtime's lifetime (where it listens).
Extensions listed in ``[runtime] admin_extensions`` add routes (the dashboard).
"""
from __future__ import annotations

import hmac
import importlib
import json
from typing import TYPE_CHECKING, Any, Self

from aiohttp import web

from .log import get_logger, scrub

if TYPE_CHECKING:
    from .config import RuntimeSettings
    from .runtime import Runtime

__all__ = ["PUBLIC_PATHS_KEY", "RUNTIME_KEY", "AdminServer", "create_admin_app"]

RUNTIME_KEY: web.AppKey[Runtime] = web.AppKey("gaitflow_runtime")
PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
#: paths an extension serves without the token (page shells and static assets, never
#: data): exact paths, or prefixes written with a trailing "*" ("/dashboard/static/*")
PUBLIC_PATHS_KEY: web.AppKey[set[str]] = web.AppKey("gaitflow_public_paths", set)
log = get_logger(component="admin")


def _json(data: Any, status: int = 200) -> web.Response:
    # scrub: a secret echoed in an error message must not leave through the API
    body = scrub(json.dumps(data, default=str, indent=1))
    return web.Response(text=body, status=status, content_type="application/json")


def _auth_middleware(token: str) -> Any:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Any) -> web.StreamResponse:
        if not _is_public(request):
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return web.json_response({"error": "unauthorized"}, status=401,
                                         headers={"WWW-Authenticate": 'Bearer realm="gaitflow"'})
        return await handler(request)

    return check


def _is_public(request: web.Request) -> bool:
    path = request.path
    if path in PUBLIC_PATHS:
        return True
    return any(path == entry or (entry.endswith("*") and path.startswith(entry[:-1]))
               for entry in request.app.get(PUBLIC_PATHS_KEY, ()))


async def healthz(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME_KEY]
    alive = runtime.state not in ("stopped",)
    return web.json_response({"status": "ok" if alive else "stopped", "state": runtime.state},
                             status=200 if alive else 503)


async def readyz(request: web.Request) -> web.Response:
    ready, waiting = request.app[RUNTIME_KEY].readiness()
    return _json({"ready": ready, "not_ready": waiting}, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    text = request.app[RUNTIME_KEY].metrics.render()
    return web.Response(text=scrub(text), content_type="text/plain",
                        headers={"X-Content-Format": "prometheus-0.0.4"})


async def status(request: web.Request) -> web.Response:
    return _json(request.app[RUNTIME_KEY].status())


async def graph(request: web.Request) -> web.Response:
    g = request.app[RUNTIME_KEY].graph
    return _json({"text": g.render_text(), "mermaid": g.render_mermaid()})


def create_admin_app(runtime: Runtime, token: str | None = None,
                     extensions: list[str] | tuple[str, ...] = ()) -> web.Application:
    middlewares = [_auth_middleware(token)] if token else []
    app = web.Application(middlewares=middlewares)
    app[RUNTIME_KEY] = runtime
    app[PUBLIC_PATHS_KEY] = set()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/status", status)
    app.router.add_get("/api/graph", graph)
    for target in extensions:
        module_name, _, attr = target.partition(":")
        setup = getattr(importlib.import_module(module_name), attr)
        setup(app, runtime)
    return app


class AdminServer:
    """Serves the admin app while the runtime lives (an async context manager)."""

    def __init__(self, runtime: Runtime, settings: RuntimeSettings) -> None:
        self.runtime, self.settings = runtime, settings
        self._runner: web.AppRunner | None = None
        self.url: str | None = None

    async def __aenter__(self) -> Self:
        s = self.settings
        token = s.admin_token.get() if s.admin_token else None
        app = create_admin_app(self.runtime, token, s.admin_extensions)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, s.admin_host, s.admin_port)
        try:
            await site.start()
        except BaseException:
            await self._runner.cleanup()
            raise
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        log.info("admin.listening", url=self.url, auth=bool(token))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
