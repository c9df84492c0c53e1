"""model_call: diagnose recordings by posting their window features to the model server.

Input: window feature batches (``handlers/README.md`` §4: ``recording``, ``window``,
``window_key``, ``seq_first``, ``seq_last``, then the ``ml.features.FEATURE_NAMES``
columns). Output (``default``): one diagnosis per recording (§5: ``recording``,
``probability``, ``label``, ``model_version``, ``n_windows``, ``window_probabilities``,
``diagnosed_at``), keyed by ``recording``.

The server is ``ml.serve`` (``POST /v1/predict``, ``GET /v1/models``, ``GET /healthz``):
the request holds recordings, each with its windows (``key`` and ``features``);
the answer holds one result per recording (probability, label, per-window
probabilities) and the ``model_version`` that computed them.

Settings (``[handlers.<name>]``)
    ``url``               base URL of the model server (default ``http://127.0.0.1:8090``)
    ``token``             bearer token (a secret), or none
    ``diagnose``          ``"final"`` (default): only batches with ``meta["final"]`` (every
                          window of an ended recording) are diagnosed; other batches are
                          committed without a call and produce nothing. ``"every_batch"``:
                          every batch is diagnosed from the windows it holds (a partial
                          diagnosis, replaced by the next one through the key)
    ``features``          feature columns sent, in the model's order (default:
                          ``ml.features.FEATURE_NAMES``)
    ``max_batch``         recordings per request (default 16)
    ``max_wait_ms``       how long a recording waits for others to share its request
                          (default 10 ms; 0 = send at once)
    ``max_in_flight``     requests in flight at once (default 4)
    ``request_timeout``   seconds per request, connection included (default 30)
    ``connect_timeout``   seconds to connect (default 5)
    ``retry_policy``      retries of 5xx, 408, 425, 429, timeouts and connection errors
                          (default 4 attempts, 0.2 s doubling to 5 s, jittered)
    ``breaker_failures``  consecutive failed attempts that open the circuit (default 5)
    ``breaker_cooldown``  seconds the circuit stays open before a probe (default 10)
    ``check_at_start``    ``GET /v1/models`` at start, fail the start if unreachable (default true)

Behaviour and guarantees
    * **Batching under a latency budget.** Recordings from concurrent ``process``
      calls share a request: one is sent when ``max_batch`` recordings are queued
      or ``max_wait_ms`` after the first one queued. Give the section
      ``concurrency = N`` (the runtime key) so N input batches can be in progress
      and coalesced; each input batch is committed only once its own diagnoses are
      emitted (``process`` awaits them).
    * **Bounded concurrency**: at most ``max_in_flight`` requests at once.
    * **Retries** with exponential backoff and jitter for 5xx, 408, 425, 429, timeouts and
      connection errors; then the rows go back to the runtime (its ``retry``, then
      dead letter with the reason). Rows diagnosed meanwhile are emitted.
    * **Circuit breaker.** ``breaker_failures`` consecutive failed attempts open it:
      ``set_connected(False)`` (``/readyz`` shows it) and every call fails fast with
      ``CircuitOpenError`` for ``breaker_cooldown`` seconds. Then it is half-open:
      one probe (a real request, or ``GET /healthz`` in the background when there is
      no traffic) closes it on success or reopens it on failure.
    * **4xx** (bad input: 400, 413, 422...): the recording's rows are dead-lettered
      with the server's status, error code, message and field, never retried. When
      a request holding several recordings is refused, each is re-sent alone so
      only the culprit is dead-lettered. 401, 403, 404 and 405 are configuration
      errors (token, url): the batch fails (runtime retry, then dead letter) and
      readiness reports it.
    * **At start** (``check_at_start``) ``GET /v1/models`` must answer (with
      ``retry_policy``), and the server's ``feature_names`` must equal ``features``;
      otherwise the start fails with the difference.
    * **Model version**: every diagnosis carries the ``model_version`` that computed it.
    * NaN features are sent as JSON ``null``; rows with a null ``recording`` are
      dead-lettered; a batch missing feature columns is rejected whole.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import itertools
import json
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import aiohttp
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import Batch, PartialFailure, Processor, Reject, RetryPolicy, Secret, setting

__all__ = ["DIAGNOSIS_SCHEMA", "CircuitBreaker", "CircuitOpenError", "ModelCall",
           "ModelCallSettings", "ModelConfigError", "ModelRejected", "ModelServerError"]

DIAGNOSIS_SCHEMA = pa.schema([
    pa.field("recording", pa.string(), nullable=False),
    pa.field("probability", pa.float64()),
    pa.field("label", pa.string()),
    pa.field("threshold", pa.float64()),  # the model's: label = parkinson iff probability >= it
    pa.field("model_version", pa.string()),
    pa.field("n_windows", pa.int64()),
    pa.field("window_probabilities", pa.list_(pa.float64())),
    pa.field("diagnosed_at", pa.timestamp("us", tz="UTC")),
])

#: statuses that say "try again later", not "your input is wrong"
RETRY_STATUSES = frozenset({408, 425, 429})
#: statuses that say "this client is misconfigured"
CONFIG_STATUSES = frozenset({401, 403, 404, 405})


class ModelServerError(Exception):
    """The model server could not answer (connection, timeout, 5xx, bad reply)."""


class ModelConfigError(Exception):
    """The model server refused this client (401, 403, 404...): retrying will not help."""


class CircuitOpenError(ModelServerError):
    """The circuit is open: the call was not attempted."""


class ModelRejected(Exception):
    """The model server refused the input (4xx); ``message`` is the server's."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"model server refused the input ({status}): {message}")
        self.status = status
        self.message = message


