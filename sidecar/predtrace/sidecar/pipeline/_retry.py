"""Retry policy: exponential backoff with full jitter, honouring Retry-After."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final

_MAX_RETRY_AFTER_S: Final = 3600.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How long to wait between attempts of one batch.

    The n-th retry waits a uniform random time in [0, min(max_backoff,
    initial_backoff * multiplier**n)] ("full jitter"), and never less than the
    receiver's Retry-After, up to an hour (or ``max_backoff`` if longer): a
    broken header asking for days must not stall delivery for days.
    ``max_attempts=None`` retries for as long as it takes: elapsed time alone
    never drops data (only the queue's cap does).

    Example:
        >>> RetryPolicy(initial_backoff=0.5, max_backoff=30.0)
    """

    initial_backoff: float = 0.5
    max_backoff: float = 30.0
    multiplier: float = 2.0
    max_attempts: int | None = None

    def __post_init__(self) -> None:
        if self.initial_backoff <= 0 or self.max_backoff < self.initial_backoff:
            raise ValueError("RetryPolicy needs 0 < initial_backoff <= max_backoff")
        if self.multiplier < 1:
            raise ValueError("RetryPolicy.multiplier must be >= 1")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("RetryPolicy.max_attempts must be >= 1 or None")

    def ceiling(self, retry: int) -> float:
        """The upper bound of the jittered wait before retry number ``retry`` (0-based)."""
        # Cap the exponent so the float never overflows in a weeks-long outage.
        return min(self.max_backoff, self.initial_backoff * self.multiplier ** min(retry, 64))

    def delay(self, retry: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to wait before retry number ``retry``."""
        jittered = rng.uniform(0.0, self.ceiling(retry))
        if retry_after is not None and retry_after > jittered:
            return min(retry_after, max(self.max_backoff, _MAX_RETRY_AFTER_S))
        return jittered

    def gives_up_after(self, attempts: int) -> bool:
        """Whether a batch that failed ``attempts`` times is abandoned."""
        return self.max_attempts is not None and attempts >= self.max_attempts
