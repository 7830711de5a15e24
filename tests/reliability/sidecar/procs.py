"""Subprocess harness for T2 tests: the real ``predtrace collector serve`` and sidecar.

Every process listens on 127.0.0.1 port 0 and is ready when its ready file
appears (polled with a deadline). ``Proc.stop`` sends SIGTERM and waits;
``Proc.kill`` is kill -9. A producer thread sends events over the sidecar's
gRPC API and records what was acknowledged in the delivery oracle.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import grpc

from predtrace.v1 import sidecar_pb2, sidecar_pb2_grpc
from predtrace.wire import ModelRef, PredictionEvent, event_to_proto

from .oracle import DeliveryOracle

PREDTRACE = shutil.which("predtrace") or str(Path(sys.executable).with_name("predtrace"))


def collector_available() -> bool:
    """Whether ``predtrace collector serve`` exists in this tree."""
    result = subprocess.run(
        [PREDTRACE, "collector", "serve", "--help"], capture_output=True, check=False
    )
    return result.returncode == 0


@dataclass
class Proc:
    """A started server process and the addresses from its ready file."""

    popen: subprocess.Popen[bytes]
    ready_file: Path
    log: Path
    addresses: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return self.addresses[""]

    def wait_ready(self, within: float = 30.0) -> Proc:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise AssertionError(f"exited with {self.popen.returncode}: {self.tail()}")
            if self.ready_file.exists() and self.ready_file.read_text().endswith("\n"):
                lines = self.ready_file.read_text().splitlines()
                self.addresses = {"": lines[0].strip()}
                for line in lines[1:]:
                    name, _, addr = line.partition(" ")
                    self.addresses[name] = addr.strip()
                return self
            time.sleep(0.02)
        raise AssertionError(f"not ready within {within} s: {self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def stop(self, within: float = 30.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(within)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)


def _spawn(args: Sequence[str], ready: Path, log: Path, env: dict[str, str] | None) -> Proc:
    ready.unlink(missing_ok=True)
    full_env = {**os.environ, **(env or {})}
    handle = log.open("ab")
    popen = subprocess.Popen(list(args), stdout=handle, stderr=subprocess.STDOUT, env=full_env)
    handle.close()
    return Proc(popen, ready, log)


def start_collector(tmp: Path, listen: str = "127.0.0.1:0") -> Proc:
    """``predtrace collector serve`` on a SQLite file in ``tmp``."""
    args = [PREDTRACE, "collector", "serve", "--db", f"sqlite:///{tmp / 'collector.db'}"]
    args += ["--listen", listen, "--ready-file", str(tmp / "collector.ready")]
    return _spawn(args, tmp / "collector.ready", tmp / "collector.log", None).wait_ready()


def start_sidecar(
    tmp: Path,
    collector_url: str,
    *extra: str,
    env: dict[str, str] | None = None,
    wait: bool = True,
    name: str = "sidecar",
) -> Proc:
    """``predtrace sidecar serve`` with its spool in ``tmp/spool``."""
    args = [PREDTRACE, "sidecar", "serve", "--listen", "127.0.0.1:0"]
    args += ["--collector", collector_url, "--spool", str(tmp / "spool")]
    args += ["--ready-file", str(tmp / f"{name}.ready"), "--batch-linger", "0.05", *extra]
    proc = _spawn(args, tmp / f"{name}.ready", tmp / f"{name}.log", env)
    return proc.wait_ready() if wait else proc


class _Http:
    """One keep-alive connection per collector address (thousands of lookups stay fast)."""

    _connections: ClassVar[dict[str, http.client.HTTPConnection]] = {}

    @classmethod
    def get_json(cls, address: str, path: str) -> tuple[int, Any]:
        for _ in range(2):
            conn = cls._connections.get(address)
            if conn is None:
                host, _, port = address.rpartition(":")
                conn = cls._connections[address] = http.client.HTTPConnection(host, int(port), 10)
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                body = resp.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                del cls._connections[address]
                continue
            return resp.status, json.loads(body) if resp.status == 200 else None
        raise AssertionError(f"collector {address} unreachable")

    @classmethod
    def close_all(cls) -> None:
        for conn in cls._connections.values():
            conn.close()
        cls._connections.clear()


def get_prediction(collector: str, prediction_id: str) -> dict[str, Any] | None:
    """The collector's first record of one prediction (``GET /v1/predictions/{id}``)."""
    rows = prediction_rows(collector, prediction_id)
    return rows[0] if rows else None


def prediction_rows(collector: str, prediction_id: str) -> list[dict[str, Any]]:
    """Every stored row of one prediction id (more than one is a duplicate delivery)."""
    status, body = _Http.get_json(collector, f"/v1/predictions/{prediction_id}")
    if status == 404:
        return []
    assert status == 200, f"collector answered {status}"
    return list(body.get("predictions") or [])


def stored_count(collector: str) -> int:
    """Events the collector stored, over every producer (``GET /v1/producers``)."""
    status, body = _Http.get_json(collector, "/v1/producers")
    assert status == 200
    return sum(int(p["events"]) for p in body["producers"])


def stored_events(collector: str, ids: Sequence[str]) -> list[PredictionEvent]:
    """The events the collector holds for ``ids``, one per stored row."""
    out = []
    for prediction_id in ids:
        for row in prediction_rows(collector, prediction_id):
            model = row.get("model") or {}
            out.append(
                PredictionEvent(
                    prediction_id=row["prediction_id"],
                    timestamp_unix_nano=int(row.get("timestamp_unix_nano") or 0),
                    model=ModelRef(model.get("name", ""), model.get("version", "")),
                )
            )
    return out


def make_event(i: int, tag: str) -> PredictionEvent:
    """A producer's event; the fields the T2 oracle fingerprints are all set."""
    return PredictionEvent(
        prediction_id=f"{tag}-{i:07d}",
        timestamp_unix_nano=1_700_000_000_000_000_000 + i,
        model=ModelRef("churn", str(1 + i % 3)),
    )


class Producer:
    """Sends batches to the sidecar from a thread; records sent and acknowledged ids.

    ``target`` may be changed while running (after a restart on a new port).
    """

    def __init__(self, oracle: DeliveryOracle, target: str, tag: str, batch: int = 20) -> None:
        self.oracle = oracle
        self.target = target
        self.tag = tag
        self.batch = batch
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def send_once(self, n: int | None = None) -> int:
        """Send one batch; return how many were acknowledged (0 on error)."""
        events = [make_event(self.sent + k, self.tag) for k in range(n or self.batch)]
        self.sent += len(events)
        self.oracle.record_sent(events)
        request = sidecar_pb2.RecordBatchRequest(events=[event_to_proto(e) for e in events])
        try:
            with grpc.insecure_channel(self.target) as channel:
                stub = sidecar_pb2_grpc.SidecarStub(channel)  # type: ignore[no-untyped-call]
                ack = stub.RecordBatch(request, timeout=5)
        except grpc.RpcError:
            return 0
        rejected = {r.index for r in ack.rejected}
        self.oracle.record_acked(e.prediction_id for i, e in enumerate(events) if i not in rejected)
        return ack.accepted

    def _run(self) -> None:
        # About a thousand events a second: steady writes, and few enough for
        # the oracle to check each one against the collector quickly.
        while not self._stop.is_set():
            self.send_once()
            self._stop.wait(0.02)

    def start(self) -> Producer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


@contextmanager
def running(*procs: Proc) -> Iterator[None]:
    """Stop every process at the end, whatever happened."""
    try:
        yield
    finally:
        _Http.close_all()
        for proc in procs:
            if proc.popen.poll() is None:
                proc.kill()
