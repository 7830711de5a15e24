"""Response-side helpers: bounded capture, served model, output summary."""

from __future__ import annotations

import gzip
import json
import tracemalloc
import zlib

import pytest

from predtrace.middleware._outputs import (
    ResponseCapture,
    _top_level_strings,
    json_encoding,
    response_id,
    served_model,
    summarise,
)
from predtrace.wire import OutputSummary


def test_capture_keeps_chunks_up_to_the_bound_then_nothing() -> None:
    capture = ResponseCapture(limit=10)
    capture.add(b'{"a":')
    capture.add(b"1}")
    assert capture.parsed() == {"a": 1}
    capture.add(b"x" * 10)
    assert capture.overflowed and capture.parsed() is None


def test_capture_of_invalid_json_gives_none() -> None:
    capture = ResponseCapture(limit=100)
    capture.add(b"<html>")
    assert capture.parsed() is None


ANSWER = {"model_name": "churn", "model_version": "7", "outputs": [{"name": "s", "data": [0.9]}]}


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("compress", [gzip.compress, zlib.compress], ids=["gzip", "deflate"])
def test_a_compressed_body_is_decoded_as_its_chunks_pass(compress: object) -> None:
    raw = json.dumps({**ANSWER, "pad": "p" * 5000}).encode()
    capture = ResponseCapture(limit=64 * 1024, compressed=True)
    for chunk in _chunks(compress(raw), 7):  # type: ignore[operator]
        capture.add(chunk)
    assert capture.parsed() == json.loads(raw)
    assert capture.served() == ("churn", "7")  # from the decoded head


def test_a_compressed_body_past_the_bound_keeps_the_decoded_head_only() -> None:
    raw = json.dumps({**ANSWER, "pad": "p" * 50_000}).encode()
    capture = ResponseCapture(limit=1024, compressed=True)
    for chunk in _chunks(gzip.compress(raw), 100):
        capture.add(chunk)
    assert capture.overflowed and capture.parsed() is None
    assert capture.served() == ("churn", "7")


