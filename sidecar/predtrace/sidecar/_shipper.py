"""The shipper: spool -> batches -> collector, in order, at least once.

Spool -> **shipper** -> ``CollectorClient``. Reads records after the
high-water mark, forms a batch by size and time, persists the plan (seq,
record span, digest) with the spool's state *before* the first send, and
retries that same byte-identical batch until the collector acknowledges it;
then it moves the high-water mark. Elapsed time never drops anything: retries
back off exponentially with full jitter up to a cap, forever; the backoff
grows across batches and only an acknowledgement resets it. A batch the
collector refuses (400) or keeps failing on (500s while the collector says
it is ready, or the sidecar dying while it builds or sends the batch on N
starts in a row) is written to ``quarantine/`` and counted, never
crash-looped; ``quarantine/`` has its own byte cap (oldest files removed past
it, counted). Answers that are not about the batch never count against it: a
refused token (401/403), a URL that is no ingest endpoint (404/405, 3xx), a
2xx that is no acknowledgement, a busy collector, a 500 while the collector
is not ready (an outage, or a proxy answering 500 to everything), and a
death while the batch waits on the network. The batch stays spooled and is
retried, with the reason in ``last_error``.

Two refusals are about the batch's shape, not its content, and lose nothing:
a batch too large for the collector or a proxy (413) is split and sent again
in parts (only one event too large alone is quarantined), and the limit
learnt bounds later batches; a seq the collector holds with other bytes
(409: a fixed producer id on a fresh spool) moves the shipper to a derived
producer id, numbered from 1, and the batch is sent again under it.

What the shipper has read (the batch in flight, the prefetched next one,
delivered records whose mark is not yet durable) is pinned in the spool, so
the byte cap never drops, and counts as lost, records that are then delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from predtrace.sidecar._batch import assemble_payload
from predtrace.sidecar._config import ShipperConfig
from predtrace.sidecar._quarantine import QUARANTINE_SHARE, Quarantine
from predtrace.sidecar._quarantine import SUFFIX as QUARANTINE_SUFFIX
from predtrace.sidecar._shipstate import Plan, ShipState
from predtrace.sidecar.pipeline import (
    Clock,
    PermanentExportError,
    RateLimitedLog,
    RetryableExportError,
    SystemClock,
)
from predtrace.sidecar.pipeline._collector_http import RefusedBatchError
from predtrace.sidecar.spool import FaultPoints, FileLayer, Record, Spool
from predtrace.wire import (
    IngestAck,
    batch_digest,
    gzip_bytes,
    producer_id_base,
    restarted_producer_id,
)

_log = logging.getLogger("predtrace.sidecar.shipper")
# 5xx statuses that say "the collector is busy", not "this batch is bad".
_BUSY_STATUSES = frozenset({502, 503, 504})
_CONFLICT = 409  # the collector holds this (producer, seq) with other bytes
_TOO_LARGE = 413  # the collector or a proxy refuses a body this large
# An attempt out this long is waiting on the network: a death from then on
# says nothing against the batch (the mark costs one state write, and only
# when the collector is this slow).
ON_THE_WIRE_S = 1.0
# The pin's end while a read is under way: whatever it returns is kept.
_OPEN_END = 2**62
Sleep = Callable[[float], Awaitable[None]]
# Given the producer id whose seqs the collector holds with other bytes: the
# id to continue under, already made durable (``SidecarApp`` keeps it).
Renumber = Callable[[str], str]


def counts_against_batch(exc: RetryableExportError) -> bool:
    """Whether a failed attempt may say the batch itself is bad (a 500, not a busy 503).

    Connection errors, 2xx answers that are no acknowledgement, 3xx, 401/403,
    404/405 and busy statuses say nothing about the batch: it is kept forever.
    A 500 counts unless the collector says it is not ready (see
    ``Shipper._against_batch``): a collector or proxy answering 500 to
    everything is an outage.
    """
    status = exc.status
    return status is not None and 500 <= status < 600 and status not in _BUSY_STATUSES


def seq_reused(exc: PermanentExportError) -> bool:
    """Whether the collector refused the batch because it holds its seq with other bytes."""
    return (
        isinstance(exc, RefusedBatchError)
        and exc.status == _CONFLICT
        and "reused" in exc.detail.lower()
    )


class BatchSender(Protocol):
    """Sends one encoded batch (``CollectorClient`` is the real one)."""

    async def send(self, body: bytes, *, compressed: bool) -> IngestAck:
        """POST the body; raise Retryable/PermanentExportError on failure."""
        ...

    # Optional: ``async def ready(self) -> bool | None``, whether the collector
    # says it is ready, None when it cannot tell (``CollectorClient.ready``).
    # Without it a 500 counts against the batch, as it must for a sender that
    # cannot tell an outage from a bad batch.

    async def close(self) -> None:
        """Release connections."""
        ...


@dataclass(slots=True)
class ShipperCounters:
    """What the shipper did (monotonic counts, plus the latest times)."""

    exported: int = 0
    batches: int = 0
    retried: int = 0
    rejected: int = 0
    duplicates: int = 0
    quarantined: int = 0
    quarantined_events: int = 0
    quarantine_bytes: int = 0
    quarantine_byte_cap: int = 0
    quarantine_evicted: int = 0
    last_success_ns: int = 0
    last_error: str = ""
    split: int = 0
    """Batches refused as too large (413) and sent again in parts."""
    renumbered: int = 0
    """Switches to a new producer id after the collector refused a reused seq (409)."""
    max_batch_events: int = 0
    """The events per batch in force (the configured cap, lowered by a 413)."""
    max_batch_bytes: int = 0
    """The event bytes per batch in force (the configured cap, lowered by a 413)."""
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str, count: int) -> None:
        """Count events dropped for ``reason``."""
        if count:
            self.dropped[reason] = self.dropped.get(reason, 0) + count


class Shipper:
    """Delivers the spool to the collector in order (one batch in flight).

    Example:
        >>> shipper = Shipper(spool, CollectorClient(cfg), ShipperConfig(), "edge-7")
        >>> task = asyncio.create_task(shipper.run())
        >>> await shipper.stop(drain_timeout=10)
    """

    def __init__(
        self,
        spool: Spool,
        sender: BatchSender,
        config: ShipperConfig,
        producer_id: str,
        *,
        files: FileLayer,
        clock: Clock | None = None,
        sleep: Sleep | None = None,
        faults: FaultPoints | None = None,
        seed: int | None = None,
        fresh_numbering: bool = False,
        renumber: Renumber | None = None,
    ) -> None:
        """``fresh_numbering``: the producer id is new, so its seqs start at 1 (no chain).

        ``renumber``: makes durable and returns the id to continue under when
        the collector refuses a seq as reused (409); without it the shipper
        derives one (``<id>-r<hex>``) that lasts until it stops.
        """
        self.config = config
        self.producer_id = producer_id
        self.counters = ShipperCounters()
        self.oldest_unsent_ns = 0
        self._renumber_fn = renumber
        # Failed attempts in a row, over batches: only an ack resets the
        # backoff, so an outage is not hammered afresh by each new batch.
        self._retries = 0
        # Set by a 409 renumbering, cleared by the next ack: a second 409
        # before any ack quarantines the batch instead of switching again.
        self._renumbered = False
        # Batch limits in force: the configured ones, lowered by a 413. The
        # batch in flight and the one read ahead are pinned in the spool, out
        # of its cap's reach: together at most half of a small cap.
        self._max_events = config.max_batch_events
        self._max_bytes = max(1, min(config.max_batch_bytes, spool.config.max_bytes // 4))
        self.counters.max_batch_events = self._max_events
        self.counters.max_batch_bytes = self._max_bytes
        # The plan whose replay count this process has already raised: a retry
        # of the resume in the same process (a read error) is not another death.
        self._counted_seq: int | None = None
        self._spool = spool
        self._sender = sender
        self._files = files
        self._clock = clock or SystemClock()
        self._sleep_fn = sleep
        self._faults = faults or FaultPoints()
        self._rng = random.Random(seed)  # noqa: S311 - jitter, not secrets
        self._log = RateLimitedLog(_log)
        fresh = spool.state_lost or fresh_numbering
        self._state = ShipState.decode(b"" if fresh else spool.meta)
        self._hwm = spool.hwm
        self._held = spool.hwm  # the last record index the shipper holds (see _hold)
        self._quarantined = Quarantine(files, spool.config.directory, self.counters)
        cap = config.quarantine_max_bytes
        self.counters.quarantine_byte_cap = (
            int(spool.config.max_bytes * QUARANTINE_SHARE) if cap is None else cap
        )
        self._dirty = False
        self._stopping = False
        self._deadline: float | None = None
        self._stop_event = asyncio.Event()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._prefetch: asyncio.Task[Plan | None] | None = None

    @property
    def next_seq(self) -> int:
        """The seq the next new batch gets."""
        return self._state.next_seq

    # -- the loop -------------------------------------------------------------------

    async def run(self) -> None:
        """Ship until ``stop``; returns when stopped (never raises for delivery errors)."""
        self._loop = asyncio.get_running_loop()
        self._spool.add_listener(self._on_data)
        try:
            await asyncio.to_thread(self._quarantined.scan)
        except OSError as exc:  # counted from the next quarantined batch on
            _log.error("cannot read %s: %s", self._quarantined.directory, exc.strerror or exc)
        try:
            await self._loop_until_stopped()
        finally:
            if self._prefetch is not None:
                self._prefetch.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await self._prefetch
        try:
            await self._persist_if_dirty()
        except OSError as exc:  # the next start resends from the older mark: duplicates only
            _log.error("could not write the spool state at stop: %s", exc.strerror or exc)

    async def _loop_until_stopped(self) -> None:
        failures = 0
        while not self._stopping:
            try:
                await self._step()
                failures = 0
            except OSError as exc:
                # A full or failing disk under the spool state: the shipper
                # waits and tries again; it never dies while the sidecar
                # keeps accepting events.
                failures += 1
                self.counters.last_error = f"spool I/O failed: {exc.strerror or exc}"
                self._log.warning("state", "spool I/O failed, retrying: %s", exc.strerror or exc)
                await self._wait(self.config.retry.delay(failures - 1, None, self._rng))

    async def _step(self) -> None:
        plan = self._state.plan
        if plan is not None and plan.body is None:
            await self._resume(plan)  # persisted by an earlier run: rebuild it first
            return
        if plan is None:
            plan = await self._next_plan()
        if plan is None:
            await self._persist_if_dirty()
            self._idle.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)
            self._wake.clear()
            return
        self._idle.clear()
        await self._ship(plan)

    def _on_data(self) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
                loop.call_soon_threadsafe(self._wake.set)

    async def stop(self, drain_timeout: float = 0.0) -> None:
        """Ship what is spooled for up to ``drain_timeout`` seconds, then stop the loop."""
        if drain_timeout > 0:
            self._deadline = self._clock.monotonic() + drain_timeout
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained(), drain_timeout)
        self._stopping = True
        self._stop_event.set()
        self._wake.set()

    async def _drained(self) -> None:
        while True:
            await self._idle.wait()
            if self._spool.stats().records == 0 and self._state.plan is None:
                return
            await asyncio.sleep(0.05)

    # -- planning -------------------------------------------------------------------

    async def _next_plan(self) -> Plan | None:
        plan = await self._take_prefetched()
        if plan is None:
            records = await self._read()
            if not records:
                self.oldest_unsent_ns = 0
                return None
            self.oldest_unsent_ns = records[0].ts_ns
            if not self._full(records) and self.config.linger > 0 and self._deadline is None:
                # What was delivered is marked in the spool before the wait,
                # not after it: the depth is right meanwhile, and a crash in
                # the wait resends nothing already delivered.
                await self._persist_if_dirty()
                await self._pause(self.config.linger)
                if self._stopping:
                    return None
                records = await self._read()
            state = self._state
            plan = await asyncio.to_thread(self._build, records, state.next_seq, state.prev_digest)
        self.oldest_unsent_ns = plan.first_ts_ns
        # Persisted as "in this process's hands": a death before the first
        # attempt has been out on the network for a moment counts toward
        # poison (see _attempt); in steady state it costs no extra write.
        plan.replays = 1
        state = self._state
        # Durable before the first send (a failed write leaves no plan behind).
        await self._commit(ShipState(state.next_seq, state.prev_digest, plan))
        return plan

    def _full(self, records: list[Record]) -> bool:
        if len(records) >= self._max_events:
            return True
        size = sum(len(r.payload) for r in records)
        if size + self._spool.config.max_record_bytes <= self._max_bytes:
            return False  # any next record would have fit: the read reached the end
        # The byte cap is never passed: the read may have stopped before a
        # record that did not fit, and did if the spool holds more after it.
        return records[-1].index < self._spool.stats().next_index - 1

    async def _prebuild(self, current: Plan) -> Plan | None:
        """The full batch after ``current``, built while ``current`` is on the wire.

        Its records stay pinned from the read until it is shipped or dropped
        in favour of a fresh read: the cap must not count them as lost.
        """
        records = await self._read(after=current.last)
        if not (records and self._full(records)):
            self._hold(current.last)
            return None
        return await asyncio.to_thread(self._build, records, current.seq + 1, current.digest)

    async def _take_prefetched(self) -> Plan | None:
        task, self._prefetch = self._prefetch, None
        if task is None:
            return None
        try:
            plan = await task
        except OSError:
            return None
        if plan is None or plan.seq != self._state.next_seq or plan.first <= self._hwm:
            return None
        return plan

    async def _read(self, until: int | None = None, *, after: int | None = None) -> list[Record]:
        """The next batch's records after ``after`` (the mark), pinned from before the read.

        See ``_hold``: what the read returns stays pinned; nothing past it does.
        """
        start = self._hwm if after is None else after
        records: list[Record] = []
        self._hold(_OPEN_END if until is None else until)
        try:
            records = await asyncio.to_thread(
                self._spool.read,
                start,
                max_records=self._max_events,
                max_bytes=self._max_bytes,
                until=until,
            )
        finally:
            self._hold(records[-1].index if records else start)
        return records

    def _hold(self, last: int) -> None:
        """Pin every record from the durable mark to ``last`` against the byte cap.

        Those are in the shipper's hands: delivered ones whose mark is not yet
        durable, the batch in flight and the prefetched next one. The cap
        would count them as dropped and they would be delivered all the same.
        A read pins an open range first (``_OPEN_END``), then what it returned.
        """
        self._held = last
        first = self._spool.hwm + 1
        self._spool.pin((first, last) if last >= first else None)

    def _build(self, records: list[Record], seq: int, prev_digest: bytes) -> Plan:
        """Assemble and compress a batch (runs in a thread: it is the big encode)."""
        payload = assemble_payload(
            producer_id=self.producer_id,
            seq=seq,
            created_at_unix_nano=records[-1].ts_ns,
            prev_digest=prev_digest,
            events=[r.payload for r in records],
        )
        body = gzip_bytes(payload, self.config.compress_level) if self.config.compress else payload
        return Plan(
            seq=seq,
            first=records[0].index,
            last=records[-1].index,
            created_at_ns=records[-1].ts_ns,
            digest=batch_digest(payload),
            events=len(records),
            first_ts_ns=records[0].ts_ns,
            payload=payload,
            body=body,
        )

    async def _resume(self, plan: Plan) -> None:
        """Rebuild the persisted plan byte for byte, or quarantine it if it crash-loops.

        ``plan.replays`` counts the starts that died with the batch in their
        hands (rebuilding, encoding, about to send). It is made durable before
        the work, so a death in the work counts; ``_attempt`` clears it once
        an attempt has been out on the network for a moment, so a death while
        waiting on the collector (a stalled uplink) does not.
        """
        self._hold(plan.last)
        state = self._state
        own = 1 if self._counted_seq == plan.seq else 0  # this process's own count
        poisoned = plan.replays - own >= self.config.poison_attempts
        if not poisoned and not own:
            plan = dataclasses.replace(plan, replays=plan.replays + 1)
            await self._commit(ShipState(state.next_seq, state.prev_digest, plan))
            self._counted_seq = plan.seq
        records = await asyncio.to_thread(
            self._spool.read, self._hwm, max_records=2**31, max_bytes=2**62, until=plan.last
        )
        rebuilt = None
        if records:
            prev = self._state.prev_digest
            rebuilt = await asyncio.to_thread(self._build, records, plan.seq, prev)
        if rebuilt is None or rebuilt.digest != plan.digest:
            # Records of the batch were damaged or lost since it was planned:
            # move on to the next seq, chained to the planned batch, and send
            # what is still readable as a new batch (duplicates, never loss).
            self._log.warning(
                "rebuild", "batch %d could not be rebuilt; resending as new", plan.seq
            )
            self._state = ShipState(plan.seq + 1, plan.digest, None)
            self._dirty = True
            return
        rebuilt.replays = plan.replays
        if poisoned:
            # Quarantine the rebuilt bytes: the persisted plan has no payload,
            # and the quarantine file is the only copy once the marks move on.
            reason = f"the sidecar died {plan.replays} times building or sending it"
            await self._quarantine(rebuilt, reason)
            return
        self.oldest_unsent_ns = rebuilt.first_ts_ns
        # The same plan as the one just persisted, now with its bytes.
        self._state = ShipState(state.next_seq, state.prev_digest, rebuilt)

    # -- sending --------------------------------------------------------------------

    async def _ship(self, plan: Plan) -> None:
        assert plan.body is not None  # noqa: S101 - plans in memory always carry their body
        self._hold(max(self._held, plan.last))
        if self._prefetch is None:
            self._prefetch = asyncio.create_task(self._prebuild(plan))
        failures = 0
        while not self._stopping:
            self._faults.hit("shipper.before_send")
            try:
                ack = await self._attempt(plan)
            except asyncio.CancelledError:
                # Cancelled at the drain deadline (SIGTERM): a stop, not a
                # crash while sending, so it must not count toward poison.
                if plan.replays:
                    plan.replays = 0
                    with contextlib.suppress(OSError):
                        await self._persist()
                raise
            except RetryableExportError as exc:
                if plan.replays:
                    plan.replays = 0  # it did not kill us: not a crash loop
                    await self._persist()
                against = await self._against_batch(exc)
                failures += against
                if failures >= self.config.poison_attempts:
                    await self._quarantine(plan, f"{failures} failed attempts: {exc}")
                    return
                self._note_retry(exc)
                if counts_against_batch(exc) and not against:
                    self.counters.last_error += " (and the collector is not ready: an outage)"
                if not await self._backoff(self._retries, exc.retry_after):
                    return
                self._retries += 1
                continue
            except PermanentExportError as exc:
                await self._refused(plan, exc)
                return
            self._faults.hit("shipper.after_ack")
            self._complete(plan, ack)
            return

    async def _attempt(self, plan: Plan) -> IngestAck:
        """Send once; once the attempt has been out a moment, clear the plan's death count.

        A sidecar killed while the collector (or a stalled uplink) holds the
        request did not die of the batch: that death must not count toward
        quarantining it. A collector that answers within ``ON_THE_WIRE_S``
        costs no extra state write.
        """
        assert plan.body is not None  # noqa: S101 - plans in memory always carry their body
        send = asyncio.ensure_future(self._sender.send(plan.body, compressed=self.config.compress))
        try:
            if plan.replays:
                done, _ = await asyncio.wait({send}, timeout=ON_THE_WIRE_S)
                if not done:
                    await self._clear_replays(plan)
            return await send
        finally:
            send.cancel()  # only still running when this attempt was cancelled

    async def _clear_replays(self, plan: Plan) -> None:
        plan.replays = 0
        try:
            await self._persist()
        except OSError as exc:  # the count stays durable: a later death may count, no loss
            self._log.warning("state", "could not mark the batch as sent: %s", exc.strerror)

    async def _against_batch(self, exc: RetryableExportError) -> bool:
        """Whether a failed attempt counts toward quarantining the batch.

        A 500 says the batch is bad unless the collector says it is not ready
        (its store down, or a proxy or load balancer answering 5xx to
        everything): that is an outage, and an outage never costs a batch.
        When readiness cannot be told (no ``ready``, or a ``/readyz`` an
        ingress does not route), the 500 counts.
        """
        if not counts_against_batch(exc):
            return False
        probe = getattr(self._sender, "ready", None)
        return probe is None or (await probe()) is not False

    def _note_retry(self, exc: RetryableExportError) -> None:
        self.counters.retried += 1
        self.counters.last_error = str(exc)
        self._log.warning("retry", "delivery to the collector failed, retrying: %s", exc)

    # -- refusals about the batch's size or numbering, not its content ----------------

    async def _refused(self, plan: Plan, exc: PermanentExportError) -> None:
        """The collector refused the batch for good: split it, renumber, or quarantine it."""
        too_large = isinstance(exc, RefusedBatchError) and exc.status == _TOO_LARGE
        if too_large and plan.events > 1:
            await self._split(plan, exc)
        elif seq_reused(exc) and not self._renumbered:
            await self._renumber(exc)
        elif too_large:
            await self._quarantine(plan, f"{exc} (one event, too large on its own)")
        else:
            await self._quarantine(plan, str(exc))

    async def _split(self, plan: Plan, exc: PermanentExportError) -> None:
        """Send again, under the same seq, the first part of a batch refused as too large.

        A 413 stores nothing, so the refused batch's seq and chain link are
        free: the first part takes them (durable before it is sent, as any
        plan) and the rest follows under the next seqs, numbered and chained
        as always, so the collector sees no gap and no break. The limit
        learnt, half the refused batch's events and event bytes (halved
        again by a later 413), bounds every later batch too: an ingress limit
        costs a few refused requests, not one per batch. It is not kept over
        a restart; the first batch too large then teaches it again.
        """
        records = await asyncio.to_thread(
            self._spool.read, self._hwm, max_records=2**31, max_bytes=2**62, until=plan.last
        )
        size = sum(len(r.payload) for r in records)
        self._learn_limit(plan, exc, max(1, len(records) // 2), max(1, size // 2))
        # The prefetched batch is numbered and chained after the refused one.
        await self._drop_prefetch()
        state = self._state
        if not records:
            # Damaged since planned (the spool counted them): nothing is left
            # to send, and the seq stays free for what follows.
            self._hwm = plan.last
            self._state = ShipState(plan.seq, state.prev_digest, None)
            self._dirty = True
            return
        part = _prefix(records, self._max_events, self._max_bytes)
        first = await asyncio.to_thread(self._build, part, plan.seq, state.prev_digest)
        first.replays = 1  # in this process's hands, as a new plan (see _next_plan)
        await self._commit(ShipState(plan.seq, state.prev_digest, first))
        self.counters.split += 1
        self.oldest_unsent_ns = first.first_ts_ns

    def _learn_limit(self, plan: Plan, exc: PermanentExportError, events: int, size: int) -> None:
        events, size = min(events, self._max_events), min(size, self._max_bytes)
        if (events, size) == (self._max_events, self._max_bytes):
            return
        self._max_events, self._max_bytes = events, size
        self.counters.max_batch_events, self.counters.max_batch_bytes = events, size
        _log.warning(
            "the collector or a proxy in front of it refused batch seq %d (%d events, %d bytes "
            "sent) as too large: %s; sending it again in parts, and batches hold at most %d "
            "events and %d bytes of events from now on (until the sidecar restarts)",
            plan.seq,
            plan.events,
            len(plan.body or b""),
            exc,
            events,
            size,
        )

    async def _renumber(self, exc: PermanentExportError) -> None:
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
        await self._drop_prefetch()
        old = self.producer_id
        # The mark stays: the batch's records are read again and renumbered.
        await self._commit(ShipState(1, b"", None))
        if self._renumber_fn is not None:
            new = await asyncio.to_thread(self._renumber_fn, old)
        else:
            new = restarted_producer_id(producer_id_base(old))
        self.producer_id = new
        self._renumbered = True
        self._counted_seq = None
        c = self.counters
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

    async def _drop_prefetch(self) -> None:
        """Forget the batch built ahead: it is numbered and chained after one not sent."""
        task, self._prefetch = self._prefetch, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task

    async def _backoff(self, retry: int, retry_after: float | None) -> bool:
        """Wait before the next attempt; False when stopping (the batch stays spooled)."""
        delay = self.config.retry.delay(retry, retry_after, self._rng)
        if self._deadline is not None and self._clock.monotonic() + delay > self._deadline:
            self._stopping = True
            return False
        await self._wait(delay)
        return not self._stopping

    async def _wait(self, delay: float) -> None:
        if self._sleep_fn is not None:
            await self._sleep_fn(delay)
        else:
            await self._pause(delay)

    def _complete(self, plan: Plan, ack: IngestAck) -> None:
        c = self.counters
        c.batches += 1
        c.exported += ack.accepted
        c.rejected += len(ack.rejected)
        c.drop("rejected", len(ack.rejected))
        c.duplicates += ack.duplicate
        c.last_success_ns = self._clock.time_ns()
        c.last_error = ""
        self._retries = 0
        self._renumbered = False
        self._advance(plan)

    def _advance(self, plan: Plan) -> None:
        """The batch is done (delivered or quarantined): move the marks past it."""
        self._hwm = plan.last
        self._state = ShipState(plan.seq + 1, plan.digest, None)
        self._hold(max(self._held, plan.last))  # pinned until the new mark is durable
        self._dirty = True

    async def _quarantine(self, plan: Plan, reason: str) -> None:
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
        c = self.counters
        c.quarantined += 1
        c.quarantined_events += plan.events
        c.drop("quarantined", plan.events)
        c.last_error = f"batch seq {plan.seq} ({plan.events} events) quarantined: {reason}"
        _log.error("%s; kept in %s", c.last_error, path)
        self._advance(plan)
        await self._persist()

    # -- persistence and waiting ----------------------------------------------------

    async def _persist(self) -> None:
        await self._commit(self._state)

    async def _commit(self, state: ShipState) -> None:
        """Write the marks and ``state`` durably; only then is ``state`` current."""
        try:
            await asyncio.to_thread(self._spool.commit, self._hwm, state.encode())
        except OSError:
            self._dirty = True
            raise
        self._state = state
        self._dirty = False
        self._hold(self._held)  # what is durably delivered needs no pin

    async def _persist_if_dirty(self) -> None:
        if self._dirty:
            await self._persist()

    async def _pause(self, seconds: float) -> None:
        """Sleep, cut short by ``stop``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_event.wait(), seconds)


def _prefix(records: list[Record], max_events: int, max_bytes: int) -> list[Record]:
    """The longest start of ``records`` within both limits (at least one record)."""
    total = 0
    for count, record in enumerate(records[:max_events]):
        total += len(record.payload)
        if total > max_bytes and count:
            return records[:count]
    return records[:max_events]
