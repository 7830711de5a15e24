"""The delivery oracle of RELIABILITY.md, reusable by every sidecar fault test.

Feed it what producers sent and what the sidecar acknowledged, then what the
collector holds; ``check`` reports conservation (every acknowledged id
delivered), no phantoms (nothing delivered that was never sent), integrity
(the delivered event's fingerprint equals the sent one's) and duplicates.
Liveness is checked by the test sending a fresh event after the fault.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from predtrace.wire import PredictionEvent


def fingerprint(event: PredictionEvent) -> str:
    """A hash of the fields no sidecar processor changes (ids, time, model, outcome)."""
    parts = (
        event.prediction_id,
        event.trace_id.hex(),
        event.span_id.hex(),
        str(event.timestamp_unix_nano),
        str(event.duration_nanos),
        event.model.name,
        event.model.version,
        event.endpoint,
        str(int(event.status)),
        event.status_code,
    )
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


@dataclass
class OracleReport:
    """What ``DeliveryOracle.check`` found; ``ok`` when nothing is violated."""

    sent: int
    acked: int
    delivered: int
    lost: list[str]
    phantoms: list[str]
    corrupted: list[str]
    duplicates: int

    @property
    def ok(self) -> bool:
        """No loss of acknowledged events, no phantom, no corruption."""
        return not (self.lost or self.phantoms or self.corrupted)

    def __str__(self) -> str:
        return (
            f"sent={self.sent} acked={self.acked} delivered={self.delivered} "
            f"lost={len(self.lost)} {self.lost[:5]} phantoms={len(self.phantoms)} "
            f"{self.phantoms[:5]} corrupted={len(self.corrupted)} duplicates={self.duplicates}"
        )


@dataclass
class DeliveryOracle:
    """Bookkeeping of one run: sent -> acknowledged -> delivered."""

    sent: dict[str, str] = field(default_factory=dict)
    acked: set[str] = field(default_factory=set)
    fingerprint: Callable[[PredictionEvent], str] = fingerprint

    def record_sent(self, events: Iterable[PredictionEvent]) -> None:
        """Events a producer tried to send (acknowledged or not)."""
        for event in events:
            self.sent[event.prediction_id] = self.fingerprint(event)

    def record_acked(self, ids: Iterable[str]) -> None:
        """Ids the sidecar acknowledged (its promise starts here)."""
        self.acked.update(ids)

    def check(self, delivered: Iterable[PredictionEvent], *, allowed_lost: int = 0) -> OracleReport:
        """Compare the collector's events with what was sent and acknowledged.

        ``allowed_lost`` admits drops the sidecar counted (the byte cap, a
        quarantine); anything beyond it is reported lost.
        """
        counts: Counter[str] = Counter()
        corrupted = []
        phantoms = []
        for event in delivered:
            counts[event.prediction_id] += 1
            expected = self.sent.get(event.prediction_id)
            if expected is None:
                phantoms.append(event.prediction_id)
            elif expected != self.fingerprint(event):
                corrupted.append(event.prediction_id)
        lost = sorted(i for i in self.acked if i not in counts)
        if len(lost) <= allowed_lost:
            lost = []
        return OracleReport(
            sent=len(self.sent),
            acked=len(self.acked),
            delivered=len(counts),
            lost=lost,
            phantoms=phantoms,
            corrupted=corrupted,
            duplicates=sum(n - 1 for n in counts.values()),
        )
