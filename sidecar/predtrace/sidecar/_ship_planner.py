"""The shipper's batches, numbered and chained: planned, rebuilt, split and renumbered.

Spool -> **planner** -> shipper -> collector. The planner gives each batch
its seq and chain link under the producer id, builds it from the records
after the mark, and makes the plan durable before the first send. After a
restart it rebuilds the persisted plan byte for byte (counting the starts
that died with it, so a crash loop ends in quarantine). Two refusals are
about a batch's shape, not its content, and the planner answers them
without loss: a batch too large (413) is planned again in parts under the
same seq, and a seq the collector holds with other bytes (409) moves the
numbering to a derived producer id, from seq 1.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable

from predtrace.sidecar._config import ShipperConfig
from predtrace.sidecar._ship_batches import BatchLimits, build_plan
from predtrace.sidecar._ship_counters import ShipperCounters
from predtrace.sidecar._ship_marks import ShipMarks
from predtrace.sidecar._shipstate import Plan, ShipState
from predtrace.sidecar.pipeline import PermanentExportError, RateLimitedLog
from predtrace.sidecar.spool import Record, Spool
from predtrace.wire import producer_id_base, restarted_producer_id

_log = logging.getLogger("predtrace.sidecar.shipper")
# Given the producer id whose seqs the collector holds with other bytes: the
# id to continue under, already made durable (``SidecarApp`` keeps it).
Renumber = Callable[[str], str]


class BatchPlanner:
    """Numbers, chains and builds the shipper's batches under its producer id."""

    def __init__(
        self,
        marks: ShipMarks,
        spool: Spool,
        config: ShipperConfig,
        *,
        counters: ShipperCounters,
        producer_id: str,
        renumber: Renumber | None,
    ) -> None:
        self.producer_id = producer_id
        self.oldest_unsent_ns = 0
        self.limits = BatchLimits(config, spool, counters)
        self._marks = marks
        self._config = config
        self._counters = counters
        self._renumber_fn = renumber
        # The plan whose replay count this process has already raised: a retry
        # of the resume in the same process (a read error) is not another death.
        self._counted_seq: int | None = None
        self._log = RateLimitedLog(_log)

    async def read(self, *, after: int | None = None) -> list[Record]:
        """The next batch's records after ``after`` (the mark), pinned (``ShipMarks.read``)."""
        return await self._marks.read(self.limits.max_events, self.limits.max_bytes, after=after)

    async def build_next(self, records: list[Record]) -> Plan:
        """The batch of ``records`` under the next seq, chained to the last batch."""
        state = self._marks.state
        return await asyncio.to_thread(self._build, records, state.next_seq, state.prev_digest)

    async def put_in_flight(self, plan: Plan) -> None:
        """Make ``plan`` the batch in flight, durably, before its first send."""
        self.oldest_unsent_ns = plan.first_ts_ns
        # Persisted as "in this process's hands": a death before the first
        # attempt has been out on the network for a moment counts toward
        # poison (see ``_ship_attempts.attempt``); in steady state it costs no extra write.
        plan.replays = 1
        state = self._marks.state
        # Durable before the first send (a failed write leaves no plan behind).
        await self._marks.commit(ShipState(state.next_seq, state.prev_digest, plan))

    async def prebuild(self, current: Plan) -> Plan | None:
        """The full batch after ``current``, built while ``current`` is on the wire.

        Its records stay pinned from the read until it is shipped or dropped
        in favour of a fresh read: the cap must not count them as lost.
        """
        records = await self.read(after=current.last)
        if not (records and self.limits.full(records)):
            self._marks.hold(current.last)
            return None
        return await asyncio.to_thread(self._build, records, current.seq + 1, current.digest)

    def _build(self, records: list[Record], seq: int, prev_digest: bytes) -> Plan:
        """Assemble and compress a batch (runs in a thread: it is the big encode)."""
        return build_plan(records, seq, prev_digest, self.producer_id, self._config)

    # -- after a restart ------------------------------------------------------------

    async def resume(self, plan: Plan) -> Plan | None:
        """Rebuild the persisted plan byte for byte; the rebuilt batch if it crash-loops.

        ``plan.replays`` counts the starts that died with the batch in their
        hands (rebuilding, encoding, about to send). It is made durable before
        the work, so a death in the work counts; ``_ship_attempts.attempt`` clears it
        once an attempt has been out on the network for a moment, so a death
        while waiting on the collector (a stalled uplink) does not.

        Returns:
            The rebuilt batch when the sidecar died with it ``poison_attempts``
            times (the shipper quarantines it), else None.
        """
        marks = self._marks
        marks.hold(plan.last)
        state = marks.state
        own = 1 if self._counted_seq == plan.seq else 0  # this process's own count
        poisoned = plan.replays - own >= self._config.poison_attempts
        if not poisoned and not own:
            plan = dataclasses.replace(plan, replays=plan.replays + 1)
            await marks.commit(ShipState(state.next_seq, state.prev_digest, plan))
            self._counted_seq = plan.seq
        rebuilt = await self._rebuild(plan)
        if rebuilt is None:
            # Records of the batch were damaged or lost since it was planned:
            # move on to the next seq, chained to the planned batch, and send
            # what is still readable as a new batch (duplicates, never loss).
            self._log.warning(
                "rebuild", "batch %d could not be rebuilt; resending as new", plan.seq
            )
            marks.state = ShipState(plan.seq + 1, plan.digest, None)
            marks.dirty = True
            return None
        rebuilt.replays = plan.replays
        if poisoned:
            return rebuilt
        self.oldest_unsent_ns = rebuilt.first_ts_ns
        # The same plan as the one just persisted, now with its bytes.
        marks.state = ShipState(state.next_seq, state.prev_digest, rebuilt)
        return None

    async def _rebuild(self, plan: Plan) -> Plan | None:
        """``plan``'s batch built again from the spool; None unless it has the same bytes."""
        records = await self._marks.read_planned(plan)
        if not records:
            return None
        prev = self._marks.state.prev_digest
        rebuilt = await asyncio.to_thread(self._build, records, plan.seq, prev)
        return rebuilt if rebuilt.digest == plan.digest else None

    # -- refusals about the batch's size or numbering, not its content ----------------

    async def learn_limit(self, plan: Plan, exc: PermanentExportError) -> list[Record]:
        """The records of ``plan``, refused as too large; later batches hold at most half.

        The limit learnt, half the refused batch's events and event bytes
        (halved again by a later 413), bounds every later batch too: an
        ingress limit costs a few refused requests, not one per batch. It is
        not kept over a restart; the first batch too large then teaches it
        again.
        """
        records = await self._marks.read_planned(plan)
        size = sum(len(r.payload) for r in records)
        self.limits.learn(plan, exc, max(1, len(records) // 2), max(1, size // 2))
        return records

    async def split(self, plan: Plan, records: list[Record]) -> None:
        """Plan again, under the same seq, the first part of a batch refused as too large.

        A 413 stores nothing, so the refused batch's seq and chain link are
        free: the first part of its ``records`` (``learn_limit``) takes them
        (durable before it is sent, as any plan) and the rest follows under
        the next seqs, numbered and chained as always, so the collector sees
        no gap and no break.
        """
        marks = self._marks
        state = marks.state
        if not records:
            # Damaged since planned (the spool counted them): nothing is left
            # to send, and the seq stays free for what follows.
            marks.hwm = plan.last
            marks.state = ShipState(plan.seq, state.prev_digest, None)
            marks.dirty = True
            return
        part = self.limits.prefix(records)
        first = await asyncio.to_thread(self._build, part, plan.seq, state.prev_digest)
        first.replays = 1  # in this process's hands, as a new plan (see put_in_flight)
        await marks.commit(ShipState(plan.seq, state.prev_digest, first))
        self._counters.split += 1
        self.oldest_unsent_ns = first.first_ts_ns

    async def renumber(self, exc: PermanentExportError) -> None:
        """Continue under a new producer id, from seq 1, after a seq refused as reused.

        The collector holds this id's seq with other bytes: a fixed
        ``--producer-id`` on a fresh spool (an emptyDir, a reflashed device)
        numbers from 1 again, and every later seq would collide too. The
        batch and all after it go under a derived id (``<id>-r<hex>``, which
        a token bound to ``<id>`` accepts), from seq 1 with no chain; nothing
        is quarantined. The fresh numbering is durable before the new id:
        a death in between starts again under the old id at seq 1, which the
        collector refuses the same way, so the switch is made again (a new
        id never continues the old numbering, which would report false gaps).
        """
        old = self.producer_id
        # The mark stays: the batch's records are read again and renumbered.
        await self._marks.commit(ShipState(1, b"", None))
        if self._renumber_fn is not None:
            new = await asyncio.to_thread(self._renumber_fn, old)
        else:
            new = restarted_producer_id(producer_id_base(old))
        self.producer_id = new
        self._counted_seq = None
        c = self._counters
        c.renumbered += 1
        c.last_error = f"producer {old!r} renumbered as {new!r} after: {exc}"
        _log.error(
            "the collector holds seqs of producer %r with other content (%s): a fixed "
            "--producer-id on a new or emptied spool? Continuing as producer %r with seqs "
            "from 1 (a token bound to %r accepts it); nothing is dropped",
            old,
            exc,
            new,
            producer_id_base(old),
        )
