"""Segment files on disk: naming, the in-memory table, and recovery by scanning.

Recovery follows RELIABILITY's spool rules: a torn tail of the active segment
is cut back to the last valid record (rule 3); damaged regions in the middle
are skipped and counted (rule 4); an index that is missing, damaged or stale
is rebuilt by scanning (rule 5); a segment that vanished after it was fully
acknowledged is normal (rule 2).
"""

from __future__ import annotations

import logging
import posixpath
import re
from dataclasses import dataclass
from typing import Final

from predtrace.sidecar.spool._config import SpoolConfig, SpoolCounters
from predtrace.sidecar.spool._files import FileLayer
from predtrace.sidecar.spool._meta import SegmentMeta
from predtrace.sidecar.spool._record import HEADER_SIZE, scan

_log = logging.getLogger("predtrace.sidecar.spool")
_NAME_RE: Final = re.compile(r"^seg-(\d{20})\.log$")
_SCAN_CHUNK: Final = 8 * 1024 * 1024


def segment_name(first: int) -> str:
    """File name of the segment whose records start at index ``first``."""
    return f"seg-{first:020d}.log"


def list_segments(files: FileLayer, directory: str) -> list[int]:
    """First indexes of the segment files present, ascending."""
    firsts = []
    for name in files.listdir(directory):
        match = _NAME_RE.match(name)
        if match:
            firsts.append(int(match.group(1)))
    return sorted(firsts)


@dataclass(slots=True)
class Segment:
    """One segment file as the spool tracks it.

    ``last`` is ``first - 1`` while empty. For the active segment ``size`` is
    the end of the last written record and ``durable_size``/``durable_last``
    what the last fsync covered; sealed segments are wholly durable.
    """

    first: int
    path: str
    last: int
    count: int
    size: int
    first_ts: int
    durable_size: int
    durable_last: int
    scanned: bool = False

    @classmethod
    def from_meta(cls, directory: str, meta: SegmentMeta) -> Segment:
        """A sealed segment as the index described it."""
        path = posixpath.join(directory, segment_name(meta.first))
        return cls(
            meta.first, path, meta.last, meta.count, meta.size, meta.first_ts, meta.size, meta.last
        )

    def meta(self) -> SegmentMeta:
        """The index row of this segment."""
        return SegmentMeta(self.first, self.last, self.count, self.size, self.first_ts)

    def unacked(self, hwm: int) -> int:
        """Records in this segment above the high-water mark."""
        if self.last <= hwm:
            return 0
        return self.count - min(self.count, max(0, hwm - self.first + 1))


def scan_segment(
    files: FileLayer,
    directory: str,
    first: int,
    config: SpoolConfig,
    counters: SpoolCounters,
    *,
    log_damage: bool = True,
) -> tuple[Segment, int]:
    """Scan a whole segment; return it and the length of its invalid tail.

    Damaged regions in the middle are counted here, and logged (one line per
    segment) unless ``log_damage`` is False (a rescan whose counts are
    discarded); the caller decides what an invalid tail means (torn for the
    active segment, damage otherwise).
    """
    path = posixpath.join(directory, segment_name(first))
    total = files.size(path)
    seg = Segment(first, path, first - 1, 0, 0, 0, 0, first - 1)
    offset, expected = 0, first
    limit = config.max_record_bytes
    chunk = max(_SCAN_CHUNK, 2 * (HEADER_SIZE + limit))
    in_damage = False
    regions = skipped = 0
    while offset < total:
        data = files.read(path, offset, chunk)
        final = offset + len(data) >= total
        result = scan(
            data,
            expected_index=expected,
            max_payload=limit,
            final=final,
            continues_damage=in_damage,
        )
        in_damage = result.ends_in_damage
        counters.add("corrupt_regions", result.corrupt_regions)
        counters.drop("corrupt", result.skipped)
        regions += result.corrupt_regions
        skipped += result.skipped
        if result.records:
            if seg.count == 0:
                seg.first_ts = result.records[0].ts_ns
            seg.count += len(result.records)
            seg.last = expected = result.records[-1].index
            expected += 1
            seg.size = offset + result.valid_end
        if final:
            break
        if result.consumed == 0:
            break  # cannot progress: treat the rest as an invalid tail
        offset += result.consumed
    if log_damage and (regions or skipped):
        # Counted as dropped; without a line in the log nobody would know why.
        _log.warning(
            "spool segment %s: skipped %d damaged region(s) in the middle, losing %d "
            "records (counted as dropped: corrupt)",
            path,
            regions,
            skipped,
        )
    return _sealed(seg), total - seg.size


def _sealed(seg: Segment) -> Segment:
    seg.scanned = True
    seg.durable_size = seg.size
    seg.durable_last = seg.last
    return seg


