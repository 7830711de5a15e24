"""Readiness by polling with a deadline (never by sleeping a fixed time)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def eventually(predicate: Callable[[], object], within: float = 10.0) -> None:
    """Wait until ``predicate()`` is true; fail after ``within`` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(0.005)


def eventually_sync(predicate: Callable[[], object], within: float = 10.0) -> None:
    """``eventually`` for plain threads and subprocess tests."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        time.sleep(0.01)
