"""gait_dashboard: the gait pipeline's pages on the runtime's admin server.

Enable it with the admin extension hook (it also mounts the generic pipeline
dashboard, ``pipeline.dashboard``, so one line gives every page)::

    [runtime]
    admin_extensions = ["handlers.gait_dashboard:setup"]

Pages (static shells, public; their data comes from the JSON API with the admin
token when one is set, see ``pipeline/dashboard``):

``/diagnoses``
    Every diagnosis (``handlers/README.md`` §5) as a table: recording, study and true
    label (read from the gaitpdb id: ``GaCo01_01`` = study Ga, control), predicted
    label, probability, model version, windows, diagnosed_at; search (id prefix or
    substring, label, model version) and filters (predicted label, true label, study,
    model version, probability range), a recording-level confusion matrix of the
    filtered set with accuracy, sensitivity and specificity. The filter state lives
    in the URL (``/diagnoses?study=Ga&label=parkinson``), so a view can be shared.
``/recordings/<id>``
    One recording: L and R total force over time (mean with a min–max band per
    pixel column, so steps keep their peaks), a per-sensor heatmap (L1..L8, R1..R8),
    and the per-window probabilities of its diagnosis against the model's decision
    threshold (the diagnosis' ``threshold``; 0.5 for diagnoses written without one).
    The id must match ``[A-Za-z0-9_.-]{1,64}`` without ``..`` (else 404).

JSON API (behind the admin token):

``GET /api/diagnoses?q=&label=&truth=&study=&model_version=&min_p=&max_p=&sort=&size=&from=``
    an Elasticsearch search (``elasticsearch[async]``) of the diagnoses index;
    400 on an invalid parameter, 503 when Elasticsearch is unreachable; an index
    that does not exist yet answers an empty result with a ``note``.
``GET /api/recordings/<id>/diagnosis``
    the diagnosis document (by ``_id`` = recording, as es_sink writes it), or 404.
``GET /api/recordings/<id>/signals?points=1000&heat=300&start=&end=``
    the recording's raw samples read from the lake through WebHDFS
    (``<lake_root>/date=*/recording=<id>/part-*.parquet``; a sample stored under two
    dates counts once), downsampled server-side, optionally to a time range in
    seconds (the page's zoom); 404 when the lake has none, 413 beyond
    ``max_lake_bytes``.

Settings: no configuration of its own to keep in sync. ``setup(app, runtime)``
takes the Elasticsearch hosts, credentials and index from the pipeline's
``es_sink`` handler, and the WebHDFS address, user and lake root from its
``lake_sink`` (else ``spark_job``) handler; environment variables override them
(a dashboard-only process, tests): ``GAITFLOW_DASHBOARD_ES_HOSTS`` (comma-separated),
``GAITFLOW_DASHBOARD_ES_INDEX``, ``GAITFLOW_DASHBOARD_WEBHDFS_URL``,
``GAITFLOW_DASHBOARD_HDFS_USER``, ``GAITFLOW_DASHBOARD_LAKE_ROOT``. Called from
Python, ``setup(app, runtime, settings=GaitDashboardSettings(...))`` sets them all.
Clients (one ``AsyncElasticsearch``, one WebHDFS session) open with the admin server
and close with it.
"""
from __future__ import annotations

import asyncio
import dataclasses
import math
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from elastic_transport import ConnectionError as TransportConnectionError
from elastic_transport import ConnectionTimeout
from elasticsearch import ApiError, AsyncElasticsearch, NotFoundError

from pipeline import RetryPolicy, Secret
from pipeline.admin import PUBLIC_PATHS_KEY
from pipeline.dashboard import add_link, page
from pipeline.dashboard import setup as setup_pipeline_dashboard

from .gait_dashboard_data import (
    LakeTooLarge,
    QueryError,
    build_search,
    downsample,
    read_recording,
    search_result,
    truth_of,
    valid_recording_id,
)
from .webhdfs import WebHdfs, WebHdfsError

if TYPE_CHECKING:
    from pipeline import Runtime

__all__ = ["GaitDashboardSettings", "settings_from_runtime", "setup"]

STATIC_DIR = Path(__file__).resolve().parent / "gait_dashboard_static"
GAIT_CSS = "/gait/static/gait.css"
ENV_PREFIX = "GAITFLOW_DASHBOARD_"


