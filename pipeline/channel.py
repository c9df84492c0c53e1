"""Bounded channels with separate send and receive ends.

``open_channel(capacity)`` returns a ``(Sender, Receiver)`` pair. A full
channel suspends ``send`` (backpressure): nothing is dropped. Senders can be
cloned for fan-in; the receiver's ``async for`` ends once every sender closed
and the buffer is empty. Several tasks may receive from one receiver.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["ChannelClosed", "ChannelStats", "Receiver", "Sender", "open_channel"]

T = TypeVar("T")


class ChannelClosed(Exception):
    """Sending on a channel whose sender was closed, or whose receiver is gone."""


@dataclass
class ChannelStats:
    name: str
    capacity: int
    depth: int = 0
    max_depth: int = 0
    sent: int = 0
    received: int = 0
    senders: int = 0
    blocked_seconds: float = 0.0  # total time senders waited for room

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


class _State(Generic[T]):
    def __init__(self, capacity: int, name: str) -> None:
        if capacity < 1:
            raise ValueError(f"channel capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.buffer: deque[T] = deque()
        self.open_senders = 0
        self.receiver_closed = False
        self.getters: deque[asyncio.Future[None]] = deque()
        self.putters: deque[asyncio.Future[None]] = deque()
        self.stats = ChannelStats(name=name, capacity=capacity)

    @staticmethod
    def _wake_one(waiters: deque[asyncio.Future[None]]) -> None:
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    @staticmethod
    def _wake_all(waiters: deque[asyncio.Future[None]]) -> None:
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)

    async def _wait(self, waiters: deque[asyncio.Future[None]]) -> None:
        fut = asyncio.get_running_loop().create_future()
        waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            # our wake-up may have been consumed: pass it on so nobody starves
            if fut.done() and not fut.cancelled():
                self._wake_one(waiters)
            raise

    async def put(self, item: T) -> None:
        if len(self.buffer) >= self.capacity and not self.receiver_closed:
            started = time.monotonic()
            try:
                while len(self.buffer) >= self.capacity and not self.receiver_closed:
                    await self._wait(self.putters)
            finally:
                self.stats.blocked_seconds += time.monotonic() - started
        if self.receiver_closed:
            raise ChannelClosed(f"channel {self.stats.name!r}: the receiver is closed")
        self.buffer.append(item)
        self.stats.sent += 1
        depth = len(self.buffer)
        self.stats.depth = depth
        self.stats.max_depth = max(self.stats.max_depth, depth)
        self._wake_one(self.getters)

    async def get(self) -> T:
        while not self.buffer:
            if self.open_senders == 0:
                raise StopAsyncIteration
            await self._wait(self.getters)
        item = self.buffer.popleft()
        self.stats.received += 1
        self.stats.depth = len(self.buffer)
        self._wake_one(self.putters)
        return item


class Sender(Generic[T]):
    """The sending end. ``close()`` it when done; ``clone()`` it for another producer."""

    __slots__ = ("_closed", "_state")

    def __init__(self, state: _State[T]) -> None:
        self._state = state
        self._closed = False
        state.open_senders += 1
        state.stats.senders = state.open_senders

    @property
    def stats(self) -> ChannelStats:
        return self._state.stats

    @property
    def closed(self) -> bool:
        return self._closed

    async def send(self, item: T) -> None:
        if self._closed:
            raise ChannelClosed(f"channel {self._state.stats.name!r}: this sender is closed")
        await self._state.put(item)

    def clone(self) -> Sender[T]:
        if self._closed:
            raise ChannelClosed(f"channel {self._state.stats.name!r}: cannot clone a closed sender")
        return Sender(self._state)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        state = self._state
        state.open_senders -= 1
        state.stats.senders = state.open_senders
        if state.open_senders == 0:
            state._wake_all(state.getters)


class Receiver(Generic[T]):
    """The receiving end: ``async for item in receiver`` until every sender closed."""

    __slots__ = ("_state",)

    def __init__(self, state: _State[T]) -> None:
        self._state = state

    @property
    def stats(self) -> ChannelStats:
        return self._state.stats

    def __aiter__(self) -> Receiver[T]:
        return self

    async def __anext__(self) -> T:
        return await self._state.get()

    async def receive(self) -> T:
        """The next item; raises ``ChannelClosed`` once the channel is finished."""
        try:
            return await self._state.get()
        except StopAsyncIteration:
            raise ChannelClosed(f"channel {self._state.stats.name!r} is finished") from None

    def close(self) -> None:
        """Stop receiving: pending and future sends raise ``ChannelClosed``."""
        state = self._state
        state.receiver_closed = True
        state._wake_all(state.putters)

    def __len__(self) -> int:
        return len(self._state.buffer)


def open_channel(capacity: int, name: str = "") -> tuple[Sender[T], Receiver[T]]:
    """A bounded channel holding at most ``capacity`` items. Never touches the loop."""
    state: _State[T] = _State(capacity, name)
    return Sender(state), Receiver(state)
