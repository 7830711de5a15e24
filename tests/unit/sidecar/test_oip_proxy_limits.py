"""The OIP v2 proxy's limits: bytes in flight, connections, metadata, ids, sizes, odd names.

Real grpc.aio servers on 127.0.0.1 port 0: a scripted model server, the
sidecar's proxy in front of it, and a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from predtrace.oip.v2 import grpc_predict_v2_pb2 as pb
from predtrace.sidecar import _oip_fields, _oip_passthrough, _oip_reads
from predtrace.sidecar._app import grpc_server_options
from predtrace.sidecar._intake import IntakeResult
from predtrace.sidecar._metrics import SidecarMetrics
from predtrace.sidecar._oip_fields import read_fields
from predtrace.sidecar._oip_proxy import INFLIGHT_MESSAGES, OipProxy
from predtrace.sidecar._oip_upstream import ByteBudget
from predtrace.sidecar._protowire import encode_varint
from predtrace.wire import Rejection, Status, uuid7_timestamp_ms
from tests.reliability.sidecar.polling import eventually
from tests.unit.sidecar.cycles import CycleWatch

from .conftest import Running, StartSidecar

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MODEL_READY = "/inference.GRPCInferenceService/ModelReady"
SERVER_METADATA = "/inference.GRPCInferenceService/ServerMetadata"
STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
WATCH = "/inference.GRPCInferenceService/ModelWatch"  # a model server's own
MiB = 1024 * 1024


def field(number: int, raw: bytes) -> bytes:
    return encode_varint(number << 3 | 2) + encode_varint(len(raw)) + raw


def body(size: int = 0, request_id: str = "", name: str = "churn") -> bytes:
    """A ModelInfer request with a raw tensor of ``size`` bytes."""
    message = pb.ModelInferRequest(model_name=name, id=request_id)
    if size:
        message.raw_input_contents.append(b"\x07" * size)
    return message.SerializeToString()


class Model(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """A model server: counts calls in flight, holds them until ``gate`` opens, or fails."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.inflight = 0
        self.peak = 0
        self.arrived = 0
        self.delay = 0.0
        self.echo_id = True
        self.error: tuple[grpc.StatusCode, str, tuple[tuple[str, Any], ...]] | None = None
        self.headers: tuple[tuple[str, Any], ...] = ()
        self.reply: bytes | None = None
        self.echo_onto: bytes | None = None  # a reply the request's id is appended to
        self.metadata: list[tuple[str, Any]] = []
        self.ungated: set[str] = set()  # methods answered at once, the gate closed or not
        self.stream_reply = b"ok"

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:  # type: ignore[type-arg]
        if details.method in self.ungated:
            return grpc.unary_unary_rpc_method_handler(self.quick)
        if details.method == STREAM_INFER:
            return grpc.stream_stream_rpc_method_handler(self.stream)
        if details.method == WATCH:
            return grpc.unary_stream_rpc_method_handler(self.watch)
        if details.method.startswith("/inference.GRPCInferenceService/"):
            return grpc.unary_unary_rpc_method_handler(self.infer)
        return None

    async def infer(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        self.arrived += 1
        self.metadata = list(context.invocation_metadata() or ())
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        try:
            await self.gate.wait()
            if self.delay:
                await asyncio.sleep(self.delay)
        finally:
            self.inflight -= 1
        if self.headers:
            await context.send_initial_metadata(self.headers)
        if self.error is not None:
            code, details, trailers = self.error
            await context.abort(code, details, trailers)
        if self.reply is not None:
            return self.reply
        fields = read_fields(request)
        if self.echo_onto is not None:
            assert fields is not None and fields.id
            return self.echo_onto + field(3, fields.id.encode())
        echoed = fields.id if fields and self.echo_id else ""
        return pb.ModelInferResponse(
            model_name="churn", model_version="7", id=echoed or ""
        ).SerializeToString()

    async def quick(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return b"quick"

    async def watch(
        self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        for answer in (b"one", b"two"):
            yield answer

    async def stream(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        await self.gate.wait()
        async for _ in requests:
            if self.error is not None:
                code, details, trailers = self.error
                await context.abort(code, details, trailers)
            yield self.stream_reply


@contextlib.asynccontextmanager
async def serving(handler: Model, options: list[tuple[str, Any]] | None = None) -> Any:
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@pytest.fixture
async def model() -> AsyncIterator[tuple[Model, str]]:
    handler = Model()
    async with serving(handler) as address:
        yield handler, address


@pytest.fixture
async def proxied(start_sidecar: StartSidecar, model: tuple[Model, str]) -> tuple[Model, Running]:
    handler, address = model
    running: Running = await start_sidecar(oip_proxies=(("127.0.0.1:0", address),))
    return handler, running


def proxy_of(running: Running) -> OipProxy:
    (proxy,) = running.app._proxies
    return proxy


async def recorded(running: Running, n: int) -> list[Any]:
    await eventually(lambda: len(running.collector.events()) >= n)
    return list(running.collector.events())


def client(running: Running, **options: int) -> grpc.aio.Channel:
    opts = [(f"grpc.{key}", value) for key, value in options.items()]
    return grpc.aio.insecure_channel(running.app.addresses["oip-proxy"], options=opts)


# -- 1. bytes in flight: calls wait for room, within a budget -------------------------


def proxy_allocations(snapshot: tracemalloc.Snapshot) -> int:
    """Bytes traced as allocated by the proxy's own code (its copies of requests)."""
    # Every module of the proxy (``_oip_*``), wherever its code moves.
    own = snapshot.filter_traces([tracemalloc.Filter(True, "*/predtrace/sidecar/_oip_*.py")])
    return sum(stat.size for stat in own.statistics("filename"))


@contextlib.contextmanager
def tracing() -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


async def test_calls_over_the_inflight_budget_wait_for_room_and_all_complete(
    start_sidecar: StartSidecar, model: tuple[Model, str]
) -> None:
    model, address = model
    size = MiB
    # A call takes room for the largest request before it reads its own:
    # the budget has room for three.
    limit = size + 2048
    running = await start_sidecar(oip_proxies=(("127.0.0.1:0", address),), max_message_bytes=limit)
    proxy = proxy_of(running)
    proxy.budget.cap = 3 * limit
    model.gate.clear()
    requests = [body(size) for _ in range(8)]  # no id: the proxy adds one (a copy)
    with tracing():
        async with client(running, max_send_message_length=8 * MiB) as channel:
            method = channel.unary_unary(MODEL_INFER)
            calls = [asyncio.ensure_future(method(r, timeout=30)) for r in requests]
            await eventually(lambda: model.arrived >= 3)
            await asyncio.sleep(0.3)  # the others stay out while the three are held
            assert (model.arrived, model.inflight) == (3, 3)
            assert proxy.budget_waits == 5
            assert proxy.budget.used <= proxy.budget.cap
            metrics = {
                m.name: m.samples[0].value
                for m in SidecarMetrics(running.app).collect()
                if m.samples
            }
            assert metrics["predtrace_sidecar_oip_budget_waits"] == 5  # on /metrics too
            assert metrics["predtrace_sidecar_oip_inflight_bytes"] == proxy.budget.used > 0
            # What the proxy itself holds (the requests it rewrote) stays within the budget.
            assert proxy_allocations(tracemalloc.take_snapshot()) <= proxy.budget.cap + 64 * 1024
            model.gate.set()
            answers = await asyncio.gather(*calls)
    assert model.peak == 3
    assert all(uuid7_timestamp_ms(pb.ModelInferResponse.FromString(a).id) for a in answers)
    events = await recorded(running, 8)
    assert {e.status for e in events} == {Status.OK}
    assert proxy.budget.used == 0


async def test_without_a_budget_in_the_way_calls_are_not_held_back(
    proxied: tuple[Model, Running],
) -> None:
    model, running = proxied
    model.gate.clear()
    async with client(running) as channel:
        method = channel.unary_unary(MODEL_INFER)
        calls = [asyncio.ensure_future(method(body(1000), timeout=30)) for _ in range(50)]
        await eventually(lambda: model.inflight == 50)  # all at once, none held back
        model.gate.set()
        await asyncio.gather(*calls)
    assert proxy_of(running).budget.used == 0


async def test_a_call_bigger_than_the_whole_budget_goes_alone(
    proxied: tuple[Model, Running],
) -> None:
    model, running = proxied
    proxy = proxy_of(running)
    proxy.budget.cap = MiB
    model.gate.clear()
    async with client(running, max_send_message_length=8 * MiB) as channel:
        method = channel.unary_unary(MODEL_INFER)
        big = asyncio.ensure_future(method(body(2 * MiB, "big-1"), timeout=30))
        await eventually(lambda: model.arrived == 1)
        small = asyncio.ensure_future(method(body(10, "small-1"), timeout=30))
        await asyncio.sleep(0.2)
        assert model.arrived == 1  # the small one waits for the big one
        model.gate.set()
        assert pb.ModelInferResponse.FromString(await big).id == "big-1"
        assert pb.ModelInferResponse.FromString(await small).id == "small-1"
    assert model.peak == 1


async def test_a_call_waiting_for_room_ends_at_its_deadline_and_is_recorded(
    proxied: tuple[Model, Running],
) -> None:
    model, running = proxied
    proxy = proxy_of(running)
    proxy.budget.cap = MiB
    model.gate.clear()
    async with client(running, max_send_message_length=8 * MiB) as channel:
        method = channel.unary_unary(MODEL_INFER)
        held = asyncio.ensure_future(method(body(MiB - 100, "held-1"), timeout=30))
        await eventually(lambda: model.arrived == 1)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            # Its request is not read while it waits: its event has the id of its metadata.
            metadata = (("x-request-id", "l-1"),)
            await method(body(1000, "late-1"), timeout=0.3, metadata=metadata)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        late = [e for e in await recorded(running, 1) if e.prediction_id == "l-1"]
        assert [e.status_code for e in late] == ["DEADLINE_EXCEEDED"]
        assert late[0].model.name == ""  # in the request, which was never read
        model.gate.set()
        await held
    assert model.arrived == 1  # the late call never reached the model server
    await eventually(lambda: proxy.budget.used == 0)


async def test_callers_that_have_not_sent_their_request_hold_up_no_one(
    proxied: tuple[Model, Running],
) -> None:
    # Each of these calls gets room for a largest request before reading it;
    # once their callers keep them waiting, that room goes to the others.
    model, running = proxied
    proxy = proxy_of(running)
    async with client(running) as stalled_channel, client(running) as channel:
        stalled = [
            stalled_channel.stream_unary(MODEL_INFER)(
                timeout=30, metadata=(("x-request-id", f"stalled-{i}"),)
            )
            for i in range(INFLIGHT_MESSAGES + 4)
        ]
        await eventually(lambda: proxy.budget.used == proxy.budget.cap)  # all the room, unread
        answer = await channel.unary_unary(MODEL_INFER)(body(100, "quick-1"), timeout=5)
        assert pb.ModelInferResponse.FromString(answer).id == "quick-1"
        # (The quick call may get through once the first of them gives its room back.)
        await eventually(lambda: proxy.slow_reads == INFLIGHT_MESSAGES)
        assert proxy.reading_outside == INFLIGHT_MESSAGES  # the bound: the other 4 are refused
        await eventually(lambda: proxy.slow_refused == 4)
        for call in stalled:
            call.cancel()
    # Cancelled before their request came, or refused: recorded under their header ids.
    events = await recorded(running, INFLIGHT_MESSAGES + 5)
    ended = {e.prediction_id: e.status_code for e in events if e.prediction_id != "quick-1"}
    assert set(ended) == {f"stalled-{i}" for i in range(INFLIGHT_MESSAGES + 4)}
    statuses = sorted(ended.values())
    assert statuses == ["CANCELLED"] * INFLIGHT_MESSAGES + ["UNAVAILABLE"] * 4
    await eventually(lambda: proxy.budget.used == 0)
    assert model.arrived == 1


async def test_requests_read_outside_the_budget_are_bounded_in_number(
    proxied: tuple[Model, Running], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each request read outside the budget holds what of it has arrived, up
    # to a whole message, counted nowhere. Past the bound a call whose request
    # has not arrived is refused, retryable: neither its bytes nor its room
    # (which would hold up the calls behind it) are kept for it.
    monkeypatch.setattr(_oip_reads, "MAX_READS_OUTSIDE", 2)
    model, running = proxied
    proxy = proxy_of(running)
    largest = proxy._max_message_bytes
    proxy.budget.cap = 4 * largest
    async with client(running) as slow_channel, client(running) as channel:
        metadata = [(("x-request-id", f"slow-{k}"),) for k in range(4)]
        slow = [
            slow_channel.stream_unary(MODEL_INFER)(timeout=30, metadata=metadata[k])
            for k in range(4)
        ]
        await eventually(lambda: proxy.slow_refused == 2)
        assert (proxy.slow_reads, proxy.reading_outside) == (2, 2)
        await eventually(lambda: proxy.budget.used == 0)  # no room kept for a slow request
        answer = await channel.unary_unary(MODEL_INFER)(body(100, "quick-1"), timeout=5)
        assert pb.ModelInferResponse.FromString(answer).id == "quick-1"
        outcomes: dict[str, str] = {}
        for k, call in enumerate(slow):
            with contextlib.suppress(asyncio.InvalidStateError):  # a refused call is over
                await call.write(body(1000, f"slow-{k}"))
                await call.done_writing()
            try:
                outcomes[f"slow-{k}"] = pb.ModelInferResponse.FromString(await call).id
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                assert "other calls' requests are arriving slowly; retry" in (exc.details() or "")
                outcomes[f"slow-{k}"] = "refused"
    assert sorted(outcomes.values()).count("refused") == 2
    answered = sorted(k for k, v in outcomes.items() if v != "refused")
    assert [outcomes[k] for k in answered] == answered  # answered with their own ids
    assert proxy.reading_outside == 0
    await eventually(lambda: proxy.budget.used == 0)
    assert model.arrived == 3
    events = await recorded(running, 5)
    refused = sorted(e.prediction_id for e in events if e.status_code == "UNAVAILABLE")
    assert refused == sorted(k for k, v in outcomes.items() if v == "refused")
    counted = [
        sample.value
        for family in SidecarMetrics(running.app).collect()
        for sample in family.samples
        if sample.name == "predtrace_sidecar_oip_slow_refusals_total"
    ]
    assert counted == [2]


async def test_a_request_read_outside_the_budget_goes_on_at_once_not_held_in_turn(
    proxied: tuple[Model, Running],
) -> None:
    # Slow requests given back their room are read whole: queued for room
    # again, they would sit in the sidecar, as many as callers chose to send.
    model, running = proxied
    proxy = proxy_of(running)
    proxy.budget.cap = 2 * proxy._max_message_bytes
    model.gate.clear()
    async with client(running, max_send_message_length=8 * MiB) as channel:
        slow = [channel.stream_unary(MODEL_INFER)(timeout=30) for _ in range(3)]
        await eventually(lambda: proxy.slow_reads == 3)
        method = channel.unary_unary(MODEL_INFER)
        big = [asyncio.ensure_future(method(body(4 * MiB - 1000), timeout=30)) for _ in range(2)]
        await eventually(lambda: model.arrived == 2)  # the budget is full now
        for k, call in enumerate(slow):
            await call.write(body(1000, f"slow-{k}"))
            await call.done_writing()
        await eventually(lambda: model.arrived == 5)  # past the cap, not waiting for room
        model.gate.set()
        answers = [pb.ModelInferResponse.FromString(await call) for call in slow]
        await asyncio.gather(*big)
    assert [a.id for a in answers] == ["slow-0", "slow-1", "slow-2"]
    await eventually(lambda: proxy.budget.used == 0)


@pytest.mark.parametrize("deadline", [0.3, 1.5])
async def test_a_call_past_its_deadline_while_waiting_is_recorded_as_such(
    proxied: tuple[Model, Running], deadline: float
) -> None:
    # The caller's deadline cancels the call a few ms before the server's copy.
    model, running = proxied
    proxy = proxy_of(running)
    proxy.budget.cap = MiB
    model.gate.clear()
    async with client(running, max_send_message_length=8 * MiB) as channel:
        method = channel.unary_unary(MODEL_INFER)
        held = asyncio.ensure_future(method(body(MiB - 100, "held-2"), timeout=30))
        await eventually(lambda: model.arrived == 1)
        with pytest.raises(grpc.aio.AioRpcError):
            await method(body(1000), timeout=deadline, metadata=(("x-request-id", "late-2"),))
        late = [e for e in await recorded(running, 1) if e.prediction_id == "late-2"]
        assert [e.status_code for e in late] == ["DEADLINE_EXCEEDED"]
        model.gate.set()
        await held


async def test_a_call_cancelled_while_its_request_is_read_is_recorded(
    proxied: tuple[Model, Running],
) -> None:
    _, running = proxied
    async with client(running) as channel:
        call = channel.stream_unary(MODEL_INFER)(
            timeout=0.5, metadata=(("x-request-id", "unsent-1"),)
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    (event,) = [e for e in await recorded(running, 1) if e.prediction_id == "unsent-1"]
    assert event.status_code == "DEADLINE_EXCEEDED"
    await eventually(lambda: proxy_of(running).budget.used == 0)


# A proxy on its own (a process of its own, to measure): one 4 MiB request in flight at once.
_PROXY_PROCESS = """
import asyncio, sys
import grpc
from predtrace.sidecar._oip_proxy import OipProxy

class Intake:
    async def record(self, batch):
        return type("Result", (), {"rejected": ()})()

async def main():
    limit = 4 * 1024 * 1024
    proxy = OipProxy(Intake(), sys.argv[1], max_message_bytes=limit, max_inflight_bytes=limit)
    options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
    server = grpc.aio.server(options=proxy.server_options(options))
    server.add_generic_rpc_handlers((proxy.generic_handler(),))
    print(server.add_insecure_port("127.0.0.1:0"), flush=True)
    await server.start()
    await server.wait_for_termination()

asyncio.run(main())
"""


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
async def test_calls_waiting_for_room_leave_their_requests_with_their_callers(
    model: tuple[Model, str],
) -> None:
    # gRPC takes a request from its caller as the handler reads it, and the
    # proxy reads one only when the budget has room: 32 waiting 4 MiB calls
    # (128 MiB, over two connections) do not grow the proxy by their size.
    handler, address = model
    handler.gate.clear()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _PROXY_PROCESS, address, stdout=asyncio.subprocess.PIPE
    )
    calls: list[asyncio.Future[bytes]] = []
    try:
        assert process.stdout is not None
        port = int(await asyncio.wait_for(process.stdout.readline(), 30))
        options = [("grpc.max_send_message_length", 8 * MiB), ("grpc.use_local_subchannel_pool", 1)]
        channels = [
            grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) for _ in range(2)
        ]
        try:
            request = body(4 * MiB - 1024)
            idle = _rss(process.pid)
            methods = [channel.unary_unary(MODEL_INFER) for channel in channels]
            calls = [asyncio.ensure_future(methods[i % 2](request, timeout=60)) for i in range(33)]
            await eventually(lambda: handler.arrived == 1)
            grown = 0
            for _ in range(15):  # the requests would be taken within a second on loopback
                await asyncio.sleep(0.2)
                grown = max(grown, _rss(process.pid) - idle)
            assert handler.arrived == 1  # the others wait for room
            assert grown < 64 * MiB  # the one in flight and its copies; not the 128 MiB waiting
            handler.gate.set()
            answers = await asyncio.gather(*calls)
            assert len(answers) == 33
        finally:
            for channel in channels:
                await channel.close(None)
    finally:
        handler.gate.set()
        for call in calls:
            call.cancel()
        process.kill()
        await process.wait()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
async def test_calls_of_a_method_passed_through_wait_for_room_in_a_budget_of_their_own(
    model: tuple[Model, str],
) -> None:
    # A model server's own methods may take big requests too: against a
    # stalled model server, 33 callers of 4 MiB ModelReady requests held
    # them all in the proxy. They now wait for room as ModelInfer calls do,
    # in a budget of four such requests.
    handler, address = model
    handler.gate.clear()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _PROXY_PROCESS, address, stdout=asyncio.subprocess.PIPE
    )
    calls: list[asyncio.Future[bytes]] = []
    try:
        assert process.stdout is not None
        port = int(await asyncio.wait_for(process.stdout.readline(), 30))
        options = [("grpc.max_send_message_length", 8 * MiB)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            request = body(4 * MiB - 1024)
            idle = _rss(process.pid)
            method = channel.unary_unary(MODEL_READY)
            calls = [asyncio.ensure_future(method(request, timeout=60)) for _ in range(33)]
            await eventually(lambda: handler.arrived == _oip_reads.PASSTHROUGH_MESSAGES)
            grown = 0
            for _ in range(10):  # the requests would be taken within a second on loopback
                await asyncio.sleep(0.2)
                grown = max(grown, _rss(process.pid) - idle)
            assert handler.arrived == _oip_reads.PASSTHROUGH_MESSAGES  # the others wait
            assert grown < 64 * MiB  # four requests and their copies; not 33 of them
            handler.gate.set()
            assert len(await asyncio.gather(*calls)) == 33
    finally:
        handler.gate.set()
        for call in calls:
            call.cancel()
        process.kill()
        await process.wait()


@pytest.mark.parametrize(
    "method", [MODEL_READY, "/inference.GRPCInferenceService/ServerLive", HEALTH_CHECK]
)
async def test_a_health_check_passed_through_never_waits_behind_inference(
    start_sidecar: StartSidecar, model: tuple[Model, str], method: str
) -> None:
    # ModelInfer calls fill the byte budget; a liveness or readiness probe
    # through the proxy is still answered at once.
    handler, address = model
    limit = 64 * 1024
    running = await start_sidecar(oip_proxies=(("127.0.0.1:0", address),), max_message_bytes=limit)
    proxy = proxy_of(running)
    handler.ungated = {method}
    handler.gate.clear()
    async with client(running) as channel:
        infer = channel.unary_unary(MODEL_INFER)
        held = [asyncio.ensure_future(infer(body(limit - 1024), timeout=30)) for _ in range(17)]
        await eventually(lambda: handler.arrived == INFLIGHT_MESSAGES)
        await eventually(lambda: proxy.budget_waits == 1)  # the budget is full: one waits
        assert await channel.unary_unary(method)(b"", timeout=3) == b"quick"
        handler.gate.set()
        await asyncio.gather(*held)
    await eventually(lambda: proxy.budget.used == 0)


async def test_callers_of_a_method_passed_through_that_never_send_are_refused_past_the_bound(
    proxied: tuple[Model, Running],
) -> None:
    # Read outside the budget when slow, at most as many at once as the
    # budget has messages (was the 16 of ModelInfer's budget, for a budget of
    # 4: five times the budget held).
    model, running = proxied
    proxy = proxy_of(running)
    most = _oip_reads.PASSTHROUGH_MESSAGES
    async with client(running) as channel:
        calls = [channel.stream_unary(MODEL_READY)(timeout=10) for _ in range(most + 1)]
        await eventually(lambda: proxy.slow_refused == 1)
        assert proxy.passthrough.reads.reading_outside == most
        await eventually(lambda: any(c.done() for c in calls))  # the refusal has arrived
        refused = [c for c in calls if c.done()]
        assert len(refused) == 1
        info = await refused[0].code(), await refused[0].details()
        assert info[0] == grpc.StatusCode.UNAVAILABLE
        assert info[1] == (
            f"ModelReady: the request had not arrived 0.25 s after the proxy had room for it,"
            f" and {most} other calls' requests are arriving slowly; retry"
        )
        # Quick callers are not held up meanwhile.
        assert await channel.unary_unary(MODEL_READY)(body(10), timeout=5)
        for call in calls:
            call.cancel()
    await eventually(lambda: proxy.passthrough.reads.reading_outside == 0)
    assert proxy.passthrough.budget.used == 0
    assert model.arrived == 1


async def test_a_method_of_the_service_the_proxy_does_not_know_may_answer_many_times(
    proxied: tuple[Model, Running],
) -> None:
    # A model server's own server-streaming method: sent as a unary call, it
    # hung until its deadline (and held room in the budget meanwhile).
    _, running = proxied
    async with client(running) as channel:
        answers = channel.unary_stream(WATCH)(body(10), timeout=5)
        assert [answer async for answer in answers] == [b"one", b"two"]
    assert proxy_of(running).passthrough.budget.used == 0


async def test_a_call_gone_on_as_a_stream_keeps_no_message_it_has_sent_on() -> None:
    # The first two messages of a one-request call that became a stream were
    # kept for the call's life (three messages a stream, not one).
    class Context:
        def __init__(self, messages: list[object]) -> None:
            self.messages = messages
            self.more = asyncio.Event()

        async def read(self) -> object:
            if not self.messages:
                await self.more.wait()
            return self.messages.pop(0)

    context = Context([b"second", b"third", grpc.aio.EOF])
    head, pending = [b"first"], []
    assert not await _oip_passthrough._half_closed(context, head, pending)  # type: ignore[arg-type]
    assert (head, pending) == ([b"first", b"second"], [])
    requests = _oip_passthrough._requests(context, head, pending)  # type: ignore[arg-type]
    assert [r async for r in requests] == [b"first", b"second", b"third"]
    assert head == pending == []
    slow = Context([])  # nothing within the grace: the read waits in ``pending``
    head, pending = [b"first"], []
    assert not await _oip_passthrough._half_closed(slow, head, pending)  # type: ignore[arg-type]
    assert head == [b"first"] and len(pending) == 1
    slow.messages.extend([b"late", grpc.aio.EOF])
    slow.more.set()
    requests = _oip_passthrough._requests(slow, head, pending)  # type: ignore[arg-type]
    assert [r async for r in requests] == [b"first", b"late"]
    assert head == pending == []


async def test_a_one_request_caller_that_does_not_half_close_is_answered(
    proxied: tuple[Model, Running],
) -> None:
    # It is answered by the model server called directly; through the proxy
    # it waited for a half-close that never came (and held a slow-read slot).
    model, running = proxied
    proxy = proxy_of(running)
    async with client(running) as channel:
        call = channel.stream_unary(MODEL_READY)(timeout=10)
        await call.write(body(10, "open-1"))
        answer = pb.ModelInferResponse.FromString(await asyncio.wait_for(call, 5))
        assert answer.id == "open-1"
        passed = proxy.passthrough.reads
        assert passed.reading_outside == passed.slow_reads == 0
    await eventually(lambda: proxy.passthrough.reads.streams == 0)
    assert proxy.inflight_bytes == 0
    assert model.arrived == 1


async def test_streaming_calls_passed_through_are_bounded_in_number(
    proxied: tuple[Model, Running], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each may hold a message in hand: their number is the bound.
    monkeypatch.setattr(_oip_reads, "MAX_STREAMS", 2)
    _, running = proxied
    proxy = proxy_of(running)
    async with client(running) as channel:
        method = channel.stream_stream(STREAM_INFER)
        open_calls = [method(timeout=10) for _ in range(2)]
        for call in open_calls:
            await call.write(b"x")
            assert await asyncio.wait_for(call.read(), 5) == b"ok"
        refused = method(timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await refused.write(b"x")
            await refused.read()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "2 streaming calls are passing through the proxy already" in (
            info.value.details() or ""
        )
        assert proxy.slow_refused == 1  # counted with the slow refusals (on /metrics)
        await open_calls[0].done_writing()
        assert await open_calls[0].read() is grpc.aio.EOF
        await eventually(lambda: proxy.passthrough.reads.streams == 1)
        again = method(iter([b"y"]), timeout=10)
        assert [answer async for answer in again] == [b"ok"]
        await open_calls[1].done_writing()
        assert await open_calls[1].read() is grpc.aio.EOF
    await eventually(lambda: proxy.passthrough.reads.streams == 0)
    assert proxy.budget.used == 0


async def test_streams_whose_callers_leave_answers_unread_hold_up_no_inference(
    start_sidecar: StartSidecar, model: tuple[Model, str]
) -> None:
    # Such a stream's message stays in hand (flow control): charged to the
    # byte budget, twenty of them held up every ModelInfer call.
    handler, address = model
    size = 256 * 1024
    handler.stream_reply = b"a" * (size - 1024)  # answers as big as the requests
    running = await start_sidecar(oip_proxies=(("127.0.0.1:0", address),), max_message_bytes=size)
    proxy = proxy_of(running)
    target = running.app.addresses["oip-proxy"]
    channels = [grpc.aio.insecure_channel(target) for _ in range(20)]
    calls = [channel.stream_stream(STREAM_INFER)() for channel in channels]

    written = [0] * len(calls)

    async def write_on(k: int) -> None:
        while True:
            await calls[k].write(b"r" * (size - 1024))
            written[k] += 1

    writers = [asyncio.ensure_future(write_on(k)) for k in range(len(calls))]
    try:
        await eventually(lambda: proxy.passthrough.reads.streams == 20)
        # Every stream's windows are full once no writer gets on any more.
        seen: list[int] = []
        for _ in range(100):
            if seen == written:
                break
            seen = list(written)
            await asyncio.sleep(0.5)
        assert seen == written and all(written), written
        async with grpc.aio.insecure_channel(target) as channel:
            answer = await channel.unary_unary(MODEL_INFER)(body(100, "through-1"), timeout=5)
        assert pb.ModelInferResponse.FromString(answer).id == "through-1"
    finally:
        for writer in writers:
            writer.cancel()
        for call in calls:
            call.cancel()
        for channel in channels:
            await channel.close(None)
    await eventually(lambda: proxy.passthrough.reads.streams == 0)
    assert proxy.budget.used == 0


async def test_a_cancelled_or_expired_unary_call_passed_through_keeps_no_request_in_a_cycle(
    proxied: tuple[Model, Running],
) -> None:
    # A unary-stream call upstream, cancelled, kept its request in a cycle
    # (call, task, exception, frame) until a GC pass.
    model, running = proxied
    proxy = proxy_of(running)
    model.gate.clear()
    size = 2 * MiB
    try:
        with CycleWatch() as watch:
            async with client(running, max_send_message_length=8 * MiB) as channel:
                method = channel.unary_unary(MODEL_READY)
                for k in range(2):
                    call = method(b"y" * size, timeout=5)
                    await eventually(lambda k=k: model.arrived == k + 1)  # type: ignore[misc]
                    call.cancel()
                with pytest.raises(grpc.aio.AioRpcError):
                    await method(b"y" * size, timeout=0.5)
                # The handlers are done once no call holds budget or a connection.
                await eventually(
                    lambda: (
                        proxy.inflight_bytes == 0
                        and all(u.calls == 0 for u in proxy._pool.upstreams)
                    )
                )
            assert watch.frames_holding(size) == []
    finally:
        model.gate.set()


async def test_the_byte_budget_is_first_come_first_served_and_survives_cancellations() -> None:
    budget = ByteBudget(10)
    await budget.acquire(6)
    big = asyncio.ensure_future(budget.acquire(8))
    small = asyncio.ensure_future(budget.acquire(1))
    cancelled = asyncio.ensure_future(budget.acquire(2))
    await asyncio.sleep(0)
    assert not big.done() and not small.done()  # the small one does not jump the queue
    cancelled.cancel()
    budget.release(6)
    await asyncio.gather(big, small)
    assert cancelled.cancelled()
    assert budget.used == 9
    budget.release(8)
    budget.release(1)
    assert budget.used == 0
    assert budget.waits == 3


def test_the_fields_of_a_big_message_are_read_without_copying_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # protobuf's C parser keeps every field it does not know (the tensor) as
    # a copy in the parsed message; the walk skips the tensor by its length.
    tensor = b"\x07" * (32 * MiB)
    message = field(1, b"churn") + field(7, tensor) + field(2, b"3") + field(3, b"req-1")
    response = pb.ModelInferResponse(model_name="churn", model_version="7", id="r")
    response.raw_output_contents.append(tensor)
    answer = response.SerializeToString()

    class Refuse:
        @staticmethod
        def FromString(data: bytes) -> None:
            raise AssertionError("the C parser was asked")

    with monkeypatch.context() as patch:
        patch.setattr(_oip_fields, "_FIELDS", Refuse)
        assert read_fields(message) == ("churn", "3", "req-1")
        assert read_fields(answer) == ("churn", "7", "r")
    hwm = Path("/proc/self/clear_refs")
    if hwm.exists():
        with contextlib.suppress(OSError):
            hwm.write_text("5")  # reset the peak resident size
            before = _peak_rss()
            read_fields(message)
            assert _peak_rss() - before < 16 * MiB


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.mark.parametrize(
    "message",
    [
        field(1, b"churn") + b"\x9b\x01\x9c\x01" + field(3, b"x"),  # a group: the parser decides
        field(1, b"churn") + b"\x80\x01\x00" * 100 + field(3, b"x"),  # many fields: the same
        field(1, b"churn") + field(3, b"x") + b"\x2a\x05ab",  # cut short: malformed
        field(1, b"a") + b"\x08\x96\x01" + field(1, b"b") + b"\x1d\x00\x00\x00\x00",
    ],
    ids=["group", "many", "cut", "varint-fixed"],
)
def test_the_walk_and_protobuf_agree(message: bytes) -> None:
    try:
        parsed: Any = pb.ModelInferRequest.FromString(message)
    except Exception:  # noqa: BLE001 - malformed, as protobuf says
        parsed = None
    expected = None if parsed is None else (parsed.model_name, parsed.model_version, parsed.id)
    assert read_fields(message) == expected


def padded_varint(value: int, size: int) -> bytes:
    """``value`` as a varint written in ``size`` bytes (non-canonical past its own length)."""
    out = bytearray()
    for i in range(size):
        out.append(value & 0x7F | (0x80 if i < size - 1 else 0))
        value >>= 7
    return bytes(out)


@pytest.mark.parametrize("size", range(1, 11))
@pytest.mark.parametrize("where", ["tag", "length"])
def test_the_walk_and_protobuf_agree_on_tags_and_lengths_written_long(
    where: str, size: int
) -> None:
    # protobuf's C parser takes a tag or a length of up to five bytes, and
    # refuses a longer one as corrupt: the walk must not read the fields then.
    name = (
        padded_varint(0x0A, size) + b"\x05churn"
        if where == "tag"
        else b"\x0a" + padded_varint(5, size) + b"churn"
    )
    message = name + field(3, b"req-1")
    test_the_walk_and_protobuf_agree(message)
    assert (read_fields(message) is not None) == (size <= 5)


# -- 2. the upstream's error details and retry pushback reach the caller --------------


def rich_error() -> tuple[grpc.StatusCode, str, tuple[tuple[str, Any], ...]]:
    status = status_pb2.Status(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message="bad")
    status.details.add().Pack(
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field="inputs", description="shape")
            ]
        )
    )
    trailers = (
        ("grpc-status-details-bin", status.SerializeToString()),
        ("grpc-retry-pushback-ms", "250"),
        ("x-err", "e1"),
    )
    return grpc.StatusCode.INVALID_ARGUMENT, "bad", trailers


@pytest.mark.parametrize("method", [MODEL_INFER, MODEL_READY, STREAM_INFER])
async def test_rich_error_details_and_retry_pushback_reach_the_caller(
    proxied: tuple[Model, Running], method: str
) -> None:
    model, running = proxied
    model.error = rich_error()
    async with client(running) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            if method == STREAM_INFER:
                call = channel.stream_stream(method)(iter([body(10, "s-1")]), timeout=10)
                async for _ in call:
                    pass
            else:
                await channel.unary_unary(method)(body(10, "r-1"), timeout=10)
    trailers = dict(info.value.trailing_metadata())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert trailers["grpc-status-details-bin"] == model.error[2][0][1]
    assert trailers["grpc-retry-pushback-ms"] == "250"
    assert trailers["x-err"] == "e1"
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    assert status.details[0].Is(error_details_pb2.BadRequest.DESCRIPTOR)


@pytest.mark.parametrize("method", [MODEL_INFER, SERVER_METADATA])
async def test_grpc_metadata_of_the_caller_reaches_the_model_server_and_back(
    proxied: tuple[Model, Running], method: str
) -> None:
    model, running = proxied
    model.headers = (("grpc-custom", "h"), ("x-up", "u"))
    sent = (("grpc-custom-bin", b"\x00\x01"), ("x-mine", "m"))
    async with client(running) as channel:
        call = channel.unary_unary(method)(body(10, "md-1"), metadata=sent, timeout=10)
        await call
        initial = tuple(await call.initial_metadata())
    assert ("grpc-custom", "h") in initial
    assert ("x-up", "u") in initial
    assert set(sent) <= set(model.metadata)


# -- 3. several connections to a model server that caps streams per connection ---------


async def test_concurrent_calls_over_a_model_servers_stream_cap_all_succeed(
    start_sidecar: StartSidecar,
) -> None:
    model = Model()
    model.delay = 0.5
    async with serving(model, [("grpc.max_concurrent_streams", 10)]) as address:
        running: Running = await start_sidecar(oip_proxies=(("127.0.0.1:0", address),))
        channels = [client(running, use_local_subchannel_pool=1) for _ in range(50)]
        try:

            async def one(i: int, method: str) -> grpc.StatusCode:
                try:
                    await channels[i].unary_unary(method)(body(10, f"st-{i}"), timeout=30)
                except grpc.aio.AioRpcError as exc:
                    return exc.code()
                return grpc.StatusCode.OK

            for method in (MODEL_INFER, MODEL_READY):
                codes = await asyncio.gather(*(one(i, method) for i in range(50)))
                assert set(codes) == {grpc.StatusCode.OK}, method
        finally:
            for channel in channels:
                await channel.close()
    proxy = proxy_of(running)
    assert 1 < proxy.upstream_connections <= 8
    assert model.peak > 10  # more calls at once than one connection carries


# -- 4. the caller learns the prediction id -------------------------------------------


async def test_the_caller_learns_the_id_when_the_model_server_does_not_echo_it(
    proxied: tuple[Model, Running],
) -> None:
    model, running = proxied
    model.echo_id = False
    model.headers = (("x-up", "u"),)
    async with client(running) as channel:
        call = channel.unary_unary(MODEL_INFER)(body(10), timeout=10)
        assert pb.ModelInferResponse.FromString(await call).id == ""
        initial = list(await call.initial_metadata())
    (event,) = await recorded(running, 1)
    assert ("x-prediction-id", event.prediction_id) in initial
    assert ("x-up", "u") in initial  # the model server's own headers pass as before
    assert [key for key, _ in initial].count("x-prediction-id") == 1


async def test_the_caller_learns_the_id_that_replaced_its_unusable_one(
    proxied: tuple[Model, Running],
) -> None:
    _, running = proxied
    async with client(running) as channel:
        call = channel.unary_unary(MODEL_INFER)(body(10, "order 42"), timeout=10)
        assert pb.ModelInferResponse.FromString(await call).id == "order 42"
        initial = dict(await call.initial_metadata())
    (event,) = await recorded(running, 1)
    assert uuid7_timestamp_ms(event.prediction_id) is not None
    assert initial["x-prediction-id"] == event.prediction_id


async def test_a_failed_call_without_headers_carries_the_id_in_its_trailers(
    proxied: tuple[Model, Running],
) -> None:
    model, running = proxied
    model.error = rich_error()
    async with client(running) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.unary_unary(MODEL_INFER)(body(10), timeout=10)
    (event,) = await recorded(running, 1)
    assert dict(info.value.trailing_metadata())["x-prediction-id"] == event.prediction_id
    assert "x-prediction-id" not in dict(info.value.initial_metadata())


async def test_a_failed_call_after_headers_carries_the_id_in_its_headers(
    proxied: tuple[Model, Running],
) -> None:
    model, running = proxied
    model.headers = (("retry-after-ms", "250"),)
    model.error = (grpc.StatusCode.UNAVAILABLE, "busy", ())
    async with client(running) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.unary_unary(MODEL_INFER)(body(10, "busy-1"), timeout=10)
    initial = list(info.value.initial_metadata())
    assert ("retry-after-ms", "250") in initial
    assert ("x-prediction-id", "busy-1") in initial


async def test_the_model_servers_own_prediction_id_header_is_not_doubled(
    proxied: tuple[Model, Running],
) -> None:
    model, running = proxied
    model.headers = (("x-prediction-id", "same-1"),)
    async with client(running) as channel:
        call = channel.unary_unary(MODEL_INFER)(body(10, "same-1"), timeout=10)
        await call
        initial = list(await call.initial_metadata())
    assert initial.count(("x-prediction-id", "same-1")) == 1


async def test_a_passed_through_call_gets_no_prediction_id(
    proxied: tuple[Model, Running],
) -> None:
    _, running = proxied
    async with client(running) as channel:
        call = channel.unary_unary(MODEL_READY)(b"", timeout=10)
        await call
        assert "x-prediction-id" not in dict(await call.initial_metadata())


# -- 5. an answer that echoes the added id may be a little over the limit -------------


@contextlib.asynccontextmanager
async def own_proxy(running: Running, upstream: str, **kwargs: Any) -> AsyncIterator[str]:
    """An OIP proxy served as the sidecar serves it, with the listener options it asks for."""
    proxy = OipProxy(running.app.intake, upstream, **kwargs)
    server = grpc.aio.server(options=proxy.server_options(grpc_server_options(running.app.config)))
    server.add_generic_rpc_handlers((proxy.generic_handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)
        await proxy.close()


async def test_an_answer_over_the_limit_by_the_echoed_id_reaches_the_caller(
    start_sidecar: StartSidecar,
) -> None:
    limit = 4 * MiB
    model = Model()
    options = [("grpc.max_send_message_length", 2 * limit)]
    async with serving(model, options) as address:
        running: Running = await start_sidecar()
        async with own_proxy(running, address, max_message_bytes=limit) as target:
            base = pb.ModelInferResponse(model_name="churn", model_version="7")
            padding = limit - 20 - len(base.SerializeToString()) - 5  # tag + 4-byte length
            base.raw_output_contents.append(b"x" * padding)
            answer_without_id = base.SerializeToString()
            assert len(answer_without_id) == limit - 20
            model.echo_onto = answer_without_id  # and the 36-character id the proxy adds
            async with grpc.aio.insecure_channel(
                target, options=[("grpc.max_receive_message_length", limit + 1024)]
            ) as channel:
                call = channel.unary_unary(MODEL_INFER)(body(10), timeout=30)
                response = await call
            assert len(response) > limit
            assert response.startswith(answer_without_id)


async def test_the_listener_options_put_the_raised_send_limit_first(
    start_sidecar: StartSidecar,
) -> None:
    running: Running = await start_sidecar()
    proxy = OipProxy(running.app.intake, "127.0.0.1:9", max_message_bytes=4 * MiB)
    try:
        limit = ("grpc.max_send_message_length", 4 * MiB)
        options = proxy.server_options([("grpc.x", 1), limit])
        assert options == [
            ("grpc.max_send_message_length", 4 * MiB + 1024),
            ("grpc.http2.bdp_probe", 0),  # an unread request stays with its caller
            ("grpc.x", 1),
        ]
    finally:
        await proxy.close()


# -- 7. text a store cannot hold; refused events are logged -----------------------------


@pytest.mark.parametrize(
    ("name", "version"),
    [("m\x00x", ""), ("churn", "1\x00"), ("tab\tname\x7f", "v\x85")],
    ids=["nul-name", "nul-version", "controls"],
)
async def test_a_model_name_with_a_nul_is_recorded_with_it_replaced(
    proxied: tuple[Model, Running], name: str, version: str
) -> None:
    model, running = proxied
    message = pb.ModelInferRequest(model_name=name, model_version=version, id="nul-1")
    model.reply = pb.ModelInferResponse(id="nul-1").SerializeToString()  # no name served
    async with client(running) as channel:
        await channel.unary_unary(MODEL_INFER)(message.SerializeToString(), timeout=10)
    (event,) = await recorded(running, 1)
    clean = str.maketrans({c: "\ufffd" for c in "\x00\t\x7f\x85"})
    assert (event.model.name, event.model.version) == (
        name.translate(clean),
        version.translate(clean),
    )
    assert proxy_of(running).rejected_events == 0


async def test_a_nul_in_the_served_model_name_is_replaced_too(
    proxied: tuple[Model, Running],
) -> None:
    model, running = proxied
    model.reply = pb.ModelInferResponse(
        model_name="m\x00", model_version="7\x00", id="nul-2"
    ).SerializeToString()
    async with client(running) as channel:
        await channel.unary_unary(MODEL_INFER)(body(10, "nul-2"), timeout=10)
    (event,) = await recorded(running, 1)
    assert (event.model.name, event.model.version) == ("m\ufffd", "7\ufffd")


async def test_an_event_the_intake_refuses_is_logged_and_counted(
    proxied: tuple[Model, Running],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, running = proxied
    intake = running.app.intake

    async def refuse(events: Any) -> IntakeResult:
        return IntakeResult(0, tuple(Rejection(i, "no good", "x") for i in range(len(events))))

    monkeypatch.setattr(intake, "record", refuse)
    with caplog.at_level(logging.WARNING, logger="predtrace.sidecar.oip"):
        async with client(running) as channel:
            await channel.unary_unary(MODEL_INFER)(body(10, "refused-1"), timeout=10)
        await eventually(lambda: proxy_of(running).rejected_events == 1)
    assert any("refused: no good" in record.getMessage() for record in caplog.records)


async def test_the_recorder_goes_on_after_an_unexpected_intake_error(
    proxied: tuple[Model, Running],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, running = proxied
    intake = running.app.intake
    real = intake.record
    failures = [RuntimeError("boom")]

    async def flaky(events: Any) -> IntakeResult:
        if failures:
            raise failures.pop()
        return await real(events)

    monkeypatch.setattr(intake, "record", flaky)
    async with client(running) as channel:
        await channel.unary_unary(MODEL_INFER)(body(10, "lost-1"), timeout=10)
        await eventually(lambda: proxy_of(running).dropped == 1)
        await channel.unary_unary(MODEL_INFER)(body(10, "kept-1"), timeout=10)
    (event,) = await recorded(running, 1)
    assert event.prediction_id == "kept-1"
