"""es_sink: index rows into Elasticsearch, one document per key, through the bulk API.

Each row becomes one document whose ``_id`` is the value of the ``key`` column
(default ``recording``: the diagnoses of ``handlers/README.md`` §5), written with
the bulk ``index`` operation, which replaces the whole document. Writing a batch
twice, or replaying it after a crash, leaves exactly one document per key.

Client: ``elasticsearch[async]`` 9 (``AsyncElasticsearch``) and
``elasticsearch.helpers.async_streaming_bulk`` (``raise_on_error=False``, so every
item's outcome comes back).

Settings (``[handlers.<name>]``)
    ``hosts``             node URLs (default ``["http://127.0.0.1:9200"]``)
    ``username``/``password``  basic authentication (password is a secret)
    ``api_key``           API key (a secret), instead of basic authentication
    ``ca_file``           CA bundle for https nodes
    ``index``             index name (default ``gaitflow-diagnoses``)
    ``key``               column holding each document's ``_id`` (default ``recording``)
    ``manage``            ``"index"``: create the index with ``mappings`` when absent (and
                          refuse to start when an existing index maps a field to another
                          type); ``"template"``: put an index template (``template_name``,
                          ``template_patterns``, ``template_priority``) when absent, so the
                          index gets the mapping when the first bulk creates it;
                          ``"none"``: touch nothing
    ``mappings``          the mapping (default: diagnoses: ``recording``/``label``/``model_version``
                          keyword, ``probability``/``window_probabilities`` float,
                          ``n_windows`` integer, ``diagnosed_at`` date)
    ``index_settings``    index settings for the created index or template (e.g.
                          ``{number_of_replicas = 0}``)
    ``refresh``           bulk ``refresh``: ``"false"`` (default), ``"true"`` or ``"wait_for"``
    ``bulk_size``         documents per bulk request (default 500)
    ``max_chunk_bytes``   bytes per bulk request (default 10 MiB)
    ``reject_non_finite`` dead-letter rows holding NaN or ±Infinity before sending (default true;
                          Elasticsearch would refuse them one by one anyway)
    ``request_timeout``   seconds per HTTP request (default 30)
    ``health_interval``   seconds between pings while disconnected (default 5)
    ``retry_policy``      in-handler retries of 429/5xx items and connection losses within one
                          ``write`` (default 5 attempts, 0.5 s doubling to 10 s)

Behaviour and guarantees
    * **Idempotent**: ``_id`` = key, ``index`` operations. Several rows of one
      batch with the same key: the last one wins; the earlier ones count as committed.
    * **Item by item.** Items answered 429 or 5xx are retried with backoff
      (``retry_policy``), then handed back to the runtime as a ``PartialFailure``
      (its ``retry``, then dead letter). Other refusals (400 mapping or parsing
      errors, an ``_id`` too long...) are dead-lettered at once with the item's
      status, error type and reason; the other rows are committed. Nothing is dropped.
    * **Before sending**, rows with a null key, rows with NaN/Infinity
      (``reject_non_finite``) and rows the JSON serializer cannot encode are
      dead-lettered with the reason.
    * **Connection loss**: ``set_connected(False)`` (``/readyz`` shows it), retries with
      backoff; rows still unwritten after ``retry_policy`` go back to the runtime.
      While disconnected the cluster is pinged every ``health_interval`` seconds so
      readiness recovers without traffic. A whole bulk request refused with another
      status (401, 403, 413...) fails the batch (runtime retry, then dead letter).
    * **Refresh**: ``"false"`` by default (documents become searchable within the
      index's refresh interval); ``"wait_for"`` makes ``write`` return only once
      they are searchable.
    * **Timestamps** are sent as ISO-8601 (UTC offset included for zoned Arrow
      timestamps; naive ones are read as UTC by Elasticsearch).
"""
from __future__ import annotations

import asyncio
import dataclasses
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import pyarrow as pa
import pyarrow.compute as pc
from elastic_transport import ConnectionError as TransportConnectionError
from elastic_transport import ConnectionTimeout, SerializationError, TransportError
from elasticsearch import ApiError, AsyncElasticsearch, BadRequestError
from elasticsearch.helpers import async_streaming_bulk
from elasticsearch.serializer import JsonSerializer

