"""Store fixtures: every store test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from predtrace.collector.store import Store, open_store


def postgres_url() -> str | None:
    """The test server's URL; fails loudly when tests/run did not provide one."""
    url = os.environ.get("PREDTRACE_TEST_POSTGRES_URL")
    if url:
        return url
    if os.environ.get("PREDTRACE_SKIP_POSTGRES") == "1":
        pytest.skip("PREDTRACE_SKIP_POSTGRES=1")
    pytest.fail(
        "PREDTRACE_TEST_POSTGRES_URL is not set: run the suite with `bash tests/run` "
        "(it starts a PostgreSQL server), or set PREDTRACE_SKIP_POSTGRES=1 to skip these tests"
    )


async def _drop_schema(url: str, schema: str) -> None:
    import asyncpg  # noqa: PLC0415 - only the postgres tests need it

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """An open, empty store of each kind (PostgreSQL: a schema of its own)."""
    if request.param == "sqlite":
        opened = open_store(f"sqlite:///{tmp_path}/collector.db")
        await opened.open()
        yield opened
        await opened.close()
        return
    url = postgres_url()
    assert url is not None
    schema = f"t_{secrets.token_hex(6)}"
    opened = open_store(f"{url}?schema={schema}")
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()
        await _drop_schema(url, schema)
