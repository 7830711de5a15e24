"""The PostgreSQL engine (asyncpg): a connection pool, one transaction per write plan.

Predictions are partitioned by receive time (one partition per UTC day,
created before the first insert into it), so retention drops whole partitions
and large volumes stay cheap. Bulk inserts use COPY. Connection loss, deadlocks
and serialization failures become ``StoreUnavailableError`` (retry, 503).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Final

from predtrace.collector._errors import ConfigError, StoreError, StoreUnavailableError
from predtrace.collector.store._maintenance import uncount_plan
from predtrace.collector.store._ops import (
    Exec,
    ExecMany,
    Fetch,
    Op,
    Plan,
    Row,
    Serialize,
    T,
    numbered,
)
from predtrace.collector.store._schema import MIGRATIONS, MIGRATIONS_TABLE, render

try:
    import asyncpg
except ImportError:  # pragma: no cover - the [postgres] extra is not installed
    asyncpg = None

log = logging.getLogger("predtrace.collector.store")
DAY_NS: Final = 86_400 * 1_000_000_000
_SCHEMA_RE: Final = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_PARTITION_RE: Final = re.compile(r"predictions_d(\d+)$")
_MIGRATION_LOCK: Final = 0x70726564  # advisory lock id: replicas migrate one at a time


def translate(exc: BaseException) -> StoreError:
    """Our error for an asyncpg/OS one: transient conditions become StoreUnavailableError.

    asyncpg's client-side DataError (an argument it cannot send: a value of
    the wrong type, an integer past the column's) is an InterfaceError too,
    yet no retry sends it otherwise: it is not transient.
    """
    transient: tuple[type[BaseException], ...] = (OSError, TimeoutError)
    permanent: tuple[type[BaseException], ...] = ()
    if asyncpg is not None:
        # asyncpg.DataError is the server's (SQLSTATE class 22); the client's
        # is exported from its private module only.
        permanent = (asyncpg.exceptions._base.DataError,)
        transient += (
            asyncpg.PostgresConnectionError,
            asyncpg.InterfaceError,
            asyncpg.exceptions.DeadlockDetectedError,
            asyncpg.exceptions.SerializationError,
            asyncpg.exceptions.InsufficientResourcesError,
            asyncpg.exceptions.CannotConnectNowError,
            asyncpg.exceptions.QueryCanceledError,
            asyncpg.exceptions.ReadOnlySQLTransactionError,
        )
    if isinstance(exc, transient) and not isinstance(exc, permanent):
        return StoreUnavailableError(f"postgresql store unavailable: {type(exc).__name__}")
    return StoreError(f"postgresql store error: {type(exc).__name__}: {exc}")


async def run_async(conn: Any, plan: Plan[T]) -> T:
    """Drive a plan to completion on one asyncpg connection."""
    try:
        op = next(plan)
        while True:
            op = plan.send(await _execute(conn, op))
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


async def _execute(conn: Any, op: Op) -> list[Row]:
    if isinstance(op, Fetch):
        return [tuple(r) for r in await conn.fetch(numbered(op.sql), *op.args)]
    if isinstance(op, Exec):
        status = await conn.execute(numbered(op.sql), *op.args)
        count = status.rsplit(" ", 1)[-1]
        return [(int(count) if count.isdigit() else 0,)]
    if isinstance(op, ExecMany):
        if op.rows:
            await conn.executemany(numbered(op.sql), op.rows)
        return []
    if isinstance(op, Serialize):
        await conn.execute("SELECT pg_advisory_xact_lock($1)", op.key)
        return []
    await conn.copy_records_to_table(op.table, records=op.rows, columns=list(op.columns))
    return []


@dataclass(frozen=True, slots=True, kw_only=True)
class PostgresOptions:
    """Pool and schema settings of the PostgreSQL engine."""

    schema: str = ""
    min_size: int = 1
    max_size: int = 10
    command_timeout: float = 30.0
    # A migration waits this long for the locks it needs (DROP INDEX locks the
    # predictions table) and then fails the start, instead of queueing every
    # other replica's ingest behind a long-running query.
    migration_lock_timeout: float = 15.0

    def __post_init__(self) -> None:
        if self.schema and not _SCHEMA_RE.match(self.schema):
            raise ConfigError("schema must be a lower-case SQL identifier")
        if not 0 <= self.min_size <= self.max_size or self.max_size < 1:
            raise ConfigError("need 0 <= min_size <= max_size and max_size >= 1")
        if not 0.001 <= self.migration_lock_timeout <= 86_400:  # NaN fails too
            raise ConfigError("migration_lock_timeout must be between 0.001 and 86400 seconds")


class PostgresEngine:
    """Runs store plans on PostgreSQL (see the module docstring)."""

    dialect: Final = "postgres"

    def __init__(self, dsn: str, options: PostgresOptions | None = None) -> None:
        if asyncpg is None:
            raise ConfigError("PostgreSQL needs asyncpg: pip install 'predtrace[postgres]'")
        self.dsn = dsn
        self.options = options or PostgresOptions()
        self._pool: Any = None
        self._partitions: set[int] = set()

    async def open(self) -> None:
        """Connect, create the schema if asked, and migrate.

        Raises:
            StoreUnavailableError: the server cannot be reached.
        """
        if self._pool is not None:
            return
        settings = {"search_path": self.options.schema} if self.options.schema else {}
        try:
            if self.options.schema:
                conn = await asyncpg.connect(self.dsn)
                try:
                    await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self.options.schema}")
                finally:
                    await conn.close()
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=self.options.min_size,
                max_size=self.options.max_size,
                command_timeout=self.options.command_timeout,
                server_settings=settings,
            )
            async with self._pool.acquire() as conn, conn.transaction():
                await self._migrate(conn)
        except (asyncpg.PostgresError, OSError, TimeoutError, asyncpg.InterfaceError) as exc:
            await self.close()
            failed = translate(exc)  # the same class (retryable or not), naming the server
            raise type(failed)(f"cannot open the --db store {self.where}: {failed}") from None
        except ValueError as exc:  # asyncpg's reading of the DSN: a bad port, an option
            await self.close()
            raise ConfigError(f"--db {self.where}: {exc}") from None
        except StoreError:
            await self.close()
            raise

    @property
    def where(self) -> str:
        """The server and database of the DSN, without its credentials or options."""
        scheme, _, rest = self.dsn.partition("://")
        rest = rest.rpartition("@")[2].partition("?")[0]
        return f"{scheme}://{rest}"

    async def _migrate(self, conn: Any) -> None:
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await conn.execute(MIGRATIONS_TABLE.format(INT="BIGINT"))
        done = {r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        timeout_ms = int(self.options.migration_lock_timeout * 1000)
        await conn.execute(f"SET LOCAL lock_timeout = {timeout_ms}")
        for version, template in MIGRATIONS:
            if version not in done:
                try:
                    for statement in render(template, "postgres"):
                        await conn.execute(statement)
                except asyncpg.exceptions.LockNotAvailableError:
                    raise StoreUnavailableError(
                        f"schema migration {version} waited {timeout_ms} ms for a lock on the"
                        " store's tables (a long query holds it); start the collector again"
                        " once it is done"
                    ) from None
                await conn.execute(
                    "INSERT INTO schema_migrations VALUES ($1, $2)", version, time.time_ns()
                )

    async def write(self, plan: Plan[T]) -> T:
        """Run a plan in one transaction.

        Raises:
            StoreUnavailableError / StoreError: PostgreSQL failed.
        """
        if self._pool is None:
            raise StoreUnavailableError("the store is not open")
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                return await run_async(conn, plan)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            raise translate(exc) from None

    async def read(self, plan: Plan[T]) -> T:
        """Run a read-only plan on a pooled connection."""
        if self._pool is None:
            raise StoreUnavailableError("the store is not open")
        try:
            async with self._pool.acquire() as conn:
                return await run_async(conn, plan)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            raise translate(exc) from None

    async def prepare_ingest(self, received_ns: int) -> None:
        """Create the day partition that ``received_ns`` falls in, once."""
        day = received_ns // DAY_NS
        if day in self._partitions:
            return
        sql = (
            f"CREATE TABLE IF NOT EXISTS predictions_d{day} PARTITION OF predictions"
            f" FOR VALUES FROM ({day * DAY_NS}) TO ({(day + 1) * DAY_NS})"
        )
        try:
            async with self._pool.acquire() as conn:
                await conn.execute(sql)
        except (asyncpg.DuplicateTableError, asyncpg.UniqueViolationError):
            pass  # another replica or request created it at the same moment
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            raise translate(exc) from None
        self._partitions.add(day)

    async def drop_partitions_before(self, cutoff_ns: int) -> tuple[int, int]:
        """Drop every day partition entirely older than ``cutoff_ns``: (partitions, rows)."""
        names = await self.read(_partitions_plan())
        dropped = rows = 0
        for name in names:
            match = _PARTITION_RE.search(name)
            if match is None or (int(match.group(1)) + 1) * DAY_NS > cutoff_ns:
                continue
            rows += await self.write(_drop_partition_plan(name, int(match.group(1))))
            self._partitions.discard(int(match.group(1)))
            dropped += 1
        return dropped, rows

    async def close(self) -> None:
        """Close the pool. Safe twice."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()


def _partitions_plan() -> Plan[list[str]]:
    rows = yield Fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'predictions'::regclass ORDER BY c.relname"
    )
    return [str(r[0]) for r in rows]


def _drop_partition_plan(name: str, day: int) -> Plan[int]:
    where = "received_ns >= ? AND received_ns < ?"
    args = (day * DAY_NS, (day + 1) * DAY_NS)
    count = yield Fetch(f"SELECT count(*) FROM predictions WHERE {where}", args)  # noqa: S608 - fixed fragment
    yield from uncount_plan(where, args)
    yield Exec(f"DROP TABLE {name}")
    return int(count[0][0])