from pipeline import Batch, PartialFailure, RetryPolicy, Secret, setting

from ._common import DocumentStoreSink

__all__ = ["DEFAULT_MAPPINGS", "EsItemError", "EsSink", "EsSinkSettings"]

DEFAULT_MAPPINGS: dict[str, Any] = {
    "properties": {
        "recording": {"type": "keyword"},
        "probability": {"type": "float"},
        "label": {"type": "keyword"},
        "threshold": {"type": "float"},
        "model_version": {"type": "keyword"},
        "n_windows": {"type": "integer"},
        "window_probabilities": {"type": "float"},
        "diagnosed_at": {"type": "date"},
    },
}

#: errors that mean "the cluster could not be reached", as opposed to "it said no"
CONNECTION_ERRORS = (TransportConnectionError, ConnectionTimeout)
#: Elasticsearch refuses a whole bulk request holding a longer _id
MAX_ID_BYTES = 512
_BAD_INDEX = re.compile(r'[\\/*?"<>| ,#:A-Z]')


class EsItemError(Exception):
    """A transient (429/5xx) refusal of one bulk item."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status


@dataclasses.dataclass(frozen=True)
class EsSinkSettings:
    hosts: list[str] = setting(["http://127.0.0.1:9200"], doc="node URLs")
    username: str | None = setting(None, doc="basic-auth user name")
    password: Secret | None = setting(None, doc="basic-auth password", secret=True)
    api_key: Secret | None = setting(None, doc="API key (instead of basic auth)", secret=True)
    ca_file: Path | None = setting(None, doc="CA bundle to verify https nodes")
    index: str = setting("gaitflow-diagnoses", doc="index name")
    key: str = setting("recording", doc="column holding each document's _id")
    manage: Literal["index", "template", "none"] = setting(
        "index", doc='create the index ("index") or an index template ("template") when absent')
    template_name: str | None = setting(None, doc="index template name (default: the index)")
    template_patterns: list[str] = setting(
        [], doc="index patterns of the template (default: [index])")
    template_priority: int = setting(200, doc="priority of the template", min=0)
    mappings: dict[str, Any] = setting(DEFAULT_MAPPINGS, doc="index mappings")
    index_settings: dict[str, Any] = setting({}, doc="index settings, e.g. number_of_replicas")
    refresh: Literal["false", "true", "wait_for"] = setting(
        "false", doc="make written documents searchable before write returns")
    bulk_size: int = setting(500, doc="documents per bulk request", min=1)
    max_chunk_bytes: int = setting(10 * 1024 * 1024, doc="bytes per bulk request", min=1024)
    reject_non_finite: bool = setting(True, doc="dead-letter rows holding NaN or ±Infinity")
    request_timeout: float = setting(30.0, doc="seconds per HTTP request", min=0.1)
    health_interval: float = setting(5.0, doc="seconds between pings while disconnected",
                                     min=0.05)
    retry_policy: RetryPolicy = setting(
        RetryPolicy(max_attempts=5, backoff=0.5, max_backoff=10.0),
        doc="retries of 429/5xx items and connection losses inside one write")

    def __post_init__(self) -> None:
        if not self.hosts:
            raise ValueError("hosts: at least one node URL is needed")
        if self.password and not self.username:
            raise ValueError("password needs username")
        if self.api_key and self.username:
            raise ValueError("use either api_key or username/password, not both")
        name = self.index
        if (not name or name in (".", "..") or name[0] in "-_+" or _BAD_INDEX.search(name)
                or len(name.encode()) > 255):
            raise ValueError(f"index {name!r}: lowercase, without \\ / * ? \" < > | , # : "
                             "or spaces, not starting with - _ +, at most 255 bytes")


def _expand(action: tuple[str, bytes]) -> tuple[dict[str, Any], bytes]:
    # our own expansion: a column named "version" or "routing" must stay a field
    return {"index": {"_id": action[0]}}, action[1]


def _item_reason(status: int, error: Any) -> str:
    if isinstance(error, dict):
        text = f"{error.get('type', 'error')}: {error.get('reason', '')}"
        cause = error.get("caused_by")
        if isinstance(cause, dict) and cause.get("reason"):
            text += f" (caused by {cause.get('type', 'error')}: {cause['reason']})"
    else:
        text = str(error)
    return f"Elasticsearch refused the document ({status}): {text}"


class EsSink(DocumentStoreSink):
    """Indexes rows as documents with ``_id`` = ``key``; see the module docstring."""

    Settings: ClassVar[type] = EsSinkSettings
    settings: EsSinkSettings
    store: ClassVar[str] = "Elasticsearch"
    event: ClassVar[str] = "es"
    ping_errors: ClassVar[tuple[type[BaseException], ...]] = (TransportError, ApiError)

    def __init__(self, name: str, settings: EsSinkSettings | None = None) -> None:
        super().__init__(name, settings)
        self._client: AsyncElasticsearch | None = None
        self._serializer = JsonSerializer()
        self._watch: asyncio.Task[None] | None = None
        self.server = ""
        self._written: Any = None
        self._refused: Any = None

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        self._client = AsyncElasticsearch(
            s.hosts,
            basic_auth=(s.username, s.password.get() if s.password else "") if s.username
            else None,
            api_key=s.api_key.get() if s.api_key else None,
            ca_certs=str(s.ca_file) if s.ca_file else None,
            request_timeout=s.request_timeout,
            max_retries=0, retry_on_timeout=False)  # one retry policy: ours, visible in logs
        try:
            info = await s.retry_policy.call(self._client.info, retry_on=CONNECTION_ERRORS,
                                             on_retry=self._on_retry)
            self.server = f"Elasticsearch {info['version']['number']}"
            if s.manage == "index":
                await self._ensure_index()
            elif s.manage == "template":
                await self._ensure_template()
        except BaseException:
            await self._client.close()
            self._client = None
            raise
        self._watch_from_now("documents indexed into Elasticsearch")
        self.log.info("es.connected", server=self.server, index=s.index, manage=s.manage)

    async def _ping(self) -> None:
        assert self._client is not None
        await self._client.info()

    async def _ensure_index(self) -> None:
        s, client = self.settings, self._client
        assert client is not None
        if await client.indices.exists(index=s.index):
            self._check_mapping((await client.indices.get_mapping(index=s.index)).body)
            return
        try:
            await client.indices.create(index=s.index, mappings=s.mappings,
                                        settings=s.index_settings or None)
            self.log.info("es.index_created", index=s.index)
        except BadRequestError as exc:
            if exc.error != "resource_already_exists_exception":  # lost a race: fine
                raise

    def _check_mapping(self, current: dict[str, Any]) -> None:
        s = self.settings
        have = next(iter(current.values()), {}).get("mappings", {}).get("properties", {})
        want = s.mappings.get("properties", {})
        clashes = [f"{f}: {have[f].get('type', 'object')} (settings: {spec.get('type')})"
                   for f, spec in want.items()
                   if f in have and isinstance(spec, dict) and spec.get("type")
                   and have[f].get("type", "object") != spec.get("type")]
        if clashes:
            raise ValueError(f"index {s.index!r} exists with other field types: "
                             f"{'; '.join(clashes)}. Reindex, or point `index` elsewhere")

    async def _ensure_template(self) -> None:
        s, client = self.settings, self._client
        assert client is not None
        name = s.template_name or s.index
        if await client.indices.exists_index_template(name=name):
            return
        template: dict[str, Any] = {"mappings": s.mappings}
        if s.index_settings:
            template["settings"] = s.index_settings
        try:
            await client.indices.put_index_template(
                name=name, index_patterns=s.template_patterns or [s.index], template=template,
                priority=s.template_priority, create=True,
                meta={"created_by": "gaitflow es_sink"})
            self.log.info("es.template_created", template=name)
        except BadRequestError as exc:
            if "already exists" not in str(exc):
                raise

    # -- writing ----------------------------------------------------------------------
    async def write(self, batch: Batch) -> None:
        s = self.settings
        prepared = await self._prepare(batch)
        positions = prepared.positions
        keys = pc.cast(batch.data.column(s.key).take(pa.array(positions)), pa.string())
        too_long = pc.greater(pc.binary_length(keys), MAX_ID_BYTES).to_numpy(
            zero_copy_only=False)
        ids = keys.to_pylist()
        bodies: list[bytes] = []
        refused: list[tuple[int, str]] = []
        sendable: list[int] = []
        for i, doc in enumerate(prepared.docs):
            if too_long[i]:  # Elasticsearch would refuse the whole bulk request
                reason = f"_id longer than {MAX_ID_BYTES} bytes (Elasticsearch's limit)"
                refused.append((int(positions[i]), reason))
                bodies.append(b"")
                continue
            try:
                bodies.append(self._serializer.dumps(doc))
            except (SerializationError, TypeError, ValueError) as exc:
                refused.append((int(positions[i]), f"not serializable to JSON: {exc}"))
                bodies.append(b"")
            else:
                sendable.append(i)
        retry, cause, refused_items = await self.index(ids, bodies, sendable)
        refused += [(int(positions[i]), reason) for i, reason in refused_items]
        await self._refuse(batch, refused)
        if retry:
            raise PartialFailure([int(positions[i]) for i in retry],
                                 cause or RuntimeError("bulk failed"))

    async def index(self, ids: list[str], bodies: list[bytes], pending: list[int],
                    ) -> tuple[list[int], BaseException | None, list[tuple[int, str]]]:
        """Index documents ``pending`` (positions in ``ids``/``bodies``); retry transient failures.

        Returns ``(still failing, their cause, [(position, reason) refused for good])``.
        """
        return await self._retry_rounds(lambda p: self._round(ids, bodies, p), pending)

    async def _round(self, ids: list[str], bodies: list[bytes], pending: list[int],
                     ) -> tuple[list[int], BaseException | None, list[tuple[int, str]]]:
        s, client = self.settings, self._client
        assert client is not None
        extra: dict[str, Any] = {} if s.refresh == "false" else {"refresh": s.refresh}
        transient: list[int] = []
        refused: list[tuple[int, str]] = []
        cause: BaseException | None = None
        done = 0  # results come back in request order (max_retries=0)
        written = 0
        try:
            async for ok, item in async_streaming_bulk(
                    client, ((ids[i], bodies[i]) for i in pending), index=s.index,
                    chunk_size=s.bulk_size, max_chunk_bytes=s.max_chunk_bytes,
                    raise_on_error=False, raise_on_exception=True, max_retries=0,
                    expand_action_callback=_expand, **extra):
                i = pending[done]
                done += 1
                if ok:
                    written += 1
                    continue
                result = next(iter(item.values()), {})
                status = int(result.get("status") or 0)
                reason = _item_reason(status, result.get("error"))
                if status == 429 or status >= 500:
                    transient.append(i)
                    cause = EsItemError(status, reason)
                else:
                    refused.append((i, reason))
        except CONNECTION_ERRORS as exc:
            self._lost(exc)
            transient += pending[done:]
            cause = exc
        except ApiError as exc:
            rest = pending[done:]
            if exc.status_code == 429 or exc.status_code >= 500:
                transient += rest
                cause = exc
            elif exc.status_code == 400 and len(rest) == 1:
                refused.append((rest[0], f"Elasticsearch refused the document (400): {exc}"))
            elif exc.status_code == 400 and rest:
                # one bad item fails request validation for all: find it, one per request
                self.log.info("es.item_by_item", documents=len(rest), error=str(exc)[:200])
                for i in rest:
                    again, why, no = await self._round(ids, bodies, [i])
                    transient += again
                    refused += no
                    cause = why or cause
            else:
                raise  # 401, 403, 413...: the request was refused, not any document
        else:
            self.set_connected(True)
        self._written.inc(written)
        return transient, cause, refused
