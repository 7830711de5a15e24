"""The sidecar and the real collector as subprocesses (T2): RELIABILITY rows 1, 8, 13, 16, 22, 26.

Each test runs ``predtrace sidecar serve`` and ``predtrace collector serve`` on
127.0.0.1 port 0, drives them over real sockets, and checks the delivery
oracle against what the collector stored. Seeds are printed.
"""

from __future__ import annotations

import contextlib
import json
import random
import resource
import socket
import sqlite3
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import libfaketime
import pytest

from predtrace.v1 import sidecar_pb2, sidecar_pb2_grpc
from predtrace.wire import PredictionEvent, decode_batch, event_to_proto

from .oracle import DeliveryOracle
from .polling import eventually_sync
from .procs import (
    PREDTRACE,
    Producer,
    collector_available,
    get_prediction,
    make_event,
    running,
    start_collector,
    start_sidecar,
    stored_count,
    stored_events,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not collector_available(), reason="predtrace collector serve missing"),
]


def fingerprint_t2(event: PredictionEvent) -> str:
    """What survives the collector's JSON: id, time, model."""
    model = event.model
    return f"{event.prediction_id}|{event.timestamp_unix_nano}|{model.name}|{model.version}"


def oracle() -> DeliveryOracle:
    return DeliveryOracle(fingerprint=fingerprint_t2)


def wait_delivered(collector: str, ids: set[str], within: float = 60.0) -> None:
    """Wait until the collector holds every id (counted first, then checked one by one)."""
    eventually_sync(lambda: stored_count(collector) >= len(ids), within)
    eventually_sync(lambda: all(get_prediction(collector, i) for i in ids), within)