def _default_features() -> list[str]:
    from ml.features import FEATURE_NAMES

    return list(FEATURE_NAMES)


@dataclasses.dataclass(frozen=True)
class ModelCallSettings:
    url: str = setting("http://127.0.0.1:8090", doc="base URL of the model server")
    token: Secret | None = setting(None, doc="bearer token", secret=True)
    diagnose: Literal["final", "every_batch"] = setting(
        "final", doc='"final": only batches with meta final; "every_batch": every batch')
    features: list[str] = setting([], doc="feature columns to send, in the model's order "
                                          "(default: ml.features.FEATURE_NAMES)")
    max_batch: int = setting(16, doc="recordings per request", min=1)
    max_wait_ms: float = setting(10.0, doc="ms a recording waits for others to share a request",
                                 min=0)
    max_in_flight: int = setting(4, doc="requests in flight at once", min=1)
    request_timeout: float = setting(30.0, doc="seconds per request", min=0.01)
    connect_timeout: float = setting(5.0, doc="seconds to connect", min=0.01)
    retry_policy: RetryPolicy = setting(
        RetryPolicy(max_attempts=4, backoff=0.2, max_backoff=5.0),
        doc="retries of 5xx, 408, 425, 429, timeouts and connection errors")
    breaker_failures: int = setting(5, doc="consecutive failures that open the circuit", min=1)
    breaker_cooldown: float = setting(10.0, doc="seconds the circuit stays open", min=0.01)
    check_at_start: bool = setting(True, doc="reach GET /v1/models at start, else fail")

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url {self.url!r}: expected http://host:port or https://...")


# --------------------------------------------------------------------------- breaker
class CircuitBreaker:
    """Closed → (``threshold`` consecutive failures) → open → (``cooldown``) → half-open.

    Half-open lets one probe through: its success closes the circuit, its
    failure reopens it for another cool-down.
    """

    def __init__(self, threshold: int, cooldown: float, *,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[str, str], None] | None = None) -> None:
        self.threshold, self.cooldown, self.clock = threshold, cooldown, clock
        self.on_change = on_change
        self.state = "closed"
        self.failures = 0
        self.opened_at = 0.0
        self.last_error = ""
        self._probing = False

    def retry_after(self) -> float:
        """Seconds until a probe may go (0 when one may go now)."""
        if self.state != "open":
            return 0.0
        return max(0.0, self.opened_at + self.cooldown - self.clock())

    def acquire(self) -> None:
        """May a call go now? Raises ``CircuitOpenError`` if not."""
        if self.state == "closed":
            return
        if self.state == "open" and self.retry_after() <= 0:
            self._set("half_open")
        if self.state == "half_open" and not self._probing:
            self._probing = True
            return
        wait = self.retry_after()
        raise CircuitOpenError(
            f"circuit open after {self.failures} consecutive failures"
            + (f", next probe in {wait:.1f}s" if wait else ", a probe is in flight")
            + f" (last error: {self.last_error})")

    def success(self) -> None:
        self.failures = 0
        self._probing = False
        if self.state != "closed":
            self._set("closed")

    def failure(self, error: BaseException | str) -> None:
        self.failures += 1
        self.last_error = str(error)[:300]
        was_probe, self._probing = self._probing, False
        if self.state == "half_open" or was_probe or (
                self.state == "closed" and self.failures >= self.threshold):
            self.opened_at = self.clock()
            self._set("open")

    def _set(self, state: str) -> None:
        self.state = state
        if self.on_change is not None:
            self.on_change(state, self.last_error)


