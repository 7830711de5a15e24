"""Answers that are not about a batch's content lose nothing (T2): 500s, 413, 409, a new id.

The real ``predtrace collector serve`` runs behind an HTTP proxy in the test
that can answer 500 to everything (a load balancer in maintenance), 503, or
413 above a body limit (an ingress): every acknowledged event is delivered,
none quarantined, and the collector sees contiguous seqs and an unbroken
chain. A fixed ``--producer-id`` on a new spool, and one set on an old
spool, start a fresh numbering instead of colliding with the old one (409)
or carrying it on (a false gap report).
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import threading
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest

from predtrace.v1 import sidecar_pb2, sidecar_pb2_grpc

from .polling import eventually_sync
from .procs import Producer, collector_available, running, start_collector, start_sidecar
from .test_sidecar_processes import check, oracle, wait_delivered

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not collector_available(), reason="predtrace collector serve missing"),
]


class FaultProxy:
    """A reverse proxy to the collector; ``mode`` is "pass", "500", "503" or "limit".

    "500" and "503" answer every request, ``/readyz`` too, as a load balancer
    in front of a collector in maintenance does; "limit" answers 413 to a
    body over ``limit`` bytes, as an ingress does, and passes the rest.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.mode = "pass"
        self.limit = 0
        self.answers: Counter[tuple[str, int]] = Counter()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                proxy.handle(self, b"")

            def do_POST(self) -> None:
                proxy.handle(self, self.rfile.read(int(self.headers.get("Content-Length") or 0)))

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.address = f"127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def handle(self, request: BaseHTTPRequestHandler, body: bytes) -> None:
        mode = self.mode
        if mode in ("500", "503"):
            self._answer(request, int(mode), f"proxy says {mode}".encode(), {})
            return
        if mode == "limit" and len(body) > self.limit:
            self._answer(request, 413, b"Request Entity Too Large", {})
            return
        host, _, port = self.upstream.rpartition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        skip = ("host", "content-length", "connection")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in skip}
        try:
            conn.request(request.command, request.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            keep = {k: v for k, v in resp.getheaders() if k.lower() in ("content-type",)}
            self._answer(request, resp.status, data, keep)
        finally:
            conn.close()

    def _answer(
        self, request: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str]
    ) -> None:
        self.answers[(request.command, status)] += 1
        request.send_response(status)
        for name, value in headers.items():
            request.send_header(name, value)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def sidecar_status(target: str) -> sidecar_pb2.SidecarStatus:
    with grpc.insecure_channel(target) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)  # type: ignore[no-untyped-call]
        return stub.Status(sidecar_pb2.StatusRequest(), timeout=5)


def producers(collector: str) -> dict[str, dict[str, Any]]:
    """The collector's report per producer id."""
    with urllib.request.urlopen(f"http://{collector}/v1/producers", timeout=10) as resp:
        return {p["producer_id"]: p for p in json.loads(resp.read())["producers"]}


def assert_numbered_from_one_without_gaps(report: dict[str, Any]) -> None:
    assert report["first_seq"] == 1, report
    assert report["batches"] == report["last_seq"], report
    assert report["chain_breaks"] == 0, report


def test_a_proxy_answering_500_for_a_while_gets_no_batch_quarantined(tmp_path: Path) -> None:
    # Each batch was quarantined after --poison-attempts 500s, though the
    # collector behind the proxy never saw it.
    book = oracle()
    collector = start_collector(tmp_path)
    proxy = FaultProxy(collector.address)
    proxy.mode = "500"
    url = f"http://{proxy.address}"
    sidecar = start_sidecar(tmp_path, url, "--poison-attempts", "2", "--batch-max-events", "20")
    with running(collector, sidecar):
        try:
            producer = Producer(book, sidecar.address, "outage")
            for _ in range(4):
                assert producer.send_once() == 20
            # The first batch has failed more often than the poison rule allows.
            eventually_sync(lambda: proxy.answers[("POST", 500)] >= 4, 30)
            status = sidecar_status(sidecar.address)
            assert status.quarantined_batches == 0
            assert "not ready" in status.last_error
            proxy.mode = "pass"
            wait_delivered(collector.address, book.acked)
            check(collector.address, book)
            assert sidecar_status(sidecar.address).quarantined_batches == 0
            (report,) = producers(collector.address).values()
            assert_numbered_from_one_without_gaps(report)
            assert sidecar.stop() == 0
        finally:
            proxy.close()


