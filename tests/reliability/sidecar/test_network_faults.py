"""Connection faults between the sidecar and the real collector (T2): RELIABILITY row 6.

A TCP proxy in the test sits between them: it resets a connection in the
middle of the request body, then accepts one and never answers, then passes
traffic through. The per-attempt timeout must fire, the batch be retried, and
the collector hold each (producer, seq) once.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import urllib.request
from pathlib import Path

import pytest

from .oracle import DeliveryOracle
from .polling import eventually_sync
from .procs import Producer, collector_available, running, start_collector, start_sidecar
from .test_sidecar_processes import check, fingerprint_t2, wait_delivered

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not collector_available(), reason="predtrace collector serve missing"),
]


class FaultyProxy:
    """Plays ``script`` ("reset", "hang", then "pass" for ever) one connection at a time."""

    def __init__(self, upstream: str, script: list[str]) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.script = list(script)
        self.connections = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._server.getsockname()[1]}"
        self._stop = threading.Event()
        self._held: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        self._server.settimeout(0.1)
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            mode = self.script.pop(0) if self.script else "pass"
            thread = threading.Thread(target=self._handle, args=(client, mode), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _handle(self, client: socket.socket, mode: str) -> None:
        if mode == "reset":
            client.recv(200)  # part of the headers and body
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()  # RST
            return
        if mode == "hang":
            self._held.append(client)  # accepted, read, never answered
            with contextlib.suppress(OSError):
                while not self._stop.is_set() and client.recv(65536):
                    pass
            return
        upstream = socket.create_connection(self.upstream)
        pump = threading.Thread(target=_pipe, args=(upstream, client), daemon=True)
        pump.start()
        _pipe(client, upstream)
        pump.join(5)
        client.close()
        upstream.close()

    def close(self) -> None:
        self._stop.set()
        self._server.close()
        for sock in self._held:
            sock.close()
        for thread in self._threads:
            thread.join(5)


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):  # either side closing ends the pipe
        while data := source.recv(65536):
            sink.sendall(data)
    for sock in (source, sink):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def test_a_reset_mid_body_and_a_silent_server_are_retried_and_stored_once(tmp_path: Path) -> None:
    book = DeliveryOracle(fingerprint=fingerprint_t2)
    collector = start_collector(tmp_path)
    proxy = FaultyProxy(collector.address, ["reset", "hang", "reset"])
    sidecar = start_sidecar(tmp_path, f"http://{proxy.address}", "--collector-timeout", "1")
    with running(collector, sidecar):
        try:
            producer = Producer(book, sidecar.address, "net")
            for _ in range(5):
                assert producer.send_once() == 20
            wait_delivered(collector.address, book.acked)
            eventually_sync(lambda: proxy.connections >= 4)
            check(collector.address, book)
            with urllib.request.urlopen(f"http://{collector.address}/v1/producers") as resp:
                (report,) = json.loads(resp.read())["producers"]
            assert report["batches"] == report["last_seq"] - report["first_seq"] + 1
            assert report["chain_breaks"] == 0
            assert sidecar.stop() == 0
        finally:
            proxy.close()
