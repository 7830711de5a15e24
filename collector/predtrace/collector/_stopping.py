"""What a stopping collector ends: uploads still arriving, answers still being built or sent.

On SIGTERM a stalled upload held the stop for its body deadline (30 s, the
default grace of a Kubernetes pod). ``RunningCollector.stop`` gives what is
tracked here a short grace, then ends it: nothing in it was acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Final, TypeVar

from aiohttp import StreamReader, web

_T = TypeVar("_T")


class ShuttingDownError(TimeoutError):
    """Set on the body of an upload that a stopping collector ends (see ``Stopping``).

    A TimeoutError: after a handler, aiohttp reads what is left of an unread
    body for up to 10 s ("lingering"), and ends that quietly on a timeout,
    closing the connection; any other exception there is logged as unhandled.
    """


class Stopping:
    """What a stopping collector ends: uploads still arriving, answers still being built or sent.

    Nothing in them was acknowledged: a body not yet received was not
    stored, a query answer can be asked again. A batch whose body has
    arrived is no longer tracked: it is committed and acknowledged whatever
    the stop. ``stop`` lets them run for a grace period, then sets
    ``ShuttingDownError`` on each body still arriving (its handler answers
    503 at once) and aborts each connection still sending an answer (its
    buffered bytes are dropped: closing would wait for a client that may
    never read them). Event-loop only.
    """

    def __init__(self) -> None:
        self.stopped = False
        self._reads: set[StreamReader] = set()
        self._sends: set[asyncio.Transport] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def reading(self, body: StreamReader) -> Iterator[None]:
        """Track ``body`` while the ``with`` reads it; a stopped collector refuses it at once.

        Raises:
            ShuttingDownError: the collector stopped (at entry or while reading).
        """
        if self.stopped:
            raise ShuttingDownError("collector shutting down")
        self._track(self._reads, body)
        try:
            yield
        finally:
            self._untrack(self._reads, body)

    @contextlib.contextmanager
    def answering(self, transport: asyncio.Transport) -> Iterator[None]:
        """Track ``transport`` while the ``with`` builds and sends an answer on it.

        Aborted on stop once the grace is over (at once when the stop is).
        """
        if self.stopped:
            transport.abort()
        self._track(self._sends, transport)
        try:
            yield
        finally:
            self._untrack(self._sends, transport)

    async def stop(self, grace_s: float) -> None:
        """Wait up to ``grace_s`` for what is tracked, then end the rest (safe twice)."""
        if self._reads or self._sends:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace_s):
                    await self._idle.wait()
        self.stopped = True
        for body in list(self._reads):
            body.set_exception(ShuttingDownError("collector shutting down"))
        for transport in list(self._sends):
            transport.abort()

    def _track(self, where: set[_T], item: _T) -> None:
        where.add(item)
        self._idle.clear()

    def _untrack(self, where: set[_T], item: _T) -> None:
        where.discard(item)
        if not self._reads and not self._sends:
            self._idle.set()


STOPPING: Final = web.AppKey("predtrace_stopping", Stopping)


def reading(request: web.Request) -> contextlib.AbstractContextManager[None]:
    """Track the request's body while it is read, when its app can stop (``STOPPING``)."""
    stopping = request.app.get(STOPPING)
    return contextlib.nullcontext() if stopping is None else stopping.reading(request.content)
