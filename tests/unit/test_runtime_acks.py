"""Ack nodes and in-order upstream acknowledgement."""
from __future__ import annotations

import asyncio

from pipeline.acks import AckNode, AckTracker


def test_node_done_only_when_every_reference_released() -> None:
    root = AckNode()
    child_a, child_b = AckNode([root]), AckNode([root])
    root.release()  # creator's hold
    assert root.state == "pending"
    child_a.release()
    assert root.state == "pending"
    child_b.release()
    assert root.state == "done"


def test_failure_propagates_to_every_ancestor_and_is_final() -> None:
    root = AckNode()
    mid = AckNode([root])
    leaf = AckNode([mid])
    leaf.fail(OSError("disk"))
    assert (mid.state, root.state) == ("failed", "failed")
    root.release()
    mid.release()
    assert root.state == "failed" and isinstance(root.error, OSError)


def test_multi_parent_child_holds_all_parents() -> None:
    p1, p2 = AckNode(), AckNode()
    child = AckNode([p1, p2])
    p1.release()
    p2.release()
    assert p1.state == p2.state == "pending"
    child.release()
    assert p1.state == p2.state == "done"


async def test_tracker_commits_contiguous_prefix_in_order() -> None:
    commits: list[list[str]] = []

    async def commit(tokens: list[str]) -> None:
        commits.append(tokens)

    tracker = AckTracker(commit)
    runner = asyncio.create_task(tracker.run())
    nodes = {t: tracker.open(t) for t in "abcd"}
    nodes["c"].release()
    nodes["b"].release()
    await asyncio.sleep(0.01)
    assert commits == [], "a is still in flight: nothing after it may be acknowledged"
    assert tracker.pending == 4
    nodes["a"].release()
    await asyncio.sleep(0.01)
    assert [t for batch in commits for t in batch] == ["a", "b", "c"]
    nodes["d"].release()
    await asyncio.wait_for(tracker.wait_settled(), 1)
    assert [t for batch in commits for t in batch] == ["a", "b", "c", "d"]
    tracker.close()
    await asyncio.wait_for(runner, 1)
    assert tracker.committed == 4 and tracker.pending == 0


async def test_tracker_never_commits_past_a_failed_message() -> None:
    commits: list[str] = []

    async def commit(tokens: list[str]) -> None:
        commits.extend(tokens)

    tracker = AckTracker(commit)
    runner = asyncio.create_task(tracker.run())
    a, b, c = tracker.open("a"), tracker.open("b"), tracker.open("c")
    a.release()
    b.fail(RuntimeError("sink down"))
    c.release()
    await asyncio.wait_for(tracker.wait_settled(), 1)
    assert commits == ["a"]
    assert tracker.blocked and tracker.failed == 1
    tracker.close()
    await asyncio.wait_for(runner, 1)


async def test_commit_errors_are_reported_and_do_not_stop_commits() -> None:
    seen: list[str] = []
    errors: list[BaseException] = []

    async def commit(tokens: list[str]) -> None:
        if "x" in tokens:
            raise ConnectionError("broker gone")
        seen.extend(tokens)

    tracker = AckTracker(commit)
    tracker.on_commit_error = errors.append
    runner = asyncio.create_task(tracker.run())
    tracker.open("x").release()
    await asyncio.sleep(0.01)
    tracker.open("y").release()
    await asyncio.wait_for(tracker.wait_settled(), 1)
    tracker.close()
    await asyncio.wait_for(runner, 1)
    assert seen == ["y"] and len(errors) == 1 and tracker.commit_errors == 1
