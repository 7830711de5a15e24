"""The shipper: spool -> batches -> collector, in order, at least once.

Spool -> **shipper** -> ``CollectorClient``. Reads records after the
high-water mark, forms a batch by size and time, persists the plan (seq,
record span, digest) with the spool's state *before* the first send, and
retries that same byte-identical batch until the collector acknowledges it;
then it moves the high-water mark. Elapsed time never drops anything: retries
back off exponentially with full jitter up to a cap, forever. A batch the
collector refuses (400/413) or keeps failing on (500s, or a crash while
sending it on N starts in a row) is written to ``quarantine/`` and counted,
never crash-looped. A refused token (401/403) is not the batch's fault: the
batch stays spooled and is retried until an operator fixes the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import posixpath
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from predtrace.sidecar._batch import assemble_payload
from predtrace.sidecar._config import ShipperConfig
from predtrace.sidecar._shipstate import Plan, ShipState
from predtrace.sidecar.pipeline import (
    Clock,
    PermanentExportError,
    RateLimitedLog,
    RetryableExportError,
    SystemClock,
)
from predtrace.sidecar.spool import FaultPoints, FileLayer, Record, Spool
from predtrace.wire import IngestAck, batch_digest, gzip_bytes

_log = logging.getLogger("predtrace.sidecar.shipper")
# Statuses that say "the collector is busy or refuses our token", not "this
# batch is bad": they never count towards quarantining a batch.
_BUSY_STATUSES = frozenset({401, 403, 408, 425, 429, 502, 503, 504})
Sleep = Callable[[float], Awaitable[None]]
QUARANTINE_DIR = "quarantine"


class BatchSender(Protocol):
    """Sends one encoded batch (``CollectorClient`` is the real one)."""

    async def send(self, body: bytes, *, compressed: bool) -> IngestAck:
        """POST the body; raise Retryable/PermanentExportError on failure."""
        ...

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
    last_success_ns: int = 0
    last_error: str = ""
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
    ) -> None:
        self.config = config
        self.producer_id = producer_id
        self.counters = ShipperCounters()
        self.oldest_unsent_ns = 0
        self._spool = spool
        self._sender = sender
        self._files = files
        self._clock = clock or SystemClock()
        self._sleep_fn = sleep
        self._faults = faults or FaultPoints()
        self._rng = random.Random(seed)  # noqa: S311 - jitter, not secrets
        self._log = RateLimitedLog(_log)
        self._state = ShipState.decode(b"" if spool.state_lost else spool.meta)
        self._hwm = spool.hwm
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
        # Persisted as "one send started": if the sidecar dies while sending it
        # on N starts in a row, the batch is the likely cause (poison).
        plan.replays = 1
        state = self._state
        # Durable before the first send (a failed write leaves no plan behind).
        await self._commit(ShipState(state.next_seq, state.prev_digest, plan))
        return plan

    def _full(self, records: list[Record]) -> bool:
        if len(records) >= self.config.max_batch_events:
            return True
        size = sum(len(r.payload) for r in records)
        if size + self._spool.config.max_record_bytes <= self.config.max_batch_bytes:
            return False  # any next record would have fit: the read reached the end
        # The byte cap is never passed: the read may have stopped before a
        # record that did not fit, and did if the spool holds more after it.
        return records[-1].index < self._spool.stats().next_index - 1

    async def _prebuild(self, current: Plan) -> Plan | None:
        """The full batch after ``current``, built while ``current`` is on the wire."""
        records = await asyncio.to_thread(
            self._spool.read,
            current.last,
            max_records=self.config.max_batch_events,
            max_bytes=self.config.max_batch_bytes,
        )
        if not records or not self._full(records):
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

    async def _read(self, until: int | None = None) -> list[Record]:
        return await asyncio.to_thread(
            self._spool.read,
            self._hwm,
            max_records=self.config.max_batch_events,
            max_bytes=self.config.max_batch_bytes,
            until=until,
        )

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
        """Rebuild the persisted plan byte for byte, or quarantine it if it crash-loops."""
        self._spool.pin((plan.first, plan.last))
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
        if plan.replays >= self.config.poison_attempts:
            # Quarantine the rebuilt bytes: the persisted plan has no payload,
            # and the quarantine file is the only copy once the marks move on.
            rebuilt.replays = plan.replays
            await self._quarantine(rebuilt, f"the sidecar died {plan.replays} times sending it")
            return
        rebuilt.replays = plan.replays + 1
        self.oldest_unsent_ns = rebuilt.first_ts_ns
        # The count of starts is durable before this start sends (poison detection).
        state = self._state
        await self._commit(ShipState(state.next_seq, state.prev_digest, rebuilt))

    # -- sending --------------------------------------------------------------------

    async def _ship(self, plan: Plan) -> None:
        assert plan.body is not None  # noqa: S101 - plans in memory always carry their body
        self._spool.pin((plan.first, plan.last))
        if self._prefetch is None:
            self._prefetch = asyncio.create_task(self._prebuild(plan))
        failures, retry = 0, 0
        while not self._stopping:
            self._faults.hit("shipper.before_send")
            try:
                ack = await self._sender.send(plan.body, compressed=self.config.compress)
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
                failures += exc.status is not None and exc.status not in _BUSY_STATUSES
                if failures >= self.config.poison_attempts:
                    await self._quarantine(plan, f"{failures} failed attempts: {exc}")
                    return
                self._note_retry(exc)
                if not await self._backoff(retry, exc.retry_after):
                    return
                retry += 1
                continue
            except PermanentExportError as exc:
                await self._quarantine(plan, str(exc))
                return
            self._faults.hit("shipper.after_ack")
            self._complete(plan, ack)
            return

    def _note_retry(self, exc: RetryableExportError) -> None:
        self.counters.retried += 1
        self.counters.last_error = str(exc)
        self._log.warning("retry", "delivery to the collector failed, retrying: %s", exc)

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
        self._advance(plan)

    def _advance(self, plan: Plan) -> None:
        """The batch is done (delivered or quarantined): move the marks past it."""
        self._hwm = plan.last
        self._state = ShipState(plan.seq + 1, plan.digest, None)
        self._spool.pin(None)
        self._dirty = True

    async def _quarantine(self, plan: Plan, reason: str) -> None:
        name = posixpath.join(
            self._spool.config.directory, QUARANTINE_DIR, f"{plan.seq:020d}.msgpack"
        )
        try:
            await asyncio.to_thread(self._write_quarantine, name, plan.payload or b"")
        except OSError as exc:
            # The file is the batch's only copy once the marks move past it:
            # keep the batch spooled; the loop backs off and tries again.
            _log.error("could not write quarantined batch %s: %s", name, exc.strerror)
            raise
        self.counters.quarantined += 1
        self.counters.quarantined_events += plan.events
        self.counters.drop("quarantined", plan.events)
        _log.error(
            "batch seq %d (%d events) quarantined to %s: %s", plan.seq, plan.events, name, reason
        )
        self._advance(plan)
        await self._persist()

    def _write_quarantine(self, path: str, payload: bytes) -> None:
        directory = posixpath.dirname(path)
        self._files.makedirs(directory)
        handle = self._files.open(path, create=True)
        try:
            self._files.truncate(handle, 0)
            self._files.pwrite(handle, payload, 0)
            self._files.fsync(handle)
        finally:
            self._files.close(handle)
        self._files.fsync_dir(directory)

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

    async def _persist_if_dirty(self) -> None:
        if self._dirty:
            await self._persist()

    async def _pause(self, seconds: float) -> None:
        """Sleep, cut short by ``stop``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_event.wait(), seconds)
