"""Sizes and timings of the queued exporter, checked once at construction.

Source -> processors -> queued exporter (bounded queue -> batcher -> retry ->
exporter): this module holds what a user sets for the queued exporter, and
the bounds that keep its worker from spinning or dying at its first wait.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final, Literal

from predtrace.sidecar.pipeline._retry import RetryPolicy
from predtrace.wire import DecodeLimits

_MAX_QUEUE_SIZE: Final = 1_000_000
# The most events the receivers (collector, sidecar) take in one batch: a
# bigger batch would be refused whole, every time.
_MAX_BATCH_SIZE: Final = DecodeLimits().max_events
# Timed waits of the worker: the longest far below threading.TIMEOUT_MAX, whose
# overflow (inf, 1e10) kills a thread at its first wait; the shortest long
# enough that an idle worker does not spin (1e-6 cost a quarter of a core).
_MIN_DELAY_S: Final = 0.001
_MAX_DELAY_S: Final = 3600.0
_MAX_BACKOFF_S: Final = 86_400.0


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueConfig:
    """Sizes and timings of a QueuedExporter.

    Integers are bounded (``max_queue_size`` at most 1,000,000) and every time
    is a finite number of seconds in [0.001, 3600]: NaN, infinity or a
    microsecond would make the worker spin or die at its first wait.

    Example:
        >>> QueueConfig(max_queue_size=4096, max_batch_size=512, schedule_delay=0.5)
    """

    max_queue_size: int = 4096
    max_batch_size: int = 512
    schedule_delay: float = 1.0
    stall_grace: float = 2.0
    """At shutdown, how long a destination that is failing or hung is waited for.

    An export in flight longer than this, or a batch failing for longer than
    this even after the immediate retry shutdown gives it, means the rest is
    dropped (``shutdown``) at once instead of at the deadline. A healthy
    destination keeps the whole shutdown deadline; one that takes longer
    than this for one batch is taken for hung (a collector commits a batch
    in milliseconds). Every server worker's restart waits this long at most
    for a collector that is down.
    """
    drop: Literal["oldest", "newest"] = "oldest"
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        if not _is_count(self.max_queue_size, _MAX_QUEUE_SIZE):
            raise ValueError(
                f"QueueConfig.max_queue_size must be an integer in [1, {_MAX_QUEUE_SIZE}], "
                f"got {self.max_queue_size!r}"
            )
        if not _is_count(self.max_batch_size, min(self.max_queue_size, _MAX_BATCH_SIZE)):
            raise ValueError(
                f"QueueConfig.max_batch_size must be in [1, max_queue_size] and at most "
                f"{_MAX_BATCH_SIZE} (what a collector or sidecar takes in one batch), "
                f"got {self.max_batch_size!r}"
            )
        for name in ("schedule_delay", "stall_grace"):
            value = getattr(self, name)
            if not _is_seconds(value, _MAX_DELAY_S, least=_MIN_DELAY_S):
                raise ValueError(
                    f"QueueConfig.{name} must be a finite number of seconds in "
                    f"[{_MIN_DELAY_S:g}, {_MAX_DELAY_S:g}], got {value!r}"
                )
        if self.drop not in ("oldest", "newest"):
            raise ValueError("QueueConfig.drop must be 'oldest' or 'newest'")
        retry = self.retry
        if not (
            _is_seconds(retry.initial_backoff, _MAX_BACKOFF_S)
            and _is_seconds(retry.max_backoff, _MAX_BACKOFF_S)
            and math.isfinite(retry.multiplier)
        ):
            raise ValueError(
                "QueueConfig.retry needs finite backoffs of at most "
                f"{_MAX_BACKOFF_S:g} seconds and a finite multiplier"
            )


def _is_count(value: object, most: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= most


def _is_seconds(value: object, most: float, *, least: float = 0.0) -> bool:
    # Every comparison with NaN is false, so NaN fails here too.
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    return value > 0 and least <= value <= most
