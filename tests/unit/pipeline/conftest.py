"""Builders shared by the pipeline tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from predtrace.wire import PredictionEvent


@pytest.fixture
def make_events() -> Callable[[int], list[PredictionEvent]]:
    """Factory: n events with ids e0..e(n-1)."""

    def make(n: int, start: int = 0) -> list[PredictionEvent]:
        return [PredictionEvent(prediction_id=f"e{i}") for i in range(start, start + n)]

    return make
