"""The OIP v2 proxy between a real OIP client and the real example model server (in process)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType

import grpc
import pytest
from google.protobuf.internal import api_implementation

from predtrace.oip.v2 import grpc_predict_v2_pb2 as pb
from predtrace.oip.v2 import grpc_predict_v2_pb2_grpc as pb_grpc
from predtrace.sidecar._metrics import SidecarMetrics
from predtrace.sidecar._oip_fields import OipFields, read_fields
from predtrace.sidecar._oip_proxy import OipProxy
from predtrace.sidecar._protowire import encode_varint
from predtrace.wire import Status, parse_prediction_id, uuid7_timestamp_ms
from tests.reliability.sidecar.polling import eventually

from .conftest import Running, StartSidecar
from .cycles import CycleWatch

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "oip_grpc_server" / "server.py"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("oip_example_server", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
async def model_server() -> AsyncIterator[str]:
    example = load_example()
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(example.ChurnModelServer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


@pytest.fixture
async def proxied(start_sidecar: StartSidecar, model_server: str) -> Running:
    running: Running = await start_sidecar(oip_proxies=(("127.0.0.1:0", model_server),))
    return running


def request(rows: list[list[float]], request_id: str = "", version: str = "") -> bytes:
    message = pb.ModelInferRequest(model_name="churn", model_version=version, id=request_id)
    tensor = message.inputs.add(name="input", datatype="FP32", shape=[len(rows), 3])
    tensor.contents.fp32_contents.extend(v for row in rows for v in row)
    return message.SerializeToString()


async def direct_and_proxied(
    model_server: str, proxied: Running, body: bytes
) -> tuple[bytes, bytes]:
    """The model server's answer to ``body`` sent directly, and through the proxy."""
    async with (
        grpc.aio.insecure_channel(model_server) as direct,
        grpc.aio.insecure_channel(proxied.app.addresses["oip-proxy"]) as via_proxy,
    ):
        method = "/inference.GRPCInferenceService/ModelInfer"
        metadata = (("traceparent", TRACEPARENT),)
        expected = await direct.unary_unary(method)(body, metadata=metadata)
        got = await via_proxy.unary_unary(method)(body, metadata=metadata)
    return expected, got


async def recorded(running: Running, n: int) -> list[object]:
    await eventually(lambda: len(running.collector.events()) >= n)
    return list(running.collector.events())


async def test_a_request_with_an_id_passes_byte_for_byte_and_is_recorded_with_the_served_version(
    proxied: Running, model_server: str
) -> None:
    body = request([[12.0, 70.5, 3.0]], request_id="req-42")
    expected, got = await direct_and_proxied(model_server, proxied, body)
    assert got == expected
    (event,) = await recorded(proxied, 1)
    assert event.prediction_id == "req-42"  # type: ignore[attr-defined]
    assert (event.model.name, event.model.version) == ("churn", "3")  # type: ignore[attr-defined]
    assert event.protocol == "oip-v2-grpc"  # type: ignore[attr-defined]
    assert event.status == Status.OK  # type: ignore[attr-defined]


async def test_a_missing_id_is_assigned_and_the_traceparent_reaches_the_model_server(
    proxied: Running,
) -> None:
    async with grpc.aio.insecure_channel(proxied.app.addresses["oip-proxy"]) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        message = pb.ModelInferRequest.FromString(request([[1.0, 2.0, 0.0], [40.0, 99.0, 7.0]]))
        response = await stub.ModelInfer(message, metadata=(("traceparent", TRACEPARENT),))
    assert response.id, "the proxy assigned an id the model server echoed"
    assert uuid7_timestamp_ms(parse_prediction_id(response.id)) is not None
    assert response.parameters["traceparent"].string_param == TRACEPARENT
    (event,) = await recorded(proxied, 1)
    assert event.prediction_id == response.id  # type: ignore[attr-defined]
    assert event.trace_id.hex() == TRACEPARENT.split("-")[1]  # type: ignore[attr-defined]


async def test_without_a_traceparent_the_proxy_starts_one(proxied: Running) -> None:
    async with grpc.aio.insecure_channel(proxied.app.addresses["oip-proxy"]) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        response = await stub.ModelInfer(pb.ModelInferRequest.FromString(request([[1, 2, 3]])))
    started = response.parameters["traceparent"].string_param
    (event,) = await recorded(proxied, 1)
    assert started.split("-")[1] == event.trace_id.hex()  # type: ignore[attr-defined]


