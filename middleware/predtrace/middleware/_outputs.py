"""The response side of a prediction: the served model and a bounded output summary.

Read from a bounded copy of a JSON response body (the response itself streams
on untouched; a gzip or deflate body is decoded into that copy, never past its
bound): OIP v2 ``model_name``/``model_version``/``id`` and the first
outputs, KServe v1 ``predictions``. Only a label, a score and a value leave,
never the output tensor.

A string is taken as the label only when it looks like a class label: at most
64 characters (``MAX_LABEL``). A longer one is generated or echoed text (a
text model's answer may carry the request's text, personal data included):
no label is exported then, though a score or value still is. Every text taken
(label, model name and version) is made safe by ``clean``: no control
characters, a lone surrogate replaced by U+FFFD.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections import Counter
from typing import Final

from predtrace.middleware._context import clean
from predtrace.middleware._routes import PROTOCOL_KSERVE_V1, PROTOCOL_OIP_V2_REST
from predtrace.wire import OutputSummary

_MAX_OUTPUTS_SCANNED: Final = 16
MAX_LABEL: Final = 64
"""The longest string taken as a label: a longer one is text, not a class (not exported)."""
_LABEL_HINTS: Final = ("label", "class", "category")
_SCORE_HINTS: Final = ("score", "prob", "confidence")


_HEAD_BYTES: Final = 4096
_PARSE_BELOW: Final = 2048  # bytes: below this, json.loads beats the head scan
_MAX_TOKENS: Final = 256  # strings and brackets scanned before giving up on the head
# A top-level string member of a JSON object, found without parsing the rest:
# strings (skipped whole) and the brackets between them, to know the depth.
_TOKENS: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?|[{}\[\]]', re.DOTALL)
_STRING_VALUE: Final = re.compile(rb'\s*:\s*("(?:[^"\\]|\\.){0,1024}")')
# The layout of nearly every OIP v2 server's answer (FastAPI/pydantic, KServe,
# MLServer, Triton): the object opens with ``model_name`` then
# ``model_version``, plain strings. Matched at the start, they are top-level
# members for certain: read without parsing or scanning the body.
_LEADING_SERVED: Final = re.compile(
    rb'\s*\{\s*"model_name"\s*:\s*"([^"\\]{0,1024})"\s*,\s*"model_version"\s*:\s*"([^"\\]{0,1024})"'
)
# Content codings a capture can decode (zlib's window bits 32+15 read both a
# gzip and a zlib stream: HTTP's "deflate" is the zlib one).
DECODABLE: Final = frozenset({b"gzip", b"x-gzip", b"deflate"})
_ZLIB_AUTO: Final = 32 + zlib.MAX_WBITS


class ResponseCapture:
    """A bounded copy of a response body, taken as its chunks pass by.

    The first 4 KiB are kept even past the bound: the served model's name
    and version are read from there without parsing the whole body. A gzip
    or deflate body (``compressed``) is decoded as it passes, never beyond
    what the copy and the head can hold: a gzip bomb costs nothing more.
    """

    __slots__ = (
        "_chunks",
        "_compressed",
        "_decoded",
        "_decoder",
        "_fed",
        "_head",
        "_limit",
        "_raw",
        "_size",
        "overflowed",
    )

    def __init__(self, limit: int, *, compressed: bool = False) -> None:
        self._chunks: list[bytes] = []
        self._head = b""
        self._limit = limit
        self._size = 0
        self.overflowed = False
        self._compressed = compressed
        self._decoder = zlib.decompressobj(_ZLIB_AUTO) if compressed else None
        self._decoded = 0
        self._fed = 0  # chunks given to the decoder
        self._raw = False  # reading a raw deflate stream (see _decode)

    def add(self, chunk: bytes) -> None:
        """Keep ``chunk`` unless the copy would pass the bound (then keep nothing)."""
        if self._compressed:
            chunk = self._decode(chunk)
        if len(self._head) < _HEAD_BYTES and chunk:
            self._head += chunk[: _HEAD_BYTES - len(self._head)]
        if self.overflowed or not chunk:
            return
        self._size += len(chunk)
        if self._size > self._limit:
            self.overflowed = True
            self._chunks.clear()
            return
        self._chunks.append(chunk)

    def _decode(self, chunk: bytes) -> bytes:
        """What ``chunk`` decodes to, up to one byte past the larger of the bound and the head."""
        decoder = self._decoder
        if decoder is None:
            return b""  # stopped: past the bound, or not what the header said
        # max_length bounds the output (0 would mean no bound: never 0 here).
        budget = max(self._limit, _HEAD_BYTES) + 1 - self._decoded
        self._fed += 1
        try:
            out = decoder.decompress(chunk, budget)
        except zlib.error:
            if self._fed == 1 and not self._raw:
                # "deflate" sent as a raw deflate stream, without the zlib
                # header HTTP asks for (some servers do): read it as such,
                # from the start (its first chunk, this one).
                self._decoder, self._raw, self._fed = zlib.decompressobj(-zlib.MAX_WBITS), True, 0
                return self._decode(chunk)
            self._decoder, self.overflowed = None, True  # unreadable: no copy
            self._chunks.clear()
            return b""
        self._decoded += len(out)
        if len(out) == budget:
            # Over the bound; the rest of the input waits in unconsumed_tail:
            # drop it with the decoder instead of decoding on.
            self._decoder = None
        return out

    def parsed(self) -> object:
        """The JSON value of the copy, or None (overflowed, empty or not JSON)."""
        if self.overflowed or not self._chunks:
            return None
        try:
            return json.loads(b"".join(self._chunks))
        except (ValueError, RecursionError):
            return None

    def served(self) -> tuple[str, str] | None:
        """OIP v2 ``(model_name, model_version)`` from the body's first 4 KiB, cheaply.

        The usual answer opens with both (one match at the start); others are
        scanned when large. None when they cannot be told apart from there (not found as
        top-level members, or escaped oddly): parse the whole body instead.
        """
        leading = _LEADING_SERVED.match(self._head)
        if leading is not None:
            try:
                name, version = leading.group(1).decode(), leading.group(2).decode()
            except UnicodeDecodeError:
                return None
            return clean(name), clean(version)
        if not self.overflowed and self._size <= _PARSE_BELOW:
            return None  # a small body: one full parse is cheaper than the scan
        members = _top_level_strings(self._head, (b"model_name", b"model_version"))
        if members is None:
            return None
        return clean(members.get(b"model_name", "")), clean(members.get(b"model_version", ""))


def _top_level_strings(  # noqa: PLR0911 - every way to be unsure says so, flat on purpose
    data: bytes, keys: tuple[bytes, ...]
) -> dict[bytes, str] | None:
    """The string values of ``keys`` at depth 1 of a JSON object, or None if unsure.

    One pass of a regular expression over strings and brackets, linear in
    ``data``. A key written twice gives its first value (``json.loads`` keeps
    the last); servers do not write them twice.
    """
    if not data.lstrip().startswith(b"{"):
        return None
    found: dict[bytes, str] = {}
    depth = 0
    for count, token in enumerate(_TOKENS.finditer(data)):
        if count == _MAX_TOKENS:
            return None  # the names are not near the start: parse instead of scanning on
        text = token.group()
        if text[:1] == b'"' and (len(text) < 2 or text[-1:] != b'"'):
            return None  # a string cut off by the end of the head: unsure from here
        if text in (b"{", b"["):
            depth += 1
        elif text in (b"}", b"]"):
            depth -= 1
            if depth == 0:
                return found  # the whole object was seen: absent keys are absent
        elif depth == 1 and text[1:-1] in keys:
            value = _STRING_VALUE.match(data, token.end())
            if value is None:
                return None  # not a string value, or cut off: let the parser decide
            raw = value.group(1)
            try:
                decoded = json.loads(raw) if b"\\" in raw else raw[1:-1].decode()
            except ValueError:  # UnicodeDecodeError included
                return None
            found[text[1:-1]] = decoded
            if len(found) == len(keys):
                return found
    return None  # the head ended before the object did


def _is_json_type(content_type: bytes) -> bool:
    return content_type.startswith(b"application/json") or b"+json" in content_type


def json_encoding(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The content coding of a JSON response (``b""`` for none), or None when not JSON."""
    json_body = False
    encoding = b""
    for key, value in headers:
        if key == b"content-type":
            json_body = _is_json_type(value)
        elif key == b"content-encoding":
            encoding = value
    if not json_body:
        return None
    if encoding:  # rare: a compressing middleware inside this one
        encoding = encoding.strip().lower()
        return b"" if encoding == b"identity" else encoding
    return encoding


