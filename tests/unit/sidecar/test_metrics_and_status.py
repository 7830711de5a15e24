"""Prometheus metrics and ``predtrace sidecar status`` read from a running sidecar."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import logging
import re
import socket
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import aiohttp
import grpc
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from predtrace.cli import main
from predtrace.sidecar._cli import _status_target
from predtrace.sidecar._config import ShipperConfig
from predtrace.sidecar._status import build_status, status_to_dict
from predtrace.sidecar.pipeline import RetryPolicy
from predtrace.sidecar.spool import MemoryFileLayer, SpoolConfig
from predtrace.v1 import sidecar_pb2, sidecar_pb2_grpc
from predtrace.wire import PredictionEvent, event_to_proto
from tests.reliability.sidecar.fake_collector import Answer
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
    # Exported is counted on the ack; the spool's depth falls once the new
    # delivered mark is durable, a group commit later: both are awaited.
    await eventually(
        lambda: (
            running.app.shipper.counters.exported == 5
            and running.app.status_view().spool.records == 0
        )
    )
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
    assert "give --target HOST:PORT, --ready-file or PREDTRACE_SIDECAR_TARGET" in result.output
    assert "a sidecar serving TLS needs --tls-ca" in result.output


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("127.0.0.1:99999", "--target must be HOST:PORT"),
        ("http://127.0.0.1:4555", "not a URL"),
        ("127.0.0.1:0", "needs the sidecar's port"),
        ("localhost", "--target must be HOST:PORT"),
    ],
)
def test_the_status_command_refuses_a_target_it_could_never_reach(target: str, reason: str) -> None:
    result = CliRunner().invoke(main, ["sidecar", "status", "--target", target])
    assert result.exit_code == 2
    assert reason in result.output


# -- delivery counters through the real /metrics endpoint ---------------------------------

Samples = dict[str, float]
_FAST_RETRY = ShipperConfig(linger=0, retry=RetryPolicy(initial_backoff=0.02, max_backoff=0.05))


async def _scrape(running: Running) -> Samples:
    """One GET /metrics of the running sidecar, parsed by prometheus_client."""
    url = f"http://{running.app.addresses['metrics']}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200
        text = await resp.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


async def _scrape_until(
    running: Running, predicate: Callable[[Samples], bool], within: float = 10.0
) -> Samples:
    """Scrape until ``predicate`` holds (polled with a deadline, like ``eventually``)."""
    latest: list[Samples] = [await _scrape(running)]

    async def scrape_in_background() -> None:
        while True:
            latest.append(await _scrape(running))
            await asyncio.sleep(0.01)

    task = asyncio.create_task(scrape_in_background())
    try:
        await eventually(lambda: predicate(latest[-1]), within)
    except AssertionError:
        raise AssertionError(f"metrics never matched; last scrape: {latest[-1]}") from None
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return latest[-1]


async def _record_ids(running: Running, ids: list[str]) -> None:
    async with grpc.aio.insecure_channel(running.target) as channel:
        ack = await sidecar_pb2_grpc.SidecarStub(channel).RecordBatch(
            sidecar_pb2.RecordBatchRequest(events=[event_to_proto(PredictionEvent(i)) for i in ids])
        )
    assert ack.accepted == len(ids)


async def test_metrics_count_a_retried_delivery_and_the_age_gauge_tracks_the_backlog(
    start_sidecar: StartSidecar,
) -> None:
    running: Running = await start_sidecar(metrics_listen="127.0.0.1:0", shipper=_FAST_RETRY)
    collector = running.collector
    idle = await _scrape(running)
    assert idle["predtrace_sidecar_exported_events_total"] == 0
    assert idle["predtrace_sidecar_retried_batches_total"] == 0
    assert idle["predtrace_sidecar_oldest_unsent_age_seconds"] == 0
    collector.script = [Answer(503)] * 10_000  # busy until the test lets the batch through
    await _record_ids(running, [f"r{i}" for i in range(8)])
    stuck = await _scrape_until(
        running, lambda m: m["predtrace_sidecar_retried_batches_total"] >= 1
    )
    assert stuck["predtrace_sidecar_exported_events_total"] == 0
    assert stuck["predtrace_sidecar_queue_depth"] == 8
    age = stuck["predtrace_sidecar_oldest_unsent_age_seconds"]
    assert age > 0
    # The age of an undelivered event keeps growing while the collector is busy.
    await _scrape_until(running, lambda m: m["predtrace_sidecar_oldest_unsent_age_seconds"] > age)
    collector.script.clear()
    done = await _scrape_until(
        running,
        lambda m: (
            m["predtrace_sidecar_exported_events_total"] == 8
            and m["predtrace_sidecar_oldest_unsent_age_seconds"] == 0
            and m["predtrace_sidecar_queue_depth"] == 0
        ),
    )
    assert done["predtrace_sidecar_exported_batches_total"] == 1
    # Every attempt but the accepted one was answered 503 and counted as a retry.
    assert done["predtrace_sidecar_retried_batches_total"] == collector.requests - 1
    assert done["predtrace_sidecar_retried_batches_total"] >= 1
    assert done["predtrace_sidecar_quarantined_batches_total"] == 0
    assert {e.prediction_id for e in collector.events()} == {f"r{i}" for i in range(8)}


async def test_metrics_count_a_quarantined_poison_batch_and_its_dropped_events(
    start_sidecar: StartSidecar,
) -> None:
    running: Running = await start_sidecar(metrics_listen="127.0.0.1:0", shipper=_FAST_RETRY)
    running.collector.fail_when = lambda d: (
        400 if d.batch.events[0].prediction_id.startswith("poison") else None
    )
    before = await _scrape(running)
    assert before["predtrace_sidecar_quarantined_batches_total"] == 0
    assert before['predtrace_sidecar_dropped_events_total{reason="quarantined"}'] == 0
    await _record_ids(running, [f"poison{i}" for i in range(5)])
    await _scrape_until(running, lambda m: m["predtrace_sidecar_quarantined_batches_total"] == 1)
    await _record_ids(running, ["good0", "good1", "good2"])
    after = await _scrape_until(
        running, lambda m: m["predtrace_sidecar_exported_events_total"] == 3
    )
    assert after["predtrace_sidecar_quarantined_batches_total"] == 1
    assert after['predtrace_sidecar_dropped_events_total{reason="quarantined"}'] == 5
    assert after["predtrace_sidecar_exported_batches_total"] == 1
    assert after["predtrace_sidecar_retried_batches_total"] == 0, "a 400 is not retried"
    assert {e.prediction_id for e in running.collector.events()} == {"good0", "good1", "good2"}


async def test_status_reports_the_last_success_once_a_batch_is_delivered(
    start_sidecar: StartSidecar,
) -> None:
    running: Running = await start_sidecar()
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        fresh = await stub.Status(sidecar_pb2.StatusRequest())
        assert fresh.last_success_unix_nano == 0, "nothing was delivered yet"
        before_ns = time.time_ns()
        await _record_ids(running, ["s0", "s1", "s2"])
        await eventually(lambda: running.app.shipper.counters.exported == 3)
        status = await stub.Status(sidecar_pb2.StatusRequest())
        after_ns = time.time_ns()
    assert before_ns <= status.last_success_unix_nano <= after_ns
    assert status.exported_events == 3
    args = ["sidecar", "status", "--target", running.target, "-o", "json"]
    result = await asyncio.to_thread(CliRunner().invoke, main, args)
    assert result.exit_code == 0, result.output
    view = json.loads(result.output)
    assert view["last_success_unix_nano"] == status.last_success_unix_nano
    table = await asyncio.to_thread(
        CliRunner().invoke, main, ["sidecar", "status", "--target", running.target]
    )
    assert table.exit_code == 0, table.output
    row = next(line for line in table.output.splitlines() if "last success" in line)
    assert "s ago" in row, row


def test_status_of_a_stopped_sidecar_by_its_ready_file_is_unreachable_not_a_usage_error(
    tmp_path: Path,
) -> None:
    # A sidecar removes its ready file when it stops; an empty one is still starting.
    missing = CliRunner().invoke(
        main, ["sidecar", "status", "--ready-file", str(tmp_path / "gone.ready")]
    )
    assert missing.exit_code == 1
    assert "is the sidecar running?" in missing.output
    empty = tmp_path / "empty.ready"
    empty.write_text("")
    answered = CliRunner().invoke(main, ["sidecar", "status", "--ready-file", str(empty)])
    assert answered.exit_code == 1
    assert "is empty" in answered.output


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--target", ""], "--target is empty"),
        (["--target", "127.0.0.1:9", "--timeout", "nan"], "--timeout must be more than 0"),
        (["--target", "127.0.0.1:9", "--timeout", "-1"], "--timeout must be more than 0"),
        # Was "between 0 and 3600 seconds, not 0.0": 0 is not taken.
        (
            ["--target", "127.0.0.1:9", "--timeout", "0"],
            "more than 0 and at most 3600 seconds, not 0",
        ),
    ],
)
def test_status_refuses_an_empty_target_or_an_unusable_timeout(args: list[str], says: str) -> None:
    result = CliRunner().invoke(main, ["sidecar", "status", *args])
    assert result.exit_code == 2
    assert says in result.output


def test_status_against_a_grpc_server_that_is_no_sidecar_says_so() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        result = CliRunner().invoke(
            main, ["sidecar", "status", "--target", f"127.0.0.1:{port}", "--timeout", "5"]
        )
    finally:
        server.stop(None)
    assert result.exit_code == 1
    assert "answers gRPC but is not a predtrace sidecar" in result.output


async def test_a_full_disk_shows_in_metrics_and_status_and_is_logged_once(
    start_sidecar: StartSidecar, caplog: pytest.LogCaptureFixture
) -> None:
    disk = MemoryFileLayer()
    running: Running = await start_sidecar(
        files=disk, spool=SpoolConfig(directory="/spool"), metrics_listen="127.0.0.1:0"
    )
    idle = await _scrape(running)
    assert idle['predtrace_sidecar_spool_refused_writes_total{reason="disk_full"}'] == 0
    assert idle["predtrace_sidecar_spool_corrupt_regions_total"] == 0
    disk.capacity = disk.used_bytes() + 200
    caplog.set_level(logging.ERROR, logger="predtrace.sidecar.spool")
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        for _ in range(5):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.RecordBatch(
                    sidecar_pb2.RecordBatchRequest(
                        events=[event_to_proto(PredictionEvent(f"f{i}")) for i in range(50)]
                    )
                )
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        status = await stub.Status(sidecar_pb2.StatusRequest())
    full = await _scrape(running)
    assert full['predtrace_sidecar_spool_refused_writes_total{reason="disk_full"}'] == 5
    assert full['predtrace_sidecar_spool_refused_writes_total{reason="busy"}'] == 0
    assert "the spool refused a write" in status.last_error
    assert "disk under the spool is full" in status.last_error
    assert "disk full 5" in status.last_error
    logged = [r for r in caplog.records if "spool write failed" in r.getMessage()]
    assert len(logged) == 1, "one line for a burst of refusals, not one each"
    disk.capacity = None
    await _record_ids(running, ["room-again"])


async def test_a_request_bigger_than_the_spool_cap_is_refused_and_shows_in_metrics_and_status(
    start_sidecar: StartSidecar,
) -> None:
    mib = 1 << 20
    running: Running = await start_sidecar(
        files=MemoryFileLayer(),
        spool=SpoolConfig(directory="/spool", max_bytes=2 * mib, segment_bytes=mib),
        metrics_listen="127.0.0.1:0",
    )
    path = "/v2/models/" + "m" * 240 + "/infer"  # 10,000 events (the most a request takes)
    events = [PredictionEvent(f"big-{i}", endpoint=path) for i in range(10_000)]
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        request = sidecar_pb2.RecordBatchRequest(events=[event_to_proto(e) for e in events])
        assert request.ByteSize() > 2 * mib
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.RecordBatch(request)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--spool-max-bytes" in (info.value.details() or "")
        status = await stub.Status(sidecar_pb2.StatusRequest())
    scraped = await _scrape(running)
    assert scraped['predtrace_sidecar_spool_refused_writes_total{reason="cap"}'] == 1
    assert "over the cap 1" in status.last_error


async def test_an_io_error_refusing_a_write_shows_in_metrics_and_status(
    start_sidecar: StartSidecar,
) -> None:
    disk = MemoryFileLayer()
    running: Running = await start_sidecar(
        files=disk, spool=SpoolConfig(directory="/spool"), metrics_listen="127.0.0.1:0"
    )
    disk.fail_next_fsync = errno.EIO
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.RecordBatch(
                sidecar_pb2.RecordBatchRequest(events=[event_to_proto(PredictionEvent("io-1"))])
            )
        assert info.value.code() != grpc.StatusCode.OK
        assert "spool write failed: Input/output error" in (info.value.details() or "")
        status = await stub.Status(sidecar_pb2.StatusRequest())
    scraped = await _scrape(running)
    assert scraped['predtrace_sidecar_spool_refused_writes_total{reason="io_error"}'] == 1
    assert scraped['predtrace_sidecar_spool_refused_writes_total{reason="disk_full"}'] == 0
    assert "spool write failed: Input/output error" in status.last_error
    assert "I/O error 1" in status.last_error
    await _record_ids(running, ["after-the-error"])


async def test_metrics_show_the_quarantine_size_and_its_cap(start_sidecar: StartSidecar) -> None:
    shipper = ShipperConfig(linger=0, quarantine_max_bytes=1 << 20)
    running: Running = await start_sidecar(metrics_listen="127.0.0.1:0", shipper=shipper)
    running.collector.fail_when = lambda d: 400
    before = await _scrape(running)
    assert before["predtrace_sidecar_quarantine_bytes"] == 0
    assert before["predtrace_sidecar_quarantine_byte_cap"] == 1 << 20
    await _record_ids(running, [f"poison{i}" for i in range(5)])
    after = await _scrape_until(running, lambda m: m["predtrace_sidecar_quarantine_bytes"] > 0)
    kept = running.app.shipper.counters.quarantine_bytes
    assert after["predtrace_sidecar_quarantine_bytes"] == kept
    assert after["predtrace_sidecar_quarantine_evicted_batches_total"] == 0


async def test_metrics_show_a_batch_split_for_an_ingress_limit_and_the_limit_in_force(
    start_sidecar: StartSidecar,
) -> None:
    shipper = ShipperConfig(linger=0.2, max_batch_events=64)
    running: Running = await start_sidecar(metrics_listen="127.0.0.1:0", shipper=shipper)
    before = await _scrape(running)
    assert before["predtrace_sidecar_split_batches_total"] == 0
    assert before["predtrace_sidecar_batch_max_events"] == 64
    running.collector.max_body = 300  # a proxy's body limit: a few events per request
    await _record_ids(running, [f"split{i}" for i in range(60)])
    after = await _scrape_until(
        running, lambda m: m["predtrace_sidecar_exported_events_total"] == 60
    )
    assert after["predtrace_sidecar_split_batches_total"] >= 1
    assert after["predtrace_sidecar_batch_max_events"] < 64
    assert after["predtrace_sidecar_producer_renumbered_total"] == 0


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_an_ipv6_sidecar_writes_bracketed_addresses_that_status_reads(
    start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    ready = tmp_path / "s.ready"
    running: Running = await start_sidecar(
        listen="[::1]:0", metrics_listen="[::1]:0", otlp_listen="[::1]:0", ready_file=str(ready)
    )
    first, *named = ready.read_text().splitlines()
    assert re.fullmatch(r"\[::1\]:\d+", first), first
    assert {line.split()[0] for line in named} == {"metrics", "otlp-grpc", "otlp-http"}
    for line in named:
        assert re.fullmatch(r"[a-z-]+ \[::1\]:\d+", line), line
    assert await _scrape(running), "the metrics address is usable as written"
    args = ["sidecar", "status", "--ready-file", str(ready), "-o", "json"]
    result = await asyncio.to_thread(CliRunner().invoke, main, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["producer_id"] == "test-sidecar"


@pytest.mark.parametrize(
    ("line", "target"),
    [
        ("::1:4555", "[::1]:4555"),
        ("[::1]:4555", "[::1]:4555"),
        ("127.0.0.1:4555", "127.0.0.1:4555"),
    ],
)
def test_status_reads_a_ready_file_line_with_or_without_ipv6_brackets(
    tmp_path: Path, line: str, target: str
) -> None:
    ready = tmp_path / "s.ready"
    ready.write_text(f"{line}\nmetrics 127.0.0.1:9\n")
    assert _status_target(None, str(ready)) == target


async def test_status_never_shows_a_user_name_or_password_of_the_collector_url(
    start_sidecar: StartSidecar,
) -> None:
    # The config refuses them; an older sidecar's answer may still carry them.
    running: Running = await start_sidecar()
    view = dataclasses.replace(
        running.app.status_view(), collector_url="http://alice:s3cret@collector:8700"
    )
    assert build_status(view).collector_url == "http://collector:8700"
    older = sidecar_pb2.SidecarStatus(collector_url="https://alice:s3cret@collector:8443/p")
    assert status_to_dict(older)["collector_url"] == "https://collector:8443/p"
