"""Stage interfaces of the pipeline: processors, exporters, and the batch they share.

Source -> processors -> queued exporter (bounded queue -> batcher -> retry ->
exporter). A processor is any callable ``event -> event | None`` (None drops
the event); an exporter is anything with ``export`` and ``shutdown``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from predtrace.wire import PredictionEvent, Rejection

Processor = Callable[[PredictionEvent], PredictionEvent | None]


@dataclass(slots=True)
class OutgoingBatch:
    """A batch on its way out, handed to the same exporter on every attempt.

    Exporters that encode or number batches keep the result in ``payload`` and
    ``seq`` on the first attempt, so a retry resends identical bytes with the
    same (producer, seq) and the receiver can deduplicate it.
    """

    events: list[PredictionEvent]
    attempt: int = 0
    seq: int = 0
    payload: bytes | None = None


@dataclass(frozen=True, slots=True)
class ExportResult:
    """What the receiver accepted; rejected events are counted, not retried."""

    accepted: int
    rejected: tuple[Rejection, ...] = field(default=())
    duplicate: bool = False


class Exporter(Protocol):
    """Delivers batches somewhere. Called from one worker thread only.

    ``export`` raises ``RetryableExportError`` or ``PermanentExportError``;
    anything else is treated as a bug in the exporter and the batch is dropped
    (and counted).
    """

    def export(self, batch: OutgoingBatch) -> ExportResult:
        """Deliver one batch or raise an ExportError."""
        ...

    def shutdown(self, timeout: float) -> None:
        """Release resources; safe to call twice."""
        ...
