"""Property tests of the batch codec (RELIABILITY row 17, row 34 short tier).

Round trips for any valid batch; for random and mutated bytes the decoder
raises nothing but WireError, returns promptly and keeps memory bounded.
"""

from __future__ import annotations

import contextlib
import gzip
import tracemalloc

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from predtrace.wire import (
    DecodeLimits,
    DeploymentRef,
    EventBatch,
    ModelRef,
    OutputSummary,
    PredictionEvent,
    Status,
    WireError,
    decode_batch,
    encode_batch,
    event_to_map,
)
from predtrace.wire._maps import _checked_event, _fast_event

text = st.text(max_size=40)
ids = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=64)
uint64 = st.integers(min_value=0, max_value=2**64 - 1)
finite = st.floats(allow_nan=False, allow_infinity=False)

models = st.builds(ModelRef, text, text, text, text, text, text)
outputs = st.one_of(
    st.none(),
    st.builds(OutputSummary, st.one_of(st.none(), text), st.one_of(st.none(), finite), st.none()),
)
events = st.builds(
    PredictionEvent,
    prediction_id=ids,
    # All zeros is OpenTelemetry's invalid id, read as absent (test_codec checks that).
    trace_id=st.one_of(st.just(b""), st.binary(min_size=16, max_size=16).filter(any)),
    span_id=st.one_of(st.just(b""), st.binary(min_size=8, max_size=8).filter(any)),
    timestamp_unix_nano=uint64,
    duration_nanos=uint64,
    model=models,
    additional_models=st.lists(models, max_size=3),
    deployment=st.builds(DeploymentRef, text, text, text, text, text, text, text),
    endpoint=text,
    protocol=text,
    status=st.sampled_from(Status),
    status_code=text,
    error_type=text,
    input_fingerprint=st.binary(max_size=32),
    output=outputs,
    features=st.dictionaries(text, finite, max_size=5),
    attributes=st.dictionaries(text, text, max_size=5),
    sampled=st.booleans(),
)
batches = st.builds(
    EventBatch,
    producer_id=ids,
    seq=st.integers(min_value=1, max_value=2**63 - 1),
    events=st.lists(events, max_size=8),
    batch_id=st.binary(max_size=16),
    created_at_unix_nano=uint64,
    prev_digest=st.binary(max_size=32),
)

SMALL = DecodeLimits(
    max_bytes=64 * 1024,
    max_decompressed_bytes=256 * 1024,
    max_events=100,
    max_str_len=4096,
    max_bin_len=4096,
    max_map_len=64,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches, st.booleans())
def test_any_valid_batch_round_trips(batch: EventBatch, compress: bool) -> None:
    decoded = decode_batch(encode_batch(batch, compress=compress))
    assert decoded.rejected == ()
    assert decoded.batch == batch


def _decode_only_wire_errors(data: bytes) -> None:
    tracemalloc.start()
    try:
        with contextlib.suppress(WireError):
            decode_batch(data, limits=SMALL)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Bounded by the limits, not by what the bytes claim.
    assert peak < 16 * SMALL.max_decompressed_bytes


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2048))
@example(b"\x1f\x8b")
@example(b"\xdf\xff\xff\xff\xff")
@example(b"\x91" * 5000)
def test_random_bytes_raise_only_wire_error(data: bytes) -> None:
    _decode_only_wire_errors(data)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches, st.data(), st.booleans())
def test_mutated_batches_raise_only_wire_error(
    batch: EventBatch, data: st.DataObject, compress: bool
) -> None:
    body = bytearray(encode_batch(batch))
    for _ in range(data.draw(st.integers(min_value=1, max_value=8))):
        if not body:
            break
        pos = data.draw(st.integers(min_value=0, max_value=len(body) - 1))
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            body[pos] ^= 1 << data.draw(st.integers(min_value=0, max_value=7))
        elif action == "cut":
            del body[pos:]
        else:
            body[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    payload = gzip.compress(bytes(body)) if compress else bytes(body)
    _decode_only_wire_errors(payload)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events)
def test_fast_and_checked_event_paths_agree(event: PredictionEvent) -> None:
    raw = event_to_map(event)
    fast = _fast_event(raw, SMALL)
    checked = _checked_event(raw, SMALL)
    assert checked == event
    assert fast is None or fast == checked
