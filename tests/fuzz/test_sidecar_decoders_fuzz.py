"""Fuzzing the sidecar's decoders (RELIABILITY row 34, short tier).

The OIP proxy's field reader (protobuf's C parser) and the sidecar's own
protobuf field reader, the spool's record scanner and the shipper-state
decoder see random and mutated bytes: they raise nothing but their own errors,
return promptly, and never return a record whose checksum does not hold.
"""

from __future__ import annotations

import contextlib
import json

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from predtrace.oip.v2 import grpc_predict_v2_pb2 as pb
from predtrace.sidecar._oip_fields import id_field, read_fields
from predtrace.sidecar._otlp import OtlpJsonError, parse_json
from predtrace.sidecar._protowire import encode_varint
from predtrace.sidecar._shipstate import ShipState
from predtrace.sidecar.spool import encode_record, scan

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
names = st.text(max_size=40)


@FAST
@given(names, names, names, st.binary(max_size=512), st.integers(0, 64))
def test_the_oip_field_reader_agrees_with_protobuf_on_real_messages(
    model: str, version: str, request_id: str, raw: bytes, cut: int
) -> None:
    message = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    message.raw_input_contents.append(raw)
    message.inputs.add(name="x", datatype="FP32", shape=[1, 3]).contents.fp32_contents.extend(
        [1.0, 2.0, 3.0]
    )
    data = message.SerializeToString()
    assert read_fields(data) == (model, version, request_id)
    rewritten = data + id_field("assigned")
    assert pb.ModelInferRequest.FromString(rewritten).id == "assigned"
    assert read_fields(rewritten) == (model, version, "assigned")
    cut_short = read_fields(data[: max(0, len(data) - cut)])  # None when malformed
    assert cut_short is None or len(cut_short) == 3


@FAST
@given(st.binary(max_size=2048))
def test_the_oip_field_reader_raises_nothing_on_random_bytes(data: bytes) -> None:
    found = read_fields(data)
    assert found is None or len(found) == 3


def _tag(number: int, wire_type: int) -> bytes:
    return encode_varint(number << 3 | wire_type)


# Fields ModelInferRequest does not have (16 and up), of every wire type,
# groups (nested) included, and its id, name and version with the wrong wire
# type: protobuf skips them all.
_scalars = st.one_of(
    st.builds(
        lambda n, v: _tag(n, 0) + encode_varint(v), st.integers(16, 5000), st.integers(0, 2**64 - 1)
    ),
    st.builds(
        lambda n, v: _tag(n, 1) + v, st.integers(16, 5000), st.binary(min_size=8, max_size=8)
    ),
    st.builds(
        lambda n, v: _tag(n, 5) + v, st.integers(16, 5000), st.binary(min_size=4, max_size=4)
    ),
    st.builds(
        lambda n, v: _tag(n, 2) + encode_varint(len(v)) + v,
        st.integers(16, 5000),
        st.binary(max_size=40),
    ),
    st.builds(lambda n, v: _tag(n, 0) + encode_varint(v), st.integers(1, 3), st.integers(0, 300)),
)
_unknown = st.recursive(
    _scalars,
    lambda inner: st.builds(
        lambda n, body: _tag(n, 3) + b"".join(body) + _tag(n, 4),
        st.integers(16, 5000),
        st.lists(
            inner
            | st.builds(lambda v: _tag(3, 2) + b"\x01" + v, st.binary(min_size=1, max_size=1)),
            max_size=4,
        ),
    ),
    max_leaves=20,
)


@FAST
@given(names, names, names, st.lists(_unknown, max_size=12), st.integers(0, 12))
def test_the_oip_field_reader_agrees_with_protobuf_on_messages_with_unknown_fields(
    model: str, version: str, request_id: str, unknown: list[bytes], at: int
) -> None:
    message = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    message.inputs.add(name="x", datatype="FP32", shape=[1, 3]).contents.fp32_contents.extend(
        [1.0, 2.0, 3.0]
    )
    data = message.SerializeToString()
    data = b"".join(unknown[:at]) + data + b"".join(unknown[at:])
    parsed = pb.ModelInferRequest.FromString(data)
    assert read_fields(data) == (parsed.model_name, parsed.model_version, parsed.id)
    assert pb.ModelInferRequest.FromString(data + id_field("assigned")).id == "assigned"
    for cut in range(1, min(len(data), 16)):  # a cut message may be malformed, never an error
        found = read_fields(data[:-cut])
        assert found is None or len(found) == 3


@FAST
@given(st.lists(st.binary(max_size=200), max_size=20), st.binary(max_size=64), st.data())
def test_the_record_scanner_never_returns_a_damaged_record(
    payloads: list[bytes], noise: bytes, data: st.DataObject
) -> None:
    frames = bytearray(b"".join(encode_record(i + 1, i, p) for i, p in enumerate(payloads)))
    for _ in range(data.draw(st.integers(0, 5))):
        if frames:
            position = data.draw(st.integers(0, len(frames) - 1))
            frames[position] ^= data.draw(st.integers(1, 255))
    blob = bytes(frames) + noise
    result = scan(blob, expected_index=1, max_payload=256, final=True)
    originals = {i + 1: p for i, p in enumerate(payloads)}
    for record in result.records:
        assert originals.get(record.index) == record.payload
    assert result.valid_end <= len(blob)


@FAST
@given(st.binary(max_size=256))
def test_the_shipper_state_decoder_raises_only_value_error(data: bytes) -> None:
    with contextlib.suppress(ValueError):
        ShipState.decode(data)


def test_the_shipper_state_decoder_never_allocates_from_a_declared_size() -> None:
    with contextlib.suppress(ValueError):
        ShipState.decode(msgpack.packb([1, 1, 2**40, None]))


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=30,
)
_otlp_keys = st.sampled_from(
    ["resourceSpans", "scopeSpans", "spans", "links", "traceId", "spanId", "parentSpanId",
     "attributes", "name", "kind", "status", "startTimeUnixNano", "resource", "scope"]
)  # fmt: skip
_otlp_like = st.recursive(
    st.none() | st.integers() | st.text(max_size=34),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_otlp_keys, inner, max_size=4),
    max_leaves=40,
)


@FAST
@given(_json_values | _otlp_like)
def test_the_otlp_json_decoder_raises_only_its_own_error(document: object) -> None:
    body = json.dumps(document).encode()
    with contextlib.suppress(OtlpJsonError):
        parsed = parse_json(body)
        assert parsed.ByteSize() >= 0


@FAST
@given(st.binary(max_size=512))
def test_the_otlp_json_decoder_survives_random_bytes(data: bytes) -> None:
    with contextlib.suppress(OtlpJsonError):
        parse_json(data)
