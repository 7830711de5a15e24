"""Queries with registry fallback: what the query API asks, answered from the store.

When a prediction's model version (or the alias it names instead of a version)
is not in the store and an MLflow registry is configured, the lineage is
fetched from MLflow, merged into the store and the answer recomputed. Lineage
that came from MLflow is refreshed in the background once its cache entry is
older than the TTL; so is an alias MLflow named, and MLflow's answer then wins
over the alias stored from it earlier.

A registry outage never fails a query: the lookups of one query run
concurrently (at most ``REGISTRY_CONCURRENCY`` at once) within one deadline
(``REGISTRY_DEADLINE_S``), and the store's answer is returned with the hop named
as missing and why. A lookup that failed is not tried again for the registry's
``negative_ttl``, so the next queries do not wait for it. One lookup per key
is in flight at once, shared by the queries that want it; one the deadline
cut goes on in the background and fills the store for the next query
(``_lookups``). Only when a query
has no answer at all without MLflow (the lineage of one model version or
alias) does the failure reach the caller, as a ``RegistryError``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any, Final, Literal, TypeVar

from predtrace.collector._errors import RegistryError
from predtrace.collector._lookups import DeadlineError, Key, SharedLookups
from predtrace.collector._metrics import CollectorMetrics
from predtrace.collector.lineage import MlflowRegistry, Registration
from predtrace.collector.lineage._mlflow import RegistryBackoffError
from predtrace.collector.store import ChainKey, OnConflict, Store

log = logging.getLogger("predtrace.collector.lineage")
Json = dict[str, object]
RegistrationKind = Literal["api", "openlineage", "mlflow"]
_MAX_REFRESHES: Final = 16
_FAILED: Final = "the MLflow lookup failed: "

REGISTRY_DEADLINE_S: Final = 2.0
"""How long one query waits for MLflow in all (its lookups run side by side)."""
REGISTRY_CONCURRENCY: Final = 4
"""How many MLflow requests one query has in flight at once."""

T = TypeVar("T")
_Model = tuple[str, str, str]
"""(name, version, alias when no version): what a prediction names, as in ``ChainKey``."""


class LineageService:
    """Store queries plus the MLflow fallback (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        registry: MlflowRegistry | None,
        metrics: CollectorMetrics,
        *,
        registry_deadline_s: float = REGISTRY_DEADLINE_S,
        registry_concurrency: int = REGISTRY_CONCURRENCY,
    ) -> None:
        self.store, self.registry, self.metrics = store, registry, metrics
        self.registry_deadline_s = registry_deadline_s
        self._refreshing: set[asyncio.Task[None]] = set()
        self._lookups = (
            SharedLookups(
                registry, concurrency=registry_concurrency, deadline_s=registry_deadline_s
            )
            if registry is not None
            else None
        )

    async def register(
        self,
        registration: Registration,
        *,
        on_conflict: OnConflict = "refuse",
        kind: RegistrationKind | None = None,
    ) -> list[str]:
        """Merge lineage into the store; the conflicts kept (see ``Store.register``).

        Counted by ``kind`` (from ``registration.source`` when not given): the
        free-text source is kept in the store, not in a metric label.
        """
        conflicts = await self.store.register(registration, on_conflict=on_conflict)
        label = kind or _kind(registration.source)
        self.metrics.registrations.labels(label).inc()
        if conflicts:
            self.metrics.lineage_conflicts.labels(label).inc(len(conflicts))
        return conflicts

    async def _store_found(self, registration: Registration) -> None:
        """Merge MLflow's answer: what was registered first stays, the rest is stored."""
        conflicts = await self.register(registration, on_conflict="keep", kind="mlflow")
        if conflicts:
            log.warning("MLflow disagrees with stored lineage: %s", "; ".join(conflicts))

    def _count_failure(self, what: str, exc: RegistryError) -> None:
        if isinstance(exc, RegistryBackoffError):
            self.metrics.registry_lookups.labels("skipped").inc()
            log.debug("MLflow lookup of %s skipped: %s", what, exc)
            return
        self.metrics.registry_lookups.labels(
            "timeout" if isinstance(exc, DeadlineError) else "error"
        ).inc()
        log.warning("MLflow lookup of %s failed: %s", what, exc)

    async def _from_registry(self, name: str, version: str) -> bool:
        """Fetch one model version from MLflow into the store; True when found.

        No deadline of its own (background refreshes): queries use ``_fetch_versions``.
        """
        if self.registry is None:
            return False
        try:
            assert self._lookups is not None  # noqa: S101 -- there is a registry
            found = await asyncio.shield(
                self._lookups.shared(
                    ("version", name, version), functools.partial(self._lookup, name, version)
                )
            )
        except RegistryError as exc:
            self._count_failure(f"{name}/{version}", exc)
            return False
        self.metrics.registry_lookups.labels("found" if found else "missing").inc()
        return found

    async def _lookup(self, name: str, version: str) -> bool:
        """Ask MLflow for one model version and store what it knows; whether it has it.

        Not asked again while its answer that it has it is fresh: the store
        took that answer (the registry keeps no registration). Predictions
        naming an alias from before it last moved stay unexplained, and their
        every pivot would ask for the alias's version again.
        """
        assert self.registry is not None  # noqa: S101 -- only called with a registry
        fresh, found = self.registry.cached(name, version)
        if fresh and found:
            return True
        registration = await self.registry.lookup(name, version)
        if registration is not None:
            await self._store_found(registration)
        return registration is not None

    def _deadline(self) -> float:
        """The loop time by which a query starting now stops waiting for MLflow."""
        return asyncio.get_running_loop().time() + self.registry_deadline_s

    async def _ask(
        self, calls: Mapping[Key, Callable[[], Coroutine[Any, Any, T]]], until: float
    ) -> dict[Key, T | RegistryError]:
        """``SharedLookups.ask`` (nothing without a registry)."""
        return {} if self._lookups is None else await self._lookups.ask(calls, until)

    async def _fetch_versions(
        self, keys: Iterable[tuple[str, str]], until: float
    ) -> tuple[bool, dict[tuple[str, str], RegistryError]]:
        """Ask MLflow for model versions and store what it knows: (any found, failures)."""
        registry = self.registry
        if registry is None:
            return False, {}
        calls = {
            ("version", *key): functools.partial(self._lookup, *key) for key in sorted(set(keys))
        }
        found, failures = False, {}
        for (_, name, version), answer in (await self._ask(calls, until)).items():
            if isinstance(answer, RegistryError):
                failures[(name, version)] = answer
                self._count_failure(f"{name}/{version}", answer)
                continue
            self.metrics.registry_lookups.labels("found" if answer else "missing").inc()
            found = found or answer is True
        return found, failures

    async def _resolve_aliases(
        self, keys: Iterable[tuple[str, str]], until: float
    ) -> dict[tuple[str, str], str | RegistryError | None]:
        """Ask MLflow where aliases point now: (name, alias) -> version, None or the failure."""
        registry = self.registry
        if registry is None:
            return {}
        calls = {
            ("alias", *key): functools.partial(registry.resolve_alias, *key)
            for key in sorted(set(keys))
        }
        answers = {
            (key[1], key[2]): answer for key, answer in (await self._ask(calls, until)).items()
        }
        for (name, alias), answer in answers.items():
            if isinstance(answer, RegistryError):
                self._count_failure(f"{name}@{alias}", answer)
            else:
                self.metrics.registry_lookups.labels("found" if answer else "missing").inc()
        return answers

    async def _fetch_lineage(
        self, versions: set[tuple[str, str]], aliases: set[tuple[str, str]], until: float
    ) -> tuple[bool, dict[_Model, str]]:
        """Fetch unregistered versions and unknown aliases: (any stored, failures by model)."""
        failures: dict[_Model, str] = {}
        moved: dict[tuple[str, str], str] = {}
        for (name, alias), answer in (await self._resolve_aliases(aliases, until)).items():
            if isinstance(answer, RegistryError):
                failures[(name, "", alias)] = str(answer)
            elif answer is not None:
                moved[(name, alias)] = answer
        # The store takes an alias with its model version's registration: fetch
        # the version (the registry's cache entry carries the alias as MLflow has it now).
        wanted = versions | {(name, version) for (name, _), version in moved.items()}
        found, failed = await self._fetch_versions(wanted, until)
        for (name, version), exc in failed.items():
            failures[(name, version, "")] = str(exc)
        for (name, alias), version in moved.items():
            if (name, version) in failed:
                failures[(name, "", alias)] = str(failed[(name, version)])
        return found, failures

    def _maybe_refresh(self, name: str, version: str, model: object) -> None:
        if self.registry is None or not isinstance(model, dict):
            return
        if model.get("origin") != "mlflow":
            return
        fresh, _ = self.registry.cached(name, version)
        if not fresh:
            self._in_background(functools.partial(self._refresh, name, version))

    def _maybe_refresh_alias(self, name: str, alias: str, model: object) -> None:
        """Ask MLflow again, in the background, for a stale alias stored from it."""
        if self.registry is None or not isinstance(model, dict):
            return
        if model.get("origin") != "mlflow":
            return
        fresh, _ = self.registry.cached_alias(name, alias)
        if not fresh:
            self._in_background(functools.partial(self._refresh_alias, name, alias))

    def _in_background(self, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        if len(self._refreshing) >= _MAX_REFRESHES:
            return
        task = asyncio.create_task(work())
        self._refreshing.add(task)
        task.add_done_callback(self._refreshing.discard)

    async def _refresh(self, name: str, version: str) -> None:
        try:
            await self._from_registry(name, version)
        except Exception:
            log.exception("background MLflow refresh of %s/%s failed", name, version)

    async def _refresh_alias(self, name: str, alias: str) -> None:
        try:
            await self.resolve_alias(name, alias)
        except RegistryError:
            pass  # counted and logged; the stored alias stays
        except Exception:
            log.exception("background MLflow refresh of alias %s@%s failed", name, alias)

    async def pivot(self, column: str, value: object, limit: int) -> list[Json]:
        """Predictions by trace or prediction id, each with its lineage chain."""
        predictions, unresolved = await self.store.pivot(column, value, limit)
        aliases = _unresolved_aliases(predictions, predictions.unlisted or [])
        if (unresolved or aliases) and self.registry is not None:
            found, failures = await self._fetch_lineage(
                set(_versions(unresolved)), aliases, self._deadline()
            )
            if found:
                predictions, _ = await self.store.pivot(column, value, limit)
            _note_failures(predictions, predictions.unlisted or [], failures)
        for prediction in predictions:
            lineage = prediction["lineage"]
            if isinstance(lineage, dict) and isinstance(lineage.get("model_version"), dict):
                model = lineage["model_version"]
                self._maybe_refresh(str(model["name"]), str(model["version"]), model)
                if model.get("resolved_via_alias"):
                    alias = str(model["resolved_via_alias"])
                    self._maybe_refresh_alias(str(model["name"]), alias, model)
        return predictions

    async def resolve_alias(self, name: str, alias: str) -> str | None:
        """The version an alias points at.

        The store's, unless MLflow is configured and the stored alias came from
        MLflow (its version's origin) or is unknown: then MLflow's answer
        (cached for the registry's TTL) wins, and is stored. When MLflow
        cannot be asked, the stored alias (if any) answers.

        Raises:
            RegistryError: the store does not know the alias and MLflow could not be asked.
        """
        stored = await self.store.resolve_alias(name, alias)
        if self.registry is None or (stored is not None and not await self._mlflows(name, stored)):
            return stored
        until = self._deadline()
        answer = (await self._resolve_aliases([(name, alias)], until))[(name, alias)]
        if isinstance(answer, RegistryError):
            if stored is None:
                raise answer
            return stored
        if answer is None:
            return stored  # the store may hold it from another source
        if answer != stored:
            await self._fetch_versions([(name, answer)], until)  # stores the alias too
        return answer

    async def _mlflows(self, name: str, version: str) -> bool:
        """Whether the stored model version (and so its aliases) came from MLflow."""
        model = await self.store.model(name, version)
        return model is not None and model.get("origin") == "mlflow"

    async def model_lineage(self, name: str, version: str) -> Json | None:
        """A model version's lineage (fetched from MLflow when the store lacks it).

        Raises:
            RegistryError: the store lacks it and the MLflow lookup failed.
        """
        lineage = await self.store.model_lineage(name, version)
        if lineage is None and self.registry is not None:
            found, failures = await self._fetch_versions([(name, version)], self._deadline())
            if (name, version) in failures:
                raise failures[(name, version)]
            if found:
                lineage = await self.store.model_lineage(name, version)
        if lineage is not None:
            self._maybe_refresh(name, version, lineage["model_version"])
        return lineage

    async def completeness(self) -> Json:
        """Completeness per model, after fetching unregistered versions from MLflow."""
        if self.registry is not None:
            served = await self.store.served_versions()
            unregistered = [k for k in served if await self.store.model(*k) is None]
            if unregistered:
                await self._fetch_versions(unregistered, self._deadline())
        return await self.store.completeness()

    async def close(self) -> None:
        """Cancel background refreshes and lookups and close the registry client."""
        tasks = list(self._refreshing)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._lookups is not None:
            await self._lookups.close()
        if self.registry is not None:
            await self.registry.close()


def _kind(source: str) -> RegistrationKind:
    """The metric label of a registration's free-text source."""
    return "openlineage" if source == "openlineage" else "api"


def _versions(keys: list[ChainKey]) -> list[tuple[str, str]]:
    return sorted({(k[0], k[1]) for k in keys})


def _model_of(entry: Json) -> _Model | None:
    """(name, version, alias when no version) a prediction or unlisted group names."""
    model = entry.get("model")
    if not isinstance(model, dict) or not model.get("name"):
        return None
    version = str(model.get("version") or "")
    return str(model["name"]), version, "" if version else str(model.get("alias") or "")


def _missing(entry: Json) -> list[Json]:
    """The missing hops of a prediction's lineage or of an unlisted group."""
    lineage = entry.get("lineage", entry)
    missing = lineage.get("missing") if isinstance(lineage, dict) else None
    return [m for m in missing if isinstance(m, dict)] if isinstance(missing, list) else []


def _unresolved_aliases(
    predictions: Iterable[Json], unlisted: Iterable[Json]
) -> set[tuple[str, str]]:
    """(name, alias) of predictions naming only an alias that the store cannot resolve."""
    out = set()
    for entry in (*predictions, *unlisted):
        model = _model_of(entry)
        if model is None or not model[2]:
            continue
        if any(m.get("hop") == "model_version" for m in _missing(entry)):
            out.add((model[0], model[2]))
    return out


def _note_failures(
    predictions: Iterable[Json], unlisted: Iterable[Json], failures: Mapping[_Model, str]
) -> None:
    """Say in each missing model_version hop why MLflow could not fill it."""
    if not failures:
        return
    for entry in (*predictions, *unlisted):
        model = _model_of(entry)
        reason = failures.get(model) if model is not None else None
        if reason is None:
            continue
        for hop in _missing(entry):  # shared by the predictions of one chain: once
            text = str(hop.get("reason", ""))
            if hop.get("hop") == "model_version" and _FAILED not in text:
                hop["reason"] = f"{text}; {_FAILED}{reason}"
