"""The shipper's waits: the backoff between attempts and the stop that cuts waits short.

Shipper -> **pacing**. Retries back off exponentially with full jitter up to
a cap (``RetryPolicy``), forever; a stop ends any wait at once. While the
shipper drains at a stop, a backoff that would end past the drain deadline
stops it instead: the batch stays spooled for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable

from predtrace.sidecar.pipeline import Clock, RetryPolicy

Sleep = Callable[[float], Awaitable[None]]


class ShipPacing:
    """Backoff delays, waits cut short by ``stop``, and the drain deadline."""

    def __init__(
        self, retry: RetryPolicy, clock: Clock, sleep: Sleep | None, seed: int | None
    ) -> None:
        """``sleep``: replaces the backoff waits (tests); ``seed``: makes the jitter repeatable."""
        self.stopping = False
        self.deadline: float | None = None  # set while draining at a stop
        self._retry = retry
        self._clock = clock
        self._sleep_fn = sleep
        self._rng = random.Random(seed)  # noqa: S311 - jitter, not secrets
        self._stop_event = asyncio.Event()

    def stop(self) -> None:
        """End every wait now, and those to come."""
        self.stopping = True
        self._stop_event.set()

    async def backoff(self, retry: int, retry_after: float | None) -> bool:
        """Wait before the next attempt; False when stopping (the batch stays spooled)."""
        delay = self._retry.delay(retry, retry_after, self._rng)
        if self.deadline is not None and self._clock.monotonic() + delay > self.deadline:
            self.stopping = True
            return False
        await self.wait(delay)
        return not self.stopping

    async def wait_to_retry(self, retry: int) -> None:
        """Wait the backoff for the ``retry``-th retry in a row."""
        await self.wait(self._retry.delay(retry, None, self._rng))

    async def wait(self, delay: float) -> None:
        """Sleep ``delay`` seconds (through ``sleep`` when given, else cut short by ``stop``)."""
        if self._sleep_fn is not None:
            await self._sleep_fn(delay)
        else:
            await self.pause(delay)

    async def pause(self, seconds: float) -> None:
        """Sleep, cut short by ``stop``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_event.wait(), seconds)
