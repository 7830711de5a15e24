"""The OIP proxy's side towards the model server: a pool of connections and a byte budget.

Client -> OipProxy -> **ChannelPool** (a few HTTP/2 connections) -> model
server. A model server may cap the calls one connection carries
(``SETTINGS_MAX_CONCURRENT_STREAMS``); calls over the cap on one shared
connection are refused (``RST_STREAM`` REFUSED_STREAM, UNAVAILABLE to the
caller) where the callers' own connections would have carried them. The
pool opens another connection (up to ``max_channels``) when every open one
carries ``busy_at`` calls or more, and sends each call on the least busy.
Its connections are opened with the options the proxy gives, which include
``RECONNECT_BACKOFF``: a model server that restarts is reached again within
about a second.

**ByteBudget** bounds the bytes of requests the proxy holds for the model
server at once (one for ModelInfer's, one for the other methods'; gRPC keeps
each until its answer): a call that does not fit waits for room, first come
first served, rather than being refused (a prediction must not fail because
of telemetry); its wait ends with its deadline. A call bigger than the whole
budget goes alone. The proxy takes room for the largest request before it
reads one (then only the request's own size): a waiting call's request stays
with its caller.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence
from typing import Any, Final

import grpc

MAX_CHANNELS: Final = 8
BUSY_AT: Final = 4  # calls on every open connection before another is opened
# gRPC's connection backoff (1 s, growing to 120 s) would keep answering
# UNAVAILABLE for up to two minutes after the model server next to the proxy
# restarts. Retry from 100 ms, growing to at most 1 s: a local server that
# comes back is reached within about a second, at the cost of one refused
# connect a second while it is down. (grpc.min_reconnect_backoff_ms is not a
# backoff but the time one connection attempt may take, 20 s by default: it
# stays, so a slow handshake is not cut short.)
RECONNECT_BACKOFF: Final = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


class Upstream:
    """One connection to the model server and the calls it carries now."""

    __slots__ = ("calls", "channel", "infer")

    def __init__(self, channel: grpc.aio.Channel, infer_method: str) -> None:
        self.channel = channel
        self.infer: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            infer_method, None, None
        )
        self.calls = 0


class ChannelPool:
    """Up to ``max_channels`` separate connections to ``target``; ``take`` the least busy."""

    def __init__(
        self,
        target: str,
        options: Sequence[tuple[str, Any]],
        infer_method: str,
        *,
        max_channels: int = MAX_CHANNELS,
        busy_at: int = BUSY_AT,
    ) -> None:
        # A channel of its own subchannel pool is a connection of its own;
        # without it, channels of the same target and options share one.
        self._options = [*options, ("grpc.use_local_subchannel_pool", 1)]
        self._target = target
        self._infer_method = infer_method
        self._max = max(1, max_channels)
        self._busy_at = max(1, busy_at)
        self.upstreams: list[Upstream] = []
        self._open()

    def _open(self) -> Upstream:
        channel = grpc.aio.insecure_channel(self._target, options=self._options)
        upstream = Upstream(channel, self._infer_method)
        self.upstreams.append(upstream)
        return upstream

    def take(self) -> Upstream:
        """The connection for one call (counted until ``give_back``)."""
        best = self.upstreams[0]
        for upstream in self.upstreams:
            if upstream.calls < best.calls:
                best = upstream
        if best.calls >= self._busy_at and len(self.upstreams) < self._max:
            best = self._open()
        best.calls += 1
        return best

    @staticmethod
    def give_back(upstream: Upstream) -> None:
        upstream.calls -= 1

    async def close(self) -> None:
        for upstream in self.upstreams:
            await upstream.channel.close(None)


class ByteBudget:
    """Bytes held at once, up to ``cap``; ``acquire`` waits its turn (FIFO) for room."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.used = 0
        self.waits = 0
        """Calls that had to wait for room."""
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def _fits(self, size: int) -> bool:
        # One bigger than the whole budget goes alone, when nothing else is held.
        return self.used + size <= self.cap or self.used == 0

    async def acquire(self, size: int) -> None:
        """Hold ``size`` bytes; wait while they do not fit (cancellation ends the wait)."""
        if not self._waiters and self._fits(size):
            self.used += size
            return
        self.waits += 1
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (size, waiter)
        self._waiters.append(entry)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(size)  # granted just as the call was cancelled
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
                self._wake()  # the next in line may fit now
            raise

    def release(self, size: int) -> None:
        self.used -= size
        self._wake()

    def share(self) -> BudgetShare:
        """A call's share of the budget, empty until it ``take``s some."""
        return BudgetShare(self)

    def _wake(self) -> None:
        while self._waiters:
            size, waiter = self._waiters[0]
            if waiter.done():  # cancelled
                self._waiters.popleft()
                continue
            if not self._fits(size):
                return
            self._waiters.popleft()
            self.used += size
            waiter.set_result(None)


class BudgetShare:
    """What one call holds of a ``ByteBudget``: taken, resized, given back once."""

    __slots__ = ("_budget", "amount")

    def __init__(self, budget: ByteBudget) -> None:
        self._budget, self.amount = budget, 0

    async def take(self, size: int) -> None:
        """Hold ``size`` bytes, in turn (the share holds none yet)."""
        await self._budget.acquire(size)
        self.amount = size

    def hold(self, size: int) -> None:
        """Hold ``size`` bytes now, instead of what the share holds, past the cap if need be.

        For bytes already here (a request read): waiting would only keep
        them longer. Counted, they keep later calls waiting until they drain.
        """
        self._budget.used += size - self.amount
        self.amount = size
        self._budget._wake()  # a smaller share leaves room for the next in line

    def release(self) -> None:
        """Give everything back (safe twice)."""
        if self.amount:
            amount, self.amount = self.amount, 0
            self._budget.release(amount)
