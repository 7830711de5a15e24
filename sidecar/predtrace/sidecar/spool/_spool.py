"""The durable spool: where the sidecar keeps every event it acknowledged until delivered.

Intake -> **spool** -> shipper. Appends go to one writer thread that writes
each group of appends, fsyncs once (group commit) and only then completes
them, so an acknowledgement always follows the fsync (RELIABILITY rule 1).
The shipper reads records in order (never past the last fsync) and, once the
collector has them, commits a new high-water mark: the mark is made durable
first and only then are fully delivered segments unlinked (rule 2). At the
byte cap the oldest segments are dropped and counted, never those the
shipper has pinned (see ``SpoolWriter``: the segment files stay within the
cap plus the pinned segments). A sealed segment
that vanishes or shrinks while the spool runs is dropped from the reads and
its undelivered records counted (``missing_segment``, ``corrupt``); the index
is a cache, so a disk too full to rewrite it stops nothing.

One sidecar per spool: the directory itself is locked (``flock`` on its own
descriptor), so no file anyone could delete holds the lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import posixpath
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from predtrace.sidecar._errors import SpoolUnusableError
from predtrace.sidecar.pipeline import Clock, SystemClock
from predtrace.sidecar.spool._config import SpoolConfig, SpoolCounters
from predtrace.sidecar.spool._files import (
    NO_FAULTS,
    NO_ROOM,
    FaultPoints,
    FileLayer,
    OsFileLayer,
)
from predtrace.sidecar.spool._meta import (
    SegmentMeta,
    SpoolState,
    read_index,
    read_state,
    write_index,
    write_state,
)
from predtrace.sidecar.spool._reader import SegmentReader
from predtrace.sidecar.spool._record import Record
from predtrace.sidecar.spool._segments import (
    Segment,
    load_segments,
    scan_segment,
    segment_name,
)
from predtrace.sidecar.spool._writer import SpoolWriter, _Request

_log = logging.getLogger("predtrace.sidecar.spool")
_LOCK_NAME: Final = "lock"
# flock on a directory descriptor fails with these where a filesystem (NFS)
# cannot lock directories: a lock file is the fallback there.
_NO_DIR_LOCK: Final = frozenset({errno.EBADF, errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP})


@dataclass(frozen=True, slots=True)
class SpoolStats:
    """A consistent view of the spool for status and metrics."""

    records: int
    bytes: int
    segments: int
    hwm: int
    next_index: int
    byte_cap: int
    pending_bytes: int


class Spool(SpoolWriter):
    """Segment files of checksummed records, a durable high-water mark, a byte cap.

    Example:
        >>> spool = Spool.open(SpoolConfig(directory="/var/lib/predtrace/spool"))
        >>> indexes = await spool.append([event_bytes])   # durable when it returns
        >>> records = spool.read(spool.hwm, max_records=1000, max_bytes=1 << 20)
        >>> spool.commit(records[-1].index, b"")          # delivered up to there
    """

    def __init__(
        self,
        config: SpoolConfig,
        files: FileLayer,
        faults: FaultPoints,
        clock: Clock,
    ) -> None:
        self.config = config
        self.counters = SpoolCounters()
        self.state_lost = False
        self._files = files
        self._faults = faults
        self._clock = clock
        self._dir = config.directory
        self._lock = threading.RLock()
        self._index_lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._cond = threading.Condition(threading.Lock())
        self._pending: list[_Request] = []
        self._pending_bytes = 0
        self._closing = False
        self._crashed = False
        self._listeners: list[Callable[[], None]] = []
        self._segments: list[Segment] = []
        self._state = SpoolState()
        self._pin: tuple[int, int] | None = None
        self._read_reach = 0
        self._handle = -1
        self._next_index = 1
        self._lock_fd: int | None = None
        self._reader = SegmentReader(files, config, self.counters, self._segment_cut)
        self._thread = threading.Thread(target=self._run, name="predtrace-spool", daemon=True)

    # -- opening and recovery ---------------------------------------------------

    @classmethod
    def open(
        cls,
        config: SpoolConfig,
        *,
        files: FileLayer | None = None,
        faults: FaultPoints | None = None,
        clock: Clock | None = None,
    ) -> Spool:
        """Open (creating or recovering) the spool and start its writer.

        Raises:
            SpoolUnusableError: the directory cannot be used; the message names
                the path and the reason.
        """
        spool = cls(config, files or OsFileLayer(), faults or NO_FAULTS, clock or SystemClock())
        try:
            spool._recover()
        except OSError as exc:
            spool._unlock()
            reason = exc.strerror or type(exc).__name__
            where = exc.filename or config.directory
            if isinstance(exc, FileExistsError):  # makedirs on a path that is a file
                reason = "exists and is not a directory"
            raise SpoolUnusableError(
                f"spool directory {config.directory} is unusable: {where}: {reason}"
            ) from None
        spool._thread.start()
        return spool

    def _recover(self) -> None:
        files, directory = self._files, self._dir
        files.makedirs(directory)
        self._lock_directory()
        state, bad = read_state(files, directory)
        self.counters.add("state_slots_bad", bad)
        index = read_index(files, directory)
        hwm = state.hwm if state is not None else 0
        segments, tail, tail_lost = load_segments(
            files, directory, self.config, self.counters, index, hwm=hwm
        )
        if state is None and bad:
            # Both state slots unreadable: the mark and the shipper's numbering
            # are unknown. Replay everything still on disk (duplicates, never
            # loss) and let the shipper start a fresh numbering.
            self.state_lost = True
            _log.error("spool state in %s is unreadable; replaying every segment", directory)
        self._state = state or SpoolState()
        self._count_missing(index, segments)
        for seg in segments:
            if seg.scanned:
                self._reader.mark_counted(seg.path, seg.size)
        self._segments = segments
        self._open_active(tail, tail_lost)
        # A plan persisted by an earlier run may hold any record on disk.
        self._read_reach = self._next_index - 1
        self._release()
        self._write_index()

    def _lock_directory(self) -> None:
        """Hold an exclusive flock on the directory for as long as the spool is open.

        A lock file could be unlinked while held, letting a second sidecar
        lock a new one; the directory cannot be, short of removing the spool.
        """
        if not isinstance(self._files, OsFileLayer):
            return
        fd = os.open(self._dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            self._flock(fd)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in _NO_DIR_LOCK:
                raise
            fd = os.open(posixpath.join(self._dir, _LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                self._flock(fd)
            except OSError:
                os.close(fd)
                raise
        self._lock_fd = fd

    def _flock(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OSError(errno.EBUSY, "in use by another sidecar process", self._dir) from None

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _count_missing(self, index: dict[int, SegmentMeta] | None, present: list[Segment]) -> None:
        firsts = {s.first for s in present}
        for meta in (index or {}).values():
            if meta.first not in firsts and meta.last > self._state.hwm:
                lost = Segment.from_meta(self._dir, meta).unacked(self._state.hwm)
                self.counters.drop("missing_segment", lost)
                _log.error(
                    "spool segment %s is missing with %d undelivered records",
                    segment_name(meta.first),
                    lost,
                )

    def _open_active(self, tail: int, tail_lost: int) -> None:
        """Open the last segment for appending, cutting an invalid tail off it.

        ``tail_lost``: records the segment lost from its end by the row a
        clean close wrote for it (already counted as ``corrupt``): the file
        was cut or damaged after the close, and those records had been
        acknowledged. Without a row, an invalid tail is a write torn by a
        crash: one record, never acknowledged.
        """
        hwm = self._state.hwm
        if not self._segments:
            first = hwm + 1
            path = posixpath.join(self._dir, segment_name(first))
            self._segments.append(Segment(first, path, first - 1, 0, 0, 0, 0, first - 1))
        active = self._segments[-1]
        self._handle = self._files.open(active.path, create=True)
        if tail:
            # A torn tail (rule 3): cut back to the last valid record.
            self._files.truncate(self._handle, active.size)
            self._files.fsync(self._handle)
            if tail_lost:
                _log.warning(
                    "spool: cut %d damaged bytes from %s (its %d lost records are counted)",
                    tail,
                    active.path,
                    tail_lost,
                )
            else:
                # A crash tore the write in progress: those records were
                # never fsynced, so never acknowledged.
                self.counters.drop("torn", 1)
                _log.warning(
                    "spool: cut a torn tail of %d bytes from %s (at least one record that "
                    "was being written when the sidecar stopped)",
                    tail,
                    active.path,
                )
        self._files.fsync_dir(self._dir)
        self._next_index = max(active.last + 1, hwm + 1, active.first)

    # -- reading and acknowledging ------------------------------------------------

    def read(
        self, after: int, *, max_records: int, max_bytes: int, until: int | None = None
    ) -> list[Record]:
        """Durable records with index > ``after`` in order (blocking: call from a thread).

        Damaged records are skipped (and counted); records dropped at the cap
        are simply absent, and so are those of a sealed segment deleted or cut
        short meanwhile (counted). Stops at ``max_records``, before the record
        that would bring the payloads past ``max_bytes`` (the first one is
        read whatever its size), or after index ``until``.
        """
        out: list[Record] = []
        total = 0
        while len(out) < max_records and total < max_bytes:
            if until is not None and after >= until:
                break
            seg = self._segment_after(after)
            if seg is None:
                break
            try:
                records = self._reader.read(
                    seg,
                    after,
                    max_records=max_records - len(out),
                    max_bytes=max_bytes - total,
                    until=until,
                    taken_before=bool(out),
                )
            except FileNotFoundError:
                if not self._forget_missing(seg, after):
                    raise  # the active segment: nothing to move on to
                after = max(after, seg.durable_last)
                continue
            if not records:
                if out:
                    break  # the next record would pass max_bytes (or this segment is damaged)
                after = max(after, seg.durable_last)
                continue
            out.extend(records)
            total += sum(len(r.payload) for r in records)
            after = records[-1].index
        return out

    def _forget_missing(self, seg: Segment, after: int) -> bool:
        """A sealed segment vanished: stop listing it and count what it still held.

        Records up to ``after`` (the reader has them) or the mark are not lost.
        Returns False for the active segment, which the writer still holds.
        """
        with self._lock:
            listed = self._listed(seg.first)
            if listed is self._segments[-1]:
                return False
            if listed is None:
                return True  # released or dropped at the cap meanwhile: accounted for there
            self._segments.remove(listed)
            lost = listed.unacked(max(after, self._state.hwm))
        self.counters.drop("missing_segment", lost)
        _log.error("spool segment %s vanished with %d undelivered records", seg.path, lost)
        self._write_index()
        return True

    def _segment_cut(self, seg: Segment, after: int) -> None:
        """A sealed segment's file got shorter: count the records it lost, list its new end.

        Records up to ``after`` (the reader has them) or the mark are not lost.
        The index is rewritten so that a restart does not count them again.
        """
        fresh, tail = scan_segment(
            self._files, self._dir, seg.first, self.config, SpoolCounters(), log_damage=False
        )
        with self._lock:
            listed = self._listed(seg.first)
            size = fresh.size + tail
            if listed is None or listed is self._segments[-1] or size >= listed.durable_size:
                return  # gone, active (the writer's), or already counted
            lost = max(0, listed.durable_last - max(fresh.last, after, self._state.hwm))
            listed.size = listed.durable_size = size
            listed.last = listed.durable_last = fresh.last
            listed.count = fresh.count
        self.counters.add("corrupt_regions")
        self.counters.drop("corrupt", lost)
        _log.error("spool segment %s was cut short, losing %d undelivered records", seg.path, lost)
        self._write_index()

    def _listed(self, first: int) -> Segment | None:
        """The listed segment that starts at ``first`` (call with ``_lock`` held)."""
        return next((s for s in self._segments if s.first == first), None)

    def _segment_after(self, after: int) -> Segment | None:
        """A copy of the first segment with durable records past ``after``.

        Taken with the cap's lock, which also moves ``_read_reach`` over the
        records the read may return: an open pin covers them from here on,
        so the cap either dropped the segment before (the read skips it) or
        keeps it.
        """
        with self._lock:
            for seg in self._segments:
                if seg.durable_last > after:
                    self._read_reach = max(self._read_reach, seg.durable_last)
                    return Segment(
                        seg.first,
                        seg.path,
                        seg.last,
                        seg.count,
                        seg.size,
                        seg.first_ts,
                        seg.durable_size,
                        seg.durable_last,
                    )
        return None

    def pin(self, span: tuple[int, int] | None) -> None:
        """Protect the segments holding indexes ``span`` (the batch in flight) from the cap.

        A span ending past the last record written (the shipper's pin while a
        read is under way) protects what reads have reached, not what is
        written after them.
        """
        with self._lock:
            self._pin = span

    @property
    def hwm(self) -> int:
        """Every record index <= hwm is delivered."""
        return self._state.hwm

    @property
    def meta(self) -> bytes:
        """The shipper's bytes saved with the last commit."""
        return self._state.meta

    def commit(self, hwm: int, meta: bytes) -> None:
        """Durably record a new high-water mark (with the shipper's bytes), then release.

        Blocking: call from a thread. Segments wholly at or below the mark are
        unlinked only after the mark is durable.
        """
        with self._commit_lock:
            state = SpoolState(self._state.generation + 1, hwm, meta)
            write_state(self._files, self._dir, state)
            self._state = state
            self._faults.hit("state.after_write")
            self._release()

    def _release(self) -> None:
        with self._lock:
            victims = [s for s in self._segments[:-1] if s.last <= self._state.hwm]
            for seg in victims:
                self._segments.remove(seg)
        self._unlink(victims)

    def _unlink(self, victims: list[Segment]) -> None:
        for seg in victims:
            # Already gone is normal (rule 2): a delivered segment may vanish first.
            with contextlib.suppress(FileNotFoundError):
                self._files.unlink(seg.path)
            self._faults.hit("release.after_unlink")
        if victims:
            self._files.fsync_dir(self._dir)
            self._write_index()

    def _write_index(self, *, with_active: bool = False) -> None:
        """Rewrite the index; without room for it, keep going (it is a cache, rule 5).

        ``with_active`` (a clean close): the active segment gets a row too, so
        the next start can count the records it loses if the file is cut or
        damaged in between. The start rewrites the index without it: after a
        crash, an invalid tail is a torn write, never acknowledged.
        """
        with self._index_lock:
            with self._lock:
                metas = [s.meta() for s in self._segments[:-1]]
                active = self._segments[-1] if self._segments else None
                if with_active and active is not None and active.size == active.durable_size:
                    metas.append(active.meta())
            try:
                write_index(self._files, self._dir, metas, self._faults)
            except OSError as exc:
                if exc.errno not in NO_ROOM:
                    raise
                # The next start checks the old index against the files and
                # rescans what does not match: nothing is lost, only time.
                _log.warning("spool index not rewritten: %s", exc.strerror or exc)

    # -- status and shutdown ------------------------------------------------------

    def stats(self) -> SpoolStats:
        """Records waiting, bytes on disk and the marks."""
        with self._lock:
            hwm = self._state.hwm
            return SpoolStats(
                records=sum(s.unacked(hwm) for s in self._segments),
                bytes=sum(s.size for s in self._segments),
                segments=len(self._segments),
                hwm=hwm,
                next_index=self._next_index,
                byte_cap=self.config.max_bytes,
                pending_bytes=self._pending_bytes,
            )

    def close(self, timeout: float = 30.0) -> None:
        """Finish queued writes, write the index, release the directory. Safe twice."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        try:
            if not self._crashed:
                self._write_index(with_active=True)
            self._files.close(self._handle)
        except (OSError, KeyError):
            pass  # the index is a cache; recovery rebuilds it
        self._unlock()