# --------------------------------------------------------------------------- batching
@dataclasses.dataclass(eq=False)
class _Job:
    """One recording to diagnose: its request entry and where its answer goes."""

    recording: str
    entry: dict[str, Any]
    keys: list[str]
    future: asyncio.Future[tuple[str, dict[str, Any]]]


class _Batcher:
    """Coalesces jobs into requests of at most ``max_batch``, waiting ``max_wait`` s."""

    def __init__(self, max_batch: int, max_wait: float, max_in_flight: int,
                 send: Callable[[list[_Job]], Any]) -> None:
        self.max_batch, self.max_wait = max_batch, max_wait
        self.slots = asyncio.Semaphore(max_in_flight)
        self._send = send
        self._queue: list[_Job] = []
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(self, jobs: Sequence[_Job]) -> None:
        self._queue.extend(jobs)
        while len(self._queue) >= self.max_batch:
            self._flush(self.max_batch)
        if self._queue and self.max_wait <= 0:
            self._flush(len(self._queue))
        elif self._queue and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.max_wait, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._queue:
            self._flush(len(self._queue))

    def _flush(self, n: int) -> None:
        jobs, self._queue = self._queue[:n], self._queue[n:]
        if not self._queue and self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task = asyncio.create_task(self._run(jobs), name="model_call:request")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, jobs: list[_Job]) -> None:
        try:
            async with self.slots:
                await self._send(jobs)
        except BaseException as exc:  # the waiting process() calls must hear about it
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(
                        exc if isinstance(exc, Exception) else ModelServerError("cancelled"))
            if not isinstance(exc, Exception):
                raise

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for job in self._queue:
            if not job.future.done():
                job.future.set_exception(ModelServerError("model_call closed"))
        self._queue.clear()


def _error_message(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:500] or "(empty body)"
    if isinstance(doc, dict):
        for name in ("error", "message", "detail"):
            value = doc.get(name)
            if isinstance(value, dict):  # ml.serve: {"error": {"code", "message", "field"}}
                text = str(value.get("message") or value.get("reason") or json.dumps(value))
                if value.get("code"):
                    text = f"{value['code']}: {text}"
                if value.get("field"):
                    text += f" (at {value['field']})"
                return text[:1000]
            if value:
                return str(value)[:1000]
    return json.dumps(doc)[:500]


