"""Helpers shared by several built-in handlers (append new sections; keep each self-contained)."""
from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import Batch, Reject, Sink

# -- document stores (mongo_sink, es_sink) ------------------------------------------
# Rows become one document each, keyed by a column; these helpers keep the
# conversion columnar up to the final ``to_pylist``.

@dataclasses.dataclass
class PreparedDocuments:
    """What a document sink writes for one batch, and what it refuses up front."""

    #: batch row position of each document
    positions: np.ndarray
    #: the documents, in the order of ``positions``
    docs: list[dict[str, Any]]
    #: ``(rows, reason)`` for rows refused before any write (null key, NaN...)
    rejected: list[tuple[list[int], str]]
    #: rows not written because a later row of the batch has the same key
    superseded: int = 0


def last_row_per_key(keys: pa.Array | pa.ChunkedArray) -> np.ndarray | None:
    """Positions (ascending) of the last row of each distinct key; None when keys are unique."""
    n = len(keys)
    if n < 2 or pc.count_distinct(keys, mode="all").as_py() == n:
        return None
    table = pa.table({"k": keys, "i": pa.array(np.arange(n, dtype=np.int64))})
    last = table.group_by("k", use_threads=False).aggregate([("i", "max")])
    return np.sort(last.column("i_max").to_numpy())


def non_finite_rows(table: pa.Table | pa.RecordBatch) -> dict[str, np.ndarray]:
    """``{column: row mask}`` for float (and list-of-float) columns holding NaN or ±Infinity."""
    found: dict[str, np.ndarray] = {}
    n = table.num_rows
    for field, column in zip(table.schema, table.columns, strict=True):
        tp = field.type
        if pa.types.is_floating(tp):
            bad = pc.invert(pc.fill_null(pc.is_finite(column), True))
            mask = np.asarray(bad.to_numpy(zero_copy_only=False), dtype=bool)
        elif ((pa.types.is_list(tp) or pa.types.is_large_list(tp)
               or pa.types.is_fixed_size_list(tp)) and pa.types.is_floating(tp.value_type)):
            flat = pc.list_flatten(column)
            bad_flat = pc.invert(pc.fill_null(pc.is_finite(flat), True))
            if not pc.any(bad_flat).as_py():
                continue
            parents = pc.list_parent_indices(column).to_numpy()
            mask = np.zeros(n, dtype=bool)
            mask[parents[np.asarray(bad_flat.to_numpy(zero_copy_only=False), dtype=bool)]] = True
        else:
            continue
        if mask.any():
            found[field.name] = mask
    return found


def documents(table: pa.Table | pa.RecordBatch) -> list[dict[str, Any]]:
    """Rows as dicts whose values BSON and JSON encoders take.

    Timestamps become ``datetime`` (tz-aware when the column has a zone;
    nanoseconds are truncated to microseconds, which both stores round to
    milliseconds anyway); dates become midnight timestamps (BSON has no date type).
    """
    casts = {}
    for i, field in enumerate(table.schema):
        tp = field.type
        if pa.types.is_timestamp(tp) and tp.unit == "ns":
            casts[i] = pa.timestamp("us", tz=tp.tz)
        elif pa.types.is_date(tp):
            casts[i] = pa.timestamp("ms")
    if casts:
        columns = [pc.cast(col, casts[i], safe=False) if i in casts else col
                   for i, col in enumerate(table.columns)]
        table = pa.table(columns, names=table.schema.names)
    return table.to_pylist()


