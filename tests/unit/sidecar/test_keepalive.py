"""Keepalive of the sidecar's gRPC listener, seen from a raw HTTP/2 client (h2).

The sidecar pings a connection that has a call in flight every
``keepalive_time``; a peer that stops answering is cut off after
``keepalive_timeout``, and the server carries on for everyone else.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest

from predtrace.sidecar._config import SidecarConfig
from predtrace.sidecar._errors import ConfigError
from predtrace.v1 import sidecar_pb2_grpc

from .conftest import StartSidecar
from .test_grpc_api import _assert_healthy

# A Record call opened and left silent: the server sees a call in flight.
_RECORD_HEADERS = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/predtrace.v1.Sidecar/Record"),
    (":authority", "sidecar"),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
]


class RawClient:
    """One HTTP/2 connection with an open, silent ``Record`` stream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.pings = 0
        self.closed_by_server = False

    @classmethod
    async def open(cls, target: str) -> RawClient:
        host, port = target.rsplit(":", 1)
        client = cls(*await asyncio.open_connection(host, int(port)))
        client.conn.initiate_connection()
        client.conn.send_headers(1, _RECORD_HEADERS, end_stream=False)
        await client.flush()
        return client

    async def flush(self) -> None:
        self.writer.write(self.conn.data_to_send())
        await self.writer.drain()

    async def run(self, seconds: float, *, answer_pings: bool) -> None:
        """Read frames for ``seconds`` (or until the server closes), acking or not."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                data = await asyncio.wait_for(self.reader.read(65536), left)
            except TimeoutError:
                return
            if not data:
                self.closed_by_server = True
                return
            pinged = False
            try:
                events = self.conn.receive_data(data)
            except h2.exceptions.ProtocolError:  # frames after the server's GOAWAY
                self.closed_by_server = True
                return
            for event in events:
                if isinstance(event, h2.events.PingReceived):
                    self.pings += 1
                    pinged = True
                elif isinstance(event, h2.events.ConnectionTerminated):
                    self.closed_by_server = True
            outgoing = self.conn.data_to_send()  # settings acks, window updates, ping acks
            if answer_pings or not pinged:
                self.writer.write(outgoing)
                await self.writer.drain()
            if self.closed_by_server:
                return

    def close(self) -> None:
        self.writer.close()


async def test_a_call_in_flight_is_pinged_and_kept_while_the_client_answers(
    start_sidecar: StartSidecar,
) -> None:
    running = await start_sidecar(keepalive_time=0.2, keepalive_timeout=1.0)
    client = await RawClient.open(running.target)
    try:
        await client.run(2.0, answer_pings=True)
    finally:
        client.close()
    assert client.pings >= 3
    assert not client.closed_by_server


async def test_a_peer_that_stops_answering_pings_is_cut_off_and_the_server_carries_on(
    start_sidecar: StartSidecar,
) -> None:
    running = await start_sidecar(keepalive_time=0.2, keepalive_timeout=0.5)
    client = await RawClient.open(running.target)
    started = time.monotonic()
    try:
        await client.run(10.0, answer_pings=False)
    finally:
        client.close()
    assert client.pings >= 1
    assert client.closed_by_server
    assert time.monotonic() - started < 10.0
    async with grpc.aio.insecure_channel(running.target) as channel:
        await _assert_healthy(channel, sidecar_pb2_grpc.SidecarStub(channel))


@pytest.mark.parametrize("field", ["keepalive_time", "keepalive_timeout"])
@pytest.mark.parametrize("value", [0.0, 0.05, -1.0, float("inf"), float("nan"), 1e9])
def test_an_unusable_keepalive_setting_is_refused_by_name(
    field: str, value: float, tmp_path: Path
) -> None:
    environ = {
        "PREDTRACE_COLLECTOR_URL": "http://127.0.0.1:1",
        "PREDTRACE_SPOOL_DIR": str(tmp_path),
    }
    with pytest.raises(ConfigError, match=field.replace("_", "-")):
        SidecarConfig.from_env(environ, **{field: value})
