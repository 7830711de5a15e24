"""Where the shipper stands in the spool: its mark, the state saved with it, and its pin.

Spool -> **marks** -> shipper. The high-water mark says which records the
collector has acknowledged (or the quarantine holds); the ``ShipState``
saved with it (next seq, chain link, batch in flight) lets a restart resend
identical bytes. Both move together, durably, in one ``Spool.commit``.

What the shipper has read (the batch in flight, the prefetched next one,
delivered records whose mark is not yet durable) is pinned in the spool, so
the byte cap never drops, and counts as lost, records that are then delivered.
"""

from __future__ import annotations

import asyncio

from predtrace.sidecar._shipstate import Plan, ShipState
from predtrace.sidecar.spool import Record, Spool

# The pin's end while a read is under way: whatever it returns is kept.
_OPEN_END = 2**62


class ShipMarks:
    """The shipper's mark and state in the spool, and the pin on what it holds."""

    def __init__(self, spool: Spool, state: ShipState) -> None:
        self.state = state
        self.hwm = spool.hwm
        self.held = spool.hwm  # the last record index the shipper holds (see hold)
        self.dirty = False  # the mark or state moved since the last commit
        self._spool = spool

    async def read(
        self, max_events: int, max_bytes: int, until: int | None = None, *, after: int | None = None
    ) -> list[Record]:
        """The next batch's records after ``after`` (the mark), pinned from before the read.

        See ``hold``: what the read returns stays pinned; nothing past it does.
        """
        start = self.hwm if after is None else after
        records: list[Record] = []
        self.hold(_OPEN_END if until is None else until)
        try:
            records = await asyncio.to_thread(
                self._spool.read,
                start,
                max_records=max_events,
                max_bytes=max_bytes,
                until=until,
            )
        finally:
            self.hold(records[-1].index if records else start)
        return records

    async def read_planned(self, plan: Plan) -> list[Record]:
        """The records of the planned batch ``plan`` still readable, whatever their size."""
        return await asyncio.to_thread(
            self._spool.read, self.hwm, max_records=2**31, max_bytes=2**62, until=plan.last
        )

    def hold(self, last: int) -> None:
        """Pin every record from the durable mark to ``last`` against the byte cap.

        Those are in the shipper's hands: delivered ones whose mark is not yet
        durable, the batch in flight and the prefetched next one. The cap
        would count them as dropped and they would be delivered all the same.
        A read pins an open range first (``_OPEN_END``), then what it returned.
        """
        self.held = last
        first = self._spool.hwm + 1
        self._spool.pin((first, last) if last >= first else None)

    def advance(self, plan: Plan) -> None:
        """The batch is done (delivered or quarantined): move the marks past it."""
        self.hwm = plan.last
        self.state = ShipState(plan.seq + 1, plan.digest, None)
        self.hold(max(self.held, plan.last))  # pinned until the new mark is durable
        self.dirty = True

    async def persist(self) -> None:
        """Write the marks and the current state durably."""
        await self.commit(self.state)

    async def commit(self, state: ShipState) -> None:
        """Write the marks and ``state`` durably; only then is ``state`` current."""
        try:
            await asyncio.to_thread(self._spool.commit, self.hwm, state.encode())
        except OSError:
            self.dirty = True
            raise
        self.state = state
        self.dirty = False
        self.hold(self.held)  # what is durably delivered needs no pin

    async def persist_if_dirty(self) -> None:
        """Write the marks and state if they moved since the last commit."""
        if self.dirty:
            await self.persist()
