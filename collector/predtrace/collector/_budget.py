"""What requests hold at once: bytes of bodies in flight, and work being done.

The ingest endpoint (``_ingest``), the lineage registration
(``_api_registration``) and the query answers (``_answers``) each charge what
they hold to an ``InflightBudget`` (a request's ``_Reservation``, released
once) and run their costly steps in ``DecodeSlots``, a few at a time (DESIGN
§4). A budget that cannot give what a request needs refuses it with 503
(``_Refused``, the handlers' answer other than 200).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Final

from prometheus_client import Gauge

# Batches decoded at once. A decode costs more than its batch's bytes (its
# rows, one event's objects; charged to the budget, see ``decode_cost``) and
# CPU: this bounds both whatever the thread pool's size (two keep a small
# host busy).
DECODES_AT_ONCE: Final = 2


class _Refused(Exception):
    """An answer other than 200, with its short reason (internal control flow)."""

    def __init__(self, status: int, reason: str, outcome: str) -> None:
        super().__init__(reason)
        self.status, self.reason, self.outcome = status, reason, outcome


class InflightBudget:
    """Bytes of request bodies, and of their decompressed forms, being ingested now, capped.

    Also the budget of query answers (a budget of their own, see ``_answers``).
    ``gauge``, if any, shows ``used``. Event-loop only.
    """

    def __init__(self, cap: int, gauge: Gauge | None = None) -> None:
        self.cap = cap
        self.used = 0
        self._gauge = gauge

    def try_reserve(self, count: int) -> bool:
        """Reserve ``count`` bytes; False when that would pass the cap."""
        if self.used + count > self.cap:
            return False
        self.used += count
        if self._gauge is not None:
            self._gauge.set(self.used)
        return True

    def release(self, count: int) -> None:
        """Give back reserved bytes."""
        self.used -= count
        if self._gauge is not None:
            self._gauge.set(self.used)


class _Reservation:
    """One request's share of the budget: grows as its body arrives, released once."""

    __slots__ = ("amount", "budget", "refusal")

    def __init__(
        self, budget: InflightBudget, refusal: str = "collector busy: in-flight byte cap reached"
    ) -> None:
        self.budget, self.amount, self.refusal = budget, 0, refusal

    def grow_to(self, total: int) -> None:
        """Hold ``total`` bytes; 503 when the budget cannot give the difference."""
        if total > self.amount:
            if not self.budget.try_reserve(total - self.amount):
                raise _Refused(503, self.refusal, "overloaded")
            self.amount = total

    def release(self) -> None:
        """Give everything back (safe twice)."""
        if self.amount:
            self.budget.release(self.amount)
            self.amount = 0


class DecodeSlots:
    """At most ``size`` batches decoded at once; the others wait (event-loop only)."""

    def __init__(self, size: int = DECODES_AT_ONCE) -> None:
        self._free = asyncio.Semaphore(size)
        self.waiting = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one slot for the body of an ``async with``."""
        self.waiting += 1
        try:
            await self._free.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._free.release()
