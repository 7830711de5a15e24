"""The spool's segment table: the in-memory state its halves share.

``Spool`` is its reading half (``SpoolReads``) and its writing half
(``SpoolWriter``, with the ``ByteCap``) over one table: the segments in
order (the last one active), the durable state with the high-water mark,
the shipper's pin and how far reads have reached, guarded by ``_lock``.
``Spool`` sets them when it is built and implements the two hooks the
halves call to change the files under the table.
"""

from __future__ import annotations

import threading

from predtrace.sidecar.spool._config import SpoolConfig, SpoolCounters
from predtrace.sidecar.spool._files import FileLayer
from predtrace.sidecar.spool._meta import SpoolState
from predtrace.sidecar.spool._segments import Segment


class SegmentTable:
    """The state ``Spool``'s halves share (a base class: ``Spool.__init__`` sets it)."""

    config: SpoolConfig
    counters: SpoolCounters
    _files: FileLayer
    _dir: str
    _lock: threading.RLock
    _segments: list[Segment]
    _state: SpoolState
    _pin: tuple[int, int] | None
    _read_reach: int
    _next_index: int

    def _write_index(self) -> None:
        """Rewrite the segment index from the table (``Spool``)."""
        raise NotImplementedError

    def _unlink(self, victims: list[Segment]) -> None:
        """Unlink segments already taken off the table, then rewrite the index (``Spool``)."""
        raise NotImplementedError
