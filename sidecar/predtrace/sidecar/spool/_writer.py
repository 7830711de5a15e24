"""The spool's writer: one thread, group commit and rotation.

Intake -> **writer** -> segment files. Appends queue here (bounded by bytes);
the thread writes each group with one ``pwrite`` per segment, fsyncs once and
only then completes the appends, so an acknowledgement always follows the
fsync (RELIABILITY rule 1). A failed write (disk full) is rolled back to the
last fsync and reported to every append of the group that was not durable.

Rotation: an append that does not fit in the room left in the active
segment, but would in an empty one, begins a new segment; an append bigger
than a whole segment fills the active one and goes on in new ones, record
by record (a record is never split), so no segment passes
``segment_bytes`` unless a single record does. Before each write the byte
cap (``ByteCap``) drops the oldest sealed segments to make room, and
refuses an append it cannot hold before any of it is written. An append
split across segments that fails in a later one is refused, yet its
records in the earlier, fsynced segments stay spooled: at least once, the
sender's retry may deliver them twice. An append that fits in a segment is
never split, so it is refused whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import posixpath
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from predtrace.sidecar._errors import (
    EventTooLargeError,
    SpoolBusyError,
    SpoolClosedError,
    SpoolError,
    SpoolFullError,
)
from predtrace.sidecar.spool._byte_cap import ByteCap
from predtrace.sidecar.spool._files import NO_ROOM, FaultPoints, SimulatedCrash
from predtrace.sidecar.spool._record import HEADER_SIZE, encode_record
from predtrace.sidecar.spool._segments import Segment, segment_name

# The write failed for lack of room: a full disk, a quota, a file-size limit.
# A refused write is logged at once, then at most this often (with a count).
_FAIL_LOG_INTERVAL_S: Final = 60.0
_log = logging.getLogger("predtrace.sidecar.spool")
Callback = Callable[[range | BaseException], None]


@dataclass(slots=True)
class _Request:
    payloads: Sequence[bytes]
    callback: Callback
    nbytes: int
    settled: bool = False

    def settle(self, result: range | BaseException) -> None:
        self.settled = True
        self.callback(result)


class SpoolWriter(ByteCap):
    """The writing half of ``Spool`` (a base class: the state lives on the spool)."""

    _faults: FaultPoints
    _cond: threading.Condition
    _pending: list[_Request]
    _pending_bytes: int
    _closing: bool
    _crashed: bool
    _listeners: list[Callable[[], None]]
    _handle: int
    last_refusal: tuple[int, str] | None = None
    """(wall-clock ns, reason) of the latest write refused (disk full, busy, I/O error)."""
    _fail_logged_at: float = -_FAIL_LOG_INTERVAL_S
    _fail_unlogged: int = 0

    # -- appending ----------------------------------------------------------------

    def submit(self, payloads: Sequence[bytes], callback: Callback) -> None:
        """Queue records for the writer; ``callback`` gets their index range once durable.

        The callback runs in the writer thread with a ``range`` or an error
        (SpoolFullError when the disk is full, SpoolError otherwise).

        Raises:
            EventTooLargeError: a payload is over ``max_record_bytes``.
            SpoolFullError: the records together are more than the byte cap
                (``max_bytes``) holds: refused whole, it would never fit.
            SpoolBusyError: too many bytes are already waiting for the writer.
            SpoolClosedError: the spool is closing.
        """
        limit = self.config.max_record_bytes
        if any(len(p) > limit for p in payloads):
            raise EventTooLargeError(f"event larger than {limit} bytes")
        nbytes = sum(len(p) for p in payloads) + HEADER_SIZE * len(payloads)
        cap = self.config.max_bytes
        if nbytes > cap:
            # Written, part of it would be dropped at the cap before the
            # acknowledgement: refused, with what to do about it.
            raise self._over_cap(
                f"{len(payloads)} events ({nbytes} bytes spooled) are more than the spool's "
                f"byte cap of {cap} bytes (--spool-max-bytes) holds: send them in smaller "
                "batches, or raise --spool-max-bytes"
            )
        with self._cond:
            if self._closing or self._crashed:
                raise SpoolClosedError("the spool is closed")
            if self._pending and self._pending_bytes + nbytes > self.config.pending_limit:
                self.counters.add("busy")
                self.last_refusal = (self._clock.time_ns(), "the spool writer is behind (busy)")
                raise SpoolBusyError("the spool writer is behind; retry shortly")
            self._pending.append(_Request(payloads, callback, nbytes))
            self._pending_bytes += nbytes
            self._cond.notify()

    async def append(self, payloads: Sequence[bytes]) -> range:
        """Append records and wait until they are durable; return their indexes.

        Raises:
            SpoolError: see ``submit``; also SpoolFullError when the disk is full.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[range] = loop.create_future()

        def done(result: range | BaseException) -> None:
            # A closed loop raises: nobody waits for the answer any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, future, result)

        self.submit(payloads, done)
        return await future

    def append_sync(self, payloads: Sequence[bytes], timeout: float = 30.0) -> range:
        """Blocking ``append`` for threads and tests."""
        box: list[range | BaseException] = []
        ready = threading.Event()

        def done(result: range | BaseException) -> None:
            box.append(result)
            ready.set()

        self.submit(payloads, done)
        deadline = time.monotonic() + timeout
        while not ready.wait(0.02):
            if self._crashed:
                raise SpoolClosedError("the spool writer stopped")
            if time.monotonic() > deadline:
                raise SpoolError("the spool write did not finish in time")
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` (from the writer thread) after each durable commit."""
        self._listeners.append(listener)

    @property
    def pending_bytes(self) -> int:
        """Bytes waiting for the writer."""
        return self._pending_bytes

    # -- the writer thread --------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return
                if self.config.commit_delay and not self._closing:
                    self._cond.wait(self.config.commit_delay)
                group, self._pending, self._pending_bytes = self._pending, [], 0
            try:
                self._commit_group(group)
            except SimulatedCrash:
                with self._cond:
                    self._crashed = True
                return

    def _commit_group(self, group: list[_Request]) -> None:
        done: list[tuple[_Request, range]] = []
        chunk: list[bytes] = []
        chunk_bytes = 0
        # The cap drops no segment holding a record of this group: its
        # appends are acknowledged as its writes complete, and a record
        # dropped while its group commits would be acknowledged already lost.
        hold_from = self._next_index
        deferred: list[_Request] = []
        try:
            for request in group:
                if deferred:  # in turn: the rest waits with it
                    deferred.append(request)
                    continue
                fresh = self._begins_segment(
                    request.payloads, request.nbytes, chunk_bytes, hold_from
                )
                if fresh is None:
                    if done or chunk:
                        # The group's earlier appends take the room: the next
                        # group's first, once these are durable.
                        deferred.append(request)
                    else:  # no room for it alone now
                        self._refuse_over_cap(request)
                    continue
                if fresh:
                    # Begin the append in a new segment: split only if it must be.
                    self._flush(chunk, done, hold_from)
                    chunk, chunk_bytes = [], 0
                    self._rotate()
                first = self._next_index
                ts_ns = self._clock.time_ns()
                for payload in request.payloads:
                    size = HEADER_SIZE + len(payload)
                    if not self._fits(chunk_bytes, size):
                        # Bigger than a segment: the records so far are written
                        # and fsynced; the append completes with its last part.
                        self._flush(chunk, done, hold_from)
                        chunk, chunk_bytes = [], 0
                        self._rotate()
                    chunk.append(encode_record(self._next_index, ts_ns, payload))
                    self._next_index += 1
                    chunk_bytes += size
                done.append((request, range(first, self._next_index)))
            self._flush(chunk, done, hold_from)
        except OSError as exc:
            self._fail(group, exc)
            return
        if deferred:
            with self._cond:
                self._pending[:0] = deferred
                self._pending_bytes += sum(request.nbytes for request in deferred)
                self._cond.notify()

    def _refuse_over_cap(self, request: _Request) -> None:
        """Refuse an append the cap has no room for now (none of it written)."""
        request.settle(
            self._over_cap(
                f"the spool's byte cap of {self.config.max_bytes} bytes (--spool-max-bytes) has "
                f"no room now for {len(request.payloads)} more events ({request.nbytes} bytes): "
                "the appends being written and the batch being delivered hold the rest; retry "
                "shortly, or send smaller batches"
            )
        )

    def _flush(
        self, chunk: list[bytes], done: list[tuple[_Request, range]], hold_from: int
    ) -> None:
        """Make room under the cap, write, fsync, then complete (the ack follows the fsync).

        ``hold_from``: the first index of the group being committed; the cap
        keeps every segment holding it or a later record.
        """
        if not chunk:
            return
        data = b"".join(chunk)
        self._enforce_cap(len(data), hold_from)
        active = self._segments[-1]
        self._files.pwrite(self._handle, data, active.size)
        self._faults.hit("append.after_write")
        self._files.fsync(self._handle)
        self._faults.hit("append.after_fsync")
        with self._lock:
            if active.count == 0:
                active.first_ts = self._clock.time_ns()
            active.count += len(chunk)
            active.size = active.durable_size = active.size + len(data)
            active.last = active.durable_last = self._next_index - 1
        self.counters.add("appended", len(chunk))
        self.counters.add("commits")
        for request, indexes in done:
            request.settle(indexes)
        done.clear()
        for listener in self._listeners:
            listener()

    def _fail(self, group: list[_Request], exc: OSError) -> None:
        """Roll back to the last fsync and fail every request not yet durable."""
        active = self._segments[-1]
        # If even the truncate fails, CRCs and the torn-tail scan still keep a
        # half record from ever being read.
        with contextlib.suppress(OSError):
            self._files.truncate(self._handle, active.durable_size)
        active.size = active.durable_size
        self._next_index = max(active.durable_last + 1, self._state.hwm + 1)
        if exc.errno in NO_ROOM:
            self.counters.add("disk_full")
            error: SpoolError = SpoolFullError("the disk under the spool is full; retry later")
        else:
            self.counters.add("write_errors")
            error = SpoolError(f"spool write failed: {exc.strerror or type(exc).__name__}")
        self.last_refusal = (self._clock.time_ns(), str(error))
        self._log_failure(error)
        for request in group:
            if not request.settled:
                request.settle(error)

    def _log_failure(self, error: SpoolError) -> None:
        """Log a refused write: the first at once, then at most once a minute, with a count.

        A full disk refuses every append until room returns: one line each
        would flood the log (the refusals are counted, and shown in the status).
        """
        now = time.monotonic()
        if now - self._fail_logged_at < _FAIL_LOG_INTERVAL_S:
            self._fail_unlogged += 1
            return
        unlogged, self._fail_unlogged = self._fail_unlogged, 0
        self._fail_logged_at = now
        more = f" ({unlogged} more refused since the last report)" if unlogged else ""
        _log.error("spool write failed: %s%s", error, more)

    def _rotate(self) -> None:
        first = self._next_index
        path = posixpath.join(self._dir, segment_name(first))
        handle = self._files.open(path, create=True)
        # The new entry must be durable before any record in it is acknowledged.
        self._files.fsync_dir(self._dir)
        self._faults.hit("rotate.after_create")
        with self._lock:
            old, self._handle = self._handle, handle
            self._segments.append(Segment(first, path, first - 1, 0, 0, 0, 0, first - 1))
        self._files.close(old)
        self._write_index()


def _settle(future: asyncio.Future[range], result: range | BaseException) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
