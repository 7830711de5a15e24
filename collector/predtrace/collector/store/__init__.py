"""The collector's store: SQLite (embedded default) or PostgreSQL, one interface."""

from predtrace.collector.store._chain import HOPS, ChainKey
from predtrace.collector.store._postgres import PostgresEngine, PostgresOptions
from predtrace.collector.store._reads import PIVOT_MAX_BYTES, PivotAnswer
from predtrace.collector.store._rows import (
    deployment_key,
    fast_prediction_row,
    prediction_row,
)
from predtrace.collector.store._sqlite import SqliteEngine, SqliteOptions
from predtrace.collector.store._store import Engine, Store, open_store
from predtrace.collector.store._writes import IngestOutcome, IngestRecord, OnConflict
from predtrace.wire import event_problem  # the store's per-event checks, shared with producers

__all__ = [
    "HOPS",
    "PIVOT_MAX_BYTES",
    "ChainKey",
    "Engine",
    "IngestOutcome",
    "IngestRecord",
    "OnConflict",
    "PivotAnswer",
    "PostgresEngine",
    "PostgresOptions",
    "SqliteEngine",
    "SqliteOptions",
    "Store",
    "deployment_key",
    "event_problem",
    "fast_prediction_row",
    "open_store",
    "prediction_row",
]
