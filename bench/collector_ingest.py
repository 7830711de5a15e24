"""Benchmark of collector ingest: events/s committed, SQLite and PostgreSQL.

Starts `predtrace collector serve` (a real subprocess on 127.0.0.1:0) for each
store, POSTs pre-encoded gzip'd batches of 1,000 events from concurrent
clients, and counts events acknowledged (acks come only after the commit).
The anchor, measured in the same run: a bare sqlite3 `executemany` of the
same rows into the same schema (no HTTP, no decode, no dedupe), the ceiling of
the embedded store. Ends with one line of JSON.

    python bench/collector_ingest.py [--quick] [--postgres URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from predtrace.collector.store import open_store, prediction_row
from predtrace.collector.store._schema import PREDICTION_COLUMNS
from predtrace.collector.testing import ChainedProducer, make_events
from predtrace.wire import decode_ack

BATCH = 1000
CONCURRENCY = 8


def start_collector(db: str, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    ready = workdir / f"ready-{time.monotonic_ns()}"
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from predtrace.cli import main; main()",
            "collector",
            "serve",
            "--db",
            db,
            "--listen",
            "127.0.0.1:0",
            "--ready-file",
            str(ready),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"collector did not start for {db}")
        time.sleep(0.02)
    return process, "http://" + ready.read_text().splitlines()[0]


def stop(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(30)


def bodies(batches: int) -> list[bytes]:
    producers = [ChainedProducer(f"bench-{i}") for i in range(CONCURRENCY)]
    return [
        producers[i % CONCURRENCY].body(make_events(BATCH), compress=True) for i in range(batches)
    ]


async def send_all(url: str, payloads: list[bytes]) -> tuple[int, float]:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in payloads:
        queue.put_nowait(body)
    accepted = 0
    headers = {
        "Content-Type": "application/vnd.predtrace.batch+msgpack",
        "Content-Encoding": "gzip",
    }

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal accepted
        while not queue.empty():
            body = queue.get_nowait()
            async with session.post(f"{url}/v1/batches", data=body, headers=headers) as resp:
                if resp.status != 200:
                    raise SystemExit(f"collector answered {resp.status}")
                accepted += decode_ack(await resp.read()).accepted

    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(CONCURRENCY)))
        return accepted, time.perf_counter() - started


def collector_rate(db: str, workdir: Path, payloads: list[bytes]) -> float:
    process, url = start_collector(db, workdir)
    try:
        asyncio.run(send_all(url, payloads[:2]))  # warm up (connections, partitions)
        accepted, elapsed = asyncio.run(send_all(url, payloads[2:]))
    finally:
        stop(process)
    return accepted / elapsed


def anchor_rate(workdir: Path, events: int) -> float:
    path = workdir / "anchor.db"
    store = open_store(f"sqlite:///{path}")
    asyncio.run(_open_close(store))
    now = time.time_ns()
    rows = [prediction_row(e, "anchor", 1, now) for e in make_events(events)]
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    marks = ", ".join("?" * len(PREDICTION_COLUMNS))
    sql = f"INSERT INTO predictions ({', '.join(PREDICTION_COLUMNS)}) VALUES ({marks})"  # noqa: S608 - bench
    started = time.perf_counter()
    for i in range(0, events, BATCH):
        conn.execute("BEGIN")
        conn.executemany(sql, rows[i : i + BATCH])
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    return events / elapsed


async def _drop_schema(url: str, schema: str) -> None:
    import asyncpg  # noqa: PLC0415 - only with --postgres

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


async def _open_close(store: object) -> None:
    await store.open()  # type: ignore[attr-defined]
    await store.close()  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer batches (< 1 minute)")
    parser.add_argument("--postgres", default=os.environ.get("PREDTRACE_TEST_POSTGRES_URL"))
    args = parser.parse_args()
    batches = 40 if args.quick else 200
    payloads = bodies(batches + 2)
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        figures["anchor_sqlite_executemany_rows_per_s"] = anchor_rate(workdir, batches * BATCH)
        figures["ingest_events_per_s_sqlite"] = collector_rate(
            f"sqlite:///{workdir}/c.db", workdir, payloads
        )
        if args.postgres:
            schema = f"bench_{os.getpid()}"
            try:
                figures["ingest_events_per_s_postgres"] = collector_rate(
                    f"{args.postgres}?schema={schema}", workdir, bodies(batches + 2)
                )
            finally:
                asyncio.run(_drop_schema(args.postgres, schema))
    figures["sqlite_ratio_to_anchor"] = (
        figures["ingest_events_per_s_sqlite"] / figures["anchor_sqlite_executemany_rows_per_s"]
    )
    anchor = figures["anchor_sqlite_executemany_rows_per_s"]
    print(f"events per batch {BATCH}, batches {batches}, concurrent clients {CONCURRENCY}")
    print(f"anchor: bare sqlite executemany     {anchor:>12,.0f} rows/s")
    print(
        f"collector (SQLite), committed       {figures['ingest_events_per_s_sqlite']:>12,.0f}"
        f" events/s  ({figures['sqlite_ratio_to_anchor']:.2f} x anchor)"
    )
    if "ingest_events_per_s_postgres" in figures:
        pg_rate = figures["ingest_events_per_s_postgres"]
        print(f"collector (PostgreSQL), committed   {pg_rate:>12,.0f} events/s")
    else:
        print("collector (PostgreSQL): skipped (no --postgres URL / PREDTRACE_TEST_POSTGRES_URL)")
    print(json.dumps({k: round(v, 3) for k, v in figures.items()}))


if __name__ == "__main__":
    main()