@dataclasses.dataclass(frozen=True)
class GaitDashboardSettings:
    """Where the dashboard reads diagnoses and raw samples."""

    es_hosts: tuple[str, ...] = ("http://127.0.0.1:9200",)
    es_index: str = "gaitflow-diagnoses"
    es_username: str | None = None
    es_password: Secret | None = None
    es_api_key: Secret | None = None
    es_ca_file: str | None = None
    webhdfs_url: str = "http://127.0.0.1:9870/webhdfs/v1"
    hdfs_user: str | None = None  # None: the current OS user
    lake_root: str = "/gaitflow/raw"
    max_lake_bytes: int = 256 * 2**20  # read budget of one recording page
    request_timeout: float = 15.0


#: the handler types whose settings the dashboard reuses: type name -> class name
_SOURCES = {"es_sink": "EsSink", "lake_sink": "LakeSink", "spark_job": "SparkJob"}


def _handler_settings(runtime: Runtime | None) -> dict[str, Any]:
    """The settings of the first handler of each type in ``_SOURCES`` (by type or class)."""
    found: dict[str, Any] = {}
    for h in runtime.config.handlers.values() if runtime is not None else ():
        cls_name = h.cls.__name__ if h.cls is not None else h.type.rsplit(":", 1)[-1]
        for type_name, known_cls in _SOURCES.items():
            if h.type == type_name or cls_name == known_cls:
                found.setdefault(type_name, h.settings)
    return found


def settings_from_runtime(runtime: Runtime | None,
                          env: Mapping[str, str] | None = None) -> GaitDashboardSettings:
    """Defaults, then the pipeline's es_sink / lake_sink (else spark_job) settings, then env."""
    env = os.environ if env is None else env
    by_type = _handler_settings(runtime)
    values: dict[str, Any] = {}
    if (es := by_type.get("es_sink")) is not None:
        values.update(es_hosts=tuple(es.hosts), es_index=es.index, es_username=es.username,
                      es_password=es.password, es_api_key=es.api_key,
                      es_ca_file=str(es.ca_file) if es.ca_file else None)
    if (lake := by_type.get("lake_sink")) is not None:
        values.update(webhdfs_url=lake.url, hdfs_user=lake.user, lake_root=lake.root)
    elif (job := by_type.get("spark_job")) is not None:  # same NameNode, default lake root
        values.update(webhdfs_url=job.webhdfs_url, hdfs_user=job.hdfs_user)
    hosts = env.get(f"{ENV_PREFIX}ES_HOSTS", "")
    overrides = {
        "es_hosts": tuple(h.strip() for h in hosts.split(",") if h.strip()) or None,
        "es_index": env.get(f"{ENV_PREFIX}ES_INDEX"),
        "webhdfs_url": env.get(f"{ENV_PREFIX}WEBHDFS_URL"),
        "hdfs_user": env.get(f"{ENV_PREFIX}HDFS_USER"),
        "lake_root": env.get(f"{ENV_PREFIX}LAKE_ROOT"),
    }
    values.update({k: v for k, v in overrides.items() if v})
    return GaitDashboardSettings(**values)


class _Backend:
    """The clients, opened and closed with the admin server (``cleanup_ctx``)."""

    def __init__(self, settings: GaitDashboardSettings) -> None:
        self.settings = settings
        self.es: AsyncElasticsearch | None = None
        self.lake: WebHdfs | None = None

    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        s = self.settings
        self.es = AsyncElasticsearch(
            list(s.es_hosts),
            basic_auth=(s.es_username, s.es_password.get() if s.es_password else "")
            if s.es_username else None,
            api_key=s.es_api_key.get() if s.es_api_key else None,
            ca_certs=s.es_ca_file, request_timeout=s.request_timeout, max_retries=1)
        self.lake = WebHdfs(s.webhdfs_url, user=s.hdfs_user, timeout=s.request_timeout,
                            retry=RetryPolicy(max_attempts=2, backoff=0.2, max_backoff=1.0))
        await self.lake.open_session()
        try:
            yield
        finally:
            errors = []
            for close in (self.lake.close, self.es.close):
                try:
                    await close()
                except Exception as exc:  # noqa: BLE001 - close the other one too
                    errors.append(exc)
            if errors:
                raise errors[0]


_BACKEND_KEY: web.AppKey[_Backend] = web.AppKey("gaitflow_gait_backend")


def setup(app: web.Application, runtime: Runtime,
          settings: GaitDashboardSettings | None = None) -> None:
    """Mount the pipeline dashboard, the diagnoses and the recording pages on ``app``."""
    setup_pipeline_dashboard(app, runtime)
    backend = _Backend(settings or settings_from_runtime(runtime))
    app[_BACKEND_KEY] = backend
    app.cleanup_ctx.append(backend.lifespan)
    app[PUBLIC_PATHS_KEY].update({"/diagnoses", "/recordings/*", "/gait/static/*"})
    add_link(app, "Diagnoses", "/diagnoses")
    app.router.add_get("/diagnoses", _diagnoses_page)
    app.router.add_get("/recordings/{recording}", _recording_page)
    app.router.add_get("/api/diagnoses", _diagnoses)
    app.router.add_get("/api/recordings/{recording}/diagnosis", _diagnosis)
    app.router.add_get("/api/recordings/{recording}/signals", _signals)
    app.router.add_static("/gait/static/", STATIC_DIR, follow_symlinks=False)


