"""The committed generated protobuf code matches the .proto sources."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from predtrace.oip.v2 import grpc_predict_v2_pb2 as oip

ROOT = Path(__file__).resolve().parents[3]


def test_regenerating_changes_nothing() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_oip_service_has_the_published_names_and_numbers() -> None:
    service = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert "ModelInfer" in service.methods_by_name
    fields = {f.name: f.number for f in oip.ModelInferRequest.DESCRIPTOR.fields}
    assert fields["model_name"] == 1
    assert fields["model_version"] == 2
    assert fields["id"] == 3
    assert fields["raw_input_contents"] == 7
    out = {f.name: f.number for f in oip.ModelInferResponse.DESCRIPTOR.fields}
    assert out["raw_output_contents"] == 6
