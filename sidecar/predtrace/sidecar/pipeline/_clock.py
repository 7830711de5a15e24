"""Time as the pipeline sees it: real, or a FakeClock in tests (predtrace.sidecar.testing)."""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    """The time source and the interruptible sleep of the pipeline."""

    def monotonic(self) -> float:
        """Seconds on a monotonic clock."""
        ...

    def time_ns(self) -> int:
        """Wall-clock unix time in nanoseconds."""
        ...

    def wait(self, event: threading.Event, timeout: float | None) -> bool:
        """Wait until ``event`` is set or ``timeout`` passes; return whether it was set."""
        ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        """Seconds on time.monotonic."""
        return time.monotonic()

    def time_ns(self) -> int:
        """Unix time in nanoseconds."""
        return time.time_ns()

    def wait(self, event: threading.Event, timeout: float | None) -> bool:
        """Block on the event for at most ``timeout`` seconds."""
        return event.wait(timeout)
