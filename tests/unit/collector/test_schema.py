"""Schema migrations: a store of any age opens to the current schema."""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
import time
from pathlib import Path

import pytest

from predtrace.collector._errors import ConfigError, StoreUnavailableError
from predtrace.collector.store import PostgresOptions, Store, open_store
from predtrace.collector.store._ops import Exec, Fetch, Plan
from predtrace.collector.store._schema import MIGRATIONS

from .conftest import _drop_schema, postgres_url


def _index_names(dialect: str) -> Plan[set[str]]:
    if dialect == "sqlite":
        sql = "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'predictions'"
    else:
        sql = (
            "SELECT indexname FROM pg_indexes"
            " WHERE tablename = 'predictions' AND schemaname = current_schema()"
        )
    rows = yield Fetch(sql, ())
    return {row[0] for row in rows}


def _versions() -> Plan[list[int]]:
    rows = yield Fetch("SELECT version FROM schema_migrations ORDER BY version", ())
    return [row[0] for row in rows]


def _back_to_v1() -> Plan[None]:
    """What a store written before migration 2 looks like (an alias registered then)."""
    yield Exec(
        "CREATE INDEX predictions_model ON predictions"
        " (model_name, model_version, deployment_id, ts_ns)",
        (),
    )
    yield Exec("ALTER TABLE model_aliases DROP COLUMN moved_ns", ())
    yield Exec("INSERT INTO model_aliases (name, alias, version) VALUES ('m', 'prod', '1')", ())
    yield Exec("DELETE FROM schema_migrations WHERE version >= 2", ())


def _aliases() -> Plan[list[tuple[str, str, int]]]:
    rows = yield Fetch("SELECT alias, version, moved_ns FROM model_aliases", ())
    return [(str(r[0]), str(r[1]), int(r[2])) for r in rows]


async def test_predictions_carry_only_the_indexes_a_query_uses(store: Store) -> None:
    names = await store.engine.read(_index_names(store.dialect))
    assert {"predictions_trace", "predictions_pid", "predictions_received"} <= names
    assert "predictions_model" not in names
    assert await store.engine.read(_versions()) == [v for v, _ in MIGRATIONS]


@pytest.mark.parametrize("dialect", ["sqlite", "postgres"])
async def test_a_store_from_before_migration_2_loses_the_model_index_and_keeps_its_data(
    dialect: str, tmp_path: Path
) -> None:
    schema = f"t_{secrets.token_hex(6)}"
    base = postgres_url() if dialect == "postgres" else None
    url = f"{base}?schema={schema}" if base else f"sqlite:///{tmp_path}/old.db"
    first = open_store(url)
    await first.open()
    try:
        await first.engine.write(_back_to_v1())
        now = time.time_ns()
        await first.engine.prepare_ingest(now)  # PostgreSQL: the day's partition
        await first.engine.write(_one_prediction(now))
        assert "predictions_model" in await first.engine.read(_index_names(dialect))
    finally:
        await first.close()
    again = open_store(url)
    await again.open()
    try:
        assert "predictions_model" not in await again.engine.read(_index_names(dialect))
        assert await again.engine.read(_versions()) == [v for v, _ in MIGRATIONS]
        assert await again.engine.read(_prediction_ids()) == ["p-kept"]
        assert await again.engine.read(_aliases()) == [("prod", "1", 0)]  # never moved
    finally:
        await again.close()
        if base:
            await _drop_schema(base, schema)


def _one_prediction(received_ns: int) -> Plan[None]:
    yield Exec(
        "INSERT INTO predictions (prediction_id, ts_ns, duration_ns, received_ns, producer_id,"
        " seq, model_name, model_version, model_alias, model_registry_id, model_digest,"
        " deployment_id, service, namespace, pod, node, image_digest, image_name, endpoint,"
        " protocol, status, status_code, error_type, sampled)"
        " VALUES ('p-kept', 1, 1, ?, 'p', 1, 'm', '1', '', '', '', '', '', '', '', '', '', '',"
        " '', '', 1, '', '', 0)",
        (received_ns,),
    )


def _prediction_ids() -> Plan[list[str]]:
    rows = yield Fetch("SELECT prediction_id FROM predictions", ())
    return [row[0] for row in rows]


def test_a_new_sqlite_file_gets_16k_pages_and_an_old_one_keeps_its_own(tmp_path: Path) -> None:
    old = tmp_path / "old.db"
    conn = sqlite3.connect(old)
    conn.execute("PRAGMA page_size = 4096")
    conn.execute("CREATE TABLE before_us (x INTEGER)")
    conn.close()

    async def open_close(path: Path) -> None:
        s = open_store(f"sqlite:///{path}")
        await s.open()
        await s.close()

    asyncio.run(open_close(tmp_path / "new.db"))
    asyncio.run(open_close(old))
    sizes = {}
    for name in ("new.db", "old.db"):
        conn = sqlite3.connect(tmp_path / name)
        sizes[name] = conn.execute("PRAGMA page_size").fetchone()[0]
        conn.close()
    assert sizes == {"new.db": 16_384, "old.db": 4096}


async def test_a_migration_blocked_by_a_long_query_fails_the_start_and_a_later_one_works() -> None:
    import asyncpg  # noqa: PLC0415 - only this PostgreSQL test needs it

    base = postgres_url()
    assert base is not None
    schema = f"t_{secrets.token_hex(6)}"
    url = f"{base}?schema={schema}"
    first = open_store(url)
    await first.open()
    await first.engine.write(_back_to_v1())
    await first.close()
    reader = await asyncpg.connect(base, server_settings={"search_path": schema})
    try:
        long_query = reader.transaction()
        await long_query.start()
        await reader.execute("SELECT count(*) FROM predictions")  # holds its lock until commit
        blocked = open_store(url, postgres=PostgresOptions(migration_lock_timeout=0.3))
        with pytest.raises(StoreUnavailableError, match="schema migration 2 waited 300 ms"):
            await blocked.open()
        await long_query.commit()
        again = open_store(url, postgres=PostgresOptions(migration_lock_timeout=0.3))
        await again.open()
        try:
            assert await again.engine.read(_versions()) == [v for v, _ in MIGRATIONS]
        finally:
            await again.close()
    finally:
        await reader.close()
        await _drop_schema(base, schema)


@pytest.mark.parametrize("wait", [float("inf"), float("nan"), 0.0, 0.0004, 3e6])
def test_a_migration_lock_timeout_postgresql_cannot_take_is_refused(wait: float) -> None:
    with pytest.raises(ConfigError, match="migration_lock_timeout"):
        PostgresOptions(migration_lock_timeout=wait)
