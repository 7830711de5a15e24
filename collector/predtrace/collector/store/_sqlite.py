"""The SQLite engine: WAL, one writer thread with group commit, a pool of reader threads.

Writes (ingest batches, registrations, retention chunks) queue to the writer
thread, which runs as many as are waiting in one transaction, each under its
own SAVEPOINT (one failing plan does not undo the others), commits once, and
only then resolves their futures: nothing is acknowledged before the commit,
and (synchronous=FULL) the commit is on disk, not only in the page cache.
Reads run a whole plan in one reader thread with its own connection, so the
event loop never blocks on SQLite.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from predtrace.collector._errors import CollectorError, StoreError, StoreUnavailableError
from predtrace.collector.store._ops import Exec, ExecMany, Fetch, Op, Plan, Row, Serialize, T
from predtrace.collector.store._schema import MIGRATIONS, MIGRATIONS_TABLE, render

log = logging.getLogger("predtrace.collector.store")
_UNAVAILABLE: Final = ("locked", "busy", "disk i/o", "full", "unable to open", "readonly")


def translate(exc: sqlite3.Error) -> StoreError:
    """Our error for a sqlite3 one: transient conditions become StoreUnavailableError."""
    text = str(exc).lower()
    if isinstance(exc, sqlite3.OperationalError) and any(w in text for w in _UNAVAILABLE):
        return StoreUnavailableError(f"sqlite store unavailable: {exc}")
    return StoreError(f"sqlite store error: {type(exc).__name__}: {exc}")


def _execute(conn: sqlite3.Connection, op: Op) -> list[Row]:
    if isinstance(op, Fetch):
        return conn.execute(op.sql, op.args).fetchall()
    if isinstance(op, Exec):
        return [(conn.execute(op.sql, op.args).rowcount,)]
    if isinstance(op, ExecMany):
        conn.executemany(op.sql, op.rows)
        return []
    if isinstance(op, Serialize):
        return []  # one writer thread: every write is serialised already
    marks = ", ".join("?" * len(op.columns))
    sql = f"INSERT INTO {op.table} ({', '.join(op.columns)}) VALUES ({marks})"  # noqa: S608 - our own table and columns
    conn.executemany(sql, op.rows)
    return []


def run_sync(conn: sqlite3.Connection, plan: Plan[T]) -> T:
    """Drive a plan to completion on one connection."""
    try:
        op = next(plan)
        while True:
            op = plan.send(_execute(conn, op))
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


@dataclass(slots=True)
class _Job:
    plan: Plan[Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


def _resolve(future: asyncio.Future[Any], result: object, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


@dataclass(frozen=True, slots=True, kw_only=True)
class SqliteOptions:
    """Tuning of the SQLite engine (defaults suit the embedded collector)."""

    readers: int = 2
    busy_timeout: float = 5.0
    max_group: int = 256
    queue_size: int = 1024
    # FULL: each commit syncs the WAL before the batch is acknowledged (the
    # sidecar deletes its spool copy on the ack, so a commit lost to a power
    # cut would lose events for good). NORMAL syncs only at checkpoints. One
    # sync per group commit, not per batch: the writer batches what waits.
    synchronous: str = "FULL"
    # The writer's page cache and WAL size: with SQLite's defaults (2 MiB,
    # 1,000 pages) a batch of 5,000 rows spills the cache and checkpoints on
    # every commit; these settings make ingest ~1.5x faster at 1 M rows.
    writer_cache_mib: int = 64
    wal_autocheckpoint_pages: int = 10_000
    # Pages of a new database file (an existing file keeps its own): with
    # 16 KiB instead of SQLite's 4 KiB, a row costs less to insert
    # (bench/collector_ingest.py).
    page_size: int = 16_384

    def __post_init__(self) -> None:
        if self.readers < 1 or self.max_group < 1 or self.queue_size < 1:
            raise ValueError("readers, max_group and queue_size must be >= 1")
        if self.writer_cache_mib < 1 or self.wal_autocheckpoint_pages < 1:
            raise ValueError("writer_cache_mib and wal_autocheckpoint_pages must be >= 1")
        if self.page_size not in (512, 1024, 2048, 4096, 8192, 16_384, 32_768, 65_536):
            raise ValueError("page_size must be a power of two from 512 to 65536")
        if self.busy_timeout < 0 or self.synchronous not in ("OFF", "NORMAL", "FULL"):
            raise ValueError("busy_timeout >= 0 and synchronous in OFF/NORMAL/FULL")


class SqliteEngine:
    """Runs store plans on one SQLite file (see the module docstring)."""

    dialect: Final = "sqlite"

    def __init__(self, path: str, options: SqliteOptions | None = None) -> None:
        self.path = path
        self.options = options or SqliteOptions()
        self._jobs: queue.Queue[_Job | None] = queue.Queue(self.options.queue_size)  # None: stop
        self._writer: threading.Thread | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self.commits = 0

    def _connect(self, *, writer: bool) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=0)
        conn.execute(f"PRAGMA busy_timeout = {int(self.options.busy_timeout * 1000)}")
        if writer:
            conn.execute(f"PRAGMA page_size = {self.options.page_size}")  # before WAL
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {self.options.synchronous}")
            conn.execute(f"PRAGMA cache_size = -{self.options.writer_cache_mib * 1024}")
            conn.execute(f"PRAGMA wal_autocheckpoint = {self.options.wal_autocheckpoint_pages}")
        else:
            conn.execute("PRAGMA query_only = ON")
        return conn

    async def open(self) -> None:
        """Create the file and schema, start the writer and the readers.

        Raises:
            StoreUnavailableError: the file cannot be opened or migrated.
        """
        if self._writer is not None:
            return
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._writer = threading.Thread(
            target=self._writer_main,
            args=(asyncio.get_running_loop(), ready),
            name="predtrace-sqlite-writer",
            daemon=True,
        )
        self._writer.start()
        try:
            await ready
        except BaseException:
            await asyncio.to_thread(self._writer.join)
            self._writer = None
            raise
        self._readers = ThreadPoolExecutor(self.options.readers, "predtrace-sqlite-reader")

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute(MIGRATIONS_TABLE.format(INT="INTEGER"))
        done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        for version, template in MIGRATIONS:
            if version in done:
                continue
            conn.execute("BEGIN IMMEDIATE")
            for statement in render(template, "sqlite"):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations VALUES (?, ?)", (version, time.time_ns()))
            conn.execute("COMMIT")

    def _writer_main(self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future[None]) -> None:
        try:
            conn = self._connect(writer=True)
            self._migrate(conn)
        except sqlite3.Error as exc:
            failed = translate(exc)  # the same class (retryable or not), naming the file
            error = type(failed)(f"cannot open the --db file {self.path}: {failed}")
            loop.call_soon_threadsafe(_resolve, ready, None, error)
            return
        except OSError as exc:
            error = StoreUnavailableError(f"cannot open the --db file {self.path}: {exc.strerror}")
            loop.call_soon_threadsafe(_resolve, ready, None, error)
            return
        loop.call_soon_threadsafe(_resolve, ready, None, None)
        try:
            while self._serve_group(conn):
                pass
        finally:
            conn.close()

    def _take_group(self) -> tuple[list[_Job], bool]:
        first = self._jobs.get()
        if first is None:
            return [], False
        jobs = [first]
        while len(jobs) < self.options.max_group:
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return jobs, False
            jobs.append(item)
        return jobs, True

    def _serve_group(self, conn: sqlite3.Connection) -> bool:
        jobs, more = self._take_group()
        if not jobs:
            return more
        outcomes: list[tuple[object, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            outcomes = [self._run_job(conn, job) for job in jobs]
            conn.execute("COMMIT")
            self.commits += 1
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            outcomes = [(None, translate(exc))] * len(jobs)
        for job, (result, error) in zip(jobs, outcomes, strict=True):
            job.loop.call_soon_threadsafe(_resolve, job.future, result, error)
        return more

    @staticmethod
    def _run_job(conn: sqlite3.Connection, job: _Job) -> tuple[object, BaseException | None]:
        conn.execute("SAVEPOINT job")
        try:
            result = run_sync(conn, job.plan)
        except sqlite3.Error as exc:
            conn.execute("ROLLBACK TO job")
            conn.execute("RELEASE job")
            if translate(exc).__class__ is StoreUnavailableError:
                raise  # the whole group fails: the database itself is unavailable
            log.warning("store plan failed: %s", exc)
            return None, translate(exc)
        except CollectorError as exc:
            # The plan's own refusal (a lineage conflict): this job alone, as raised.
            conn.execute("ROLLBACK TO job")
            conn.execute("RELEASE job")
            return None, exc
        except (OverflowError, ValueError, TypeError) as exc:
            # A value SQLite cannot bind (e.g. an int past 2**63): fail this job
            # alone, never the writer thread (which would hang every later write).
            conn.execute("ROLLBACK TO job")
            conn.execute("RELEASE job")
            log.warning("store plan failed: %s", type(exc).__name__)
            return None, StoreError(f"value cannot be stored: {type(exc).__name__}")
        conn.execute("RELEASE job")
        return result, None

    async def write(self, plan: Plan[T]) -> T:
        """Run a plan in the writer's next group commit; return once committed.

        Raises:
            StoreUnavailableError: the write queue is full, or SQLite is locked/failing.
            StoreError: the plan failed.
        """
        if self._writer is None:
            raise StoreUnavailableError("the store is not open")
        loop = asyncio.get_running_loop()
        job = _Job(plan, loop, loop.create_future())
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise StoreUnavailableError("the store's write queue is full") from None
        return await job.future  # type: ignore[no-any-return]

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect(writer=False)
            self._local.conn = conn
            with self._lock:
                self._reader_conns.append(conn)
        return conn

    def _read_sync(self, plan: Plan[T]) -> T:
        try:
            return run_sync(self._reader(), plan)
        except sqlite3.Error as exc:
            raise translate(exc) from None

    async def read(self, plan: Plan[T]) -> T:
        """Run a read-only plan in a reader thread.

        Raises:
            StoreUnavailableError / StoreError: SQLite failed.
        """
        if self._readers is None:
            raise StoreUnavailableError("the store is not open")
        return await asyncio.get_running_loop().run_in_executor(
            self._readers, self._read_sync, plan
        )

    async def prepare_ingest(self, received_ns: int) -> None:
        """Nothing to prepare: SQLite has one predictions table."""

    async def drop_partitions_before(self, cutoff_ns: int) -> tuple[int, int]:
        """SQLite has no partitions: (0, 0)."""
        return 0, 0

    async def close(self) -> None:
        """Finish queued writes, stop the writer and readers. Safe twice."""
        writer, readers = self._writer, self._readers
        self._writer = self._readers = None
        if writer is not None:
            await asyncio.to_thread(self._jobs.put, None)
            await asyncio.to_thread(writer.join)
        if readers is not None:
            await asyncio.to_thread(readers.shutdown, True)
        with self._lock:
            conns, self._reader_conns = self._reader_conns, []
        for conn in conns:
            conn.close()
