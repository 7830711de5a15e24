"""A real Open Inference Protocol v2 gRPC model server: a tiny logistic regression.

Serves ``inference.GRPCInferenceService`` (``predtrace.oip.v2``) for one model,
``churn`` version ``3``: the probability that a customer leaves, from three
FP32 features ``[tenure_months, monthly_charges, support_calls]``. Pure
Python, no numpy. It knows nothing of predtrace: put the sidecar's OIP proxy
in front of it and every ModelInfer becomes a prediction event.

    python examples/oip_grpc_server/server.py --listen 127.0.0.1:8001 --ready-file /tmp/oip.ready

The server reports the W3C trace context it received in the response
parameter ``traceparent``, so you can see the proxy propagate it.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import signal
import struct
from collections.abc import Sequence
from pathlib import Path

import grpc

from predtrace.oip.v2 import grpc_predict_v2_pb2 as pb
from predtrace.oip.v2 import grpc_predict_v2_pb2_grpc as pb_grpc

MODEL = "churn"
VERSION = "3"
FEATURES = ("tenure_months", "monthly_charges", "support_calls")
WEIGHTS = (-0.045, 0.021, 0.38)
BIAS = -1.2


def predict(rows: Sequence[Sequence[float]]) -> list[float]:
    """Logistic regression: sigmoid(w . x + b) for each row."""
    out = []
    for row in rows:
        z = BIAS + sum(w * x for w, x in zip(WEIGHTS, row, strict=True))
        out.append(1.0 / (1.0 + math.exp(-z)))
    return out


def _rows(request: pb.ModelInferRequest) -> list[list[float]]:
    if len(request.inputs) != 1:
        raise ValueError("expected exactly one input tensor")
    tensor = request.inputs[0]
    if tensor.datatype != "FP32" or len(tensor.shape) != 2 or tensor.shape[1] != len(FEATURES):
        raise ValueError(f"input must be FP32 of shape [N, {len(FEATURES)}]")
    if request.raw_input_contents:
        raw = request.raw_input_contents[0]
        values = list(struct.unpack(f"<{len(raw) // 4}f", raw))
    else:
        values = list(tensor.contents.fp32_contents)
    n = tensor.shape[0]
    if len(values) != n * len(FEATURES):
        raise ValueError("tensor contents do not match its shape")
    return [values[i * 3 : i * 3 + 3] for i in range(n)]


class ChurnModelServer(pb_grpc.GRPCInferenceServiceServicer):
    """The OIP v2 service for the one model."""

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: object
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: object
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: object
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=request.name == MODEL)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: object
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="churn-example", version="1.0", extensions=[])

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        if request.name != MODEL:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.name!r}")
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=MODEL,
            versions=[VERSION],
            platform="python-logistic-regression",
            inputs=[tensor(name="input", datatype="FP32", shape=[-1, len(FEATURES)])],
            outputs=[tensor(name="probability", datatype="FP32", shape=[-1])],
        )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        if request.model_name != MODEL:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.model_name!r}")
        if request.model_version not in ("", VERSION):
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"unknown version {request.model_version!r}"
            )
        try:
            rows = _rows(request)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        probabilities = predict(rows)
        response = pb.ModelInferResponse(model_name=MODEL, model_version=VERSION, id=request.id)
        output = response.outputs.add(name="probability", datatype="FP32", shape=[len(rows)])
        output.contents.fp32_contents.extend(probabilities)
        metadata = dict(context.invocation_metadata() or ())
        if "traceparent" in metadata:
            response.parameters["traceparent"].string_param = str(metadata["traceparent"])
        return response


def _write_ready(path: str, address: str) -> None:
    tmp = Path(path + ".tmp")
    tmp.write_text(address + "\n")
    tmp.replace(path)


async def serve(listen: str, ready_file: str | None) -> None:
    """Serve until SIGTERM/SIGINT."""
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(ChurnModelServer(), server)
    port = server.add_insecure_port(listen)
    await server.start()
    host = listen.rpartition(":")[0]
    if ready_file:
        await asyncio.to_thread(_write_ready, ready_file, f"{host}:{port}")
    print(f"OIP v2 model server {MODEL}/{VERSION} on {host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main() -> None:
    """Parse flags and serve."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:8001")
    parser.add_argument("--ready-file")
    args = parser.parse_args()
    asyncio.run(serve(args.listen, args.ready_file))


if __name__ == "__main__":
    main()
