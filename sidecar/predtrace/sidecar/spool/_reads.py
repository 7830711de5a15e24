"""The spool's read side: records in order for the shipper, and the pin on its batch.

Spool -> **reads** -> shipper. The shipper reads durable records in order
(never past the last fsync) one segment at a time through a
``SegmentReader``, and pins the batch in flight so that the byte cap keeps
its segments. A sealed segment that vanishes or shrinks while the spool runs
is dropped from the reads and its undelivered records counted
(``missing_segment``, ``corrupt``), and the index is rewritten so that a
restart does not count them again.
"""

from __future__ import annotations

import logging

from predtrace.sidecar.spool._config import SpoolCounters
from predtrace.sidecar.spool._reader import SegmentReader
from predtrace.sidecar.spool._record import Record
from predtrace.sidecar.spool._segments import Segment, scan_segment
from predtrace.sidecar.spool._table import SegmentTable

_log = logging.getLogger("predtrace.sidecar.spool")


class SpoolReads(SegmentTable):
    """The reading half of ``Spool`` (a base class: the state lives on the spool)."""

    _reader: SegmentReader

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
