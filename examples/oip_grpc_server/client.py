"""Call the example model server (directly or through the sidecar's OIP proxy).

    python examples/oip_grpc_server/client.py --target 127.0.0.1:8002

Prints the probability and the prediction id the proxy assigned.
"""

from __future__ import annotations

import argparse

import grpc

from predtrace.oip.v2 import grpc_predict_v2_pb2 as pb
from predtrace.oip.v2 import grpc_predict_v2_pb2_grpc as pb_grpc


def infer_request(rows: list[list[float]], request_id: str = "") -> pb.ModelInferRequest:
    """A ModelInfer request for the churn model."""
    request = pb.ModelInferRequest(model_name="churn", id=request_id)
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[len(rows), 3])
    tensor.contents.fp32_contents.extend(v for row in rows for v in row)
    return request


def main() -> None:
    """Send one request and print the answer."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", default="127.0.0.1:8002")
    args = parser.parse_args()
    with grpc.insecure_channel(args.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(infer_request([[12.0, 70.5, 3.0]]))
        print(f"model {response.model_name}/{response.model_version} id={response.id or '-'}")
        print(f"probability {response.outputs[0].contents.fp32_contents[0]:.3f}")


if __name__ == "__main__":
    main()