def test_a_gzip_bomb_is_decoded_no_further_than_the_bound() -> None:
    # 64 MiB of JSON-looking zeros in some 64 KiB of gzip: decoding it whole
    # would take 64 MiB (16 MiB a chunk); the capture stops one byte past its bound.
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b"0" * (1 << 20)
    parts = [packer.compress(b"["), *(packer.compress(block) for _ in range(64)), packer.flush()]
    bomb = b"".join(parts)
    capture = ResponseCapture(limit=64 * 1024, compressed=True)
    tracemalloc.start()
    try:
        for chunk in _chunks(bomb, 16 * 1024):
            capture.add(chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * 1024 * 1024
    assert capture.overflowed and capture.parsed() is None


def test_a_body_that_is_not_what_its_encoding_says_gives_nothing_and_no_error() -> None:
    capture = ResponseCapture(limit=1024, compressed=True)
    capture.add(json.dumps(ANSWER).encode())  # plain JSON under content-encoding: gzip
    capture.add(b"more")
    assert capture.parsed() is None and capture.served() is None


def test_the_content_coding_of_a_json_response_is_read_with_its_type() -> None:
    plain = [(b"content-type", b"application/json")]
    assert json_encoding(plain) == b""
    assert json_encoding([*plain, (b"content-encoding", b"identity")]) == b""
    assert json_encoding([(b"content-encoding", b" GZip "), *plain]) == b"gzip"
    assert json_encoding([*plain, (b"content-encoding", b"br")]) == b"br"
    assert json_encoding([(b"content-type", b"text/plain"), (b"content-encoding", b"gzip")]) is None
    assert json_encoding([]) is None


def test_json_content_types_are_recognised() -> None:
    assert json_encoding([(b"content-type", b"application/json; charset=utf-8")]) == b""
    assert json_encoding([(b"content-type", b"application/problem+json")]) == b""
    assert json_encoding([(b"content-type", b"text/event-stream")]) is None


def test_served_model_names_lose_control_characters_and_are_bounded() -> None:
    answer = {"model_name": "a\x00b", "model_version": "v" * 1000}
    assert served_model(answer) == ("ab", "v" * 256)


def test_served_model_and_response_id_are_read_from_oip_answers() -> None:
    answer = {"model_name": "iris", "model_version": "4", "id": "r1"}
    assert served_model(answer) == ("iris", "4")
    assert response_id(answer) == "r1"
    assert served_model({"model_version": 4}) == ("", "")
    assert served_model([1]) == ("", "")


def test_oip_summary_picks_label_score_and_value_by_name_and_type() -> None:
    answer = {
        "outputs": [
            {"name": "predicted_label", "data": ["cat"]},
            {"name": "probability", "data": [[0.9, 0.1]]},
            {"name": "embedding", "data": [0.5, 0.7]},
        ]
    }
    assert summarise(answer, "oip-v2-rest") == OutputSummary(label="cat", score=0.9, value=0.5)
    assert summarise({"outputs": [{"name": "x", "data": []}]}, "oip-v2-rest") is None


def test_summary_bounds_labels_and_ignores_non_finite_numbers() -> None:
    # A string longer than a class label is generated text: never exported.
    long_label = {"outputs": [{"name": "label", "data": ["x" * 10_000]}]}
    assert summarise(long_label, "oip-v2-rest") is None
    scored = {"outputs": [{"name": "label", "data": ["x" * 65]}, {"name": "p", "data": [0.5]}]}
    assert summarise(scored, "oip-v2-rest") == OutputSummary(value=0.5)
    assert summarise({"outputs": [{"name": "v", "data": [float("inf")]}]}, "oip-v2-rest") is None


def test_kserve_summary_uses_the_first_prediction() -> None:
    assert summarise({"predictions": [[3.5, 1.0]]}, "kserve-v1") == OutputSummary(value=3.5)
    assert summarise({"predictions": ["spam"]}, "kserve-v1") == OutputSummary(label="spam")
    assert summarise({"predictions": []}, "kserve-v1") is None
    assert summarise({"outputs": []}, "http") is None


@pytest.mark.parametrize(
    ("body", "served"),
    [
        (b'{"model_name":"iris","model_version":"7","outputs":[]}', ("iris", "7")),
        (b' {"id": "r", "model_version" : "7", "model_name": "iris"}', ("iris", "7")),
        (
            b'{"outputs":[{"model_version":"x"}],"model_name":"iris","model_version":"7"}',
            ("iris", "7"),
        ),
        (b'{"parameters":{"model_version":"nested"},"model_name":"iris"}', ("iris", "")),
        (b'{"model_name":"ir\\"is\\u00e9","model_version":"7"}', ('ir"is\u00e9', "7")),
        (b'{"a":"}","model_version":"9"}', ("", "9")),
        (b"{}", ("", "")),
        (b'{"model_version":7}', None),  # not a string: the parser decides
        (b'{"a":"model_name","model_name":"x"}', None),  # a value that looks like a key
        (b"[1, 2]", None),
        (b'{"model_name":"iris", "outputs": [', None),  # cut off before the end
    ],
)
def test_the_served_model_is_read_from_the_head_without_parsing(
    body: bytes, served: tuple[str, str] | None
) -> None:
    members = _top_level_strings(body, (b"model_name", b"model_version"))
    if members is None:
        assert served is None
    else:
        assert (members.get(b"model_name", ""), members.get(b"model_version", "")) == served
    if served is not None and body.strip().endswith(b"}"):
        assert served_model(json.loads(body)) == served  # what the full parse says


def test_the_served_model_is_read_even_past_the_capture_bound() -> None:
    data = b"1," * 50_000
    body = b'{"model_name":"iris","model_version":"7","outputs":[{"data":[' + data + b"1]}]}"
    capture = ResponseCapture(64 * 1024)
    for start in range(0, len(body), 1000):  # as a server streams it, in chunks
        capture.add(body[start : start + 1000])
    assert capture.overflowed and capture.parsed() is None
    assert capture.served() == ("iris", "7")


def test_a_small_body_in_another_layout_is_parsed_whole_instead_of_scanned() -> None:
    capture = ResponseCapture(1 << 20)
    capture.add(b'{"id":"r","model_name":"iris","model_version":"7"}')
    assert capture.served() is None  # the caller parses it: cheaper for a small body
    assert served_model(capture.parsed()) == ("iris", "7")


@pytest.mark.parametrize(
    ("body", "served"),
    [
        (b'{"model_name":"iris","model_version":"7","id":"r","outputs":[]}', ("iris", "7")),
        (b' {\n  "model_name" : "ir\x07is",\n  "model_version": "7"}', ("iris", "7")),
        (b'{"model_name":"caf\xc3\xa9","model_version":"7"}', ("caf\u00e9", "7")),
        (b'{"model_name":"caf\xc3","model_version":"7"}', None),  # not UTF-8: parse
        (b'{"model_name":"a\\"b","model_version":"7"}', None),  # escaped: parse
        (b'{"model_version":"7","model_name":"iris"}', None),  # other order, small: parse
    ],
)
def test_the_usual_layout_is_read_from_its_first_bytes_whatever_the_size(
    body: bytes, served: tuple[str, str] | None
) -> None:
    capture = ResponseCapture(1 << 20)
    capture.add(body)
    assert capture.served() == served


@pytest.mark.parametrize(
    "text",
    [b"x" * 3000 + b"]}]}" + b"y" * 2000, b'\\"' * 20_000],
    ids=["brackets-in-a-cut-string", "escaped-quotes"],
)
def test_a_string_cut_off_by_the_head_makes_the_scan_unsure(text: bytes) -> None:
    body = (
        b'{"outputs":[{"name":"o","datatype":"BYTES","shape":[1],"data":["'
        + text
        + b'"]}],"model_name":"m","model_version":"7"}'
    )
    capture = ResponseCapture(1 << 20)
    capture.add(body)
    assert capture.served() is None  # never a guess from brackets inside a string
    assert served_model(capture.parsed()) == ("m", "7")
