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

from predtrace.oip.v2 import grpc_predict_v2_pb2 as pb
from predtrace.oip.v2 import grpc_predict_v2_pb2_grpc as pb_grpc
from predtrace.wire import Status, parse_prediction_id, uuid7_timestamp_ms
from tests.reliability.sidecar.polling import eventually

from .conftest import Running, StartSidecar

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