def load_segments(
    files: FileLayer,
    directory: str,
    config: SpoolConfig,
    counters: SpoolCounters,
    index: dict[int, SegmentMeta] | None,
    *,
    hwm: int,
) -> tuple[list[Segment], int, int]:
    """Every segment, the sealed ones from the index when it matches the file.

    Records lost from the end of a segment above the high-water mark ``hwm``
    (damaged, truncated, emptied) are counted as ``corrupt``. Returns the
    segments, the invalid tail length of the last one (the caller truncates
    it: that segment becomes the active one again) and how many records the
    last one lost from its end by its index row (0 without a row: a clean
    close writes one for the active segment, a crash leaves none). When the
    records on disk stop short of ``hwm`` (the active segment was deleted or
    cut outside the spool), a new empty segment at ``hwm + 1`` ends the list,
    to be created as the active one: the old one, delivered, is released.
    """
    firsts = list_segments(files, directory)
    segments: list[Segment] = []
    damaged: set[int] = set()
    tail = 0
    if index is None and firsts:
        counters.add("index_rebuilds")
    for position, first in enumerate(firsts):
        is_last = position == len(firsts) - 1
        meta = (index or {}).get(first)
        path = posixpath.join(directory, segment_name(first))
        if not is_last and meta is not None and meta.size == files.size(path):
            segments.append(Segment.from_meta(directory, meta))
            continue
        if index is not None and not is_last:
            counters.add("index_rebuilds")
        seg, tail = scan_segment(files, directory, first, config, counters)
        if not is_last and tail:
            counters.add("corrupt_regions")
            damaged.add(first)
            _log.warning("spool segment %s has %d damaged trailing bytes", seg.path, tail)
        segments.append(seg)
    last_lost = _count_lost_ends(segments, index or {}, damaged, hwm, counters)
    if _check_mark_on_disk(segments, index or {}, hwm, counters) and segments:
        # Appending to the last segment would leave a gap in it, up to the
        # mark, that a later scan takes for lost records: the next records go
        # to a new segment at the mark, and the old one, delivered, is released.
        first = hwm + 1
        path = posixpath.join(directory, segment_name(first))
        segments.append(Segment(first, path, first - 1, 0, 0, 0, 0, first - 1))
        return segments, 0, 0
    return segments, tail, last_lost


def _count_lost_ends(
    segments: list[Segment],
    index: dict[int, SegmentMeta],
    damaged: set[int],
    hwm: int,
    counters: SpoolCounters,
) -> int:
    """Count the records above ``hwm`` missing from the end of each segment.

    A segment ended where its index row says; without a row, just before
    the next segment (a gap that may also be a whole lost segment: the two
    cannot be told apart). Segments the index lists but that are gone are
    counted by the caller (``missing_segment``); the byte cap counted its
    drops when it made them. Returns what the last segment lost.
    """
    last_lost = 0
    present = {seg.first for seg in segments}
    absent = [meta for meta in index.values() if meta.first not in present]
    for position, seg in enumerate(segments):
        following = segments[position + 1].first if position + 1 < len(segments) else None
        row = index.get(seg.first)
        if row is not None:
            end = row.last if following is None else min(row.last, following - 1)
        elif following is not None:
            end = following - 1
        else:
            continue  # the last segment with no row: nothing says where it ended
        start = max(seg.last, hwm)  # records up to here are on disk or delivered
        lost = max(0, end - start) - sum(_overlap(meta, start, end) for meta in absent)
        if lost <= 0:
            continue
        if seg.first not in damaged:
            counters.add("corrupt_regions")
        counters.drop("corrupt", lost)
        _log.error("spool segment %s lost its last %d undelivered records", seg.path, lost)
        if following is None:
            last_lost = lost
    return last_lost


def _check_mark_on_disk(
    segments: list[Segment], index: dict[int, SegmentMeta], hwm: int, counters: SpoolCounters
) -> bool:
    """Count (one region, an error line) an active segment removed or cut below the mark.

    The spool never unlinks its active segment, which holds every record up
    to the mark that no sealed one does: the records on disk, or the index's
    rows (a clean close lists the active segment too), always reach the mark.
    When they stop short, the active segment was deleted, emptied or cut
    outside the spool after a crash; the undelivered records it held after
    the mark are lost, and nothing durable says how many (a crash leaves the
    active segment no row), so only the region is counted. With a row, the
    loss is counted record by record (``_count_lost_ends``, and the
    ``missing_segment`` count of a listed segment that is gone). Returns
    whether the last segment present ends below the mark (counted or not).
    """
    short = bool(segments) and segments[-1].last < hwm
    reach = max([seg.last for seg in segments] + [meta.last for meta in index.values()], default=0)
    if hwm <= reach:
        return short
    counters.add("corrupt_regions")
    last = segments[-1] if segments else None
    if last is not None and last.first not in index:
        what = f"spool segment {last.path} ends at record {last.last}"
    elif reach:
        what = f"the spool's active segment (after record {reach}) is missing"
    else:
        what = "the spool's active segment is missing"
    _log.error(
        "%s, below the delivered mark %d: it was deleted or cut outside the spool, and "
        "the undelivered records it held after the mark are lost (how many is not known: "
        "counted as one corrupt region, no records)",
        what,
        hwm,
    )
    return short


def _overlap(meta: SegmentMeta, start: int, end: int) -> int:
    """How many of the indexes in (start, end] the row ``meta`` holds."""
    return max(0, min(meta.last, end) - max(meta.first - 1, start))