def capture_for(
    headers: list[tuple[bytes, bytes]], limit: int, counts: Counter[str]
) -> ResponseCapture | None:
    """A capture for a JSON response body (decoding gzip and deflate), None for others.

    JSON in a coding it cannot decode (br, zstd...) is counted in ``counts``.
    """
    encoding = json_encoding(headers)
    if encoding is None:
        return None
    if not encoding:
        return ResponseCapture(limit)
    if encoding in DECODABLE:  # e.g. Starlette's GZipMiddleware inside the middleware
        return ResponseCapture(limit, compressed=True)
    counts["response_encoding_unreadable"] += 1
    return None


def read_response(capture: ResponseCapture, *, summary: bool) -> tuple[object, tuple[str, str]]:
    """The parsed response when a ``summary`` needs it, and the served model.

    The served model of an OIP v2 answer is read from its head when that is
    enough (no summary wanted): the body is parsed only when it must be.
    """
    if not summary:
        served = capture.served()
        if served is not None:
            return None, served
    response = capture.parsed()
    if response is None:  # over the bound (or not JSON): the head may still say
        return None, capture.served() or ("", "")
    return response, served_model(response)


def served_model(parsed: object) -> tuple[str, str]:
    """OIP v2 ``(model_name, model_version)`` of a response, empty when absent."""
    if not isinstance(parsed, dict):
        return "", ""
    name, version = parsed.get("model_name"), parsed.get("model_version")
    return (
        clean(name) if isinstance(name, str) else "",
        clean(version) if isinstance(version, str) else "",
    )


