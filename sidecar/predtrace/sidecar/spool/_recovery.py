"""Spool recovery at start: what the segments lost, and the active segment reopened.

``Spool.open`` -> **recovery** -> writer. ``load_segments`` (``_segments``)
scans what is on disk; these steps then count the undelivered records of
segments the index lists but that are gone, and reopen the last segment for
appending, cutting a torn tail back to the last valid record (RELIABILITY
rule 3) and making the directory's entries durable before the writer starts.
"""

from __future__ import annotations

import logging
import posixpath

from predtrace.sidecar.spool._config import SpoolCounters
from predtrace.sidecar.spool._files import FileLayer
from predtrace.sidecar.spool._meta import SegmentMeta
from predtrace.sidecar.spool._segments import Segment, segment_name

_log = logging.getLogger("predtrace.sidecar.spool")


def count_missing(
    directory: str,
    index: dict[int, SegmentMeta] | None,
    present: list[Segment],
    hwm: int,
    counters: SpoolCounters,
) -> None:
    """Count (as ``missing_segment``) the undelivered records of listed segments that are gone."""
    firsts = {s.first for s in present}
    for meta in (index or {}).values():
        if meta.first not in firsts and meta.last > hwm:
            lost = Segment.from_meta(directory, meta).unacked(hwm)
            counters.drop("missing_segment", lost)
            _log.error(
                "spool segment %s is missing with %d undelivered records",
                segment_name(meta.first),
                lost,
            )


def open_active(
    files: FileLayer,
    directory: str,
    segments: list[Segment],
    *,
    hwm: int,
    tail: int,
    tail_lost: int,
    counters: SpoolCounters,
) -> tuple[int, int]:
    """Open the last segment for appending, cutting an invalid tail off it.

    ``tail_lost``: records the segment lost from its end by the row a
    clean close wrote for it (already counted as ``corrupt``): the file
    was cut or damaged after the close, and those records had been
    acknowledged. Without a row, an invalid tail is a write torn by a
    crash: one record, never acknowledged.

    Returns:
        The handle of the active segment (an empty one at ``hwm + 1`` is
        appended to ``segments`` when there is none) and the next record index.
    """
    if not segments:
        first = hwm + 1
        path = posixpath.join(directory, segment_name(first))
        segments.append(Segment(first, path, first - 1, 0, 0, 0, 0, first - 1))
    active = segments[-1]
    handle = files.open(active.path, create=True)
    if tail:
        # A torn tail (rule 3): cut back to the last valid record.
        files.truncate(handle, active.size)
        files.fsync(handle)
        _report_cut(active.path, tail, tail_lost, counters)
    files.fsync_dir(directory)
    return handle, max(active.last + 1, hwm + 1, active.first)


def _report_cut(path: str, tail: int, tail_lost: int, counters: SpoolCounters) -> None:
    """Log the tail just cut from ``path``; a torn write (no ``tail_lost``) is counted here."""
    if tail_lost:
        _log.warning(
            "spool: cut %d damaged bytes from %s (its %d lost records are counted)",
            tail,
            path,
            tail_lost,
        )
    else:
        # A crash tore the write in progress: those records were
        # never fsynced, so never acknowledged.
        counters.drop("torn", 1)
        _log.warning(
            "spool: cut a torn tail of %d bytes from %s (at least one record that "
            "was being written when the sidecar stopped)",
            tail,
            path,
        )