async def test_an_error_reaches_the_client_unchanged_and_is_recorded_as_an_error(
    proxied: Running,
) -> None:
    async with grpc.aio.insecure_channel(proxied.app.addresses["oip-proxy"]) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        bad = pb.ModelInferRequest(model_name="nope", id="err-1")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(bad)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details() == "unknown model 'nope'"
    (event,) = await recorded(proxied, 1)
    assert event.status == Status.ERROR  # type: ignore[attr-defined]
    assert event.status_code == "NOT_FOUND"  # type: ignore[attr-defined]


async def test_every_other_method_passes_through(proxied: Running) -> None:
    async with grpc.aio.insecure_channel(proxied.app.addresses["oip-proxy"]) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert (await stub.ServerLive(pb.ServerLiveRequest())).live
        assert (await stub.ModelReady(pb.ModelReadyRequest(name="churn"))).ready
        meta = await stub.ModelMetadata(pb.ModelMetadataRequest(name="churn"))
        assert meta.versions == ["3"]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelMetadata(pb.ModelMetadataRequest(name="other"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    await asyncio.sleep(0.05)
    assert proxied.collector.events() == []


async def test_an_unreachable_model_server_is_unavailable_to_the_client_and_recorded(
    start_sidecar: StartSidecar,
) -> None:
    running: Running = await start_sidecar(oip_proxies=(("127.0.0.1:0", "127.0.0.1:9"),))
    async with grpc.aio.insecure_channel(running.app.addresses["oip-proxy"]) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(pb.ModelInferRequest.FromString(request([[1, 2, 3]])))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    (event,) = await recorded(running, 1)
    assert event.status_code == "UNAVAILABLE"  # type: ignore[attr-defined]


async def test_a_request_the_proxy_cannot_read_passes_untouched_never_with_a_new_id(
    proxied: Running, model_server: str
) -> None:
    long_id = "L" * 5000  # over the proxy's 4 KiB field bound: unreadable to it
    body = request([[12.0, 70.5, 3.0]], request_id=long_id)
    expected, got = await direct_and_proxied(model_server, proxied, body)
    assert got == expected
    assert pb.ModelInferResponse.FromString(got).id == long_id
    (event,) = await recorded(proxied, 1)
    assert event.status == Status.OK  # type: ignore[attr-defined]


@contextlib.contextmanager
def on_one_cpu() -> Iterator[None]:
    """Every thread of this process on one CPU (Linux), restored afterwards.

    The race below needs grpc's poller thread and the event loop to take turns:
    on one CPU it shows in about 1 call in 10; on several idle CPUs it can
    vanish for minutes.
    """
    tasks = Path("/proc/self/task")
    if not hasattr(os, "sched_setaffinity") or not tasks.is_dir():
        yield
        return
    mask = os.sched_getaffinity(0)

    def pin(cpus: set[int]) -> None:
        for task in tasks.iterdir():
            with contextlib.suppress(OSError):  # a thread that has just ended
                os.sched_setaffinity(int(task.name), cpus)

    pin({min(mask)})
    try:
        yield
    finally:
        pin(mask)


async def test_a_method_the_model_server_lacks_is_unimplemented_to_the_client_every_time(
    proxied: Running,
) -> None:
    # grpc.aio reports a request write that fails because the server has just
    # ended the call as INTERNAL "Internal error from Core", over the server's
    # status (grpc/grpc#36066); the proxy must not stream a unary request.
    method = "/inference.GRPCInferenceService/NoSuchMethod"
    seen: Counter[tuple[grpc.StatusCode, str | None]] = Counter()
    async with grpc.aio.insecure_channel(proxied.app.addresses["oip-proxy"]) as channel:
        call = channel.unary_unary(method)
        with on_one_cpu():
            for _ in range(300):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call(b"")
                seen[info.value.code(), info.value.details()] += 1
    assert seen == {(grpc.StatusCode.UNIMPLEMENTED, "Method not found!"): 300}


STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"


class Streaming(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """An upstream with a method of every request and response cardinality."""

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:  # type: ignore[type-arg]
        if details.method == STREAM_INFER:  # bidi: one answer per request, at once
            return grpc.stream_stream_rpc_method_handler(self.echo)
        if details.method == "/test.Streams/Count":
            return grpc.unary_stream_rpc_method_handler(self.count)
        if details.method == "/test.Streams/Join":
            return grpc.stream_unary_rpc_method_handler(self.join)
        if details.method == "/test.Streams/Chat":  # bidi, another service
            return grpc.stream_stream_rpc_method_handler(self.echo)
        return None

    async def echo(self, requests: AsyncIterator[bytes], context: object) -> AsyncIterator[bytes]:
        async for request in requests:
            yield b"echo:" + request

    async def count(self, request: bytes, context: object) -> AsyncIterator[bytes]:
        for i in range(int(request)):
            yield str(i).encode()

    async def join(self, requests: AsyncIterator[bytes], context: object) -> bytes:
        return b"+".join([request async for request in requests])


@pytest.fixture
async def streaming_proxy(start_sidecar: StartSidecar) -> AsyncIterator[str]:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((Streaming(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    running: Running = await start_sidecar(oip_proxies=(("127.0.0.1:0", f"127.0.0.1:{port}"),))
    yield running.app.addresses["oip-proxy"]
    await server.stop(None)


async def test_streams_of_any_cardinality_pass_through(streaming_proxy: str) -> None:
    async with grpc.aio.insecure_channel(streaming_proxy) as channel:
        count = channel.unary_stream("/test.Streams/Count")
        assert [r async for r in count(b"3")] == [b"0", b"1", b"2"]
        join = channel.stream_unary("/test.Streams/Join")
        assert await join(iter([b"a", b"b", b"c"])) == b"a+b+c"
        assert await join(iter([])) == b""
        assert await join(iter([b"one"])) == b"one"
        # bidi calls that wait for each answer before they send the next request
        for method in (STREAM_INFER, "/test.Streams/Chat"):
            bidi = channel.stream_stream(method)()
            for request in (b"1", b"2"):
                await bidi.write(request)
                assert await asyncio.wait_for(bidi.read(), 5) == b"echo:" + request
            await bidi.done_writing()
            assert await bidi.read() is grpc.aio.EOF


async def test_a_response_over_grpcs_default_4_mib_passes_when_the_limit_allows_it(
    start_sidecar: StartSidecar,
) -> None:
    limit = 16 * 1024 * 1024
    options = [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
    ]
    big = pb.ModelInferResponse(model_name="churn", model_version="2", id="r")
    big.raw_output_contents.append(b"\x01" * (6 * 1024 * 1024))

    async def infer(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return big.SerializeToString()

    upstream = grpc.aio.server(options=options)
    upstream.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "inference.GRPCInferenceService",
                {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)},
            ),
        )
    )
    port = upstream.add_insecure_port("127.0.0.1:0")
    await upstream.start()
    try:
        running = await start_sidecar(
            oip_proxies=(("127.0.0.1:0", f"127.0.0.1:{port}"),), max_message_bytes=limit
        )
        target = running.app.addresses["oip-proxy"]
        async with grpc.aio.insecure_channel(target, options=options) as channel:
            method = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            answer = await method(request([[1.0, 2.0, 3.0]]), timeout=30)
        assert answer == big.SerializeToString()
    finally:
        await upstream.stop(None)


MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
SERVER_LIVE = "/inference.GRPCInferenceService/ServerLive"
SERVER_READY = "/inference.GRPCInferenceService/ServerReady"
HEADERS_ONLY = "/test.Streams/HeadersOnly"


class Upstream(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """A model server that keeps what reached it, answers as scripted, or holds a call."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.metadata: list[list[tuple[str, str | bytes]]] = []
        self.arrived = asyncio.Event()
        self.hold = False  # ModelInfer never answers (until cancelled)
        self.cancelled: list[bytes] = []
        self.reply: bytes | None = None  # else churn version 7, echoing the request's id
        self.fail_after_headers = False  # ModelInfer sends headers, then fails

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:  # type: ignore[type-arg]
        if details.method == MODEL_INFER:
            return grpc.unary_unary_rpc_method_handler(self.infer)
        if details.method == SERVER_LIVE:
            return grpc.unary_unary_rpc_method_handler(self.live)
        if details.method == SERVER_READY:  # held until cancelled
            return grpc.unary_unary_rpc_method_handler(self.ready)
        if details.method == HEADERS_ONLY:
            return grpc.unary_stream_rpc_method_handler(self.headers_only)
        return None

    async def infer(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        self.requests.append(request)
        self.metadata.append(list(context.invocation_metadata() or ()))
        self.arrived.set()
        if self.hold:
            await self.held(request)
        if self.fail_after_headers:
            await context.send_initial_metadata((("retry-after-ms", "250"),))
            context.set_trailing_metadata((("x-up-trailing", "failed"),))
            await context.abort(grpc.StatusCode.UNAVAILABLE, "overloaded, try again")
        if self.reply is not None:
            return self.reply
        echoed = pb.ModelInferRequest.FromString(request).id
        return pb.ModelInferResponse(
            model_name="churn", model_version="7", id=echoed
        ).SerializeToString()

    async def held(self, request: bytes) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.append(request)
            raise

    async def ready(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        self.arrived.set()
        await self.held(request)
        return b""

    async def live(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        await context.send_initial_metadata((("x-up-initial", "live"),))
        return pb.ServerLiveResponse(live=True).SerializeToString()

    async def headers_only(
        self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        await context.send_initial_metadata((("x-up-initial", "headers-only"),))
        return
        yield b""  # a generator that sends no message


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Upstream, str]]:
    handler = Upstream()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield handler, f"127.0.0.1:{port}"
    await server.stop(None)


@pytest.fixture
async def scripted(
    start_sidecar: StartSidecar, upstream: tuple[Upstream, str]
) -> tuple[Upstream, Running]:
    handler, address = upstream
    running: Running = await start_sidecar(oip_proxies=(("127.0.0.1:0", address),))
    return handler, running


def proxy_of(running: Running) -> OipProxy:
    (proxy,) = running.app._proxies
    return proxy


async def infer(
    running: Running, body: bytes, metadata: tuple[tuple[str, str], ...] = ()
) -> pb.ModelInferResponse:
    async with grpc.aio.insecure_channel(running.app.addresses["oip-proxy"]) as channel:
        answer = await channel.unary_unary(MODEL_INFER)(body, metadata=metadata, timeout=10)
    return pb.ModelInferResponse.FromString(answer)


# -- pass-through: the upstream's initial metadata ------------------------------------


async def test_a_passed_through_call_gives_the_caller_the_upstreams_initial_metadata(
    scripted: tuple[Upstream, Running],
) -> None:
    _, running = scripted
    async with grpc.aio.insecure_channel(running.app.addresses["oip-proxy"]) as channel:
        call = channel.unary_unary(SERVER_LIVE)(b"", timeout=10)
        assert pb.ServerLiveResponse.FromString(await call).live
        assert ("x-up-initial", "live") in tuple(await call.initial_metadata())
        stream = channel.unary_stream(HEADERS_ONLY)(b"", timeout=10)
        assert [item async for item in stream] == []
        assert ("x-up-initial", "headers-only") in tuple(await stream.initial_metadata())
        assert await stream.code() == grpc.StatusCode.OK


async def test_a_passed_through_unary_call_the_client_cancels_is_cancelled_at_the_model_server(
    scripted: tuple[Upstream, Running],
) -> None:
    upstream, running = scripted
    async with grpc.aio.insecure_channel(running.app.addresses["oip-proxy"]) as channel:
        call = channel.unary_unary(SERVER_READY)(pb.ServerReadyRequest().SerializeToString())
        await asyncio.wait_for(upstream.arrived.wait(), 10)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    # Not held until the model server's own deadline (none here): cancelled now.
    await eventually(lambda: upstream.cancelled == [b""], within=5)


async def test_a_failed_inference_gives_the_caller_the_headers_the_model_server_sent(
    scripted: tuple[Upstream, Running],
) -> None:
    upstream, running = scripted
    upstream.fail_after_headers = True
    async with grpc.aio.insecure_channel(running.app.addresses["oip-proxy"]) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.unary_unary(MODEL_INFER)(request([[1, 2, 3]], "busy-1"), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert info.value.details() == "overloaded, try again"
    assert ("retry-after-ms", "250") in tuple(info.value.initial_metadata())
    assert ("x-up-trailing", "failed") in tuple(info.value.trailing_metadata())
    (event,) = await recorded(running, 1)
    assert event.prediction_id == "busy-1"  # type: ignore[attr-defined]
    assert event.status_code == "UNAVAILABLE"  # type: ignore[attr-defined]


# -- a deadline, a cancellation and a stopping sidecar are recorded -------------------


async def test_an_inference_past_its_deadline_is_recorded_as_deadline_exceeded(
    scripted: tuple[Upstream, Running],
) -> None:
    upstream, running = scripted
    upstream.hold = True
    async with grpc.aio.insecure_channel(running.app.addresses["oip-proxy"]) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.unary_unary(MODEL_INFER)(request([[1, 2, 3]], "late-1"), timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    (event,) = await recorded(running, 1)
    assert event.prediction_id == "late-1"  # type: ignore[attr-defined]
    assert event.status == Status.ERROR  # type: ignore[attr-defined]
    assert event.status_code == "DEADLINE_EXCEEDED"  # type: ignore[attr-defined]


async def test_an_inference_the_client_cancels_is_recorded_as_cancelled(
    scripted: tuple[Upstream, Running],
) -> None:
    upstream, running = scripted
    upstream.hold = True
    async with grpc.aio.insecure_channel(running.app.addresses["oip-proxy"]) as channel:
        call = channel.unary_unary(MODEL_INFER)(request([[1, 2, 3]], "gone-1"), timeout=30)
        await asyncio.wait_for(upstream.arrived.wait(), 10)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    (event,) = await recorded(running, 1)
    assert event.prediction_id == "gone-1"  # type: ignore[attr-defined]
    assert event.status_code == "CANCELLED"  # type: ignore[attr-defined]
    await eventually(lambda: upstream.cancelled)  # the model server's call ended too


async def test_an_inference_in_flight_when_the_sidecar_stops_is_still_recorded(
    scripted: tuple[Upstream, Running],
) -> None:
    upstream, running = scripted
    upstream.hold = True
    async with grpc.aio.insecure_channel(running.app.addresses["oip-proxy"]) as channel:
        call = channel.unary_unary(MODEL_INFER)(request([[1, 2, 3]], "inflight-1"), timeout=30)
        await asyncio.wait_for(upstream.arrived.wait(), 10)
        await running.app.stop()
        with pytest.raises(grpc.aio.AioRpcError):
            await call
    (event,) = await recorded(running, 1)
    assert event.prediction_id == "inflight-1"  # type: ignore[attr-defined]
    assert event.status_code == "CANCELLED"  # type: ignore[attr-defined]


# -- traceparents W3C Trace Context calls invalid -------------------------------------

VALID_TRACE, VALID_SPAN = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"


@pytest.mark.parametrize(
    "traceparent",
    [
        "zz-not-a-traceparent",
        f"00-{'0' * 32}-{VALID_SPAN}-01",  # all-zero trace id
        f"00-{VALID_TRACE}-{'0' * 16}-01",  # all-zero span (parent) id
        f"ff-{VALID_TRACE}-{VALID_SPAN}-01",  # version ff
        f"00-{VALID_TRACE.upper()}-{VALID_SPAN.upper()}-01",  # upper-case hex
        f"00-{VALID_TRACE}-{VALID_SPAN}-01-more",  # version 00 has four fields
    ],
)
async def test_an_invalid_traceparent_is_replaced_by_a_new_trace(
    scripted: tuple[Upstream, Running], traceparent: str
) -> None:
    upstream, running = scripted
    await infer(running, request([[1, 2, 3]], "tp-1"), (("traceparent", traceparent),))
    (sent,) = [value for key, value in upstream.metadata[0] if key == "traceparent"]
    assert isinstance(sent, str)
    _, trace_hex, span_hex, _ = sent.split("-")
    assert trace_hex not in (VALID_TRACE, "0" * 32)
    (event,) = await recorded(running, 1)
    assert event.trace_id.hex() == trace_hex  # type: ignore[attr-defined]
    assert event.span_id.hex() == span_hex  # type: ignore[attr-defined]


async def test_a_traceparent_of_a_later_version_is_continued(
    scripted: tuple[Upstream, Running],
) -> None:
    upstream, running = scripted
    later = f"01-{VALID_TRACE}-{VALID_SPAN}-01-what-comes-next"
    await infer(running, request([[1, 2, 3]], "tp-2"), (("traceparent", later),))
    assert [value for key, value in upstream.metadata[0] if key == "traceparent"] == [later]
    (event,) = await recorded(running, 1)
    assert event.trace_id.hex() == VALID_TRACE  # type: ignore[attr-defined]


# -- an unreadable id leaves the other fields readable --------------------------------


def string_field(number: int, raw: bytes) -> bytes:
    return encode_varint(number << 3 | 2) + encode_varint(len(raw)) + raw


@pytest.mark.parametrize("raw_id", [b"L" * 5000, b"\xff\xfe-not-utf-8"], ids=["5000", "binary"])
async def test_an_unreadable_id_still_records_the_model_and_version_served(
    scripted: tuple[Upstream, Running], raw_id: bytes
) -> None:
    upstream, running = scripted
    body = pb.ModelInferRequest(model_name="churn").SerializeToString() + string_field(3, raw_id)
    served = pb.ModelInferResponse(model_name="churn", model_version="7").SerializeToString()
    upstream.reply = served + string_field(3, raw_id)
    async with grpc.aio.insecure_channel(running.app.addresses["oip-proxy"]) as channel:
        assert await channel.unary_unary(MODEL_INFER)(body, timeout=10) == upstream.reply
    assert upstream.requests == [body]  # untouched: no id appended over the caller's
    (event,) = await recorded(running, 1)
    assert (event.model.name, event.model.version) == ("churn", "7")  # type: ignore[attr-defined]
    assert uuid7_timestamp_ms(event.prediction_id) is not None  # type: ignore[attr-defined]


def test_the_oip_field_reader_follows_proto3_and_marks_an_unreadable_field() -> None:
    body = pb.ModelInferRequest(model_name="churn", model_version="3").SerializeToString()
    assert read_fields(body + string_field(3, b"\xff")) == OipFields("churn", "3", None)
    assert read_fields(body + string_field(3, b"x" * 4097)) == OipFields("churn", "3", None)
    assert read_fields(body + string_field(3, b"x" * 4096)) == OipFields("churn", "3", "x" * 4096)
    assert read_fields(body + string_field(1, b"a") + string_field(1, b"b")) == ("b", "3", "")
    assert read_fields(body + b"\x18\x07") == ("churn", "3", "")  # id as a varint: unknown
    group = encode_varint(100 << 3 | 3) + string_field(3, b"inner") + encode_varint(100 << 3 | 4)
    assert read_fields(body + group) == ("churn", "3", "")  # a group's fields are its own
    assert read_fields(b"") == ("", "", "")
    assert read_fields(body + b"\x1a\x05ab") is None  # cut short: malformed
    assert read_fields(body + encode_varint(100 << 3 | 3)) is None  # a group never ended
    assert read_fields(b"\x00\x01") is None  # field number 0


def test_a_message_of_many_fields_is_read_by_protobufs_c_parser_not_a_python_scan() -> None:
    # Read on the event loop: a scan in Python took about a second for a
    # message of a million tiny fields and stalled every call of the sidecar
    # meanwhile. The proxy walks at most 64 top-level fields in Python, then
    # hands over to the C parser, whose cost does not grow with the fields
    # skipped (measured by bench/, not here): what is checked is that it is used.
    assert api_implementation.Type() == "upb"
    body = request([[1, 2, 3]], "many-1") + b"\x80\x01\x00" * 990_000  # field 16 = 0
    assert read_fields(body) == ("churn", "", "many-1")


async def test_a_request_of_millions_of_tiny_fields_is_read_and_gets_an_id(
    scripted: tuple[Upstream, Running],
) -> None:
    upstream, running = scripted
    body = request([[1, 2, 3]]) + b"\x80\x01\x00" * 1_200_000  # 3.6 MB of field 16 = 0
    answer = await infer(running, body)
    assert uuid7_timestamp_ms(answer.id) is not None
    assert upstream.requests == [body + string_field(3, answer.id.encode())]
    (event,) = await recorded(running, 1)
    assert event.prediction_id == answer.id  # type: ignore[attr-defined]
    assert (event.model.name, event.model.version) == ("churn", "7")  # type: ignore[attr-defined]


async def test_a_request_with_a_group_field_is_read_and_gets_an_id(
    scripted: tuple[Upstream, Running],
) -> None:
    upstream, running = scripted
    group = encode_varint(100 << 3 | 3) + string_field(3, b"inner") + encode_varint(100 << 3 | 4)
    body = request([[1, 2, 3]]) + group
    answer = await infer(running, body)
    assert uuid7_timestamp_ms(answer.id) is not None  # not "inner": that is the group's field
    assert upstream.requests == [body + string_field(3, answer.id.encode())]
    (event,) = await recorded(running, 1)
    assert event.prediction_id == answer.id  # type: ignore[attr-defined]


async def test_a_malformed_request_passes_untouched_and_is_counted(
    scripted: tuple[Upstream, Running],
) -> None:
    upstream, running = scripted
    body = request([[1, 2, 3]]) + b"\x1a\x05ab"  # an id whose length runs past the end
    upstream.reply = pb.ModelInferResponse(model_name="churn", id="echo-1").SerializeToString()
    assert await infer(running, body) == pb.ModelInferResponse.FromString(upstream.reply)
    assert upstream.requests == [body]
    (event,) = await recorded(running, 1)
    assert event.prediction_id == "echo-1"  # type: ignore[attr-defined]
    assert proxy_of(running).unreadable_requests == 1
    exported = {
        m.name: m.samples[0].value for m in SidecarMetrics(running.app).collect() if m.samples
    }
    assert exported["predtrace_sidecar_oip_unreadable_requests"] == 1  # on /metrics too


# -- the appended id fits the upstream channel ----------------------------------------


async def test_the_id_is_added_only_while_the_request_stays_within_the_message_limit(
    start_sidecar: StartSidecar, upstream: tuple[Upstream, str]
) -> None:
    handler, address = upstream
    limit = 256 * 1024
    running = await start_sidecar(oip_proxies=(("127.0.0.1:0", address),), max_message_bytes=limit)
    caller_id = "c" * 256  # the longest id the proxy appends
    field = string_field(3, caller_id.encode())
    base = pb.ModelInferRequest(model_name="churn").SerializeToString()
    for room, added in ((len(field), True), (len(field) - 1, False), (0, False)):
        padding = b"\x00" * (limit - room - len(base) - 5)  # field 100: 2-byte tag, 3-byte length
        body = base + string_field(100, padding)  # an unknown field up to the limit
        assert len(body) == limit - room
        answer = await infer(running, body, (("x-request-id", caller_id),))
        assert handler.requests[-1] == (body + field if added else body)
        assert answer.id == (caller_id if added else "")
    events = await recorded(running, 3)
    assert [event.prediction_id for event in events] == [caller_id] * 3  # type: ignore[attr-defined]
    assert proxy_of(running).ids_not_added == 2
    exported = {
        m.name: m.samples[0].value for m in SidecarMetrics(running.app).collect() if m.samples
    }
    assert exported["predtrace_sidecar_oip_ids_not_added"] == 2  # on /metrics too


async def test_a_request_without_an_id_near_the_model_servers_limit_is_answered_as_directly(
    proxied: Running, model_server: str
) -> None:
    # The example model server takes gRPC's default 4 MiB, as does the proxy:
    # an id added to this request would make the model server refuse it.
    limit = 4 * 1024 * 1024
    base = request([[12.0, 70.5, 3.0]])
    body = base + string_field(100, b"\x00" * (limit - 10 - len(base) - 6))  # 2 + 4-byte length
    assert len(body) == limit - 10
    expected, got = await direct_and_proxied(model_server, proxied, body)
    assert got == expected
    (event,) = await recorded(proxied, 1)
    assert event.status == Status.OK  # type: ignore[attr-defined]
    assert uuid7_timestamp_ms(event.prediction_id) is not None  # type: ignore[attr-defined]
    assert proxy_of(proxied).ids_not_added == 1


# -- a restarted model server is reached again at once --------------------------------


async def serve(handler: Upstream, port: int = 0) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, bound


@contextlib.asynccontextmanager
async def refusing(port: int) -> AsyncIterator[list[object]]:
    """A stand-in on ``port`` that takes each connection and closes it at once, counting them."""
    attempts: list[object] = []

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        attempts.append(writer.get_extra_info("peername"))
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    server = await asyncio.start_server(refuse, "127.0.0.1", port, reuse_address=True)
    try:
        yield attempts
    finally:
        server.close()
        await server.wait_closed()


async def test_a_restarted_model_server_is_reached_again_within_a_few_retries(
    start_sidecar: StartSidecar,
) -> None:
    handler = Upstream()
    server, port = await serve(handler)
    running = await start_sidecar(oip_proxies=(("127.0.0.1:0", f"127.0.0.1:{port}"),))
    body = request([[1, 2, 3]], "again")
    await infer(running, body)
    await server.stop(None)
    # While the model server is down, every connection the proxy opens is
    # refused; each refusal lengthens the proxy's reconnect backoff (with
    # gRPC's defaults, after five the next attempt is 5 s or more away).
    async with (
        refusing(port) as attempts,
        grpc.aio.insecure_channel(running.app.addresses["oip-proxy"]) as channel,
    ):
        call = channel.unary_unary(MODEL_INFER)
        deadline = asyncio.get_running_loop().time() + 60
        while len(attempts) < 5 and asyncio.get_running_loop().time() < deadline:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(body, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            await asyncio.sleep(0.05)
    server, _ = await serve(handler, port)  # back, on the same port
    try:
        failures = 0
        while True:
            try:
                await infer(running, body)
                break
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
                failures += 1
                assert failures < 40, "still UNAVAILABLE 4 s after the model server came back"
                await asyncio.sleep(0.1)
    finally:
        await server.stop(None)


# -- the prediction id (DESIGN §3) ----------------------------------------------------

UNUSABLE_IDS = ["nul\x00id", "req 42", "ünïcödé", "A" * 257, "tab\tid"]


@pytest.mark.parametrize("caller_id", UNUSABLE_IDS, ids=["nul", "space", "non-ascii", "257", "tab"])
async def test_an_unusable_oip_id_passes_untouched_and_is_recorded_under_a_new_id(
    scripted: tuple[Upstream, Running], caller_id: str
) -> None:
    upstream, running = scripted
    body = request([[1, 2, 3]], caller_id)
    answer = await infer(running, body)
    assert answer.id == caller_id
    assert upstream.requests == [body]
    (event,) = await recorded(running, 1)
    assert uuid7_timestamp_ms(event.prediction_id) is not None  # type: ignore[attr-defined]
    assert (event.model.name, event.model.version) == ("churn", "7")  # type: ignore[attr-defined]
    assert proxy_of(running).invalid_caller_ids == 1
    exported = {
        m.name: m.samples[0].value for m in SidecarMetrics(running.app).collect() if m.samples
    }
    assert exported["predtrace_sidecar_oip_invalid_caller_ids"] == 1  # on /metrics too


@pytest.mark.parametrize(
    ("oip_id", "metadata", "expected"),
    [
        ("", (("x-request-id", "req-1"),), "req-1"),
        ("", (("ce-id", "ce-1"),), "ce-1"),
        ("", (("x-request-id", "req-1"), ("ce-id", "ce-1")), "req-1"),
        ("oip-1", (("x-request-id", "req-1"), ("ce-id", "ce-1")), "oip-1"),
        ("", (("x-request-id", "has space"), ("ce-id", "ce-1")), "ce-1"),
        ("has space", (("x-request-id", "req-1"),), "req-1"),
    ],
    ids=["request-id", "ce-id", "request-id-first", "oip-id-first", "skip-unusable", "oip-bad"],
)
async def test_the_prediction_id_is_the_first_usable_caller_id(
    scripted: tuple[Upstream, Running],
    oip_id: str,
    metadata: tuple[tuple[str, str], ...],
    expected: str,
) -> None:
    upstream, running = scripted
    body = request([[1, 2, 3]], oip_id)
    answer = await infer(running, body, metadata)
    (event,) = await recorded(running, 1)
    assert event.prediction_id == expected  # type: ignore[attr-defined]
    if oip_id:  # the caller's own id is never rewritten
        assert upstream.requests == [body]
        assert answer.id == oip_id
    else:  # no id: the chosen one is added, and the model server echoes it
        assert upstream.requests == [body + string_field(3, expected.encode())]
        assert answer.id == expected


async def test_without_any_usable_caller_id_the_prediction_id_is_a_new_uuid7(
    scripted: tuple[Upstream, Running],
) -> None:
    upstream, running = scripted
    metadata = (("x-request-id", "has space"), ("ce-id", "x" * 257))
    body = request([[1, 2, 3]])
    answer = await infer(running, body, metadata)
    (event,) = await recorded(running, 1)
    assert event.prediction_id == answer.id  # type: ignore[attr-defined]
    assert uuid7_timestamp_ms(answer.id) is not None
    assert upstream.requests == [body + string_field(3, answer.id.encode())]
    assert proxy_of(running).invalid_caller_ids == 2


async def test_a_call_the_model_server_fails_leaves_no_cycle_holding_its_request(
    proxied: Running,
) -> None:
    """Each failed call's request (MBs) waited for the cyclic GC, which the sidecar runs seldom.

    ``context.abort()`` raised through the handler took its frames into a
    cycle: a tester saw the sidecar grow by one request per failed call.
    """
    size = 512 * 1024
    unknown_model = pb.ModelInferRequest(model_name="nope", id="err-1")
    unknown_model.raw_input_contents.append(b"x" * size)
    with CycleWatch() as watch:
        async with grpc.aio.insecure_channel(proxied.app.addresses["oip-proxy"]) as channel:
            for method, body, code in (
                ("/inference.GRPCInferenceService/NoSuchMethod", b"y" * size, "UNIMPLEMENTED"),
                (
                    "/inference.GRPCInferenceService/ModelInfer",
                    unknown_model.SerializeToString(),
                    "NOT_FOUND",
                ),
            ):
                for _ in range(3):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await channel.unary_unary(method)(body)
                    assert info.value.code().name == code
        await asyncio.sleep(0.1)  # the handlers' tasks end
        assert watch.frames_holding(size) == []
