"""Errors of the collector: what its store, adapters and CLI raise to users.

Every error is a ``predtrace.wire.PredtraceError``; sqlite3, asyncpg and aiohttp
errors are translated at the boundary where they happen.
"""

from __future__ import annotations

from predtrace.wire import PredtraceError


class CollectorError(PredtraceError):
    """Base of the collector's errors."""


class ConfigError(CollectorError, ValueError):
    """A setting, URL or file that the collector cannot start with."""


class StoreError(CollectorError):
    """The store failed in a way that retrying will not fix."""


class StoreUnavailableError(StoreError):
    """The store is locked, unreachable or out of space: retry later (503)."""


class LineageError(CollectorError, ValueError):
    """A lineage registration or OpenLineage event that cannot be read (400)."""


class LineageConflictError(LineageError):
    """A registration that contradicts stored lineage, sent without replace (409)."""


class RegistryError(CollectorError):
    """The model registry (MLflow) could not be reached or answered badly."""
