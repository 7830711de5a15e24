"""The SQLite engine's writer tuning."""

from __future__ import annotations

from pathlib import Path

import pytest

from predtrace.collector.store import SqliteEngine, SqliteOptions


def test_writer_connection_gets_the_configured_cache_and_checkpoint(tmp_path: Path) -> None:
    engine = SqliteEngine(str(tmp_path / "c.db"), SqliteOptions(writer_cache_mib=8))
    conn = engine._connect(writer=True)
    try:
        assert conn.execute("PRAGMA cache_size").fetchone()[0] == -8 * 1024
        assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 10_000
    finally:
        conn.close()


@pytest.mark.parametrize("field", ["writer_cache_mib", "wal_autocheckpoint_pages"])
def test_writer_tuning_must_be_positive(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SqliteOptions(**{field: 0})  # type: ignore[arg-type]


def test_writer_commits_are_synced_before_the_ack(tmp_path: Path) -> None:
    # The sidecar deletes its spool copy on the ack: with synchronous=NORMAL a
    # WAL commit is synced only at the next checkpoint, so a power cut after
    # the 200 lost acknowledged events. FULL (2) syncs the WAL at each commit.
    engine = SqliteEngine(str(tmp_path / "c.db"))
    conn = engine._connect(writer=True)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    finally:
        conn.close()
