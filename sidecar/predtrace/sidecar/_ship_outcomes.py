"""How a batch leaves the shipper's hands: acknowledged, or quarantined as a file.

Shipper -> **outcomes** -> counters and ``quarantine/``. Either way the
marks move past the batch. An acknowledgement is counted (accepted,
rejected, duplicates); a batch the shipper gives up on is first written to
``quarantine/`` (its only copy once the marks move), then counted as dropped.
"""

from __future__ import annotations

import asyncio
import logging

from predtrace.sidecar._quarantine import QUARANTINE_SHARE, Quarantine
from predtrace.sidecar._quarantine import SUFFIX as QUARANTINE_SUFFIX
from predtrace.sidecar._ship_counters import ShipperCounters
from predtrace.sidecar._ship_marks import ShipMarks
from predtrace.sidecar._shipstate import Plan
from predtrace.sidecar.pipeline import Clock
from predtrace.sidecar.spool import FileLayer, SpoolConfig
from predtrace.wire import IngestAck

_log = logging.getLogger("predtrace.sidecar.shipper")


class BatchOutcomes:
    """Books each batch's end in the counters, keeps quarantined ones, and moves the marks."""

    def __init__(
        self,
        marks: ShipMarks,
        counters: ShipperCounters,
        clock: Clock,
        *,
        files: FileLayer,
        spool: SpoolConfig,
        cap: int | None,
    ) -> None:
        """``cap``: the quarantine's byte cap (None: a share of the spool's)."""
        self._marks = marks
        self._counters = counters
        self._clock = clock
        self._quarantined = Quarantine(files, spool.directory, counters)
        counters.quarantine_byte_cap = (
            int(spool.max_bytes * QUARANTINE_SHARE) if cap is None else cap
        )

    async def scan(self) -> None:
        """Count what earlier runs quarantined (at start; a failure is logged, not raised)."""
        try:
            await asyncio.to_thread(self._quarantined.scan)
        except OSError as exc:  # counted from the next quarantined batch on
            _log.error("cannot read %s: %s", self._quarantined.directory, exc.strerror or exc)

    def acknowledged(self, plan: Plan, ack: IngestAck) -> None:
        """The collector acknowledged ``plan``: count its answer and move the marks past it."""
        c = self._counters
        c.batches += 1
        c.exported += ack.accepted
        c.rejected += len(ack.rejected)
        c.drop("rejected", len(ack.rejected))
        c.duplicates += ack.duplicate
        c.last_success_ns = self._clock.time_ns()
        c.last_error = ""
        self._marks.advance(plan)

    async def quarantine(self, plan: Plan, reason: str) -> None:
        """Keep ``plan``'s payload in ``quarantine/``, count it dropped, and move past it.

        Raises:
            OSError: the file could not be written; the batch stays spooled.
        """
        # Named by time, then seq: seqs start again at 1 after a numbering
        # restart (a new producer id), and a seq alone would overwrite an older
        # batch; the cap removes the oldest first, in name order.
        name = f"{self._clock.time_ns():020d}-{plan.seq:020d}{QUARANTINE_SUFFIX}"
        path = self._quarantined.path(name)
        try:
            await asyncio.to_thread(self._quarantined.write, name, plan.payload or b"")
        except OSError as exc:
            # The file is the batch's only copy once the marks move past it:
            # keep the batch spooled; the loop backs off and tries again.
            _log.error("could not write quarantined batch %s: %s", path, exc.strerror)
            raise
        c = self._counters
        c.quarantined += 1
        c.quarantined_events += plan.events
        c.drop("quarantined", plan.events)
        c.last_error = f"batch seq {plan.seq} ({plan.events} events) quarantined: {reason}"
        _log.error("%s; kept in %s", c.last_error, path)
        self._marks.advance(plan)
        await self._marks.persist()
