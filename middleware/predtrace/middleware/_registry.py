"""Registry stamping: model name/version -> training run id and artifact digest.

A ``ModelResolver`` asks the registry (slow, may fail); the ``ResolverCache``
makes that cheap for the request path: a lookup is a dict read, and a miss
only queues the model for a background thread, so the first predictions of a
new model go out without a run id and later ones carry it. Each model is
resolved once (failures are retried after ``retry_interval``). The cache is
bounded: once full, a new model takes the place of one the registry did not
know (or failed on), else of the least recently used one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from predtrace.sidecar.pipeline import RateLimitedLog

_log = RateLimitedLog(logging.getLogger("predtrace.middleware"))
_CACHES: weakref.WeakSet[ResolverCache] = weakref.WeakSet()


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """What the registry knows about one model version."""

    run_id: str = ""
    artifact_digest: str = ""
    registry_model_id: str = ""


class ModelResolver(Protocol):
    """Looks a model version up in a registry. Called off the request path only."""

    def resolve(self, name: str, version: str) -> ResolvedModel | None:
        """Return what the registry knows, or None when it does not know the model.

        May block (it runs in a background thread) and may raise; a failure is
        counted and retried later.
        """
        ...


class StaticResolver:
    """A resolver backed by a fixed mapping ``(name, version) -> ResolvedModel``."""

    def __init__(self, models: Mapping[tuple[str, str], ResolvedModel]) -> None:
        self._models = dict(models)

    def resolve(self, name: str, version: str) -> ResolvedModel | None:
        """Return the mapped model, if any."""
        return self._models.get((name, version))


@dataclass(slots=True)
class _Entry:
    result: ResolvedModel | None
    retry_at: float  # 0: final; else monotonic time after which to ask again


class ResolverCache:
    """O(1) cached lookups in front of a ModelResolver, resolved by a background thread.

    Bounded: at most ``max_models`` models are remembered. A new one evicts a
    model the registry did not know or failed on (oldest first), else the
    least recently used resolved one; only when every entry still waits for
    the registry is it not resolved. Both are counted in ``overflow``.

    Threads: lookups, scheduling and eviction run on the event loop; the
    background thread only writes the result of an entry still pending (never
    evicted), and appends to the deque of negative entries.
    """

    def __init__(
        self, resolver: ModelResolver, *, max_models: int = 1024, retry_interval: float = 60.0
    ) -> None:
        self._resolver = resolver
        self._max = max_models
        self._retry_interval = retry_interval
        self.overflow = 0
        self.failures = 0
        self._reset()
        _CACHES.add(self)

    def _reset(self) -> None:
        # Insertion order is recency: a hit moves its entry to the end.
        self._entries: dict[tuple[str, str], _Entry | None] = {}
        self._todo: deque[tuple[str, str]] = deque()
        # Models resolved to nothing (unknown, or failed), oldest first: evicted
        # before any known one. May hold stale keys (checked when taken); bounded.
        self._negative: deque[tuple[str, str]] = deque(maxlen=2 * self._max)
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None

    def lookup(self, name: str, version: str) -> ResolvedModel | None:
        """Return the cached result now; on a miss, queue the model and return None."""
        key = (name, version)
        entry = self._entries.get(key, _MISSING)
        if entry is _MISSING:
            self._schedule(key)
            return None
        if entry is None:  # pending
            return None
        # Most recently used last (the background thread never adds or removes keys).
        del self._entries[key]
        self._entries[key] = entry
        if entry.retry_at and time.monotonic() >= entry.retry_at:
            entry.retry_at = 0.0
            self._entries[key] = None
            self._todo.append(key)
            self._wake.set()
        return entry.result

    def peek(self, name: str, version: str) -> ResolvedModel | None:
        """The cached result, if any; never asks the registry (for names not to be trusted)."""
        entry = self._entries.get((name, version))
        return entry.result if entry is not None else None

    def _schedule(self, key: tuple[str, str]) -> None:
        if self._closed:
            return
        if len(self._entries) >= self._max:
            self.overflow += 1
            if not self._evict():
                return  # every entry waits for the registry: this model is not resolved
        self._entries[key] = None
        self._todo.append(key)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="predtrace-resolve", daemon=True)
            self._thread.start()
        self._wake.set()

    def _evict(self) -> bool:
        """Forget one model to make room: an unknown or failed one, else the least recently used."""
        entries = self._entries
        negative = self._negative
        while negative:
            key = negative.popleft()
            entry = entries.get(key)
            # Still there, not pending, still without a result (not resolved since).
            if entry is not None and entry.result is None:
                del entries[key]
                return True
        for key, entry in entries.items():  # oldest use first
            if entry is not None:  # a pending entry is the background thread's
                del entries[key]
                return True
        return False

    def prime(self, name: str, version: str) -> ResolvedModel | None:
        """Resolve one model now, in the calling thread (used at startup, off the loop)."""
        key = (name, version)
        self._entries[key] = self._resolve(key)
        entry = self._entries[key]
        return entry.result if entry else None

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait()
            self._wake.clear()
            while self._todo and not self._closed:
                key = self._todo.popleft()
                self._entries[key] = self._resolve(key)

    def _resolve(self, key: tuple[str, str]) -> _Entry:
        try:
            entry = _Entry(self._resolver.resolve(*key), 0.0)
        except Exception as exc:  # noqa: BLE001 - a registry outage must not reach requests
            self.failures += 1
            _log.warning("resolve", "model registry lookup failed: %s", type(exc).__name__)
            entry = _Entry(None, time.monotonic() + self._retry_interval)
        if entry.result is None:
            self._negative.append(key)
        return entry

    def close(self, timeout: float = 1.0) -> None:
        """Stop the background thread. Safe twice."""
        self._closed = True
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def reopened(self) -> ResolverCache:
        """A new open cache with what this one resolved for good, and its counts.

        For an app started again after ``close``. A new object: this one's
        thread may still be in a registry call that outlived ``close``.
        """
        cache = ResolverCache(
            self._resolver, max_models=self._max, retry_interval=self._retry_interval
        )
        cache._keep(self._resolved())
        cache.overflow, cache.failures = self.overflow, self.failures
        return cache

    def _resolved(self) -> dict[tuple[str, str], _Entry]:
        return {k: v for k, v in self._entries.items() if v is not None and not v.retry_at}

    def _keep(self, resolved: dict[tuple[str, str], _Entry]) -> None:
        self._entries.update(resolved)
        self._negative.extend(k for k, v in resolved.items() if v.result is None)

    def _after_fork_in_child(self) -> None:
        # Keep what the parent learnt; the parent's thread does not exist here.
        done = self._resolved()
        self._reset()
        self._keep(done)


_MISSING = _Entry(None, -1.0)


def _reset_after_fork() -> None:
    for cache in list(_CACHES):
        cache._after_fork_in_child()


os.register_at_fork(after_in_child=_reset_after_fork)
