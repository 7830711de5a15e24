"""The JSON of a request body: orjson's speed, ``json``'s values and canonical bytes.

The fingerprint covers the canonical form as Python's ``json`` writes it;
orjson must give the very same bytes (and read the same values), or take
the ``json`` path.
"""

from __future__ import annotations

import json
import math
import random
import struct
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from predtrace.middleware import _json_codec
from predtrace.middleware._json_codec import NOT_JSON, canonical_json, parse_json


def reference(value: object) -> bytes:
    """The canonical form by definition: Python's json, sorted keys, compact, UTF-8."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8", "surrogatepass")


_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text()
)
JSON_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(), inner, max_size=6),
    max_leaves=40,
)


@settings(max_examples=800, deadline=None)
@given(JSON_VALUES)
def test_the_canonical_form_is_json_s_for_any_value(value: Any) -> None:
    assert canonical_json(value) == reference(value)


@settings(max_examples=800, deadline=None)
@given(JSON_VALUES, st.sampled_from([", ", ",", " , "]), st.sampled_from([": ", ":"]))
def test_a_body_reads_as_json_loads_reads_it(value: Any, comma: str, colon: str) -> None:
    body = json.dumps(value, separators=(comma, colon), ensure_ascii=False).encode(
        "utf-8", "surrogatepass"
    )
    expected = json.loads(body)
    parsed = parse_json(body)
    # Equal as canonical bytes: NaN is not equal to itself as a value.
    assert reference(parsed) == reference(expected)
    assert type(parsed) is type(expected)


def test_every_float_magnitude_is_written_as_repr_writes_it() -> None:
    rng = random.Random(7)
    floats = [rng.random() * 10.0**e for e in range(-323, 308) for _ in range(8)]
    floats += [struct.unpack("d", struct.pack("Q", rng.getrandbits(64)))[0] for _ in range(20000)]
    floats = [x for x in floats if math.isfinite(x)]
    floats += [-x for x in floats] + [0.0, -0.0, 1e-5, 9.999e-05, 1e-4, 1e16, 5e-324]
    # The odd spellings are there to fix: orjson alone writes 1e-05 as 0.00001.
    assert orjson.dumps(floats, option=orjson.OPT_SORT_KEYS) != reference(floats)
    assert canonical_json(floats) == reference(floats)
    assert canonical_json({"x": floats, "note": "1e-7 and 0.00001 in a string stay"}) == reference(
        {"x": floats, "note": "1e-7 and 0.00001 in a string stay"}
    )


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b'{"big": 123456789012345678901234567890}', "an integer past 64 bits stays exact"),
        (b'{"x": NaN, "y": -Infinity}', "NaN and the infinities, as json reads them"),
        (b'{"s": "\\ud800"}', "a lone surrogate"),
        (b'\xef\xbb\xbf{"a": 1}', "a BOM"),
        ('{"a": "é"}'.encode("utf-16"), "UTF-16"),
        (b'{"a": 1e400}', "an overflow to infinity"),
        ("12".encode("utf-16-le"), "a number in UTF-16 (not a number and trailing NULs)"),
        ("3.5".encode("utf-32-le"), "a number in UTF-32"),
    ],
)
def test_what_orjson_reads_otherwise_is_read_by_json(body: bytes, why: str) -> None:
    expected = json.loads(body)
    assert reference(parse_json(body)) == reference(expected), why
    assert canonical_json(parse_json(body)) == reference(expected), why


def test_no_json_is_no_value() -> None:
    assert parse_json(b"") is NOT_JSON
    assert parse_json(b'{"a": 1} trailing') is NOT_JSON
    assert parse_json(b"\xff\xfe\x00") is NOT_JSON


def test_a_large_tensor_is_canonicalised_by_orjson_not_by_json(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The point of it all: a MB of floats is not encoded by ``json`` (slow, on the loop)."""
    rng = random.Random(1)
    value = {"inputs": [{"name": "x", "data": [rng.random() * 100 for _ in range(50_000)]}]}
    expected = reference(value)
    monkeypatch.setattr(_json_codec, "_C_ENCODER", None)
    monkeypatch.setattr(_json_codec, "_CANONICAL", _refuse)
    assert canonical_json(value) == expected
    assert parse_json(json.dumps(value).encode()) == value


def _refuse(value: object) -> str:
    raise AssertionError("took the json path")


def test_without_orjson_json_does_it_all(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_json_codec, "orjson", None)
    value = {"b": [1e-05, 1e-7, 2.5], "a": "é", "n": None, "big": 2**70}
    assert canonical_json(value) == reference(value)
    assert parse_json(reference(value)) == value
