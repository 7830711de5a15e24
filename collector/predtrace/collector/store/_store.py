"""The store interface: one ``Store`` over a SQLite or PostgreSQL engine.

Everything the collector keeps goes through here: ingested batches, lineage
registrations, the query plans and retention. ``open_store`` reads the
``--db`` URL (``sqlite:////abs/path.db``, a plain file path, or
``postgresql://...``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from predtrace.collector._config import CREDENTIALS_CUT, credentials_cut
from predtrace.collector._errors import ConfigError
from predtrace.collector.lineage import Registration
from predtrace.collector.store._chain import ChainKey, Json, chain_plan, model_plan
from predtrace.collector.store._maintenance import producer_plan, producers_plan
from predtrace.collector.store._ops import Fetch, Plan, T
from predtrace.collector.store._postgres import PostgresEngine, PostgresOptions
from predtrace.collector.store._reads import (
    PIVOT_MAX_BYTES,
    PivotAnswer,
    completeness_plan,
    impact_plan,
    model_lineage_plan,
    pivot_plan,
    served_groups_plan,
)
from predtrace.collector.store._sqlite import SqliteEngine, SqliteOptions
from predtrace.collector.store._writes import (
    IngestOutcome,
    IngestRecord,
    OnConflict,
    ingest_plan,
    register_plan,
)


class Engine(Protocol):
    """What a store engine does: run plans, and manage its partitions."""

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgres``."""
        ...

    async def open(self) -> None:
        """Connect and migrate."""

    async def close(self) -> None:
        """Release everything; safe twice."""

    async def write(self, plan: Plan[T]) -> T:
        """Run a plan in a transaction; return after the commit."""
        ...

    async def read(self, plan: Plan[T]) -> T:
        """Run a read-only plan."""
        ...

    async def prepare_ingest(self, received_ns: int) -> None:
        """Get ready to store predictions received at ``received_ns``."""

    async def drop_partitions_before(self, cutoff_ns: int) -> tuple[int, int]:
        """Drop whole partitions older than the cutoff: (partitions, rows)."""
        ...


def _ping_plan() -> Plan[None]:
    yield Fetch("SELECT 1")


class Store:
    """The collector's store (see the module docstring).

    Example:
        >>> store = open_store("sqlite:////var/lib/predtrace/collector.db")
        >>> await store.open()
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgres``."""
        return self.engine.dialect

    async def open(self) -> None:
        """Connect and migrate the schema."""
        await self.engine.open()

    async def close(self) -> None:
        """Close; safe twice."""
        await self.engine.close()

    async def ping(self) -> None:
        """Raise StoreUnavailableError unless a trivial read works."""
        await self.engine.read(_ping_plan())

    async def ingest(self, record: IngestRecord) -> IngestOutcome:
        """Store a batch once (idempotent on producer and seq); return after the commit."""
        if record.rows:
            await self.engine.prepare_ingest(record.received_ns)
        return await self.engine.write(ingest_plan(record))

    async def register(
        self, registration: Registration, *, on_conflict: OnConflict = "refuse"
    ) -> list[str]:
        """Merge lineage into the graph; the conflicts kept (see ``register_plan``).

        Raises:
            LineageConflictError: it contradicts stored lineage and ``on_conflict`` is refuse.
        """
        plan = register_plan(registration, time.time_ns(), on_conflict=on_conflict)
        return await self.engine.write(plan)

    async def pivot(
        self, column: str, value: object, limit: int = 1000, max_bytes: int = PIVOT_MAX_BYTES
    ) -> tuple[PivotAnswer, list[ChainKey]]:
        """Predictions by trace id or prediction id with chains, and unregistered versions.

        A tuple ``value`` matches any of its items (one prediction id in
        several spellings). At most ``limit`` predictions and ``max_bytes`` of
        their JSON are listed; the answer says what it left out (``PivotAnswer``).
        """
        return await self.engine.read(pivot_plan(column, value, limit, max_bytes))

    async def chain(self, key: ChainKey) -> Json:
        """The chain of one (model, version, alias, deployment, image) group."""
        return await self.engine.read(chain_plan(key))

    async def model(self, name: str, version: str) -> Json | None:
        """The model version node, or None."""
        return await self.engine.read(model_plan(name, version))

    async def model_lineage(self, name: str, version: str) -> Json | None:
        """A model version's full lineage, or None when it is not registered."""
        return await self.engine.read(model_lineage_plan(name, version))

    async def resolve_alias(self, name: str, alias: str) -> str | None:
        """The version an alias points at, or None."""
        rows = await self.engine.read(_alias_plan(name, alias))
        return rows

    async def impact(self, kind: str, value: str) -> Json | None:
        """What a dataset, commit or image touched (None when unknown)."""
        return await self.engine.read(impact_plan(kind, value))

    async def completeness(self) -> Json:
        """Per model, the share of predictions whose chain is complete."""
        return await self.engine.read(completeness_plan())

    async def served_versions(self) -> list[tuple[str, str]]:
        """Every (model, version) that served predictions."""
        rows = await self.engine.read(served_groups_plan())
        return sorted({(str(r[0]), str(r[1])) for r in rows if r[0] and r[1]})

    async def producers(self) -> list[Json]:
        """The first page of producers (1,000, by id) with their counts and missing batches."""
        return await self.engine.read(producers_plan())

    async def producer(self, producer_id: str) -> Json | None:
        """One producer's gap report, or None."""
        return await self.engine.read(producer_plan(producer_id))


def _alias_plan(name: str, alias: str) -> Plan[str | None]:
    rows = yield Fetch(
        "SELECT version FROM model_aliases WHERE name = ? AND alias = ?", (name, alias)
    )
    return str(rows[0][0]) if rows else None


def open_store(
    url: str, *, sqlite: SqliteOptions | None = None, postgres: PostgresOptions | None = None
) -> Store:
    """A (not yet opened) store for a ``--db`` URL.

    ``postgresql://...?schema=name`` keeps every table in that schema.

    Raises:
        ConfigError: an unsupported or malformed URL.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.split("+", 1)[0]
    if scheme in ("postgresql", "postgres"):
        if credentials_cut(url):  # never quoted: the password would show
            raise ConfigError(f"--db: {CREDENTIALS_CUT}")
        query = dict(parse_qsl(parts.query))
        schema = query.pop("schema", "")
        dsn = urlunsplit(("postgresql", parts.netloc, parts.path, urlencode(query), ""))
        options = postgres or PostgresOptions()
        if schema:
            options = dataclasses.replace(options, schema=schema)
        return Store(PostgresEngine(dsn, options))
    if scheme == "sqlite":
        path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else ""
        if not path or path == ":memory:":
            raise ConfigError("sqlite URL needs a file: sqlite:////abs/path.db")
        if "?" in path:  # it would be part of the file's name
            raise ConfigError("--db: a sqlite URL takes no options: sqlite:////abs/path.db")
        return Store(SqliteEngine(path, sqlite))
    if scheme == "" and url:
        return Store(SqliteEngine(url, sqlite))
    raise ConfigError(f"unsupported --db URL scheme {parts.scheme!r}: use sqlite or postgresql")
