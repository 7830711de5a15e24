"""What the shipper did: the counts that status and metrics report.

Shipper -> **counters** -> ``sidecar status`` and ``/metrics``. The shipper
and its parts (the planner, the batch limits, the quarantine) write them;
status and metrics read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
    quarantine_bytes: int = 0
    quarantine_byte_cap: int = 0
    quarantine_evicted: int = 0
    last_success_ns: int = 0
    last_error: str = ""
    split: int = 0
    """Batches refused as too large (413) and sent again in parts."""
    renumbered: int = 0
    """Switches to a new producer id after the collector refused a reused seq (409)."""
    max_batch_events: int = 0
    """The events per batch in force (the configured cap, lowered by a 413)."""
    max_batch_bytes: int = 0
    """The event bytes per batch in force (the configured cap, lowered by a 413)."""
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str, count: int) -> None:
        """Count events dropped for ``reason``."""
        if count:
            self.dropped[reason] = self.dropped.get(reason, 0) + count
