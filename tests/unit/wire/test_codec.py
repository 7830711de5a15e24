"""The msgpack batch codec: round trips, partial success, bounds, schema drift."""

from __future__ import annotations

import dataclasses
import gzip
import math
import tracemalloc
from collections.abc import Callable

import msgpack
import pytest

from predtrace.v1 import batch_pb2, event_pb2
from predtrace.wire import (
    DecodeLimits,
    DeploymentRef,
    EventBatch,
    IngestAck,
    InvalidIdError,
    ModelRef,
    OutputSummary,
    PredictionEvent,
    Rejection,
    WireError,
    WireTooLargeError,
    batch_digest,
    decode_ack,
    decode_batch,
    decode_batch_raw,
    encode_ack,
    encode_batch,
    encode_events_payload,
    event_from_map,
    event_problem,
    event_rejection,
    event_to_map,
    pack_events,
    parse_prediction_id,
    plain_event_map,
    unpack_event_maps,
)
from predtrace.wire._problems import PREDICTION_ID_RULE


def _raw(batch: EventBatch) -> dict[int, object]:
    return msgpack.unpackb(encode_batch(batch), strict_map_key=False)  # type: ignore[no-any-return]


def _pack(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def test_round_trip_keeps_every_field(batch: EventBatch) -> None:
    decoded = decode_batch(encode_batch(batch))
    assert decoded.batch == batch
    assert decoded.rejected == ()


def test_gzip_round_trip_and_digest_covers_uncompressed_bytes(batch: EventBatch) -> None:
    body = encode_batch(batch, compress=True)
    assert body[:2] == b"\x1f\x8b"
    assert gzip.decompress(body) == encode_batch(batch)
    decoded = decode_batch(body)
    assert decoded.batch == batch
    assert decoded.digest == batch_digest(encode_events_payload(batch))


def test_minimal_event_encodes_only_the_id() -> None:
    assert event_to_map(PredictionEvent(prediction_id="p1")) == {1: "p1"}


def test_keys_are_the_proto_field_numbers(batch: EventBatch) -> None:
    raw = _raw(batch)
    numbers = {f.name: f.number for f in batch_pb2.EventBatch.DESCRIPTOR.fields}
    assert {numbers["producer_id"], numbers["seq"], numbers["events"]} <= set(raw)
    event_numbers = {f.number for f in event_pb2.PredictionEvent.DESCRIPTOR.fields}
    events = raw[numbers["events"]]
    assert isinstance(events, list)
    assert set(events[0]) <= event_numbers


def test_bad_event_is_rejected_alone_and_the_rest_kept(batch: EventBatch) -> None:
    raw = _raw(batch)
    events = raw[6]
    assert isinstance(events, list)
    events[1][2] = b"short"  # trace id of the wrong length
    events.append({2: b"x" * 16})  # no prediction id
    events.append("not a map")
    decoded = decode_batch(_pack(raw))
    assert [e.prediction_id for e in decoded.batch.events] == [
        batch.events[0].prediction_id,
        batch.events[2].prediction_id,
    ]
    assert [r.index for r in decoded.rejected] == [1, 3, 4]
    assert "trace_id" in decoded.rejected[0].reason
    assert decoded.rejected[0].prediction_id == batch.events[1].prediction_id
    assert "prediction_id is required" in decoded.rejected[1].reason


def test_raw_decode_checks_the_header_and_leaves_events_as_maps(batch: EventBatch) -> None:
    raw = _raw(batch)
    raw[6].append("not a map")
    body = gzip.compress(_pack(raw))
    decoded = decode_batch_raw(body)
    assert (decoded.producer_id, decoded.seq) == (batch.producer_id, batch.seq)
    assert decoded.digest == decode_batch(body).digest
    assert [event_from_map(e) for e in decoded.events[:-1]] == batch.events
    assert decoded.events[-1] == "not a map"
    with pytest.raises(WireError, match="seq"):
        decode_batch_raw(_pack({**raw, 2: 0}))


def test_event_rejection_names_the_id_when_there_is_one() -> None:
    exc = WireError("event.trace_id must be 16 or 0 bytes")
    assert event_rejection(3, {1: "p-1"}, exc).prediction_id == "p-1"
    assert event_rejection(4, {1: 7}, exc).prediction_id == ""
    assert event_rejection(5, "not a map", exc).index == 5


def test_unknown_keys_are_ignored_and_newer_minor_accepted(batch: EventBatch) -> None:
    raw = _raw(batch)
    raw[0] = [1, 7]
    raw[99] = {"future": ["field"]}
    events = raw[6]
    assert isinstance(events, list)
    events[0][77] = [1, 2, 3]
    decoded = decode_batch(_pack(raw))
    assert decoded.batch.events == batch.events


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda r: r.pop(0), "missing format version"),
        (lambda r: r.__setitem__(0, [2, 0]), "unsupported format major version 2"),
        (lambda r: r.__setitem__(0, "1.0"), "format version must be"),
        (lambda r: r.pop(1), "producer_id is required"),
        (lambda r: r.__setitem__(1, 5), "producer_id must be a string"),
        (lambda r: r.__setitem__(2, 0), "seq must be a positive integer"),
        (lambda r: r.__setitem__(2, -1), "seq must be a positive integer"),
        (lambda r: r.__setitem__(2, True), "seq must be a positive integer"),
        (lambda r: r.__setitem__(6, {}), "events must be an array"),
        (lambda r: r.__setitem__(5, "digest"), "prev_digest must be bytes"),
    ],
)
def test_malformed_batch_is_refused_with_a_reason(
    batch: EventBatch, mutate: object, reason: str
) -> None:
    raw = _raw(batch)
    mutate(raw)  # type: ignore[operator]
    with pytest.raises(WireError, match=reason):
        decode_batch(_pack(raw))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "malformed msgpack"),
        (b"\xc1", "malformed msgpack"),
        (_pack([1, 2]), "batch must be a msgpack map"),
        (_pack({0: [1, 0], 1: "p", 2: 1}) + b"\x00", "trailing bytes"),
        (_pack({0: [1, 0], 1: "p", 2: 1})[:-1], "malformed msgpack"),
    ],
)
def test_malformed_bytes_raise_wire_error_only(data: bytes, reason: str) -> None:
    with pytest.raises(WireError, match=reason):
        decode_batch(data)