def response_id(parsed: object) -> str | None:
    """The OIP v2 response ``id``, if any."""
    if isinstance(parsed, dict):
        value = parsed.get("id")
        if isinstance(value, str):
            return value
    return None


def summarise(parsed: object, protocol: str) -> OutputSummary | None:
    """A label/score/value summary of an OIP v2 or KServe v1 response.

    OIP v2: the first string of the outputs is the label (or a number from a
    tensor named like a label), a number from a tensor named like a score the
    score, another number the value. KServe v1: the first prediction, a label
    or a value. A string over ``MAX_LABEL`` characters is no label (see the
    module's docstring).
    """
    if not isinstance(parsed, dict):
        return None
    if protocol == PROTOCOL_OIP_V2_REST:
        return _summarise_oip(parsed.get("outputs"))
    if protocol == PROTOCOL_KSERVE_V1:
        predictions = parsed.get("predictions")
        if isinstance(predictions, list) and predictions:
            return _from_scalar(predictions[0])
    return None


def _summarise_oip(outputs: object) -> OutputSummary | None:
    if not isinstance(outputs, list):
        return None
    label: str | None = None
    score: float | None = None
    value: float | None = None
    for tensor in outputs[:_MAX_OUTPUTS_SCANNED]:
        if not isinstance(tensor, dict):
            continue
        name = str(tensor.get("name", "")).lower()
        first = _first(tensor.get("data"))
        if isinstance(first, str):
            if label is None:
                label = _label(first)
        elif (number := _number(first)) is not None:
            if score is None and any(h in name for h in _SCORE_HINTS):
                score = number
            elif label is None and any(h in name for h in _LABEL_HINTS):
                label = _label(str(first))
            elif value is None:
                value = number
    if label is None and score is None and value is None:
        return None
    return OutputSummary(label=label, score=score, value=value)


def _from_scalar(first: object) -> OutputSummary | None:
    while isinstance(first, list) and first:
        first = first[0]
    if isinstance(first, str):
        label = _label(first)
        return OutputSummary(label=label) if label is not None else None
    number = _number(first)
    return OutputSummary(value=number) if number is not None else None


def _label(text: str) -> str | None:
    """``text`` made safe if it looks like a class label (short), else None."""
    return clean(text) if len(text) <= MAX_LABEL else None


def _first(data: object) -> object:
    while isinstance(data, list) and data:
        data = data[0]
    return data


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # a JSON integer beyond any float (valid JSON): no number
        return None
    return number if math.isfinite(number) else None
