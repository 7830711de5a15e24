"""One attempt to send a batch, and what its outcome says about the batch.

Shipper -> ``BatchSender`` -> collector, and back. The shipper sends through
a ``BatchSender`` (``CollectorClient`` is the real one), one attempt at a
time, and reads each failed attempt here: whether it may count toward
quarantining the batch (a 500 while the collector is ready), or says nothing
about it (connection errors, busy statuses, 401/403, 404/405, 3xx, a 2xx that
is no acknowledgement), and whether a refusal is about the batch's size (413)
or its numbering (409), not its content. A death while an attempt waits on
the network says nothing against the batch either (``attempt``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

from predtrace.sidecar._shipstate import Plan
from predtrace.sidecar.pipeline import PermanentExportError, RetryableExportError
from predtrace.sidecar.pipeline._collector_http import RefusedBatchError
from predtrace.wire import IngestAck

# 5xx statuses that say "the collector is busy", not "this batch is bad".
_BUSY_STATUSES = frozenset({502, 503, 504})
_CONFLICT = 409  # the collector holds this (producer, seq) with other bytes
_TOO_LARGE = 413  # the collector or a proxy refuses a body this large
# An attempt out this long is waiting on the network: a death from then on
# says nothing against the batch (the mark costs one state write, and only
# when the collector is this slow).
ON_THE_WIRE_S = 1.0


class BatchSender(Protocol):
    """Sends one encoded batch (``CollectorClient`` is the real one)."""

    async def send(self, body: bytes, *, compressed: bool) -> IngestAck:
        """POST the body; raise Retryable/PermanentExportError on failure."""
        ...

    # Optional: ``async def ready(self) -> bool | None``, whether the collector
    # says it is ready, None when it cannot tell (``CollectorClient.ready``).
    # Without it a 500 counts against the batch, as it must for a sender that
    # cannot tell an outage from a bad batch.

    async def close(self) -> None:
        """Release connections."""
        ...


async def attempt(
    sender: BatchSender,
    plan: Plan,
    *,
    compressed: bool,
    on_the_wire: Callable[[Plan], Awaitable[None]],
) -> IngestAck:
    """Send once; once the attempt has been out a moment, clear the plan's death count.

    A sidecar killed while the collector (or a stalled uplink) holds the
    request did not die of the batch: that death must not count toward
    quarantining it (``on_the_wire`` clears the count durably). A collector
    that answers within ``ON_THE_WIRE_S`` costs no extra state write.
    """
    assert plan.body is not None  # noqa: S101 - plans in memory always carry their body
    send = asyncio.ensure_future(sender.send(plan.body, compressed=compressed))
    try:
        if plan.replays:
            done, _ = await asyncio.wait({send}, timeout=ON_THE_WIRE_S)
            if not done:
                await on_the_wire(plan)
        return await send
    finally:
        send.cancel()  # only still running when this attempt was cancelled


def counts_against_batch(exc: RetryableExportError) -> bool:
    """Whether a failed attempt may say the batch itself is bad (a 500, not a busy 503).

    Connection errors, 2xx answers that are no acknowledgement, 3xx, 401/403,
    404/405 and busy statuses say nothing about the batch: it is kept forever.
    A 500 counts unless the collector says it is not ready (see
    ``against_batch``): a collector or proxy answering 500 to everything is an
    outage.
    """
    status = exc.status
    return status is not None and 500 <= status < 600 and status not in _BUSY_STATUSES


async def against_batch(sender: BatchSender, exc: RetryableExportError) -> bool:
    """Whether a failed attempt counts toward quarantining the batch.

    A 500 says the batch is bad unless the collector says it is not ready
    (its store down, or a proxy or load balancer answering 5xx to
    everything): that is an outage, and an outage never costs a batch.
    When readiness cannot be told (no ``ready``, or a ``/readyz`` an
    ingress does not route), the 500 counts.
    """
    if not counts_against_batch(exc):
        return False
    probe = getattr(sender, "ready", None)
    return probe is None or (await probe()) is not False


def too_large(exc: PermanentExportError) -> bool:
    """Whether the collector or a proxy in front of it refused the batch as too large."""
    return isinstance(exc, RefusedBatchError) and exc.status == _TOO_LARGE


def seq_reused(exc: PermanentExportError) -> bool:
    """Whether the collector refused the batch because it holds its seq with other bytes."""
    return (
        isinstance(exc, RefusedBatchError)
        and exc.status == _CONFLICT
        and "reused" in exc.detail.lower()
    )
