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

Here: the loop, sending with retries, and the stop. The parts: the mark,
state and pin in the spool (``_ship_marks``), numbering and building batches
(``_ship_planner``, ``_ship_batches``), one attempt and what its answer
means (``_ship_attempts``), the backoff and waits (``_ship_pacing``), a
batch's end (``_ship_outcomes``) and the counters (``_ship_counters``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from predtrace.sidecar._config import ShipperConfig
from predtrace.sidecar._ship_attempts import (
    BatchSender,
    against_batch,
    attempt,
    counts_against_batch,
    seq_reused,
    too_large,
)
from predtrace.sidecar._ship_counters import ShipperCounters
from predtrace.sidecar._ship_marks import ShipMarks
from predtrace.sidecar._ship_outcomes import BatchOutcomes
from predtrace.sidecar._ship_pacing import ShipPacing, Sleep
from predtrace.sidecar._ship_planner import BatchPlanner, Renumber
from predtrace.sidecar._shipstate import Plan, ShipState
from predtrace.sidecar.pipeline import (
    Clock,
    PermanentExportError,
    RateLimitedLog,
    RetryableExportError,
    SystemClock,
)
from predtrace.sidecar.spool import FaultPoints, FileLayer, Spool
from predtrace.wire import IngestAck

# Imported from here, wherever they are defined.
__all__ = [
    "BatchSender",
    "Renumber",
    "Shipper",
    "ShipperCounters",
    "Sleep",
    "counts_against_batch",
    "seq_reused",
]

