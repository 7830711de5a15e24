"""The spool's byte cap: where an append fits, and the oldest segments dropped to make room.

Intake -> writer -> **byte cap** -> segment files. Before each write the
writer asks here whether an append begins a new segment (an append that
does not fit in the room left in the active segment, but would in an empty
one, does) and whether the cap can hold it now; then the oldest sealed
segments are dropped (counted as ``byte_cap``) until the segments plus the
write fit under ``max_bytes``. The active segment, those the shipper has
pinned and those holding records of the group being committed are never
dropped. So the segment files stay within ``max_bytes`` while nothing is
pinned; otherwise within the larger of ``max_bytes`` and the pinned
segments plus the group's.

The cap never drops a record before it is acknowledged: an append bigger
than ``max_bytes`` is refused up front, and one that would take the group's
segments past what the pinned segments leave of ``max_bytes`` (at least a
segment) is refused (SpoolFullError) before any of it is written, while the
others of its group go on. Alone in a group with nothing pinned, an append
of up to ``max_bytes`` always fits: if the earlier records in the active
segment would take it past the cap, it begins a new segment (and the cap
may then drop the old one, acknowledged earlier).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from predtrace.sidecar._errors import SpoolFullError
from predtrace.sidecar.pipeline import Clock, RateLimitedLog
from predtrace.sidecar.spool._record import HEADER_SIZE
from predtrace.sidecar.spool._segments import Segment
from predtrace.sidecar.spool._table import SegmentTable

_log = logging.getLogger("predtrace.sidecar.spool")
# At the cap a segment is dropped per segment written: one line a minute per spool.
_cap_log = RateLimitedLog(_log)


class ByteCap(SegmentTable):
    """The byte cap of ``SpoolWriter`` (a base class: the state lives on the spool)."""

    _clock: Clock
    last_refusal: tuple[int, str] | None

    def _fits(self, chunk_bytes: int, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit in the active segment (always, if it is still empty)."""
        used = self._segments[-1].size + chunk_bytes
        return used == 0 or used + nbytes <= self.config.segment_bytes

    def _begins_segment(
        self, payloads: Sequence[bytes], nbytes: int, chunk_bytes: int, hold_from: int
    ) -> bool | None:
        """Whether an append begins a new segment; None if the cap cannot hold it now.

        ``payloads``: the append's records; ``nbytes``: their size spooled.

        It does if it fits in a segment but not in the room left in the
        active one, or if not even its first record fits there (bigger than
        a segment, it otherwise fills the active one first). Either way, the
        segments holding records of the group (``hold_from`` on), the active
        one (never dropped) and the append must fit in what the segments
        the shipper pinned leave of ``max_bytes`` (at least a segment: past a
        cap the pinned ones fill, appends go on one segment at a time). If
        the active segment's earlier records are what passes it, the append
        begins a new segment, so that the cap may drop the old one.
        """
        active = self._segments[-1]
        used = active.size + chunk_bytes
        if nbytes > self.config.segment_bytes and payloads:
            fresh = not self._fits(chunk_bytes, HEADER_SIZE + len(payloads[0]))
        else:
            fresh = not self._fits(chunk_bytes, nbytes)
        held = pinned = 0
        with self._lock:
            for seg in self._segments[:-1]:
                if seg.last >= hold_from:
                    held += seg.size
                elif self._pinned(seg):
                    pinned += seg.size
            active_pinned = self._pinned(active)
        cap = self.config.max_bytes
        # At least a segment, or the one record a segment may pass it to hold.
        least = self.config.segment_bytes
        if len(payloads) == 1:
            least = max(least, nbytes)
        if held + used + nbytes <= max(cap - pinned, least):
            return fresh
        in_group = chunk_bytes > 0 or active.last >= hold_from
        if used and not in_group:
            # Sealed, the active segment's earlier records may go instead (unless pinned).
            pinned += used if active_pinned else 0
            if held + nbytes <= max(cap - pinned, least):
                return True
        return None

    def _over_cap(self, reason: str) -> SpoolFullError:
        """A refusal by the byte cap: counted, shown in the status, logged (rate-limited)."""
        self.counters.add("cap_refused")
        self.last_refusal = (self._clock.time_ns(), reason)
        _cap_log.warning(f"{self._dir} refused", "spool %s: %s", self._dir, reason)
        return SpoolFullError(reason)

    def _enforce_cap(self, incoming: int, hold_from: int) -> None:
        """Drop the oldest segments until ``incoming`` more bytes fit under the cap.

        Every segment counts against the cap, pinned ones included; the
        active one, pinned ones and those holding records from ``hold_from``
        on (the group being committed: not acknowledged yet, or acknowledged
        by this very group) are never dropped. Called before each write, so
        when an earlier group's segment was just sealed it is a candidate
        too. ``_begins_segment`` keeps the group's segments within what the
        pinned ones leave of the cap, or within a segment if they leave less:
        the overshoot is at most the pinned segments.
        """
        with self._lock:
            excess = sum(s.size for s in self._segments) + incoming - self.config.max_bytes
            victims = []
            lost = 0
            for seg in self._segments[:-1]:
                if excess <= 0 or seg.last >= hold_from:
                    break
                if self._pinned(seg):
                    continue
                victims.append(seg)
                excess -= seg.size
            for seg in victims:
                self._segments.remove(seg)
                lost += seg.unacked(self._state.hwm)
            self.counters.drop("byte_cap", lost)
        if victims:
            _cap_log.warning(
                self._dir,
                "spool %s at its byte cap of %d bytes: dropped %d oldest segments, "
                "%d undelivered records (counted as dropped: byte_cap)",
                self._dir,
                self.config.max_bytes,
                len(victims),
                lost,
            )
            self._unlink(victims)

    def _pinned(self, seg: Segment) -> bool:
        """Whether ``seg`` holds records the shipper pinned (call with ``_lock`` held).

        A pin that ends past the last record written is open: a read is under
        way, or has just returned and the shipper has not narrowed the pin yet.
        It holds nothing past the furthest any read has reached
        (``_read_reach``), so segments written later stay under the cap.
        """
        pin = self._pin
        if pin is None:
            return False
        first, last = pin
        if last >= self._next_index:
            last = self._read_reach
        return seg.first <= last and seg.last >= first
