"""Acknowledgement tracking.

Every batch carries an :class:`AckNode`. A node is *done* when every reference
on it was released: one per delivery to a consumer, one per derived batch still
in flight, one per deferred commit a sink still holds, plus the creator's own
reference while it is sending. A node is *failed* when any part of its
downstream could not be committed; failure propagates to the root and is final.

Each source owns an :class:`AckTracker`. It opens one root node per upstream
message (token), and hands tokens back to the source's ``commit`` hook strictly
in the order they were opened, and only the contiguous prefix of done roots:
that is what lets an MQTT source PUBACK, or a Kafka source commit an offset,
without ever acknowledging past a message that is still in flight or failed.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

__all__ = ["AckNode", "AckTracker"]

PENDING, DONE, FAILED = "pending", "done", "failed"


class AckNode:
    """Reference-counted completion of one batch and everything derived from it."""

    __slots__ = ("_on_settled", "_parents", "_refs", "error", "state")

    def __init__(
        self,
        parents: Sequence[AckNode] = (),
        on_settled: Callable[[AckNode], None] | None = None,
    ) -> None:
        self._refs = 1  # the creator's hold, released once it finished sending
        self._parents = tuple(parents)
        self.state = PENDING
        self.error: BaseException | None = None
        self._on_settled = on_settled
        for parent in self._parents:
            parent.retain()

    @property
    def settled(self) -> bool:
        return self.state != PENDING

    def retain(self, n: int = 1) -> None:
        if self.state == PENDING:
            self._refs += n

    def release(self) -> None:
        if self.state != PENDING:
            return
        self._refs -= 1
        if self._refs > 0:
            return
        self.state = DONE
        self._settle()
        for parent in self._parents:
            parent.release()

    def fail(self, error: BaseException) -> None:
        if self.state != PENDING:
            return
        self.state = FAILED
        self.error = error
        self._settle()
        for parent in self._parents:
            parent.fail(error)

    def _settle(self) -> None:
        callback, self._on_settled = self._on_settled, None
        if callback is not None:
            callback(self)

    def __repr__(self) -> str:
        return f"<AckNode {self.state} refs={self._refs}>"


class _Entry:
    __slots__ = ("node", "opened", "token")

    def __init__(self, token: Any, opened: float, node: AckNode) -> None:
        self.token = token
        self.opened = opened
        self.node = node


class AckTracker:
    """In-order acknowledgement of one source's upstream messages.

    ``commit`` is awaited with lists of tokens, in the order their roots were
    opened, from a single task (:meth:`run`), so it is never re-entered.
    """

    def __init__(self, commit: Callable[[list[Any]], Awaitable[None]]) -> None:
        self._commit = commit
        self._entries: deque[_Entry] = deque()
        self._ready: list[Any] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._committing = False
        self._unsettled = 0
        self._closed = False
        self.opened = 0
        self.committed = 0
        self.failed = 0
        self.commit_errors = 0
        self.on_commit_error: Callable[[BaseException], None] | None = None

    def open(self, token: Any = None) -> AckNode:
        """A root node for one upstream message; its creator reference is held."""
        node = AckNode(on_settled=self._settled)
        self._entries.append(_Entry(token, time.monotonic(), node))
        self.opened += 1
        self._unsettled += 1
        return node

    # -- state --------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Roots opened but not yet handed to ``commit`` (in flight, or behind one)."""
        return len(self._entries) + len(self._ready)

    @property
    def blocked(self) -> bool:
        """True when the oldest root failed: nothing after it will ever be committed."""
        return bool(self._entries) and self._entries[0].node.state == FAILED

    def lag_seconds(self) -> float:
        """Age of the oldest root not yet committed upstream."""
        if not self._entries:
            return 0.0
        return time.monotonic() - self._entries[0].opened

    @property
    def settled(self) -> bool:
        """Nothing in flight: every root is committed, or stuck behind a failure."""
        if self._ready or self._committing:
            return False
        return self._unsettled == 0

    # -- completion ---------------------------------------------------------
    def _settled(self, node: AckNode) -> None:
        self._unsettled -= 1
        if node.state == FAILED:
            self.failed += 1
        while self._entries and self._entries[0].node.state == DONE:
            self._ready.append(self._entries.popleft().token)
        self._notify()

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def _changed(self) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        await fut

    async def run(self) -> None:
        """Deliver commits until :meth:`close` and everything ready was delivered."""
        while True:
            if self._ready:
                tokens, self._ready = self._ready, []
                self._committing = True
                try:
                    await self._commit(tokens)
                except Exception as exc:  # noqa: BLE001 - reported, the flow goes on
                    self.commit_errors += 1
                    if self.on_commit_error is not None:
                        self.on_commit_error(exc)
                finally:
                    self._committing = False
                self.committed += len(tokens)
                self._notify()
                continue
            if self._closed:
                return
            await self._changed()

    def close(self) -> None:
        self._closed = True
        self._notify()

    async def wait_settled(self) -> None:
        """Wait until every open root settled and its commit, if any, was delivered."""
        while not self.settled:
            await self._changed()