_log = logging.getLogger("predtrace.sidecar.shipper")


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
        self._config = config
        self.counters = ShipperCounters()
        # Failed attempts in a row, over batches: only an ack resets the
        # backoff, so an outage is not hammered afresh by each new batch.
        self._retries = 0
        # Set by a 409 renumbering, cleared by the next ack: a second 409
        # before any ack quarantines the batch instead of switching again.
        self._renumbered = False
        fresh = spool.state_lost or fresh_numbering
        self._marks = ShipMarks(spool, ShipState.decode(b"" if fresh else spool.meta))
        self._planner = BatchPlanner(
            self._marks,
            spool,
            config,
            counters=self.counters,
            producer_id=producer_id,
            renumber=renumber,
        )
        self._spool = spool
        self._sender = sender
        self._clock = clock or SystemClock()
        self._faults = faults or FaultPoints()
        self._pacing = ShipPacing(config.retry, self._clock, sleep, seed)
        self._log = RateLimitedLog(_log)
        self._outcomes = BatchOutcomes(
            self._marks,
            self.counters,
            self._clock,
            files=files,
            spool=spool.config,
            cap=config.quarantine_max_bytes,
        )
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._prefetch: asyncio.Task[Plan | None] | None = None

    @property
    def config(self) -> ShipperConfig:
        """The settings, read-only: its parts took theirs when it was built."""
        return self._config

    @property
    def next_seq(self) -> int:
        """The seq the next new batch gets."""
        return self._marks.state.next_seq

    @property
    def producer_id(self) -> str:
        """The producer id batches go under (a 409 moves it to a derived one)."""
        return self._planner.producer_id

    @property
    def oldest_unsent_ns(self) -> int:
        """When the oldest record not yet acknowledged was recorded (0: none waits)."""
        return self._planner.oldest_unsent_ns

    # -- the loop -------------------------------------------------------------------

    async def run(self) -> None:
        """Ship until ``stop``; returns when stopped (never raises for delivery errors)."""
        self._loop = asyncio.get_running_loop()
        self._spool.add_listener(self._on_data)
        await self._outcomes.scan()
        try:
            await self._loop_until_stopped()
        finally:
            if self._prefetch is not None:
                self._prefetch.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await self._prefetch
        try:
            await self._marks.persist_if_dirty()
        except OSError as exc:  # the next start resends from the older mark: duplicates only
            _log.error("could not write the spool state at stop: %s", exc.strerror or exc)

    async def _loop_until_stopped(self) -> None:
        failures = 0
        while not self._pacing.stopping:
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
                await self._pacing.wait_to_retry(failures - 1)

    async def _step(self) -> None:
        plan = self._marks.state.plan
        if plan is not None and plan.body is None:
            await self._resume(plan)  # persisted by an earlier run: rebuild it first
            return
        if plan is None:
            plan = await self._next_plan()
        if plan is None:
            await self._marks.persist_if_dirty()
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
            self._pacing.deadline = self._clock.monotonic() + drain_timeout
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained(), drain_timeout)
        self._pacing.stop()
        self._wake.set()

    async def _drained(self) -> None:
        while True:
            await self._idle.wait()
            if self._spool.stats().records == 0 and self._marks.state.plan is None:
                return
            await asyncio.sleep(0.05)

    # -- planning -------------------------------------------------------------------

    async def _next_plan(self) -> Plan | None:
        planner = self._planner
        plan = await self._take_prefetched()
        if plan is None:
            records = await planner.read()
            if not records:
                planner.oldest_unsent_ns = 0
                return None
            planner.oldest_unsent_ns = records[0].ts_ns
            full = planner.limits.full(records)
            if not full and self._config.linger > 0 and self._pacing.deadline is None:
                # What was delivered is marked in the spool before the wait,
                # not after it: the depth is right meanwhile, and a crash in
                # the wait resends nothing already delivered.
                await self._marks.persist_if_dirty()
                await self._pacing.pause(self._config.linger)
                if self._pacing.stopping:
                    return None
                records = await planner.read()
            plan = await planner.build_next(records)
        await planner.put_in_flight(plan)
        return plan

    async def _take_prefetched(self) -> Plan | None:
        task, self._prefetch = self._prefetch, None
        if task is None:
            return None
        try:
            plan = await task
        except OSError:
            return None
        marks = self._marks
        if plan is None or plan.seq != marks.state.next_seq or plan.first <= marks.hwm:
            return None
        return plan

    async def _drop_prefetch(self) -> None:
        """Forget the batch built ahead: it is numbered and chained after one not sent."""
        task, self._prefetch = self._prefetch, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task

    async def _resume(self, plan: Plan) -> None:
        """Rebuild the persisted plan byte for byte, or quarantine it if it crash-loops."""
        poisoned = await self._planner.resume(plan)
        if poisoned is not None:
            # Quarantine the rebuilt bytes: the persisted plan has no payload,
            # and the quarantine file is the only copy once the marks move on.
            reason = f"the sidecar died {poisoned.replays} times building or sending it"
            await self._outcomes.quarantine(poisoned, reason)

    # -- sending --------------------------------------------------------------------

    async def _ship(self, plan: Plan) -> None:
        assert plan.body is not None  # noqa: S101 - plans in memory always carry their body
        self._marks.hold(max(self._marks.held, plan.last))
        if self._prefetch is None:
            self._prefetch = asyncio.create_task(self._planner.prebuild(plan))
        failures = 0
        while not self._pacing.stopping:
            self._faults.hit("shipper.before_send")
            try:
                ack = await attempt(
                    self._sender,
                    plan,
                    compressed=self._config.compress,
                    on_the_wire=self._clear_replays,
                )
            except asyncio.CancelledError:
                # Cancelled at the drain deadline (SIGTERM): a stop, not a
                # crash while sending, so it must not count toward poison.
                if plan.replays:
                    plan.replays = 0
                    with contextlib.suppress(OSError):
                        await self._marks.persist()
                raise
            except RetryableExportError as exc:
                counted = await self._failed(plan, exc, failures)
                if counted is None:
                    return
                failures = counted
                continue
            except PermanentExportError as exc:
                await self._refused(plan, exc)
                return
            self._faults.hit("shipper.after_ack")
            self._complete(plan, ack)
            return

    async def _failed(self, plan: Plan, exc: RetryableExportError, failures: int) -> int | None:
        """After a failed attempt, back off; the failures counted against the batch so far.

        None: the batch was quarantined, or the shipper is stopping (it stays spooled).
        """
        if plan.replays:
            plan.replays = 0  # it did not kill us: not a crash loop
            await self._marks.persist()
        against = await against_batch(self._sender, exc)
        failures += against
        if failures >= self._config.poison_attempts:
            await self._outcomes.quarantine(plan, f"{failures} failed attempts: {exc}")
            return None
        self._note_retry(exc)
        if counts_against_batch(exc) and not against:
            self.counters.last_error += " (and the collector is not ready: an outage)"
        if not await self._pacing.backoff(self._retries, exc.retry_after):
            return None
        self._retries += 1
        return failures

    def _complete(self, plan: Plan, ack: IngestAck) -> None:
        self._outcomes.acknowledged(plan, ack)
        self._retries = 0
        self._renumbered = False

    async def _clear_replays(self, plan: Plan) -> None:
        plan.replays = 0
        try:
            await self._marks.persist()
        except OSError as exc:  # the count stays durable: a later death may count, no loss
            self._log.warning("state", "could not mark the batch as sent: %s", exc.strerror)

    def _note_retry(self, exc: RetryableExportError) -> None:
        self.counters.retried += 1
        self.counters.last_error = str(exc)
        self._log.warning("retry", "delivery to the collector failed, retrying: %s", exc)

    # -- refusals about the batch's size or numbering, not its content ----------------

    async def _refused(self, plan: Plan, exc: PermanentExportError) -> None:
        """The collector refused the batch for good: split it, renumber, or quarantine it."""
        refused_large = too_large(exc)
        if refused_large and plan.events > 1:
            await self._split(plan, exc)
        elif seq_reused(exc) and not self._renumbered:
            # The prefetched batch is numbered under the old producer id.
            await self._drop_prefetch()
            await self._planner.renumber(exc)
            self._renumbered = True
        elif refused_large:
            await self._outcomes.quarantine(plan, f"{exc} (one event, too large on its own)")
        else:
            await self._outcomes.quarantine(plan, str(exc))

    async def _split(self, plan: Plan, exc: PermanentExportError) -> None:
        """Send again, under the same seq, the first part of a batch refused as too large."""
        records = await self._planner.learn_limit(plan, exc)
        # The prefetched batch is numbered and chained after the refused one.
        await self._drop_prefetch()
        await self._planner.split(plan, records)
