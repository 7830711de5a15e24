"""MLflow lookups shared between queries, each query within its deadline.

LineageService (``_service``) -> **SharedLookups** -> MlflowRegistry. One
lookup per key is in flight at once, shared by the queries that want it
(``shared``); ``ask`` runs a query's lookups side by side (``concurrency``
at once) until its deadline. A lookup the deadline cut goes on once no query
waits for it any more, in the background (at most ``MAX_BACKGROUND`` at once),
and fills the store for the next query; MLflow is held down at a deadline
only when it sent no answer at all within it (hung, not merely slow).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Final, TypeVar

from predtrace.collector._errors import RegistryError, StoreError
from predtrace.collector.lineage import MlflowRegistry
from predtrace.collector.lineage._mlflow import RegistryBackoffError

log = logging.getLogger("predtrace.collector.lineage")
MAX_BACKGROUND: Final = 4
"""Lookups that go on after the deadline of every query that wanted them."""
T = TypeVar("T")
Key = tuple[str, str, str]
"""("version", name, version) or ("alias", name, alias): one shared lookup."""


class DeadlineError(RegistryError):
    """MLflow did not answer within a query's deadline."""


class SharedLookups:
    """The lookups in flight of one service, and those going on in the background."""

    def __init__(self, registry: MlflowRegistry, *, concurrency: int, deadline_s: float) -> None:
        self.registry = registry
        self.concurrency = concurrency
        self.deadline_s = deadline_s
        self._inflight: dict[Key, asyncio.Task[Any]] = {}
        self._waiting: Counter[Key] = Counter()  # queries waiting for each in flight
        self._background: set[asyncio.Task[Any]] = set()

    def shared(self, key: Key, work: Callable[[], Coroutine[Any, Any, T]]) -> asyncio.Task[T]:
        """The lookup of ``key`` in flight, started now when there is none."""
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(work())
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._settled, key))
        return task

    def _settled(self, key: Key, task: asyncio.Task[Any]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # the queries that waited report it; background ones: the next

    def _left(self, key: Key, task: asyncio.Task[Any]) -> None:
        """A query stopped waiting for ``task``: the last one to leave hands it on."""
        self._waiting[key] -= 1
        if self._waiting[key] <= 0:
            del self._waiting[key]
            self._keep_going(task)

    def _keep_going(self, task: asyncio.Task[Any]) -> None:
        """Let a lookup no query waits for any more go on (cancel it when too many already do).

        Only once the last query waiting for it has left (its deadline, or its
        answer): cancelled under a query still waiting, it failed that query early.
        """
        if task in self._background or task.done():
            return
        if len(self._background) >= MAX_BACKGROUND:
            task.cancel()
            return
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def ask(
        self, calls: Mapping[Key, Callable[[], Coroutine[Any, Any, T]]], until: float
    ) -> dict[Key, T | RegistryError]:
        """Shared registry calls side by side (``concurrency`` at once) until ``until``.

        Each key maps to its answer or its RegistryError. Calls sent and still
        running at the deadline answer a timeout but go on in the background
        (``_keep_going``); when MLflow sent no answer at all meanwhile, it is
        marked down (``negative_ttl``): the next queries do not wait for it again.
        Calls still waiting for a slot were never sent: they answer "not asked"
        and say nothing against MLflow (a query of many lookups to a healthy
        but not instant MLflow must not mark it down).
        """
        registry = self.registry
        if not calls:
            return {}
        limit = asyncio.Semaphore(self.concurrency)
        sent: dict[Key, asyncio.Task[T]] = {}
        answered = registry.answers

        async def bounded(key: Key, call: Callable[[], Coroutine[Any, Any, T]]) -> T:
            async with limit:
                registry.check_backoff(key)  # before joining a lookup in flight, too
                task = sent[key] = self.shared(key, call)
                self._waiting[key] += 1
                try:
                    return await asyncio.shield(task)
                finally:
                    self._left(key, task)

        tasks = {key: asyncio.create_task(bounded(key, call)) for key, call in calls.items()}
        left = max(0.0, until - asyncio.get_running_loop().time())
        try:
            _, pending = await asyncio.wait(tasks.values(), timeout=left)
        finally:
            for task in tasks.values():
                task.cancel()  # a no-op for the finished ones
        await asyncio.gather(*pending, return_exceptions=True)
        timeout = DeadlineError(
            f"MLflow did not answer within the query's {self.deadline_s:g} s deadline"
        )
        not_asked = RegistryBackoffError(
            f"not asked: the query's {self.deadline_s:g} s for MLflow ran out first"
        )
        cut = {key for key, task in tasks.items() if task in pending and key in sent}
        if cut and registry.answers == answered:
            # MLflow sent nothing in the whole deadline: down or hung. Had it
            # answered any request, it is alive, only slower than this query.
            registry.mark_down(str(timeout))
        answers: dict[Key, T | RegistryError] = {}
        for key, task in tasks.items():
            if task in pending:
                answers[key] = timeout if key in cut else not_asked
            elif task.cancelled():  # its shared lookup was dropped from the background
                answers[key] = timeout
            else:
                answers[key] = _outcome(task)
        return answers

    async def close(self) -> None:
        """Cancel every lookup in flight."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _outcome(task: asyncio.Task[T]) -> T | RegistryError:
    """A finished registry call's answer; a failure of any kind as a RegistryError.

    Raises:
        StoreError: storing MLflow's answer failed (the lookup stores what it
            found): the store's failure, not the registry's, for the caller.
    """
    exc = task.exception()
    if exc is None:
        return task.result()
    if isinstance(exc, RegistryError):
        return exc
    if isinstance(exc, StoreError):
        raise exc
    # A bug reading MLflow's answer must not fail the query: a registry
    # outage never does (``_service``).
    log.error("MLflow lookup raised %s", type(exc).__name__, exc_info=exc)
    return RegistryError(f"unexpected {type(exc).__name__} reading MLflow's answer")