def test_huge_declared_lengths_are_refused_before_allocation() -> None:
    # A str header claiming 4 GiB followed by nothing.
    for header in (b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff"):
        tracemalloc.start()
        try:
            with pytest.raises(WireError):
                decode_batch(header)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 1024 * 1024


def test_deep_nesting_is_refused() -> None:
    deep = b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(WireError):
        decode_batch(deep)


def test_string_over_the_limit_is_refused() -> None:
    limits = DecodeLimits(max_str_len=100)
    with pytest.raises(WireError):
        decode_batch(_pack({0: [1, 0], 1: "p" * 101, 2: 1}), limits=limits)


def test_too_many_events_is_refused(make_event: Callable[[int], PredictionEvent]) -> None:
    body = encode_batch(EventBatch("p", 1, [make_event(i) for i in range(11)]))
    # The msgpack parser refuses the array header before building 11 events.
    with pytest.raises(WireError, match=r"11 exceeds max_array_len\(10\)"):
        decode_batch(body, limits=DecodeLimits(max_events=10, max_map_len=8))
    # With maps allowed larger than the event cap, the codec's own check says it.
    with pytest.raises(WireTooLargeError, match="more than 10 events"):
        decode_batch(body, limits=DecodeLimits(max_events=10, max_map_len=64))


def test_oversized_body_is_too_large_before_decoding(batch: EventBatch) -> None:
    body = encode_batch(batch)
    with pytest.raises(WireTooLargeError, match="body exceeds"):
        decode_batch(body, limits=DecodeLimits(max_bytes=len(body) - 1))


def test_gzip_bomb_is_stopped_at_the_decompressed_limit() -> None:
    bomb = gzip.compress(b"\x00" * (50 * 1024 * 1024))
    assert len(bomb) < 100_000
    tracemalloc.start()
    try:
        with pytest.raises(WireTooLargeError, match="decompressed body exceeds"):
            decode_batch(bomb, limits=DecodeLimits(max_decompressed_bytes=1024 * 1024))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024


def test_truncated_and_corrupt_gzip_are_wire_errors(batch: EventBatch) -> None:
    body = encode_batch(batch, compress=True)
    with pytest.raises(WireError, match="truncated gzip"):
        decode_batch(body[: len(body) // 2])
    with pytest.raises(WireError, match="invalid gzip"):
        decode_batch(body[:10] + b"\xff" * 20)
    for tail in (b"junk", body):  # junk, or a second gzip member
        with pytest.raises(WireError, match="trailing bytes after the gzip data"):
            decode_batch(body + tail)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=repr)
def test_a_non_finite_feature_is_left_out_and_its_event_kept(bad: float) -> None:
    # NaN marks a missing value in ML data: it must not cost the event, nor
    # reach a store that keeps features as JSON.
    features = {"x": bad, "age": 42.0, "n": 3}
    raw = {0: [1, 0], 1: "p", 2: 1, 6: [{1: "a", 16: features}, {1: "b"}]}
    decoded = decode_batch(_pack(raw))
    assert decoded.rejected == ()
    assert [e.prediction_id for e in decoded.batch.events] == ["a", "b"]
    assert decoded.batch.events[0].features == {"age": 42.0, "n": 3.0}
    assert event_from_map({1: "a", 16: {"x": bad}}).features == {}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=repr)
def test_a_non_finite_output_number_is_left_unset_and_its_event_kept(bad: float) -> None:
    raw = {0: [1, 0], 1: "p", 2: 1, 6: [{1: "a", 15: {1: "churn", 2: bad, 3: bad}}]}
    decoded = decode_batch(_pack(raw))
    assert decoded.rejected == ()
    [event] = decoded.batch.events
    assert event.output == OutputSummary(label="churn", score=None, value=None)
    assert event_from_map({1: "a", 15: {2: 0.5, 3: bad}}).output == OutputSummary(score=0.5)


@pytest.mark.parametrize("value", [True, "1", b"1", None], ids=repr)
def test_a_feature_value_that_is_not_a_number_still_rejects_its_event(value: object) -> None:
    raw = {0: [1, 0], 1: "p", 2: 1, 6: [{1: "a", 16: {"x": value}}, {1: "b"}]}
    decoded = decode_batch(_pack(raw))
    assert [e.prediction_id for e in decoded.batch.events] == ["b"]
    assert [r.reason for r in decoded.rejected] == ["features values must be numbers"]


def test_ack_round_trip() -> None:
    ack = IngestAck("edge-7", 9, 510, (Rejection(3, "bad trace_id", "p3"),), duplicate=True)
    assert decode_ack(encode_ack(ack)) == ack


def test_ack_with_wrong_types_is_a_wire_error() -> None:
    with pytest.raises(WireError, match=r"ack\.accepted"):
        decode_ack(_pack({1: "p", 2: 1, 3: "many"}))


def _text_fields_of_every_kind() -> list[tuple[str, Callable[[str], PredictionEvent]]]:
    """Every text field an event carries, each as a way to build an event with it set."""
    cases: list[tuple[str, Callable[[str], PredictionEvent]]] = []
    for f in dataclasses.fields(PredictionEvent):
        if f.type in ("str", str) and f.name != "prediction_id":
            cases.append((f.name, lambda v, n=f.name: PredictionEvent("p", **{n: v})))
    for f in dataclasses.fields(ModelRef):
        cases.append(
            (f"model.{f.name}", lambda v, n=f.name: PredictionEvent("p", model=ModelRef(**{n: v})))
        )
        cases.append(
            (
                f"additional_models[].{f.name}",
                lambda v, n=f.name: PredictionEvent("p", additional_models=[ModelRef(**{n: v})]),
            )
        )
    for f in dataclasses.fields(DeploymentRef):
        cases.append(
            (
                f"deployment.{f.name}",
                lambda v, n=f.name: PredictionEvent("p", deployment=DeploymentRef(**{n: v})),
            )
        )
    cases.append(("output.label", lambda v: PredictionEvent("p", output=OutputSummary(label=v))))
    cases.append(("features key", lambda v: PredictionEvent("p", features={v: 1.0})))
    cases.append(("attributes key", lambda v: PredictionEvent("p", attributes={v: "x"})))
    cases.append(("attributes value", lambda v: PredictionEvent("p", attributes={"k": v})))
    return cases


TEXT_FIELDS = _text_fields_of_every_kind()


@pytest.mark.parametrize("build", [b for _, b in TEXT_FIELDS], ids=[n for n, _ in TEXT_FIELDS])
def test_event_problem_sees_every_text_field_the_decoder_bounds(
    build: Callable[[str], PredictionEvent],
) -> None:
    # An event event_problem passes must decode at the collector: one text over
    # the bound would otherwise cost the whole batch it travels in.
    assert event_problem(build("x" * 70_000)) is not None
    assert event_problem(build("a\x00b")) is not None
    ok = build("fine")
    assert event_problem(ok) is None
    decode_batch(encode_batch(EventBatch("p", 1, [ok])))


@pytest.mark.parametrize(
    "output",
    [
        OutputSummary(score=math.nan),
        OutputSummary(score=math.inf),
        OutputSummary(value=-math.inf),
        OutputSummary(score=math.nan, value=-math.inf),
    ],
    ids=repr,
)
def test_a_non_finite_output_built_by_code_is_stored_unset_not_refused(
    output: OutputSummary,
) -> None:
    # event_problem says what the collector would refuse: it refuses nothing
    # here, it stores the event with the number unset.
    event = PredictionEvent("p", output=dataclasses.replace(output, label="churn"))
    assert event_problem(event) is None
    decoded = decode_batch(encode_batch(EventBatch("p", 1, [event])))
    assert decoded.rejected == ()
    assert [e.output for e in decoded.batch.events] == [OutputSummary(label="churn")]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=repr)
