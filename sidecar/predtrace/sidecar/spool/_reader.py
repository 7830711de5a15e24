"""Reading records back from segments, in order, with a cursor for sequential reads.

The shipper reads the spool front to back; the cursor remembers where the
last read stopped so the next read continues there instead of rescanning the
segment. Only the durable part of a segment is ever read; a file that ends
before its durable size was cut short behind the spool's back, and the
reader reports it (the spool counts what was lost).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from predtrace.sidecar.pipeline import RateLimitedLog
from predtrace.sidecar.spool._config import SpoolConfig, SpoolCounters
from predtrace.sidecar.spool._files import FileLayer
from predtrace.sidecar.spool._record import HEADER_SIZE, Record, scan
from predtrace.sidecar.spool._segments import Segment

_MAX_CHUNK: Final = 16 * 1024 * 1024
_log = logging.getLogger("predtrace.sidecar.spool")

#: Called with a segment found shorter than its durable size and the ``after`` of the read.
OnCut = Callable[[Segment, int], None]


@dataclass(slots=True)
class _Cursor:
    path: str
    after: int  # index of the last record returned
    offset: int  # where the next read starts
    expected: int  # the index expected there (lost records before it already counted)
    in_damage: bool  # the offset is inside a damaged region already counted


class SegmentReader:
    """Reads one segment at a time; not thread-safe (the shipper is its only user).

    ``on_cut`` hears of a segment whose file ends before its durable size
    (truncated or emptied while the spool runs); the records before the cut
    are still returned.
    """

    def __init__(
        self,
        files: FileLayer,
        config: SpoolConfig,
        counters: SpoolCounters,
        on_cut: OnCut | None = None,
    ) -> None:
        self._files = files
        self._config = config
        self._counters = counters
        self._on_cut = on_cut
        self._cursor: _Cursor | None = None
        self._counted: dict[str, int] = {}  # damage counted up to this offset, per segment
        # One line per segment a minute: a disk going bad must not flood the log.
        self._damage_log = RateLimitedLog(_log)

    def read(
        self,
        seg: Segment,
        after: int,
        *,
        max_records: int,
        max_bytes: int,
        until: int | None,
        taken_before: bool = False,
    ) -> list[Record]:
        """Records of ``seg`` with index > ``after``, within the limits.

        ``taken_before``: the caller already holds records of this read, so
        even the first record here must fit in ``max_bytes``.
        """
        cursor = self._cursor
        in_damage = False
        if cursor is not None and cursor.path == seg.path and cursor.after == after:
            offset, expected, in_damage = cursor.offset, cursor.expected, cursor.in_damage
        else:
            offset, expected = 0, seg.first
        limit = self._config.max_record_bytes
        chunk = min(_MAX_CHUNK, max(2 * (HEADER_SIZE + limit), max_bytes + max_bytes // 4))
        records: list[Record] = []
        total = 0
        cut = False
        while offset < seg.durable_size and len(records) < max_records and total < max_bytes:
            wanted = min(chunk, seg.durable_size - offset)
            data = self._files.read(seg.path, offset, wanted)
            cut = len(data) < wanted  # the file ends before its durable size
            final = cut or offset + len(data) >= seg.durable_size
            result = scan(
                data,
                expected_index=expected,
                max_payload=limit,
                final=final,
                max_records=max_records - len(records),
                max_bytes=max_bytes - total,
                skip_through=after,
                until=until,
                taken_before=taken_before or bool(records),
                continues_damage=in_damage,
            )
            in_damage = result.ends_in_damage
            # A read stopped at a record counted what lies before it only: the
            # next read, from that record, counts what follows.
            scanned = result.consumed if result.at_limit else max(result.consumed, 1)
            self._count_damage(seg.path, offset, scanned, result.corrupt_regions, result.skipped)
            records.extend(result.records)
            total += sum(len(r.payload) for r in result.records)
            # Records passed over (``skip_through``) move it on too: a buffer
            # of nothing but delivered records is no gap for the next one.
            if result.next_expected is not None:
                expected = result.next_expected
            offset += result.consumed
            if final or result.at_limit or result.consumed == 0:
                break
            if until is not None and expected > until:
                break
        if records:
            self._cursor = _Cursor(seg.path, records[-1].index, offset, expected, in_damage)
        if cut and self._on_cut is not None:
            self._on_cut(seg, after)
        return records

    def mark_counted(self, path: str, size: int) -> None:
        """Damage in ``path`` up to ``size`` was already counted (by the recovery scan)."""
        self._counted[path] = size + 1

    def _count_damage(
        self, path: str, offset: int, scanned: int, regions: int, skipped: int
    ) -> None:
        if (regions or skipped) and offset >= self._counted.get(path, 0):
            self._counters.add("corrupt_regions", regions)
            self._counters.drop("corrupt", skipped)
            self._counted[path] = offset + scanned
            # Counted as dropped; without a line in the log nobody would know why.
            self._damage_log.warning(
                path,
                "spool segment %s: skipped %d damaged region(s), losing %d records "
                "(counted as dropped: corrupt)",
                path,
                regions,
                skipped,
            )