def producer_report(collector: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{collector}/v1/producers", timeout=10) as resp:
        (report,) = json.loads(resp.read())["producers"]
    return report  # type: ignore[no-any-return]


def check(collector: str, book: DeliveryOracle, *, allowed_lost: int = 0) -> None:
    """The oracle over everything sent; the stored total rules out phantoms with other ids."""
    delivered = stored_events(collector, sorted(book.sent))
    report = book.check(delivered, allowed_lost=allowed_lost)
    print(report)
    assert report.ok, str(report)
    assert stored_count(collector) == len(delivered), "the collector holds events never sent"


def liveness(tmp: Path, sidecar_target: str, collector: str, book: DeliveryOracle) -> None:
    fresh = Producer(book, sidecar_target, "fresh")
    assert fresh.send_once(1) == 1
    wait_delivered(collector, {"fresh-0000000"})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- row 1: collector down -------------------------------------------------------------


def test_with_the_collector_down_events_are_spooled_and_all_delivered_when_it_returns(
    tmp_path: Path,
) -> None:
    port = free_port()
    book = oracle()
    sidecar = start_sidecar(tmp_path, f"http://127.0.0.1:{port}")
    with running(sidecar):
        producer = Producer(book, sidecar.address, "down")
        for _ in range(10):
            assert producer.send_once() == 20
        status = subprocess.run(
            [PREDTRACE, "sidecar", "status", "--target", sidecar.address, "-o", "json"],
            capture_output=True,
            check=True,
        )
        view = json.loads(status.stdout)
        assert view["spool_records"] == 200
        eventually_sync(lambda: json.loads(_status(sidecar.address))["retried_batches"] >= 2)
        collector = start_collector(tmp_path, listen=f"127.0.0.1:{port}")
        with running(collector):
            wait_delivered(collector.address, book.acked)
            liveness(tmp_path, sidecar.address, collector.address, book)
            check(collector.address, book)
            assert producer_report(collector.address)["chain_breaks"] == 0
            assert sidecar.stop() == 0
            collector.stop()


def _status(target: str) -> str:
    result = subprocess.run(
        [PREDTRACE, "sidecar", "status", "--target", target, "-o", "json"],
        capture_output=True,
        check=True,
    )
    return result.stdout.decode()


# -- row 8: kill -9 during steady writes -------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_during_steady_writes_loses_no_acknowledged_event(tmp_path: Path, seed: int) -> None:
    print(f"seed={seed}")
    rng = random.Random(seed)
    book = oracle()
    collector = start_collector(tmp_path)
    url = f"http://{collector.address}"
    sidecar = start_sidecar(tmp_path, url)
    with running(collector, sidecar):
        producer = Producer(book, sidecar.address, f"k{seed}").start()
        for _ in range(2):
            time.sleep(rng.uniform(0.2, 0.6))  # let writes run; the kill lands anywhere
            sidecar.kill()
            sidecar = start_sidecar(tmp_path, url)
            producer.target = sidecar.address
        time.sleep(rng.uniform(0.1, 0.3))
        producer.stop()
        assert len(book.acked) > 0
        wait_delivered(collector.address, book.acked)
        liveness(tmp_path, sidecar.address, collector.address, book)
        check(collector.address, book)
        assert sidecar.stop() == 0


# -- row 13: crash at each named point ---------------------------------------------------

POINTS = [
    "append.after_fsync",
    "rotate.after_create",
    "state.after_write",
    "release.after_unlink",
    "index.before_rename",
    "shipper.before_send",
    "shipper.after_ack",
]


@pytest.mark.parametrize("point", POINTS)
def test_a_crash_at_a_named_point_restarts_and_loses_nothing_acknowledged(
    tmp_path: Path, point: str
) -> None:
    book = oracle()
    collector = start_collector(tmp_path)
    url = f"http://{collector.address}"
    faults = {"PREDTRACE_SIDECAR_FAULTS": f"{point}:3"}
    small = ("--spool-segment-bytes", "64KiB")
    sidecar = start_sidecar(tmp_path, url, *small, env=faults)
    with running(collector, sidecar):
        producer = Producer(book, sidecar.address, "fp", batch=100)
        while sidecar.popen.poll() is None and producer.sent < 200_000:
            producer.send_once()
        assert sidecar.popen.wait(10) == 86, f"{point} was not reached: {sidecar.tail()}"
        sidecar = start_sidecar(tmp_path, url, *small)
        wait_delivered(collector.address, book.acked)
        liveness(tmp_path, sidecar.address, collector.address, book)
        check(collector.address, book)
        assert sidecar.stop() == 0


# -- row 16: spool directory unusable at startup -----------------------------------------


def test_an_unusable_spool_directory_exits_non_zero_naming_path_and_reason(
    tmp_path: Path,
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    result = subprocess.run(
        [
            *(PREDTRACE, "sidecar", "serve", "--listen", "127.0.0.1:0"),
            *("--collector", "http://127.0.0.1:9", "--spool", str(blocker / "spool")),
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    stderr = result.stderr.decode()
    assert str(blocker / "spool") in stderr
    assert "Not a directory" in stderr


# -- row 14: disk full, in the real process --------------------------------------------


def test_a_write_that_finds_no_room_is_refused_whole_and_the_sidecar_resumes_when_room_returns(
    tmp_path: Path,
) -> None:
    # No room, for real: RLIMIT_FSIZE makes the kernel refuse any write that
    # grows the segment past 96 KiB (EFBIG, as ENOSPC or a quota would).
    port = free_port()
    book = oracle()
    sidecar = start_sidecar(tmp_path, f"http://127.0.0.1:{port}", "--spool-segment-bytes", "8MiB")
    with running(sidecar):
        limit = 96 * 1024
        # The soft limit only: raising it again needs no privilege.
        resource.prlimit(sidecar.popen.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        producer = Producer(book, sidecar.address, "full", batch=200)
        request = sidecar_pb2.RecordBatchRequest(
            events=[event_to_proto(make_event(i, "refused")) for i in range(200)]
        )
        codes = []
        with grpc.insecure_channel(sidecar.address) as channel:
            stub = sidecar_pb2_grpc.SidecarStub(channel)  # type: ignore[no-untyped-call]
            for _ in range(40):
                if producer.send_once() == 0:
                    try:
                        stub.RecordBatch(request, timeout=5)
                    except grpc.RpcError as exc:
                        codes.append(exc.code())
                    break
            status = stub.Status(sidecar_pb2.StatusRequest(), timeout=5)
        assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED], "the spool should have filled"
        assert status.spool_records == len(book.acked)  # alive, and nothing half-written counted
        unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
        resource.prlimit(sidecar.popen.pid, resource.RLIMIT_FSIZE, unlimited)
        assert Producer(book, sidecar.address, "after").send_once() == 20
        collector = start_collector(tmp_path, listen=f"127.0.0.1:{port}")
        with running(collector):
            wait_delivered(collector.address, book.acked)
            check(collector.address, book, allowed_lost=0)
            for refused in ("refused-0000000", "refused-0000199"):
                assert get_prediction(collector.address, refused) is None
            sidecar.stop()


# -- row 22: SIGTERM with a full queue ---------------------------------------------------


def test_sigterm_with_a_backlog_and_no_collector_exits_in_time_and_keeps_everything(
    tmp_path: Path,
) -> None:
    port = free_port()
    book = oracle()
    sidecar = start_sidecar(tmp_path, f"http://127.0.0.1:{port}", "--drain-timeout", "1")
    with running(sidecar):
        producer = Producer(book, sidecar.address, "term", batch=500)
        for _ in range(4):
            producer.send_once()
        assert sidecar.stop(within=20) == 0, "SIGTERM must never hang"
        collector = start_collector(tmp_path, listen=f"127.0.0.1:{port}")
        sidecar = start_sidecar(tmp_path, f"http://127.0.0.1:{port}")
        with running(collector, sidecar):
            wait_delivered(collector.address, book.acked)
            check(collector.address, book)
            sidecar.stop()


def test_sigterm_with_a_collector_that_never_answers_exits_in_time_and_keeps_everything(
    tmp_path: Path,
) -> None:
    # A collector that takes the connection and never answers: the send in
    # flight would hold the exit for the whole client timeout (30 s here).
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        port = silent.getsockname()[1]
        book = oracle()
        sidecar = start_sidecar(
            tmp_path,
            f"http://127.0.0.1:{port}",
            *("--drain-timeout", "1", "--collector-timeout", "30"),
        )
        with running(sidecar):
            producer = Producer(book, sidecar.address, "silent", batch=200)
            for _ in range(3):
                producer.send_once()
            time.sleep(0.5)  # the shipper's first send is on the wire
            started = time.monotonic()
            assert sidecar.stop(within=40) == 0
            took = time.monotonic() - started
        assert took < 10, f"SIGTERM took {took:.1f} s with a 1 s drain deadline"
        assert "still in flight at the drain deadline" in sidecar.tail()
    collector = start_collector(tmp_path)
    sidecar = start_sidecar(tmp_path, f"http://{collector.address}")
    with running(collector, sidecar):
        wait_delivered(collector.address, book.acked)
        check(collector.address, book)
        sidecar.stop()


def test_sigterm_with_a_backlog_drains_it_to_the_collector_within_the_deadline(
    tmp_path: Path,
) -> None:
    book = oracle()
    collector = start_collector(tmp_path)
    sidecar = start_sidecar(tmp_path, f"http://{collector.address}", "--drain-timeout", "20")
    with running(collector, sidecar):
        producer = Producer(book, sidecar.address, "drain", batch=1000)
        for _ in range(3):
            producer.send_once()
        assert sidecar.stop(within=40) == 0
        for prediction_id in book.acked:
            assert get_prediction(collector.address, prediction_id) is not None
        check(collector.address, book)


# -- row 25: a device clock that is wrong ------------------------------------------------


def test_events_from_a_device_with_a_wrong_clock_are_stored_in_seq_order_with_receive_time(
    tmp_path: Path,
) -> None:
    book = oracle()
    collector = start_collector(tmp_path)
    sidecar = start_sidecar(tmp_path, f"http://{collector.address}")
    with running(collector, sidecar):
        producer = Producer(book, sidecar.address, "clock")
        producer.send_once()
        before = time.time_ns()
        wait_delivered(collector.address, book.acked)
        row = get_prediction(collector.address, "clock-0000000")
        assert row is not None
        assert row["timestamp_unix_nano"] == 1_700_000_000_000_000_000  # the device's claim
        assert int(row["received_unix_nano"]) >= before - 60 * 10**9  # type: ignore[call-overload]
        check(collector.address, book)
        sidecar.stop()


def _clock_env(offset: str) -> dict[str, str]:
    """Environment that runs a process with its wall clock moved by ``offset`` (libfaketime).

    Only the wall clock moves (``DONT_FAKE_MONOTONIC``): timers and deadlines
    keep working, as they do on a device whose clock was set wrong.
    """
    env: dict[str, str] = dict(libfaketime.get_reload_information()[1])
    env["FAKETIME"] = offset
    return env


def test_a_sidecar_whose_clock_jumps_back_keeps_seq_order_and_dedupe_with_receive_time(
    tmp_path: Path,
) -> None:
    book = oracle()
    collector = start_collector(tmp_path)
    url = f"http://{collector.address}"
    with running(collector):
        # Run 1: the device's clock is a day ahead. The sidecar dies right
        # after the collector acknowledged batch 1 (its state not yet written).
        ahead = {**_clock_env("+1d"), "PREDTRACE_SIDECAR_FAULTS": "shipper.after_ack:1"}
        sidecar = start_sidecar(tmp_path, url, env=ahead)
        first = Producer(book, sidecar.address, "ahead")
        assert first.send_once() == 20
        assert sidecar.popen.wait(30) == 86
        # Run 2: the clock jumped back four days. Batch 1 goes again (a
        # duplicate to the collector), then new events follow as batch 2.
        sidecar = start_sidecar(tmp_path, url, env=_clock_env("-3d"))
        with running(sidecar):
            second = Producer(book, sidecar.address, "behind")
            assert second.send_once() == 20
            before = time.time_ns()
            wait_delivered(collector.address, book.acked)
            sidecar.stop()
        check(collector.address, book)  # every event once: the resent batch was deduplicated
        report = producer_report(collector.address)
        assert (report["first_seq"], report["last_seq"], report["batches"]) == (1, 2, 2)
        assert report["events"] == 40
        assert (report["chain_breaks"], report["missing_batches"]) == (0, 0)
        # The batches carry the device's wrong times (so the clocks really were
        # wrong); the collector's own clock stamps the receive time.
        day = 86_400 * 10**9
        db = sqlite3.connect(f"file:{tmp_path / 'collector.db'}?mode=ro", uri=True)
        with contextlib.closing(db):
            created = dict(db.execute("SELECT seq, created_ns FROM batches").fetchall())
        assert abs(created[1] - (before + day)) < day / 2
        assert abs(created[2] - (before - 3 * day)) < day / 2
        for prediction_id in ("ahead-0000000", "behind-0000000"):
            row = get_prediction(collector.address, prediction_id)
            assert row is not None
            received = int(row["received_unix_nano"])  # type: ignore[call-overload]
            assert abs(received - before) < 120 * 10**9, prediction_id


# -- row 26: poison batch ----------------------------------------------------------------


def test_a_batch_that_crashes_the_sidecar_on_every_start_is_quarantined_and_data_flows(
    tmp_path: Path,
) -> None:
    book = oracle()
    collector = start_collector(tmp_path)
    url = f"http://{collector.address}"
    crash = {"PREDTRACE_SIDECAR_FAULTS": "shipper.before_send:1"}
    sidecar = start_sidecar(tmp_path, url, "--poison-attempts", "3", env=crash)
    with running(collector, sidecar):
        poison = Producer(book, sidecar.address, "poison")
        poison.send_once()
        assert sidecar.popen.wait(20) == 86
        for _ in range(2):  # the sidecar restarts, and dies on the same batch again
            sidecar = start_sidecar(tmp_path, url, "--poison-attempts", "3", env=crash, wait=False)
            assert sidecar.popen.wait(20) == 86
        sidecar = start_sidecar(tmp_path, url, "--poison-attempts", "3")
        later = Producer(book, sidecar.address, "later")
        later.send_once()
        wait_delivered(collector.address, {f"later-{i:07d}" for i in range(20)})
        assert get_prediction(collector.address, "poison-0000000") is None
        (kept,) = (tmp_path / "spool" / "quarantine").iterdir()
        quarantined = decode_batch(kept.read_bytes()).batch.events
        assert {e.prediction_id for e in quarantined} == {f"poison-{i:07d}" for i in range(20)}
        status = json.loads(_status(sidecar.address))
        assert status["quarantined_batches"] == 1
        assert status["dropped"]["quarantined"] == 20
        sidecar.stop()


# -- answers that are not about the batch; unusable settings -----------------------------


def test_a_collector_url_with_a_wrong_path_prefix_quarantines_nothing_and_says_why(
    tmp_path: Path,
) -> None:
    # Behind a reverse proxy the URL gets a prefix the collector does not
    # serve: every POST answers 404. That is the URL's fault, not the
    # batches': they stay spooled, with the reason in the status, and are
    # all delivered once the URL is fixed.
    book = oracle()
    collector = start_collector(tmp_path)
    wrong = f"http://{collector.address}/predtrace"
    sidecar = start_sidecar(tmp_path, wrong, "--poison-attempts", "2")
    with running(collector, sidecar):
        producer = Producer(book, sidecar.address, "prefix")
        for _ in range(3):
            assert producer.send_once() == 20
        eventually_sync(lambda: json.loads(_status(sidecar.address))["retried_batches"] >= 3)
        view = json.loads(_status(sidecar.address))
        assert view["quarantined_batches"] == 0
        assert view["spool_records"] == 60
        assert "404" in view["last_error"] and "not an ingest endpoint" in view["last_error"]
        assert not (tmp_path / "spool" / "quarantine").exists()
        assert sidecar.stop() == 0
        fixed = start_sidecar(tmp_path, f"http://{collector.address}")
        with running(fixed):
            wait_delivered(collector.address, book.acked)
            check(collector.address, book)
            fixed.stop()
        collector.stop()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--collector-timeout", "inf"), "--collector-timeout"),
        (("--collector-timeout", "nan"), "--collector-timeout"),
        (("--collector-timeout", "0"), "--collector-timeout"),
        (("--collector", "http://127.0.0.1:99999"), "invalid port"),
    ],
)
def test_an_unusable_collector_setting_exits_2_naming_it(
    tmp_path: Path, args: tuple[str, str], says: str
) -> None:
    result = subprocess.run(
        [
            *(PREDTRACE, "sidecar", "serve", "--listen", "127.0.0.1:0"),
            *("--collector", "http://127.0.0.1:9", "--spool", str(tmp_path / "spool"), *args),
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert says in result.stderr.decode()