# --------------------------------------------------------------------------- handler
class ModelCall(Processor):
    """Posts the windows of finished recordings to the model server; emits diagnoses."""

    Settings: ClassVar[type] = ModelCallSettings
    settings: ModelCallSettings

    def __init__(self, name: str, settings: ModelCallSettings | None = None) -> None:
        super().__init__(name, settings)
        s = self.settings
        self.features = list(s.features) or _default_features()
        self.breaker = CircuitBreaker(s.breaker_failures, s.breaker_cooldown,
                                      on_change=self._circuit_changed)
        self.model_version: str | None = None
        self._session: aiohttp.ClientSession | None = None
        self._batcher: _Batcher | None = None
        self._prober: asyncio.Task[None] | None = None
        self._opened: asyncio.Event | None = None
        self._m: dict[str, Any] = {}

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        headers = {"Authorization": f"Bearer {s.token.get()}"} if s.token else {}
        self._session = aiohttp.ClientSession(
            headers=headers, raise_for_status=False,
            timeout=aiohttp.ClientTimeout(total=s.request_timeout, connect=s.connect_timeout))
        try:
            if s.check_at_start:
                models = await s.retry_policy.call(
                    self._get_models, retry_on=(ModelServerError,),
                    on_retry=lambda n, exc, pause: self.log.warning(
                        "model.start_retry", attempt=n, delay_s=round(pause, 3),
                        error=str(exc)))
                self.model_version = self._version_of(models)
                served = models.get("feature_names") if isinstance(models, dict) else None
                if isinstance(served, list) and served != self.features:
                    raise ValueError(
                        f"model server {s.url} (model {self.model_version}) expects "
                        f"{len(served)} features {_names(served)}, the settings send "
                        f"{len(self.features)} {_names(self.features)}: fix `features`")
        except BaseException:
            await self._session.close()
            self._session = None
            raise
        m = self.metrics
        self._m = {
            "requests": m.counter("model_requests", "requests sent to the model server"),
            "failures": m.counter("model_request_failures", "failed request attempts"),
            "recordings": m.counter("model_recordings", "recordings diagnosed"),
            "skipped": m.counter("model_batches_skipped", "non-final batches committed "
                                 "without a call"),
            "latency": m.histogram("model_request_seconds", "model server request latency"),
            "size": m.histogram("model_request_recordings", "recordings per request",
                                buckets=(1, 2, 4, 8, 16, 32, 64, 128)),
            "circuit": m.gauge("model_circuit_open", "1 while the circuit breaker is open"),
        }
        self._opened = asyncio.Event()
        self._batcher = _Batcher(s.max_batch, s.max_wait_ms / 1000, s.max_in_flight,
                                 self._send)
        self._prober = asyncio.create_task(self._probe_loop(), name=f"{self.name}:probe")
        self.log.info("model.connected", url=s.url, model_version=self.model_version,
                      features=len(self.features), diagnose=s.diagnose)

    async def close(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            await asyncio.gather(self._prober, return_exceptions=True)
            self._prober = None
        if self._batcher is not None:
            await self._batcher.aclose()
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _circuit_changed(self, state: str, error: str) -> None:
        (self.log.info if state == "closed" else self.log.warning)(
            "model.circuit", state=state, error=error or None)
        if "circuit" in self._m:
            self._m["circuit"].set(1.0 if state != "closed" else 0.0)
        if self._opened is not None:
            if state == "open":
                self._opened.set()
            elif state == "closed":
                self._opened.clear()
        if state == "open":
            self.set_connected(False, f"model server circuit open: {error}")
        elif state == "closed":
            self.set_connected(True)

    async def _probe_loop(self) -> None:
        """While the circuit is open and idle, probe ``/healthz`` after each cool-down."""
        assert self._opened is not None
        while True:
            await self._opened.wait()
            await asyncio.sleep(max(0.05, self.breaker.retry_after()))
            try:
                self.breaker.acquire()
            except CircuitOpenError:
                continue  # a real request is the probe
            try:
                await self._get("/healthz")
            except (ModelServerError, ModelConfigError) as exc:
                self.breaker.failure(exc)
            except BaseException:
                self.breaker.failure("probe cancelled")
                raise
            else:
                self.breaker.success()

    # -- HTTP ---------------------------------------------------------------------------
    async def _get(self, path: str) -> Any:
        assert self._session is not None
        try:
            async with self._session.get(self.settings.url.rstrip("/") + path) as resp:
                body = await resp.read()
                if resp.status in RETRY_STATUSES or resp.status >= 500:
                    raise ModelServerError(f"GET {path}: {resp.status} {_error_message(body)}")
                if resp.status >= 400:
                    raise ModelConfigError(f"GET {path}: {resp.status} {_error_message(body)}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ModelServerError(f"GET {path}: {type(exc).__name__}: {exc}") from exc
        try:
            return json.loads(body) if body else None
        except ValueError as exc:
            raise ModelServerError(f"GET {path}: not JSON") from exc

    async def _get_models(self) -> Any:
        return await self._get("/v1/models")

    @staticmethod
    def _version_of(models: Any) -> str | None:
        if isinstance(models, dict):
            for name in ("active", "model_version", "version"):
                if isinstance(models.get(name), str):
                    return models[name]
            items = models.get("models") or models.get("data")
            if isinstance(items, list) and items and isinstance(items[0], dict):
                return items[0].get("model_version") or items[0].get("version")
        return None

    async def predict(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        """One ``POST /v1/predict`` with retries, through the circuit breaker."""
        assert self._session is not None
        s, policy = self.settings, self.settings.retry_policy
        url = s.url.rstrip("/") + "/v1/predict"
        payload = json.dumps({"recordings": entries}, allow_nan=False).encode()
        attempt = 0
        while True:
            attempt += 1
            self.breaker.acquire()
            started = time.perf_counter()
            self._m["requests"].inc()
            self._m["size"].observe(len(entries))
            try:
                async with self._session.post(
                        url, data=payload, headers={"Content-Type": "application/json"}) as resp:
                    status, body = resp.status, await resp.read()
                self._m["latency"].observe(time.perf_counter() - started)
            except (aiohttp.ClientError, TimeoutError) as exc:
                error: Exception = ModelServerError(
                    f"model server unreachable: {type(exc).__name__}: {exc or 'timeout'}")
            except BaseException:
                self.breaker.failure("request cancelled")
                raise
            else:
                if status < 400:
                    try:
                        reply = self._check_reply(body)
                    except ModelServerError as exc:
                        error = exc
                    else:
                        self.breaker.success()
                        if not self.health()[0]:  # e.g. after a 401 fixed on the server
                            self.set_connected(True)
                        return reply
                elif status in RETRY_STATUSES or status >= 500:
                    error = ModelServerError(f"model server answered {status}: "
                                             f"{_error_message(body)}")
                elif status in CONFIG_STATUSES:
                    self.breaker.success()  # it answered: not an outage
                    message = f"model server refused this client ({status}): " \
                              f"{_error_message(body)}; check `token` and `url`"
                    self.set_connected(False, message)
                    raise ModelConfigError(message)
                else:
                    self.breaker.success()
                    raise ModelRejected(status, _error_message(body))
            self._m["failures"].inc()
            self.breaker.failure(error)
            if attempt >= policy.max_attempts or self.breaker.state != "closed":
                raise error
            pause = policy.delay(attempt)
            self.log.warning("model.retry", attempt=attempt, of=policy.max_attempts,
                             delay_s=round(pause, 3), error=str(error))
            await asyncio.sleep(pause)

    @staticmethod
    def _check_reply(body: bytes) -> dict[str, Any]:
        try:
            reply = json.loads(body)
        except ValueError as exc:
            raise ModelServerError(f"model server reply is not JSON: {body[:200]!r}") from exc
        if not (isinstance(reply, dict) and isinstance(reply.get("results"), list)):
            raise ModelServerError(f"model server reply has no results list: {body[:200]!r}")
        return reply

    async def _send(self, jobs: list[_Job]) -> None:
        """Post ``jobs`` (holding an in-flight slot) and settle their futures."""
        jobs = [j for j in jobs if not j.future.done()]  # their process() was cancelled
        if not jobs:
            return
        try:
            reply = await self.predict([j.entry for j in jobs])
        except ModelRejected as exc:
            if len(jobs) == 1:
                jobs[0].future.set_exception(exc)
                return
            # which recording is refused? ask for each alone, in this same slot
            for job in jobs:
                await self._send([job])
            return
        version = str(reply.get("model_version") or self.model_version or "unknown")
        if reply.get("model_version"):
            self.model_version = version
        results = {str(r.get("id")): r for r in reply["results"] if isinstance(r, dict)}
        for job in jobs:
            if job.future.done():
                continue
            result = results.get(job.recording)
            if result is None:
                job.future.set_exception(ModelServerError(
                    f"model server reply has no result for recording {job.recording!r}"))
            else:
                job.future.set_result((str(result.get("model_version") or version), result))

    # -- processing ---------------------------------------------------------------------
    async def process(self, batch: Batch) -> None:
        s = self.settings
        if s.diagnose == "final" and not batch.meta.get("final"):
            self._m["skipped"].inc()
            return
        table = batch.to_table()
        missing = [c for c in ("recording", *self.features) if c not in table.schema.names]
        if missing:
            raise Reject(f"window batch lacks column(s) {', '.join(missing[:10])}"
                         f"{' ...' if len(missing) > 10 else ''} ({len(missing)} missing)")
        if table.num_rows == 0:
            return
        jobs, rows_of, null_rows = self._jobs(table)
        if null_rows:
            await self.dead_letter(batch, rows=null_rows, reason="recording is null")
        if not jobs:
            return
        assert self._batcher is not None
        self._batcher.submit(jobs)
        try:
            await asyncio.wait([j.future for j in jobs])
        except asyncio.CancelledError:  # e.g. the section's timeout: nobody waits any more
            for job in jobs:
                job.future.cancel()
            raise
        done, retry, cause = [], [], None
        rejected: dict[str, list[int]] = {}
        for job in jobs:
            exc = job.future.exception()
            if exc is None:
                done.append((job, *job.future.result()))
            elif isinstance(exc, ModelRejected):
                rejected.setdefault(str(exc), []).extend(rows_of[job.recording])
            else:
                retry.extend(rows_of[job.recording])
                cause = exc
        for reason, rows in rejected.items():
            await self.dead_letter(batch, rows=rows, reason=reason)
        if done:
            self._m["recordings"].inc(len(done))
            await self.emit(self._diagnoses(done), key="recording")
        if retry:
            raise PartialFailure(sorted(retry), cause or ModelServerError("failed"))

    def _jobs(self, table: pa.Table) -> tuple[list[_Job], dict[str, list[int]], list[int]]:
        """Group the windows by recording (in window order) into request entries."""
        names = table.schema.names
        rec = table.column("recording")
        null_rows: list[int] = []
        positions = np.arange(table.num_rows)
        if rec.null_count:
            valid = np.asarray(rec.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
            null_rows = positions[~valid].tolist()
            positions = positions[valid]
        if not len(positions):
            return [], {}, null_rows
        sub = table.take(pa.array(positions))
        order_by = [("recording", "ascending")] + ([("window", "ascending")]
                                                   if "window" in names else [])
        order = pc.sort_indices(sub, sort_keys=order_by).to_numpy()
        sub, positions = sub.take(pa.array(order)), positions[order]
        recs = sub.column("recording").to_pylist()
        if "window_key" in names:
            keys = pc.cast(sub.column("window_key"), pa.string()).to_pylist()
        elif "window" in names:
            keys = [f"{r}:{w}" for r, w in zip(recs, sub.column("window").to_pylist(),
                                                strict=True)]
        else:
            keys = [f"{r}:{i}" for i, r in enumerate(recs)]
        matrix = np.column_stack([
            sub.column(f).to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
            for f in self.features])
        nan = ~np.isfinite(matrix)
        values: Any = matrix
        if nan.any():  # JSON has no NaN: send null and let the model's imputer decide
            values = matrix.astype(object)
            values[nan] = None
        vectors = values.tolist()
        starts = [0] + [i for i in range(1, len(recs)) if recs[i] != recs[i - 1]] + [len(recs)]
        loop = asyncio.get_running_loop()
        jobs, rows_of = [], {}
        for a, b in itertools.pairwise(starts):
            recording = recs[a]
            windows = [{"key": k, "features": v} for k, v in zip(keys[a:b], vectors[a:b],
                                                                   strict=True)]
            jobs.append(_Job(recording, {"id": recording, "windows": windows}, keys[a:b],
                             loop.create_future()))
            rows_of[recording] = positions[a:b].tolist()
        return jobs, rows_of, null_rows

    @staticmethod
    def _diagnoses(done: list[tuple[_Job, str, dict[str, Any]]]) -> pa.Table:
        now = dt.datetime.now(dt.UTC)
        cols: dict[str, list[Any]] = {f.name: [] for f in DIAGNOSIS_SCHEMA}
        for job, version, result in done:
            cols["recording"].append(job.recording)
            cols["probability"].append(_float(result.get("probability")))
            cols["label"].append(result.get("label"))
            cols["threshold"].append(_float(result.get("threshold")))
            cols["model_version"].append(version)
            cols["n_windows"].append(len(job.keys))
            cols["window_probabilities"].append(_window_probabilities(job.keys,
                                                                      result.get("windows")))
            cols["diagnosed_at"].append(now)
        return pa.table(cols, schema=DIAGNOSIS_SCHEMA)


def _names(names: Sequence[str]) -> str:
    return f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def _window_probabilities(keys: list[str], windows: Any) -> list[float | None]:
    """Per-window probabilities in window order: the reply gives floats or
    ``{"key": ..., "probability": ...}`` objects."""
    if not isinstance(windows, list):
        return []
    if windows and all(isinstance(w, dict) for w in windows):
        by_key = {w.get("key"): _float(w.get("probability")) for w in windows}
        if all(k in by_key for k in keys):
            return [by_key[k] for k in keys]
        return [_float(w.get("probability")) for w in windows]
    return [_float(w) for w in windows]
