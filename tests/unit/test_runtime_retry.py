"""Retry policy: exponential backoff with jitter, capped, with a maximum of attempts."""
from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline import RetryPolicy


def test_backoff_grows_exponentially_and_is_capped_without_jitter() -> None:
    policy = RetryPolicy(backoff=0.5, multiplier=2, max_backoff=3, jitter=0)
    assert [policy.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


@given(attempt=st.integers(1, 60), backoff=st.floats(0, 10), max_backoff=st.floats(0, 60),
       multiplier=st.floats(1, 4), jitter=st.floats(0, 1), seed=st.integers(0, 2**32))
def test_jittered_delay_stays_within_bounds(attempt: int, backoff: float, max_backoff: float,
                                            multiplier: float, jitter: float, seed: int) -> None:
    policy = RetryPolicy(backoff=backoff, max_backoff=max_backoff, multiplier=multiplier,
                         jitter=jitter)
    base = min(max_backoff, backoff * multiplier ** (attempt - 1))
    delay = policy.delay(attempt, random.Random(seed))
    assert base * (1 - jitter) - 1e-9 <= delay <= base + 1e-9
    assert delay <= max_backoff + 1e-9


def test_jitter_spreads_delays() -> None:
    policy = RetryPolicy(backoff=1, jitter=1)
    rng = random.Random(1)
    delays = {round(policy.delay(1, rng), 6) for _ in range(20)}
    assert len(delays) == 20


async def test_call_retries_then_succeeds_or_reraises() -> None:
    calls: list[int] = []
    retried: list[tuple[int, str]] = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError(f"try {len(calls)}")
        return "ok"

    policy = RetryPolicy(max_attempts=3, backoff=0, jitter=0)
    assert await policy.call(flaky, on_retry=lambda n, e, d: retried.append((n, str(e)))) == "ok"
    assert retried == [(1, "try 1"), (2, "try 2")]

    calls.clear()
    with pytest.raises(ConnectionError, match="try 2"):
        await RetryPolicy(max_attempts=2, backoff=0).call(flaky)

    async def wrong() -> None:
        raise KeyError("not retried")

    with pytest.raises(KeyError):
        await policy.call(wrong, retry_on=(ConnectionError,))


async def test_call_refuses_a_function_that_is_not_async_without_running_it_again() -> None:
    writes: list[int] = []

    def plain_write() -> None:  # a mistake: not async
        writes.append(1)

    with pytest.raises(TypeError, match="returned NoneType"):
        await RetryPolicy(max_attempts=3, backoff=0).call(plain_write)  # type: ignore[arg-type]
    assert writes == [1], "the side effect must not be repeated by retries"
