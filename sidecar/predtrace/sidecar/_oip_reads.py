"""How the OIP proxy reads its callers' requests, within bounds.

Client -> **RequestReads** -> OipProxy -> model server. A request's size
is unknown until it is read, and reading it takes it whole from its caller
(gRPC opens the call's flow-control window to the message being read);
until then its bytes stay with its caller (``LISTENER_OPTIONS``).

A call takes room in a byte budget (``_oip_upstream.ByteBudget``) for the
largest request before its read (``read``), and then holds its request's
own size. A call whose request has not arrived ``READ_GRACE_S`` after it
got its room gives the room back and is read outside the budget (a slow
link, or a caller that has not sent yet): calls waiting on their callers
never hold up the others. At most ``MAX_READS_OUTSIDE`` at once; past that,
the call is refused, retryable (``TooManySlowError``); as many as the
budget has messages (``RequestReads.most_outside``). Its requests thus stay
within twice the budget (the reads outside it, then the budget, which takes
no new call while they drain past its cap).

ModelInfer calls have a budget of their own, and so do the methods passed
through that take one request (``PASSTHROUGH_MESSAGES``): a health check
never waits in line behind inference, and a stalled model server holds no
more of a model server's own methods' requests than that budget. Streaming
calls passed through are bounded in number instead (``MAX_STREAMS``; each
holds one message at a time, the one it is sending on), not charged to a
budget: a stream whose caller leaves the answers unread keeps its message in
hand (flow control), and charged, it would hold up every call behind it.
"""

from __future__ import annotations

import asyncio
from typing import Final, Literal

import grpc

from predtrace.sidecar._oip_upstream import BudgetShare

# Requests in flight to the model server, in maximum messages, by default.
INFLIGHT_MESSAGES: Final = 16
# A request not read this long after its call got room in the budget is
# read outside it.
READ_GRACE_S: Final = 0.25
# Requests read outside the budget at once, at most: each holds what of it has
# arrived, up to a whole message, uncounted until read. Past that, a call whose
# request has not arrived is refused, retryable (UNAVAILABLE): kept waiting
# with its room, it would hold up the calls behind it (callers that never send
# would stall the proxy); read outside the budget, it would hold bytes beyond
# any bound.
MAX_READS_OUTSIDE: Final = INFLIGHT_MESSAGES
# Requests of the methods passed through that take one request, in flight to
# the model server at once, in maximum messages (metadata and health checks:
# small, and each holds its own size once read).
PASSTHROUGH_MESSAGES: Final = 4
# Streaming calls passed through at once, at most; past that, a new one is
# refused, retryable.
MAX_STREAMS: Final = 2 * INFLIGHT_MESSAGES


def too_many_slow(method: str, most: int) -> str:
    """The refusal's details for a call of ``method`` (the last part of its name)."""
    return (
        f"{method}: the request had not arrived {READ_GRACE_S:g} s after the proxy had room "
        f"for it, and {most} other calls' requests are arriving slowly; retry"
    )


Cardinality = Literal["unary", "one-request", "stream"]
"""How a method passed through is called upstream: one request and one answer
(unary-unary), one request and any answers (unary-stream), or a stream."""


def too_many_streams(method: str) -> str:
    """The refusal's details for a streaming call of ``method`` past ``MAX_STREAMS``."""
    return (
        f"{method}: {MAX_STREAMS} streaming calls are passing through the proxy already;"
        " retry once one has ended"
    )


class TooManySlowError(Exception):
    """A request slow to arrive while ``MAX_READS_OUTSIDE`` others are (see ``RequestReads``)."""


class RequestReads:
    """One proxy's reads of its callers' requests, and their counts."""

    def __init__(self, most_outside: int | None = None) -> None:
        """``most_outside``: reads outside the budget at once (``MAX_READS_OUTSIDE``
        by default): twice the budget is the bound, so as many as it has messages."""
        self._most_outside = most_outside
        self.slow_reads = 0  # requests read outside the budget: not arrived in READ_GRACE_S
        self.reading_outside = 0  # of those, being read now (at most MAX_READS_OUTSIDE)
        self.slow_refused = 0  # calls refused as slow past MAX_READS_OUTSIDE (UNAVAILABLE)
        self.streams = 0  # streaming calls passing through now (at most MAX_STREAMS)
        self.streams_refused = 0  # refused past MAX_STREAMS (UNAVAILABLE)

    def most_outside(self) -> int:
        """Reads outside the budget at once, at most."""
        return MAX_READS_OUTSIDE if self._most_outside is None else self._most_outside

    async def read(
        self, context: grpc.aio.ServicerContext[bytes, bytes], share: BudgetShare
    ) -> object:
        """The call's request (``EOF`` if none came), within the room ``share`` took.

        Read from the context (an iterator over the request stream left
        suspended after it would keep the request alive). A read outside the
        budget gives the share's room back; the caller resizes the share to
        what it holds once the read is done (``BudgetShare.hold``).

        Raises:
            TooManySlowError: past ``MAX_READS_OUTSIDE`` slow reads (to be refused).
        """
        read = asyncio.ensure_future(context.read())
        outside = False
        try:
            done, _ = await asyncio.wait((read,), timeout=READ_GRACE_S)
            if not done:
                if self.reading_outside >= self.most_outside():
                    self.slow_refused += 1
                    raise TooManySlowError
                outside = True
                self.reading_outside += 1
                share.release()
                self.slow_reads += 1
            return await read
        finally:
            read.cancel()  # nothing once it is done; else the call is ending
            if outside:
                self.reading_outside -= 1
