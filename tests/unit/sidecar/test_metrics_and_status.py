"""Prometheus metrics and ``predtrace sidecar status`` read from a running sidecar."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import grpc
from click.testing import CliRunner

from predtrace.cli import main
from predtrace.sidecar.spool import SpoolConfig
from predtrace.v1 import sidecar_pb2, sidecar_pb2_grpc
from predtrace.wire import PredictionEvent, event_to_proto
from tests.reliability.sidecar.polling import eventually

from .conftest import Running, StartSidecar


async def _record(running: Running, n: int) -> None:
    async with grpc.aio.insecure_channel(running.target) as channel:
        await sidecar_pb2_grpc.SidecarStub(channel).RecordBatch(
            sidecar_pb2.RecordBatchRequest(
                events=[event_to_proto(PredictionEvent(f"m{i}")) for i in range(n)]
            )
        )


async def test_metrics_show_depth_bytes_age_and_drops_by_reason(
    start_sidecar: StartSidecar, tmp_path: object
) -> None:
    running: Running = await start_sidecar(
        metrics_listen="127.0.0.1:0",
        spool=SpoolConfig(directory=f"{tmp_path}/spool", segment_bytes=4096, max_bytes=8192),
    )
    await running.collector.stop()
    for _ in range(20):
        await _record(running, 20)
    url = f"http://{running.app.addresses['metrics']}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        text = await resp.text()
    assert resp.status == 200
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert values["predtrace_sidecar_queue_depth"] > 0
    assert values["predtrace_sidecar_spool_bytes"] > 0
    assert values["predtrace_sidecar_received_events_total"] == 400
    assert values['predtrace_sidecar_dropped_events_total{reason="byte_cap"}'] > 0
    assert "predtrace_sidecar_oldest_unsent_age_seconds" in values


async def test_the_status_command_reads_the_running_sidecar(start_sidecar: StartSidecar) -> None:
    running: Running = await start_sidecar()
    await _record(running, 5)
    await eventually(lambda: running.app.shipper.counters.exported == 5)
    runner = CliRunner()
    args = ["sidecar", "status", "--target", running.target, "-o", "json"]
    result = await asyncio.to_thread(runner.invoke, main, args)
    assert result.exit_code == 0, result.output
    view = json.loads(result.output)
    assert view["producer_id"] == "test-sidecar"
    assert view["exported_events"] == 5
    assert view["spool_records"] == 0
    table = await asyncio.to_thread(
        runner.invoke, main, ["sidecar", "status", "--target", running.target]
    )
    assert "spool depth" in table.output and "last success" in table.output


def test_the_status_command_says_when_no_sidecar_answers() -> None:
    result = CliRunner().invoke(
        main, ["sidecar", "status", "--target", "127.0.0.1:9", "--timeout", "0.5"]
    )
    assert result.exit_code == 1
    assert "cannot reach the sidecar at 127.0.0.1:9" in result.output
