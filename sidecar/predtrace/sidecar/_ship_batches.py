"""What one batch holds: the size limits in force and the encoded plan.

Spool records -> **batch** -> shipper. A batch takes records up to the
limits in force (the configured ones, lowered when the collector or a proxy
refuses a batch as too large) and is encoded once, as a ``Plan`` carrying
its payload, compressed body and digest: retries resend those bytes.
"""

from __future__ import annotations

import logging

from predtrace.sidecar._batch import assemble_payload
from predtrace.sidecar._config import ShipperConfig
from predtrace.sidecar._ship_counters import ShipperCounters
from predtrace.sidecar._shipstate import Plan
from predtrace.sidecar.pipeline import PermanentExportError
from predtrace.sidecar.spool import Record, Spool
from predtrace.wire import batch_digest, gzip_bytes

_log = logging.getLogger("predtrace.sidecar.shipper")


class BatchLimits:
    """The events and event bytes a batch may hold, lowered by a 413 until a restart."""

    def __init__(self, config: ShipperConfig, spool: Spool, counters: ShipperCounters) -> None:
        # The configured limits, lowered by a 413. The batch in flight and
        # the one read ahead are pinned in the spool, out of its cap's reach:
        # together at most half of a small cap.
        self.max_events = config.max_batch_events
        self.max_bytes = max(1, min(config.max_batch_bytes, spool.config.max_bytes // 4))
        counters.max_batch_events = self.max_events
        counters.max_batch_bytes = self.max_bytes
        self._spool = spool
        self._counters = counters

    def full(self, records: list[Record]) -> bool:
        """Whether ``records`` make a full batch (no reason to wait for more)."""
        if len(records) >= self.max_events:
            return True
        size = sum(len(r.payload) for r in records)
        if size + self._spool.config.max_record_bytes <= self.max_bytes:
            return False  # any next record would have fit: the read reached the end
        # The byte cap is never passed: the read may have stopped before a
        # record that did not fit, and did if the spool holds more after it.
        return records[-1].index < self._spool.stats().next_index - 1

    def prefix(self, records: list[Record]) -> list[Record]:
        """The longest start of ``records`` within both limits (at least one record)."""
        total = 0
        for count, record in enumerate(records[: self.max_events]):
            total += len(record.payload)
            if total > self.max_bytes and count:
                return records[:count]
        return records[: self.max_events]

    def learn(self, plan: Plan, exc: PermanentExportError, events: int, size: int) -> None:
        """Lower the limits to ``events`` and ``size`` after ``plan`` was refused as too large."""
        events, size = min(events, self.max_events), min(size, self.max_bytes)
        if (events, size) == (self.max_events, self.max_bytes):
            return
        self.max_events, self.max_bytes = events, size
        self._counters.max_batch_events, self._counters.max_batch_bytes = events, size
        _log.warning(
            "the collector or a proxy in front of it refused batch seq %d (%d events, %d bytes "
            "sent) as too large: %s; sending it again in parts, and batches hold at most %d "
            "events and %d bytes of events from now on (until the sidecar restarts)",
            plan.seq,
            plan.events,
            len(plan.body or b""),
            exc,
            events,
            size,
        )


def build_plan(
    records: list[Record], seq: int, prev_digest: bytes, producer_id: str, config: ShipperConfig
) -> Plan:
    """Assemble and compress a batch (call it in a thread: it is the big encode)."""
    payload = assemble_payload(
        producer_id=producer_id,
        seq=seq,
        created_at_unix_nano=records[-1].ts_ns,
        prev_digest=prev_digest,
        events=[r.payload for r in records],
    )
    body = gzip_bytes(payload, config.compress_level) if config.compress else payload
    return Plan(
        seq=seq,
        first=records[0].index,
        last=records[-1].index,
        created_at_ns=records[-1].ts_ns,
        digest=batch_digest(payload),
        events=len(records),
        first_ts_ns=records[0].ts_ns,
        payload=payload,
        body=body,
    )
