"""Bounded channels: backpressure, close semantics, fan-in, several receivers."""
from __future__ import annotations

import asyncio

import pytest

from pipeline.channel import ChannelClosed, open_channel


async def test_send_blocks_when_full_and_resumes_when_room() -> None:
    tx, rx = open_channel(2, "c")
    await tx.send(1)
    await tx.send(2)
    blocked = asyncio.create_task(tx.send(3))
    await asyncio.sleep(0.01)
    assert not blocked.done(), "a full channel must suspend the sender"
    assert rx.stats.depth == 2
    assert await rx.receive() == 1
    await asyncio.wait_for(blocked, 1)
    assert [await rx.receive(), await rx.receive()] == [2, 3]
    assert rx.stats.max_depth == 2
    assert rx.stats.blocked_seconds > 0


async def test_receiver_loop_ends_when_every_sender_closed() -> None:
    tx, rx = open_channel(4)
    tx2 = tx.clone()
    await tx.send("a")
    tx.close()
    await tx2.send("b")
    got: list[str] = []

    async def consume() -> None:
        async for item in rx:
            got.append(item)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.01)
    assert not task.done(), "one sender still open: the loop keeps waiting"
    tx2.close()
    await asyncio.wait_for(task, 1)
    assert got == ["a", "b"]
    with pytest.raises(ChannelClosed):
        await rx.receive()


async def test_sending_on_closed_sender_or_to_closed_receiver_raises() -> None:
    tx, rx = open_channel(1)
    tx2 = tx.clone()
    tx.close()
    with pytest.raises(ChannelClosed):
        await tx.send(1)
    await tx2.send(1)
    pending = asyncio.create_task(tx2.send(2))
    await asyncio.sleep(0)
    rx.close()
    with pytest.raises(ChannelClosed):
        await asyncio.wait_for(pending, 1)


async def test_several_receivers_share_the_items_without_duplicates() -> None:
    tx, rx = open_channel(3)
    seen: list[int] = []

    async def worker() -> None:
        async for item in rx:
            seen.append(item)
            await asyncio.sleep(0)

    workers = [asyncio.create_task(worker()) for _ in range(4)]
    for i in range(100):
        await tx.send(i)
    tx.close()
    await asyncio.wait_for(asyncio.gather(*workers), 2)
    assert sorted(seen) == list(range(100))
    assert rx.stats.max_depth <= 3


async def test_cancelled_waiting_sender_does_not_lose_wakeups() -> None:
    tx, rx = open_channel(1)
    await tx.send(0)
    first = asyncio.create_task(tx.send(1))
    second = asyncio.create_task(tx.send(2))
    await asyncio.sleep(0.01)
    first.cancel()
    assert await rx.receive() == 0
    await asyncio.wait_for(second, 1)
    assert await rx.receive() == 2


def test_capacity_must_be_positive_and_construction_needs_no_loop() -> None:
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        open_channel(0)
    tx, rx = open_channel(1)  # no running loop here: constructors never touch it
    assert tx.stats is rx.stats