def prepare_documents(table: pa.Table | pa.RecordBatch, key: str, *,
                      reject_non_finite: bool = True,
                      id_field: str | None = None) -> PreparedDocuments:
    """One document per row of ``table``, keyed by column ``key``.

    Rows with a null key are refused, and so are rows with NaN or ±Infinity when
    ``reject_non_finite``. Several rows with the same key keep the last one (as
    writing them in order would). ``id_field`` adds the key under that name too
    (``"_id"`` for MongoDB).
    """
    n = table.num_rows
    keys = table.column(key)
    ok = np.ones(n, dtype=bool)
    rejected: list[tuple[list[int], str]] = []
    if keys.null_count:
        nulls = np.asarray(keys.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        rejected.append((np.flatnonzero(nulls).tolist(), f"key column {key!r} is null"))
        ok &= ~nulls
    if reject_non_finite:
        for name, mask in non_finite_rows(table).items():
            bad = mask & ok
            if bad.any():
                reason = (f"column {name!r} holds NaN or an infinite value "
                          "(not storable as a number in JSON, refused by FerretDB)")
                rejected.append((np.flatnonzero(bad).tolist(), reason))
                ok &= ~bad
    positions = np.flatnonzero(ok)
    if len(positions) < n:
        table = table.take(pa.array(positions))
    last = last_row_per_key(table.column(key))
    superseded = 0
    if last is not None:
        superseded = len(positions) - len(last)
        positions = positions[last]
        table = table.take(pa.array(last))
    if id_field is not None:
        table = pa.Table.from_batches([table]) if isinstance(table, pa.RecordBatch) else table
        table = table.add_column(0, id_field, table.column(key))
    return PreparedDocuments(positions, documents(table), rejected, superseded)


def group_rows(failures: Iterable[tuple[int, str]]) -> dict[str, list[int]]:
    """``{reason: [row, ...]}`` from ``(row, reason)`` pairs: one dead-letter call per reason."""
    grouped: dict[str, list[int]] = {}
    for row, reason in failures:
        grouped.setdefault(reason, []).append(int(row))
    return grouped


# -- document store sinks: connection, retries, dead letters (mongo_sink, es_sink) ----------
#: one pass over pending documents: ``(transient failures, their cause, [(doc, reason)])``
Round = Callable[[list[int]],
                 Awaitable[tuple[list[int], BaseException | None, list[tuple[int, str]]]]]


class DocumentStoreSink(Sink):
    """What mongo_sink and es_sink share around their own client and writes.

    Readiness follows the connection (``_lost`` on a failure, a ping every
    ``health_interval`` while disconnected), transient failures are retried in
    rounds per ``retry_policy``, refused rows are dead-lettered one call per reason.
    A subclass sets ``store`` (its name in messages), ``event`` (the prefix of its log
    events and metrics) and ``ping_errors``, implements ``_ping``, keeps its client in
    ``_client`` and calls ``_watch_from_now`` at the end of ``start()``.
    """

    store: ClassVar[str]
    event: ClassVar[str]
    ping_errors: ClassVar[tuple[type[BaseException], ...]]
    _client: Any
    _watch: asyncio.Task[None] | None
    _written: Any
    _refused: Any

    async def _ping(self) -> None:
        raise NotImplementedError

    def _watch_from_now(self, written: str) -> None:
        """The metrics (``written``: help of the written counter), the watch, readiness."""
        self._written = self.metrics.counter(f"{self.event}_documents_written", written)
        self._refused = self.metrics.counter(f"{self.event}_documents_refused",
                                             "documents dead-lettered (permanent errors)")
        self._watch = asyncio.create_task(self._watch_connection(), name=f"{self.name}:ping")
        self.set_connected(True)

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
            self._watch = None
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    def _on_retry(self, attempt: int, exc: BaseException, pause: float) -> None:
        self._lost(exc)
        self.log.warning(f"{self.event}.retry", attempt=attempt, delay_s=round(pause, 3),
                         error=f"{type(exc).__name__}: {exc}")

    def _lost(self, exc: BaseException) -> None:
        self.set_connected(False, f"{self.store} unreachable: {type(exc).__name__}: {exc}")

    async def _watch_connection(self) -> None:
        # readiness recovers when the server is back, even without traffic
        while True:
            await asyncio.sleep(self.settings.health_interval)
            if self.health()[0] or self._client is None:
                continue
            try:
                await self._ping()
            except self.ping_errors as exc:
                self.log.debug(f"{self.event}.ping_failed", error=f"{type(exc).__name__}: {exc}")
            else:
                self.set_connected(True)

    async def _prepare(self, batch: Batch, *, id_field: str | None = None) -> PreparedDocuments:
        """The batch's documents (``prepare_documents``); what it refuses is dead-lettered."""
        s = self.settings
        if s.key not in batch.schema.names:
            raise Reject(f"no key column {s.key!r} in the batch (columns: "
                         f"{', '.join(batch.schema.names)})")
        prepared = prepare_documents(batch.data, s.key, reject_non_finite=s.reject_non_finite,
                                     id_field=id_field)
        for rows, reason in prepared.rejected:
            await self.dead_letter(batch, rows=rows, reason=reason)
        return prepared

    async def _refuse(self, batch: Batch, refused: Iterable[tuple[int, str]]) -> None:
        """Dead-letter ``(row, reason)`` pairs, one call per reason, and count them."""
        for reason, rows in group_rows(refused).items():
            self._refused.inc(len(rows))
            await self.dead_letter(batch, rows=rows, reason=reason)

    async def _retry_rounds(self, round_: Round, pending: list[int],
                            ) -> tuple[list[int], BaseException | None, list[tuple[int, str]]]:
        """Run ``round_`` on ``pending`` until nothing fails transiently or attempts run out.

        Returns ``(still failing, their cause, [(doc, reason) refused for good])``.
        """
        policy = self.settings.retry_policy
        refused: list[tuple[int, str]] = []
        cause: BaseException | None = None
        for attempt in range(1, policy.max_attempts + 1):
            if not pending:
                break
            pending, cause, refused_now = await round_(pending)
            refused += refused_now
            if not pending or attempt == policy.max_attempts:
                break
            pause = policy.delay(attempt)
            self.log.warning(f"{self.event}.retry", attempt=attempt, of=policy.max_attempts,
                             delay_s=round(pause, 3), documents=len(pending),
                             error=f"{type(cause).__name__}: {cause}")
            await asyncio.sleep(pause)
        return pending, cause, refused
