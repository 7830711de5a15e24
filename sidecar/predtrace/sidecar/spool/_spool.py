"""The durable spool: where the sidecar keeps every event it acknowledged until delivered.

Intake -> **spool** -> shipper. Appends go to one writer thread that writes
each group of appends, fsyncs once (group commit) and only then completes
them, so an acknowledgement always follows the fsync (RELIABILITY rule 1;
see ``SpoolWriter``). The shipper reads records in order (never past the
last fsync; see ``SpoolReads``) and, once the collector has them, commits a
new high-water mark: the mark is made durable first and only then are fully
delivered segments unlinked (rule 2). At the byte cap the oldest segments
are dropped and counted, never those the shipper has pinned (see
``ByteCap``: the segment files stay within the cap plus the pinned
segments). A sealed segment that vanishes or shrinks while the spool runs
is dropped from the reads and its undelivered records counted
(``missing_segment``, ``corrupt``); the index is a cache, so a disk too
full to rewrite it stops nothing.

One sidecar per spool: the directory itself is locked (``flock`` on its own
descriptor, see ``_directory_lock``), so no file anyone could delete holds
the lock. Recovery at start scans the segments (``_segments``) and reopens
the active one (``_recovery``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

from predtrace.sidecar._errors import SpoolUnusableError
from predtrace.sidecar.pipeline import Clock, SystemClock
from predtrace.sidecar.spool._config import SpoolConfig, SpoolCounters
from predtrace.sidecar.spool._directory_lock import lock_directory
from predtrace.sidecar.spool._files import (
    NO_FAULTS,
    NO_ROOM,
    FaultPoints,
    FileLayer,
    OsFileLayer,
)
from predtrace.sidecar.spool._meta import (
    SpoolState,
    read_index,
    read_state,
    write_index,
    write_state,
)
from predtrace.sidecar.spool._reader import SegmentReader
from predtrace.sidecar.spool._reads import SpoolReads
from predtrace.sidecar.spool._recovery import count_missing, open_active
from predtrace.sidecar.spool._segments import Segment, load_segments
from predtrace.sidecar.spool._writer import SpoolWriter, _Request

_log = logging.getLogger("predtrace.sidecar.spool")


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


class Spool(SpoolReads, SpoolWriter):
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
        count_missing(directory, index, segments, self._state.hwm, self.counters)
        for seg in segments:
            if seg.scanned:
                self._reader.mark_counted(seg.path, seg.size)
        self._segments = segments
        self._handle, self._next_index = open_active(
            files,
            directory,
            self._segments,
            hwm=self._state.hwm,
            tail=tail,
            tail_lost=tail_lost,
            counters=self.counters,
        )
        # A plan persisted by an earlier run may hold any record on disk.
        self._read_reach = self._next_index - 1
        self._release()
        self._write_index()

    def _lock_directory(self) -> None:
        """Hold the directory's lock for as long as the spool is open (the real disk only)."""
        if isinstance(self._files, OsFileLayer):
            self._lock_fd = lock_directory(self._dir)

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- acknowledging ------------------------------------------------------------

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
