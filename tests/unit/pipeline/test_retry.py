"""RetryPolicy: full-jitter exponential backoff, capped, honouring Retry-After."""

from __future__ import annotations

import random

import pytest

from predtrace.sidecar.pipeline import RetryPolicy


def test_ceiling_doubles_then_caps() -> None:
    policy = RetryPolicy(initial_backoff=0.5, max_backoff=30.0)
    assert [policy.ceiling(n) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]


def test_ceiling_never_overflows_in_a_long_outage() -> None:
    policy = RetryPolicy(initial_backoff=0.5, max_backoff=30.0)
    assert policy.ceiling(10**9) == 30.0


def test_delay_is_full_jitter_within_the_ceiling() -> None:
    policy = RetryPolicy(initial_backoff=1.0, max_backoff=8.0)
    rng = random.Random(7)
    delays = [policy.delay(3, None, rng) for _ in range(2000)]
    assert all(0.0 <= d <= 8.0 for d in delays)
    # Full jitter spreads over the whole range, not around the ceiling.
    assert min(delays) < 1.0
    assert max(delays) > 7.0


def test_retry_after_is_a_floor() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=1.0)
    rng = random.Random(1)
    assert all(policy.delay(0, 3600.0, rng) == 3600.0 for _ in range(100))


def test_unlimited_attempts_by_default() -> None:
    assert not RetryPolicy().gives_up_after(10**9)
    assert RetryPolicy(max_attempts=3).gives_up_after(3)
    assert not RetryPolicy(max_attempts=3).gives_up_after(2)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_backoff": 0},
        {"initial_backoff": 5, "max_backoff": 1},
        {"multiplier": 0.5},
        {"max_attempts": 0},
    ],
)
def test_invalid_policy_fails_at_construction(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="RetryPolicy"):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_retry_after_is_honoured_up_to_an_hour_or_the_backoff_cap() -> None:
    rng = random.Random(1)
    edge = RetryPolicy(initial_backoff=1.0, max_backoff=300.0)
    assert edge.delay(0, 1800.0, rng) == 1800.0
    assert edge.delay(0, 86_400.0, rng) == 3600.0  # a broken header: not a day
    patient = RetryPolicy(initial_backoff=1.0, max_backoff=7200.0)
    assert patient.delay(0, 86_400.0, rng) == 7200.0
