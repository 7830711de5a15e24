"""The batches a sender recently had spooled, by its batch id: a retry is answered, not spooled.

A sender's ``RecordBatch`` call can end on its side (a deadline, a lost
connection) while the sidecar finishes spooling it: the spool was slow, not
the batch bad. The retry would spool the same events a second time, and the
collector would store them twice (its (producer, seq) idempotence covers the
sidecar's own resends, not a sender's second copy). A sender that names its
batch (``RecordBatchRequest.batch_id``, kept across retries) gets, for a
retry, the answer of the first call: awaited if it is still spooling, given
at once if it is done. The spooling runs to its end whatever becomes of the
call that started it.

Bounded: the last ``capacity`` ids and ``max_bytes`` of answers (an answer
listing rejections is larger), in memory: a restart forgets them. An id sent
again with other bytes is refused: answering it with the first batch's count
would acknowledge events that were never spooled.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Final, Generic, TypeVar

MAX_BATCH_ID_BYTES: Final = 64
DEFAULT_CAPACITY: Final = 4096
DEFAULT_MAX_BYTES: Final = 8 * 1024 * 1024
_T = TypeVar("_T")


class BatchIdReusedError(ValueError):
    """A batch id already used for other bytes."""


class RecentBatches(Generic[_T]):
    """Spool results by batch id, for the last ``capacity`` ids. Event-loop only."""

    def __init__(
        self,
        size: Callable[[_T], int],
        *,
        capacity: int = DEFAULT_CAPACITY,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self._size = size
        self._capacity = capacity
        self._max_bytes = max_bytes
        # batch id -> (digest of the request, the spooling's task)
        self._entries: OrderedDict[bytes, tuple[bytes, asyncio.Task[_T]]] = OrderedDict()
        self._held: dict[bytes, int] = {}  # bytes of each answer kept, once done
        self.held_bytes = 0
        self.duplicates = 0
        """Calls answered with an earlier call's result."""

    def __len__(self) -> int:
        return len(self._entries)

    async def spool_once(
        self, batch_id: bytes, request: bytes, spool: Callable[[], Awaitable[_T]]
    ) -> tuple[_T, bool]:
        """``(result, duplicate)``: run ``spool`` for a new id, else the first call's result.

        The spooling is a task of its own, so a caller that goes away (its
        deadline passed) leaves it to finish, and its result to the retry.
        A spooling that failed is forgotten: the retry spools afresh.

        Raises:
            BatchIdReusedError: the id came with other bytes before.
            Whatever ``spool`` raised, to the caller that started it and to
            those waiting on it.
        """
        digest = hashlib.blake2b(request, digest_size=16).digest()
        entry = self._entries.get(batch_id)
        if entry is not None:
            if entry[0] != digest:
                raise BatchIdReusedError(
                    "batch_id already used for a batch with other bytes: give each batch its "
                    "own id and keep it only for that batch's retries"
                )
            self.duplicates += 1
            del entry  # it holds the task: see _outcome
            return await _outcome(self._entries[batch_id][1]), True
        self._start(batch_id, digest, spool)
        return await _outcome(self._entries[batch_id][1]), False

    def _start(self, batch_id: bytes, digest: bytes, spool: Callable[[], Awaitable[_T]]) -> None:
        """The spooling of a new id, as a task of its own, remembered under the id."""
        task = asyncio.ensure_future(spool())
        self._entries[batch_id] = (digest, task)
        task.add_done_callback(lambda done: self._settle(batch_id, done))
        self._trim()

    def _settle(self, batch_id: bytes, task: asyncio.Task[_T]) -> None:
        """Keep a done spooling's answer (counted in bytes), forget a failed one."""
        entry = self._entries.get(batch_id)
        if entry is None or entry[1] is not task:
            return
        if task.cancelled() or task.exception() is not None:
            del self._entries[batch_id]
            return
        size = self._size(task.result())
        self._held[batch_id] = size
        self.held_bytes += size
        self._trim()

    def _trim(self) -> None:
        """Forget the oldest ids past the bounds; not one still spooling (calls bound those)."""
        entries = self._entries
        while len(entries) > self._capacity or self.held_bytes > self._max_bytes:
            oldest, (_, task) = next(iter(entries.items()))
            if not task.done():
                return
            del entries[oldest]
            self.held_bytes -= self._held.pop(oldest, 0)


async def _outcome(task: asyncio.Task[_T]) -> _T:
    """The spooling's result, or its exception raised, the caller staying while it runs.

    No frame the exception passes through keeps the task (``spool_once``
    hands it over without a local): the task holds the exception, whose
    traceback holds those frames, and a frame holding the task would close a
    reference cycle (the request's bytes in it) that only the cyclic garbage
    collector frees, which the sidecar runs seldom.
    """
    try:
        return await asyncio.shield(task)
    finally:
        del task
