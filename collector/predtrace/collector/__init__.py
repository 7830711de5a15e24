"""predtrace's lineage collector: where a trace id becomes an answer.

Producers (the middleware, the sidecar, edge devices) POST msgpack batches to
``/v1/batches``; the collector stores them (SQLite or PostgreSQL), links each
prediction to deployment, image, model version, training run, datasets and
commit (lineage from MLflow, CI hooks and OpenLineage), and answers the
on-call pivot, impact and completeness queries. Depends only on
``predtrace.wire``. Server parts load on first use, so the query commands
start fast.

Example:
    >>> config = CollectorConfig(db="sqlite:////tmp/c.db", listen="127.0.0.1:0")
    >>> running = await start_collector(config)
    >>> running.url
    'http://127.0.0.1:43117'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from predtrace.collector._errors import (
    CollectorError,
    ConfigError,
    LineageError,
    RegistryError,
    StoreError,
    StoreUnavailableError,
)

if TYPE_CHECKING:
    from predtrace.collector._app import PARTS, CollectorParts, build_app
    from predtrace.collector._auth import Scope, TokenEntry, TokenTable, hash_token, new_token
    from predtrace.collector._client import QueryClient
    from predtrace.collector._config import CollectorConfig, RetentionPolicy
    from predtrace.collector._server import RunningCollector, start_collector
    from predtrace.collector.store import Store, open_store

_LAZY = {
    "PARTS": "predtrace.collector._app",
    "CollectorParts": "predtrace.collector._app",
    "build_app": "predtrace.collector._app",
    "Scope": "predtrace.collector._auth",
    "TokenEntry": "predtrace.collector._auth",
    "TokenTable": "predtrace.collector._auth",
    "hash_token": "predtrace.collector._auth",
    "new_token": "predtrace.collector._auth",
    "QueryClient": "predtrace.collector._client",
    "CollectorConfig": "predtrace.collector._config",
    "RetentionPolicy": "predtrace.collector._config",
    "RunningCollector": "predtrace.collector._server",
    "start_collector": "predtrace.collector._server",
    "Store": "predtrace.collector.store",
    "open_store": "predtrace.collector.store",
}

__all__ = [
    "PARTS",
    "CollectorConfig",
    "CollectorError",
    "CollectorParts",
    "ConfigError",
    "LineageError",
    "QueryClient",
    "RegistryError",
    "RetentionPolicy",
    "RunningCollector",
    "Scope",
    "Store",
    "StoreError",
    "StoreUnavailableError",
    "TokenEntry",
    "TokenTable",
    "build_app",
    "hash_token",
    "new_token",
    "open_store",
    "start_collector",
]


def __getattr__(name: str) -> object:
    """Import server-side names on first use (keeps ``predtrace trace`` light)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'predtrace.collector' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