def test_a_non_finite_feature_built_by_code_is_stored_without_it_not_refused(
    value: float,
) -> None:
    event = PredictionEvent("p", features={"f": value, "g": 1.5})
    assert event_problem(event) is None
    decoded = decode_batch(encode_batch(EventBatch("p", 1, [event])))
    assert decoded.rejected == ()
    assert [e.features for e in decoded.batch.events] == [{"g": 1.5}]


NOT_PACKABLE = [10**400, 2**64, -(2**63) - 1, True, "1"]


@pytest.mark.parametrize("value", NOT_PACKABLE, ids=repr)
def test_event_problem_refuses_feature_values_msgpack_cannot_carry(value: object) -> None:
    # Acknowledged, such an event would fail its encoding (OverflowError for
    # an int past 64 bits) or be refused by the collector's decoder.
    event = PredictionEvent("p", features={"f": value})  # type: ignore[dict-item]
    assert event_problem(event) == "features values must be floats or 64-bit integers"
    assert (
        event_problem(PredictionEvent("p", features={"f": 2}, output=OutputSummary(score=1)))
        is None
    )
    edges = {"lo": -(2**63), "hi": 2**64 - 1}
    ok = PredictionEvent("p", features=edges, output=OutputSummary(score=2**64 - 1))  # type: ignore[arg-type]
    assert event_problem(ok) is None
    assert decode_batch(encode_batch(EventBatch("p", 1, [ok]))).batch.events[0].features == {
        "lo": float(-(2**63)),
        "hi": float(2**64 - 1),
    }


