"""Retry policy: exponential backoff with jitter and a maximum number of attempts."""
from __future__ import annotations

import asyncio
import inspect
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from .settings import setting

__all__ = ["RetryPolicy"]

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How a failing batch is retried before it goes to dead letter (or stops the flow).

    Used by the runtime for every ``process``/``write`` call, and by handlers for
    their own retries (``await policy.call(fn)``).
    """

    max_attempts: int = setting(5, doc="attempts in total, the first included", min=1)
    backoff: float = setting(0.5, doc="seconds before the first retry", min=0)
    max_backoff: float = setting(30.0, doc="ceiling of the delay between attempts", min=0)
    multiplier: float = setting(2.0, doc="growth of the delay per attempt", min=1)
    jitter: float = setting(
        0.5, doc="fraction of each delay that is randomised (0 = none, 1 = full jitter)",
        min=0, max=1,
    )

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        base = min(self.max_backoff, self.backoff * self.multiplier ** max(0, attempt - 1))
        if self.jitter <= 0 or base <= 0:
            return base
        r = (rng or random).random()
        # "equal jitter": a fixed part keeps the backoff growing, a random part
        # spreads retries of many clients so they do not hammer a service together
        return base * (1 - self.jitter) + base * self.jitter * r

    async def call(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        retry_on: tuple[type[BaseException], ...] = (Exception,),
        on_retry: Callable[[int, BaseException, float], None] | None = None,
    ) -> T:
        """Await ``fn()`` until it succeeds or ``max_attempts`` is reached (then re-raise).

        ``fn`` takes no arguments and returns an awaitable: an ``async def`` function, or
        ``lambda: client.get(url)``; each attempt calls it again. A ``fn`` that returns
        something else is a programming error, raised at once as ``TypeError``.
        """
        attempt = 0
        while True:
            attempt += 1
            try:
                awaitable = fn()
                if not inspect.isawaitable(awaitable):
                    raise _NotAwaitable(
                        f"RetryPolicy.call needs a function that returns an awaitable (an async "
                        f"def without arguments); {fn!r} returned {type(awaitable).__name__}")
                return await awaitable
            except _NotAwaitable:
                raise
            except retry_on as exc:
                if attempt >= self.max_attempts:
                    raise
                pause = self.delay(attempt)
                if on_retry is not None:
                    on_retry(attempt, exc, pause)
                await asyncio.sleep(pause)


class _NotAwaitable(TypeError):
    pass
