"""An edge device: a tiny on-device model whose predictions go through a local sidecar.

The device scores vibration readings with a fixed anomaly model and records
every prediction with one ``RecordBatch`` call to the sidecar running next to
it in edge mode. The sidecar answers once the events are fsynced in its disk
spool, so the device may lose power or its uplink at any moment: the events
survive and are delivered, in order, when the collector is reachable again.

    python examples/edge_device/device.py --sidecar 127.0.0.1:4555 --count 2000
"""

from __future__ import annotations

import argparse
import math
import random
import time

import grpc

from predtrace.v1 import sidecar_pb2, sidecar_pb2_grpc
from predtrace.wire import (
    ModelRef,
    OutputSummary,
    PredictionEvent,
    Status,
    event_to_proto,
    new_prediction_id,
)

MODEL = ModelRef(name="vibration-anomaly", version="12", alias="field")
THRESHOLD = 0.8


def score(reading: float) -> float:
    """The on-device model: a logistic score of how far a reading is from normal."""
    return 1.0 / (1.0 + math.exp(-(abs(reading - 1.0) * 6.0 - 3.0)))


def predictions(count: int, rng: random.Random) -> list[PredictionEvent]:
    """``count`` scored readings as prediction events."""
    events = []
    for _ in range(count):
        started = time.time_ns()
        value = score(rng.gauss(1.0, 0.3))
        label = "anomaly" if value > THRESHOLD else "normal"
        events.append(
            PredictionEvent(
                prediction_id=new_prediction_id(),
                timestamp_unix_nano=started,
                duration_nanos=time.time_ns() - started,
                model=MODEL,
                endpoint="on-device",
                protocol="edge",
                status=Status.OK,
                output=OutputSummary(label=label, score=value),
            )
        )
    return events


def main() -> None:
    """Score readings and record them in batches of 50."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sidecar", default="127.0.0.1:4555")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--per-second", type=float, default=200.0)
    args = parser.parse_args()
    rng = random.Random()
    sent = 0
    with grpc.insecure_channel(args.sidecar) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        while sent < args.count:
            batch = predictions(min(50, args.count - sent), rng)
            request = sidecar_pb2.RecordBatchRequest(events=[event_to_proto(e) for e in batch])
            ack = stub.RecordBatch(request, timeout=10)
            sent += ack.accepted
            time.sleep(len(batch) / args.per_second)
    print(f"recorded {sent} predictions; they are durable in the sidecar's spool")


if __name__ == "__main__":
    main()
