"""Queries with registry fallback: what the query API asks, answered from the store.

When a prediction's model version is not in the store and an MLflow registry is
configured, the lineage is fetched from MLflow, merged into the store and the
answer recomputed. Lineage that came from MLflow is refreshed in the background
once its cache entry is older than the TTL. A registry outage never fails a
query: the store's answer is returned with the hop named as missing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from predtrace.collector._errors import RegistryError
from predtrace.collector._metrics import CollectorMetrics
from predtrace.collector.lineage import MlflowRegistry, Registration
from predtrace.collector.store import ChainKey, OnConflict, Store

log = logging.getLogger("predtrace.collector.lineage")
Json = dict[str, object]
_MAX_REFRESHES: Final = 16


class LineageService:
    """Store queries plus the MLflow fallback (see the module docstring)."""

    def __init__(
        self, store: Store, registry: MlflowRegistry | None, metrics: CollectorMetrics
    ) -> None:
        self.store, self.registry, self.metrics = store, registry, metrics
        self._refreshing: set[asyncio.Task[None]] = set()

    async def register(
        self, registration: Registration, *, on_conflict: OnConflict = "refuse"
    ) -> list[str]:
        """Merge lineage into the store; the conflicts kept (see ``Store.register``)."""
        conflicts = await self.store.register(registration, on_conflict=on_conflict)
        self.metrics.registrations.labels(registration.source).inc()
        if conflicts:
            self.metrics.lineage_conflicts.labels(registration.source).inc(len(conflicts))
        return conflicts

    async def _from_registry(self, name: str, version: str) -> bool:
        """Fetch one model version from MLflow into the store; True when found."""
        if self.registry is None:
            return False
        try:
            registration = await self.registry.lookup(name, version)
        except RegistryError as exc:
            self.metrics.registry_lookups.labels("error").inc()
            log.warning("MLflow lookup of %s/%s failed: %s", name, version, exc)
            return False
        self.metrics.registry_lookups.labels("found" if registration else "missing").inc()
        if registration is not None:
            # What was registered first stays; the rest of MLflow's answer is stored.
            conflicts = await self.register(registration, on_conflict="keep")
            if conflicts:
                log.warning("MLflow disagrees with stored lineage: %s", "; ".join(conflicts))
        return registration is not None

    def _maybe_refresh(self, name: str, version: str, model: object) -> None:
        if self.registry is None or not isinstance(model, dict):
            return
        if model.get("origin") != "mlflow" or len(self._refreshing) >= _MAX_REFRESHES:
            return
        fresh, _ = self.registry.cached(name, version)
        if not fresh:
            task = asyncio.create_task(self._refresh(name, version))
            self._refreshing.add(task)
            task.add_done_callback(self._refreshing.discard)

    async def _refresh(self, name: str, version: str) -> None:
        try:
            await self._from_registry(name, version)
        except Exception:
            log.exception("background MLflow refresh of %s/%s failed", name, version)

    async def pivot(self, column: str, value: object, limit: int) -> list[Json]:
        """Predictions by trace or prediction id, each with its lineage chain."""
        predictions, unresolved = await self.store.pivot(column, value, limit)
        if unresolved and self.registry is not None:
            found = [await self._from_registry(k[0], k[1]) for k in _versions(unresolved)]
            if any(found):
                predictions, _ = await self.store.pivot(column, value, limit)
        for prediction in predictions:
            lineage = prediction["lineage"]
            if isinstance(lineage, dict) and isinstance(lineage.get("model_version"), dict):
                model = lineage["model_version"]
                self._maybe_refresh(str(model["name"]), str(model["version"]), model)
        return predictions

    async def resolve_alias(self, name: str, alias: str) -> str | None:
        """The version an alias points at (store first, then MLflow)."""
        version = await self.store.resolve_alias(name, alias)
        if version is None and self.registry is not None:
            try:
                version = await self.registry.resolve_alias(name, alias)
            except RegistryError as exc:
                log.warning("MLflow alias lookup %s@%s failed: %s", name, alias, exc)
        return version

    async def model_lineage(self, name: str, version: str) -> Json | None:
        """A model version's lineage (fetched from MLflow when the store lacks it)."""
        lineage = await self.store.model_lineage(name, version)
        if lineage is None and await self._from_registry(name, version):
            lineage = await self.store.model_lineage(name, version)
        if lineage is not None:
            self._maybe_refresh(name, version, lineage["model_version"])
        return lineage

    async def completeness(self) -> Json:
        """Completeness per model, after fetching unregistered versions from MLflow."""
        if self.registry is not None:
            for name, version in await self.store.served_versions():
                if await self.store.model(name, version) is None:
                    await self._from_registry(name, version)
        return await self.store.completeness()

    async def close(self) -> None:
        """Cancel background refreshes and close the registry client."""
        for task in list(self._refreshing):
            task.cancel()
        await asyncio.gather(*self._refreshing, return_exceptions=True)
        if self.registry is not None:
            await self.registry.close()


def _versions(keys: list[ChainKey]) -> list[tuple[str, str]]:
    return sorted({(k[0], k[1]) for k in keys})
