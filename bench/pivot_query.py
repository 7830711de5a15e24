"""Benchmark of the on-call pivot: `GET /v1/traces/{id}` at 1,000,000 stored predictions.

Fills a SQLite store through the store's own ingest path (1 M predictions, two
per trace, ``--quick``: 100 k), registers full lineage, starts `predtrace
collector serve` on it, and times sequential pivot requests over a keep-alive
connection (HTTP, JSON, chain assembly included). The anchor, in the same run:
the bare indexed SQL lookup of the same trace ids with sqlite3 in-process.
Target (DESIGN §8): p99 <= 5 ms on SQLite. Ends with one line of JSON.

    python bench/pivot_query.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from predtrace.collector.lineage import parse_registration
from predtrace.collector.store import IngestRecord, open_store, prediction_row
from predtrace.collector.testing import make_events

PER_BATCH = 10_000
PER_TRACE = 2


def _trace(i: int) -> bytes:
    return (i + 1).to_bytes(16, "big")


async def fill(path: Path, predictions: int) -> None:
    store = open_store(f"sqlite:///{path}")
    await store.open()
    try:
        await store.register(
            parse_registration(
                {
                    "model": {"name": "churn", "version": "3", "aliases": ["prod"]},
                    "run": {"id": "run-42", "params": {"lr": "0.1"}, "metrics": {"auc": 0.91}},
                    "datasets": [{"digest": "sha256:train", "source": "s3://b/train.csv"}],
                    "commit": {"sha": "1f2e3d4c5b6a79881f2e3d4c5b6a79881f2e3d4c"},
                    "image": {"digest": "sha256:image-churn-3"},
                }
            )
        )
        for seq, start in enumerate(range(0, predictions, PER_BATCH), start=1):
            now = time.time_ns()
            rows = []
            for t in range(start // PER_TRACE, (start + PER_BATCH) // PER_TRACE):
                rows += [
                    prediction_row(e, "fill", seq, now)
                    for e in make_events(PER_TRACE, trace_id=_trace(t))
                ]
            await store.ingest(
                IngestRecord("fill", seq, seq.to_bytes(32, "big"), b"", b"", now, now, rows)
            )
    finally:
        await store.close()


def start_collector(db: Path, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    ready = workdir / "ready"
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from predtrace.cli import main; main()",
            "collector",
            "serve",
            "--db",
            f"sqlite:///{db}",
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
            raise SystemExit("collector did not start")
        time.sleep(0.02)
    return process, "http://" + ready.read_text().splitlines()[0]


async def time_pivots(url: str, traces: list[bytes]) -> list[float]:
    latencies = []
    async with aiohttp.ClientSession() as session:
        for trace in traces:
            started = time.perf_counter()
            async with session.get(f"{url}/v1/traces/{trace.hex()}") as resp:
                body = await resp.json()
            latencies.append((time.perf_counter() - started) * 1000)
            if resp.status != 200 or not body["complete"] or len(body["predictions"]) != PER_TRACE:
                raise SystemExit(f"bad pivot answer {resp.status}")
    return latencies


def anchor(db: Path, traces: list[bytes]) -> list[float]:
    conn = sqlite3.connect(db)
    latencies = []
    for trace in traces:
        started = time.perf_counter()
        rows = conn.execute("SELECT * FROM predictions WHERE trace_id = ?", (trace,)).fetchall()
        latencies.append((time.perf_counter() - started) * 1000)
        if len(rows) != PER_TRACE:
            raise SystemExit("anchor lookup found the wrong rows")
    conn.close()
    return latencies


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100,000 predictions (< 1 minute)")
    parser.add_argument("--queries", type=int, default=2000)
    args = parser.parse_args()
    predictions = 100_000 if args.quick else 1_000_000
    rng = random.Random(42)
    traces = [_trace(rng.randrange(predictions // PER_TRACE)) for _ in range(args.queries)]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        db = workdir / "pivot.db"
        started = time.perf_counter()
        asyncio.run(fill(db, predictions))
        fill_s = time.perf_counter() - started
        process, url = start_collector(db, workdir)
        try:
            asyncio.run(time_pivots(url, traces[:100]))  # warm up
            latencies = asyncio.run(time_pivots(url, traces))
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(30)
        bare = anchor(db, traces)
    figures = {
        "stored_predictions": float(predictions),
        "pivot_p50_ms": pct(latencies, 50),
        "pivot_p99_ms": pct(latencies, 99),
        "anchor_sql_p50_ms": pct(bare, 50),
        "anchor_sql_p99_ms": pct(bare, 99),
        "fill_s": fill_s,
    }
    print(
        f"stored predictions: {predictions:,} ({'--quick' if args.quick else 'full'}), "
        f"{PER_TRACE} per trace; filled in {fill_s:.1f} s; {args.queries} queries"
    )
    print(
        f"pivot GET /v1/traces/{{id}} over HTTP: p50 {figures['pivot_p50_ms']:.2f} ms, "
        f"p99 {figures['pivot_p99_ms']:.2f} ms (target p99 <= 5 ms)"
    )
    print(
        f"anchor: bare indexed SQL lookup:      p50 {figures['anchor_sql_p50_ms']:.3f} ms, "
        f"p99 {figures['anchor_sql_p99_ms']:.3f} ms "
        f"(pivot p50 = {figures['pivot_p50_ms'] / figures['anchor_sql_p50_ms']:.0f} x)"
    )
    print(json.dumps({k: round(v, 3) for k, v in figures.items()}))


if __name__ == "__main__":
    main()