@pytest.mark.parametrize("value", NOT_PACKABLE, ids=repr)
def test_event_problem_refuses_output_numbers_msgpack_cannot_carry(value: object) -> None:
    for output in (OutputSummary(score=value), OutputSummary(value=value)):  # type: ignore[arg-type]
        problem = event_problem(PredictionEvent("p", output=output))
        assert problem is not None
        assert problem.startswith("output.")
        assert problem.endswith("must be a float or a 64-bit integer")


@pytest.mark.parametrize("extra", [0, "", {}, None, False], ids=repr)
def test_additional_models_other_than_an_array_are_refused_on_every_path(extra: object) -> None:
    # The fast paths once read a falsy value as "none" where the checked path refuses it.
    raw = {1: "p1", 7: extra}
    assert not plain_event_map(raw)
    with pytest.raises(WireError, match="additional_models must be an array"):
        event_from_map(raw)
    assert event_from_map({1: "p1", 7: []}).additional_models == []


def test_a_nil_output_label_is_refused_on_every_path() -> None:
    raw = {1: "p1", 15: {1: None}}
    assert not plain_event_map(raw)
    with pytest.raises(WireError, match=r"output\.label must be a string"):
        event_from_map(raw)


@pytest.mark.parametrize("header", [b"\xdd\xff\xff\xff\xff", b"\xdc\x27\x11", b"\x9f"])
def test_packed_events_over_the_count_are_refused_from_the_array_header(header: bytes) -> None:
    # Nothing follows the header: the refusal cannot have come from building items.
    with pytest.raises(WireTooLargeError, match="more than 10 packed events"):
        unpack_event_maps(header, limits=DecodeLimits(max_events=10))
    with pytest.raises(WireTooLargeError, match="more than 10000 packed events"):
        unpack_event_maps(b"\xdc\x27\x11", limits=DecodeLimits(max_events=10_000))  # 10,001


