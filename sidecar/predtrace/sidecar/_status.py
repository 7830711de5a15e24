"""The running sidecar's status: one view for the Status RPC, the CLI and the metrics.

Spool depth, the oldest unsent event, the last success and the lag, and
every counter (dropped by reason) are read from the live process. A write
the spool refused lately (a full disk, a writer that is behind) shows in
``last_error`` next to the shipper's latest delivery error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from predtrace.sidecar._intake import IntakeCounters
from predtrace.sidecar._shipper import ShipperCounters
from predtrace.sidecar.pipeline._collector_http import without_userinfo
from predtrace.sidecar.spool import SpoolStats
from predtrace.v1 import sidecar_pb2

if TYPE_CHECKING:
    from predtrace.sidecar._otlp_export import ForwarderCounters
    from predtrace.sidecar.spool import Spool

# A refused spool write shows in the status for this long after the latest one.
REFUSAL_SHOWN_NS = 60 * 10**9


@dataclass(frozen=True, slots=True)
class StatusView:
    """A snapshot of one sidecar."""

    producer_id: str
    collector_url: str
    spool: SpoolStats
    spool_counters: dict[str, int]
    shipper: ShipperCounters
    next_seq: int
    oldest_unsent_ns: int
    intake: IntakeCounters
    spool_refusal: str = ""
    otlp_forward: ForwarderCounters | None = None
    oip_dropped: int = 0
    oip_invalid_caller_ids: int = 0
    oip_unreadable_requests: int = 0
    oip_ids_not_added: int = 0
    oip_budget_waits: int = 0
    oip_slow_refusals: int = 0
    oip_inflight_bytes: int = 0
    stream_held_bytes: int = 0
    # OTLP exports refused with the in-flight budget spent, by transport (None: no receiver).
    otlp_busy_refusals: dict[str, int] | None = None
    # OTLP exports answered as retries of one already taken (None: no receiver).
    otlp_duplicate_exports: int | None = None
    otlp_connections_refused: int | None = None

    def dropped(self) -> dict[str, int]:
        """Events dropped, by reason, across spool, shipper, intake and the OIP proxy.

        Spans the OTLP forwarder drops are not events (the predictions in them
        were taken by the intake first): they are counted apart.
        """
        out: dict[str, int] = {}
        for key, value in self.spool_counters.items():
            if key.startswith("dropped."):
                out[key.removeprefix("dropped.")] = value
        for reason, value in self.shipper.dropped.items():
            out[reason] = out.get(reason, 0) + value
        if self.intake.processor_errors:
            out["processor"] = self.intake.processor_errors
        if self.intake.rejected:
            out["invalid"] = self.intake.rejected
        if self.oip_dropped:
            out["oip_buffer"] = self.oip_dropped
        return out


def build_status(view: StatusView) -> sidecar_pb2.SidecarStatus:
    """The ``predtrace.v1.SidecarStatus`` message of a view."""
    message = sidecar_pb2.SidecarStatus(
        producer_id=view.producer_id,
        spool_records=view.spool.records,
        spool_bytes=view.spool.bytes,
        spool_byte_cap=view.spool.byte_cap,
        oldest_unsent_unix_nano=view.oldest_unsent_ns,
        last_success_unix_nano=view.shipper.last_success_ns,
        next_seq=view.next_seq,
        exported_events=view.shipper.exported,
        retried_batches=view.shipper.retried,
        quarantined_batches=view.shipper.quarantined,
        collector_url=without_userinfo(view.collector_url),  # the Status RPC is open to all
        last_error="; ".join(e for e in (view.spool_refusal, view.shipper.last_error) if e),
    )
    for reason, count in view.dropped().items():
        message.dropped[reason] = count
    return message


def spool_refusal(spool: Spool, now_ns: int) -> str:
    """What the spool refused within the last minute, with the counts so far ("" if nothing)."""
    latest = spool.last_refusal
    if latest is None or now_ns - latest[0] > REFUSAL_SHOWN_NS:
        return ""
    counts = spool.counters.snapshot()
    ago = max(0.0, (now_ns - latest[0]) / 1e9)
    return (
        f"the spool refused a write {ago:.0f} s ago: {latest[1]} "
        f"(refused so far: disk full {counts.get('disk_full', 0)}, "
        f"I/O error {counts.get('write_errors', 0)}, busy {counts.get('busy', 0)}, "
        f"over the cap {counts.get('cap_refused', 0)})"
    )


def status_to_dict(
    message: sidecar_pb2.SidecarStatus, now_ns: int | None = None
) -> dict[str, object]:
    """A JSON-ready view of a Status answer, with the lag computed."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    oldest = message.oldest_unsent_unix_nano
    return {
        "producer_id": message.producer_id,
        "collector_url": without_userinfo(message.collector_url),
        "spool_records": message.spool_records,
        "spool_bytes": message.spool_bytes,
        "spool_byte_cap": message.spool_byte_cap,
        "oldest_unsent_unix_nano": oldest,
        "lag_seconds": round(max(0, now_ns - oldest) / 1e9, 3) if oldest else 0.0,
        "last_success_unix_nano": message.last_success_unix_nano,
        "next_seq": message.next_seq,
        "exported_events": message.exported_events,
        "retried_batches": message.retried_batches,
        "quarantined_batches": message.quarantined_batches,
        "dropped": dict(sorted(message.dropped.items())),
        "last_error": message.last_error,
    }