def test_batches_too_large_for_an_ingress_after_an_outage_are_split_and_all_delivered(
    tmp_path: Path,
) -> None:
    # The backlog of an outage goes in big batches; an ingress refused them
    # (413) and each was quarantined whole.
    book = oracle()
    collector = start_collector(tmp_path)
    proxy = FaultProxy(collector.address)
    proxy.mode = "503"
    sidecar = start_sidecar(tmp_path, f"http://{proxy.address}")
    with running(collector, sidecar):
        try:
            producer = Producer(book, sidecar.address, "backlog", batch=100)
            for _ in range(30):
                assert producer.send_once() == 100
            proxy.limit, proxy.mode = 8 * 1024, "limit"
            wait_delivered(collector.address, book.acked)
            check(collector.address, book)
            assert proxy.answers[("POST", 413)] >= 1
            assert sidecar_status(sidecar.address).quarantined_batches == 0
            (report,) = producers(collector.address).values()
            assert_numbered_from_one_without_gaps(report)
            assert sidecar.stop() == 0
        finally:
            proxy.close()


def test_a_fixed_producer_id_on_a_new_spool_continues_under_a_derived_id(tmp_path: Path) -> None:
    # A pod with PREDTRACE_PRODUCER_ID=$(POD_NAME) and an emptyDir spool:
    # the new spool numbers from 1, the collector refuses each seq as reused
    # (409), and every batch was quarantined.
    book = oracle()
    collector = start_collector(tmp_path)
    url = f"http://{collector.address}"
    with running(collector):
        sidecar = start_sidecar(tmp_path, url, "--producer-id", "edge-7")
        with running(sidecar):
            first = Producer(book, sidecar.address, "first")
            for _ in range(3):
                assert first.send_once() == 20
                wait_delivered(collector.address, book.acked)
            assert sidecar.stop() == 0
        shutil.rmtree(tmp_path / "spool")
        sidecar = start_sidecar(tmp_path, url, "--producer-id", "edge-7")
        with running(sidecar):
            second = Producer(book, sidecar.address, "second")
            for _ in range(3):
                assert second.send_once() == 20
            wait_delivered(collector.address, book.acked)
            status = sidecar_status(sidecar.address)
            assert status.quarantined_batches == 0
            renamed = status.producer_id
            assert re.fullmatch(r"edge-7-r[0-9a-f]{6}", renamed), renamed
            assert sidecar.stop() == 0
        # The new id is kept: the next start continues it, with no new refusal.
        sidecar = start_sidecar(tmp_path, url, "--producer-id", "edge-7")
        with running(sidecar):
            assert sidecar_status(sidecar.address).producer_id == renamed
            third = Producer(book, sidecar.address, "third")
            assert third.send_once() == 20
            wait_delivered(collector.address, book.acked)
            check(collector.address, book)
            assert sidecar_status(sidecar.address).quarantined_batches == 0
            reports = producers(collector.address)
            assert set(reports) == {"edge-7", renamed}
            for report in reports.values():
                assert_numbered_from_one_without_gaps(report)
            assert sidecar.stop() == 0


def test_a_producer_id_set_on_an_old_spool_numbers_from_one(tmp_path: Path) -> None:
    # The id was set later (PREDTRACE_PRODUCER_ID added to a running
    # deployment): the new id carried on the old numbering, and the
    # collector reported the old seqs as batches missing under the new id.
    book = oracle()
    collector = start_collector(tmp_path)
    url = f"http://{collector.address}"
    with running(collector):
        sidecar = start_sidecar(tmp_path, url)
        with running(sidecar):
            before = Producer(book, sidecar.address, "auto")
            for _ in range(3):
                assert before.send_once() == 20
                wait_delivered(collector.address, book.acked)
            assert sidecar.stop() == 0
        sidecar = start_sidecar(tmp_path, url, "--producer-id", "edge-9")
        with running(sidecar):
            after = Producer(book, sidecar.address, "named")
            assert after.send_once() == 20
            wait_delivered(collector.address, book.acked)
            check(collector.address, book)
            reports = producers(collector.address)
            assert len(reports) == 2
            assert_numbered_from_one_without_gaps(reports["edge-9"])
            assert sidecar.stop() == 0