# -- pages ---------------------------------------------------------------------------------
def _recording_id(request: web.Request) -> str:
    recording = request.match_info["recording"]
    if not valid_recording_id(recording):
        raise web.HTTPNotFound(text=f"invalid recording id: expected [A-Za-z0-9_.-]{{1,64}} "
                                    f"without '..', got {recording[:80]!r}")
    return recording


async def _diagnoses_page(request: web.Request) -> web.Response:
    return page(request, STATIC_DIR / "diagnoses.html", title="diagnoses",
                stylesheets=(GAIT_CSS,))


async def _recording_page(request: web.Request) -> web.Response:
    recording = _recording_id(request)
    return page(request, STATIC_DIR / "recording.html", title=recording, stylesheets=(GAIT_CSS,),
                recording=recording)


# -- API -----------------------------------------------------------------------------------
def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _unreachable(backend: _Backend, exc: Exception) -> web.Response:
    hosts = ", ".join(backend.settings.es_hosts)
    return _error(503, f"Elasticsearch at {hosts} is unreachable: {type(exc).__name__}")


async def _diagnoses(request: web.Request) -> web.Response:
    backend = request.app[_BACKEND_KEY]
    assert backend.es is not None
    try:
        body = build_search(request.query)
    except QueryError as exc:
        return _error(400, str(exc))
    index = backend.settings.es_index
    try:
        resp = await backend.es.search(index=index, body=body)
    except NotFoundError:
        result = search_result({"hits": {"hits": [], "total": {"value": 0}}})
        result["note"] = f"index {index!r} does not exist yet: no diagnosis was written"
        return web.json_response({**result, "index": index})
    except (TransportConnectionError, ConnectionTimeout) as exc:
        return _unreachable(backend, exc)
    except ApiError as exc:
        return _error(502, f"Elasticsearch refused the search ({exc.meta.status}): {exc.message}")
    result = search_result(resp.body)
    result.update(index=index, took_ms=resp.body.get("took"))
    return web.json_response(result)


async def _diagnosis(request: web.Request) -> web.Response:
    recording = _recording_id(request)
    backend = request.app[_BACKEND_KEY]
    assert backend.es is not None
    try:
        resp = await backend.es.get(index=backend.settings.es_index, id=recording)
        doc = dict(resp.body["_source"])
    except NotFoundError:
        return _error(404, f"no diagnosis for {recording} in {backend.settings.es_index!r}")
    except (TransportConnectionError, ConnectionTimeout) as exc:
        return _unreachable(backend, exc)
    except ApiError as exc:
        return _error(502, f"Elasticsearch refused the request ({exc.meta.status}): {exc.message}")
    study, truth = truth_of(recording)
    doc.update(recording=doc.get("recording", recording), study=study, truth=truth)
    return web.json_response(doc)


def _float_param(request: web.Request, name: str) -> float | None:
    raw = request.query.get(name, "")
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value):
        raise web.HTTPBadRequest(text=f"{name}: expected seconds, got {raw[:20]!r}")
    return value


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name, "")
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name}: expected an integer, got {raw[:20]!r}") from None
    return max(low, min(high, value))


async def _signals(request: web.Request) -> web.Response:
    recording = _recording_id(request)
    points = _int_param(request, "points", 1000, 50, 5000)
    heat = _int_param(request, "heat", 300, 10, 2000)
    start, end = _float_param(request, "start"), _float_param(request, "end")
    backend = request.app[_BACKEND_KEY]
    s = backend.settings
    assert backend.lake is not None
    try:
        table, paths = await read_recording(backend.lake, s.lake_root, recording,
                                            max_bytes=s.max_lake_bytes)
    except LakeTooLarge as exc:
        return _error(413, str(exc))
    except WebHdfsError as exc:
        return _error(503, f"lake read failed: {exc}")
    if table is None or table.num_rows == 0:
        return _error(404, f"no samples of {recording} in the lake under {s.lake_root}")
    out = await asyncio.to_thread(downsample, table, points, heat, start, end)
    if out is None:
        return _error(404, f"no samples of {recording} between {start} and {end} s")
    out.update(recording=recording, files=len(paths), lake_paths=paths[:20])
    return web.json_response(out)