@pytest.mark.parametrize("data", [b"\x80", b"\xc0", b"\xa1x", b"", b"\xdc\x00"])
def test_packed_events_that_are_not_an_array_are_refused_unread(data: bytes) -> None:
    with pytest.raises(WireError, match="must be a msgpack array"):
        unpack_event_maps(data)


@pytest.mark.parametrize("empty", [[], {}], ids=["arrays", "maps"])
def test_a_body_of_empty_containers_is_refused_within_a_bounded_cost(empty: object) -> None:
    # One byte on the wire, a dict or list in memory: the bound stops the decode early.
    body = _pack({0: [1, 0], 1: "p", 2: 1, 6: [[empty] * 1000] * 2000})
    tracemalloc.start()
    try:
        with pytest.raises(WireError, match="one map or array per 2 bytes"):
            decode_batch(body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 40 * len(body)


@pytest.mark.parametrize(
    "make",
    [
        lambda i: PredictionEvent(chr(ord("a") + i % 26)),
        lambda i: PredictionEvent(chr(ord("a") + i % 26), output=OutputSummary()),  # {} output
        lambda i: PredictionEvent("x", additional_models=[ModelRef(role="r")] * 5),
    ],
    ids=["id only", "id and empty output", "minimal additional models"],
)
def test_the_densest_events_event_problem_passes_are_within_the_container_bound(
    make: Callable[[int], PredictionEvent],
) -> None:
    events = [make(i) for i in range(10_000)]
    assert all(event_problem(e) is None for e in events)
    decoded = decode_batch(encode_batch(EventBatch("p", 1, events)))
    assert len(decoded.batch.events) == 10_000
    assert decoded.rejected == ()
    assert len(unpack_event_maps(pack_events(events))) == 10_000


def test_an_empty_additional_model_is_refused_before_it_can_sink_a_batch() -> None:
    # One byte each: 1,000 of them in one event would make its whole batch
    # fail the decoder's containers-per-byte bound at the collector.
    event = PredictionEvent("p", additional_models=[ModelRef()] * 1000)
    assert event_problem(event) == "additional_models[] must not be empty"
    with pytest.raises(WireError, match="one map or array per 2 bytes"):
        decode_batch(encode_batch(EventBatch("p", 1, [event])))


@pytest.mark.parametrize("prediction_id", ["", "x" * 257])
def test_event_problem_refuses_a_prediction_id_the_decoder_would_refuse(
    prediction_id: str,
) -> None:
    # One rule for every source that builds events (OTLP spans, code): the
    # decoder refuses such an id, so acknowledging it would lose it.
    assert event_problem(PredictionEvent(prediction_id)) == (
        "prediction_id must be 1 to 256 characters"
    )
    assert event_problem(PredictionEvent("x" * 256)) is None


_UUID = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
UNFINDABLE_IDS = [
    "order 42",
    "  padded",
    "padded ",
    f" {_UUID}",
    "tab\tid",
    "line\nbreak",
    "ctl\x01id",
    "del\x7fid",
    "café-7",
    "ü" * 10,
    "nb\u00a0sp",
    "emoji-\U0001f600",
]
FINDABLE_IDS = [
    _UUID,
    _UUID.upper(),
    _UUID.replace("-", ""),
    f"urn:uuid:{_UUID}",
    f"{{{_UUID}}}",
    "req-42/a",
    "a/b?c#d",
    "!",
    "~" * 256,
]


def _lookup_candidates(typed: str) -> set[str]:
    """The ids the query API looks for when a person types ``typed`` (collector _api)."""
    given = typed.strip()
    try:
        return {given, parse_prediction_id(given)}
    except InvalidIdError:
        return set()


@pytest.mark.parametrize("prediction_id", UNFINDABLE_IDS, ids=repr)
def test_event_problem_refuses_an_id_the_query_api_could_never_look_up(
    prediction_id: str,
) -> None:
    # Acknowledged and stored, `predtrace trace <id>` could never find it.
    assert prediction_id not in _lookup_candidates(prediction_id)
    assert event_problem(PredictionEvent(prediction_id)) == PREDICTION_ID_RULE
    assert PREDICTION_ID_RULE == (
        "prediction_id must be a UUID or 1-256 printable ASCII characters without spaces"
    )


@pytest.mark.parametrize("prediction_id", FINDABLE_IDS, ids=repr)
def test_event_problem_keeps_every_id_the_query_api_looks_up_as_sent(
    prediction_id: str,
) -> None:
    assert prediction_id in _lookup_candidates(prediction_id)
    assert event_problem(PredictionEvent(prediction_id)) is None
    raw = {1: prediction_id}
    assert plain_event_map(raw)
    assert event_from_map(raw).prediction_id == prediction_id  # stored as sent


@pytest.mark.parametrize("prediction_id", UNFINDABLE_IDS, ids=repr)
def test_a_plain_map_with_an_unfindable_id_takes_the_path_that_refuses_it(
    prediction_id: str,
) -> None:
    # The fast paths (the sidecar's plain maps, the collector's rows) share
    # plain_scalars: they must not keep what event_problem refuses.
    raw = {1: prediction_id, 16: {"f": 1.0}}
    assert not plain_event_map(raw)
    event = event_from_map(raw)  # the decoder keeps the id as sent ...
    assert event.prediction_id == prediction_id
    assert event_problem(event) == PREDICTION_ID_RULE  # ... the store's rule refuses it


@pytest.mark.parametrize(
    ("trace_id", "span_id"),
    [(bytes(16), bytes(8)), (bytes(16), b"s" * 8), (b"t" * 16, bytes(8))],
    ids=["both", "trace", "span"],
)
def test_opentelemetrys_invalid_all_zero_ids_are_read_as_absent_on_every_path(
    trace_id: bytes, span_id: bytes
) -> None:
    # A trace id of zeros names no trace: stored, it was shown but could never
    # be looked up (``predtrace trace`` refuses it). The fast paths leave such
    # an event to the precise one, which reads it as no id.
    raw = {1: "p1", 2: trace_id, 3: span_id}
    assert not plain_event_map(raw)
    event = event_from_map(raw)
    assert event.trace_id == (b"" if trace_id == bytes(16) else trace_id)
    assert event.span_id == (b"" if span_id == bytes(8) else span_id)
    decoded = decode_batch(
        encode_batch(EventBatch("edge", 1, [PredictionEvent("p1", trace_id, span_id)]))
    )
    assert decoded.batch.events == [event]
