"""The request side of a prediction: the bounded body read, caller ids, fingerprint, features.

The middleware reads a prediction's body once, up to a bound, and gives the
application a ``receive`` that replays exactly the messages it consumed, then
continues with the server's own. The body never leaves the process: only a
keyed HMAC-SHA256 of its canonical form (sorted keys, no whitespace; the OIP
request ``id`` is left out, it names the request, not the input) and the
allow-listed numeric features do.
"""

from __future__ import annotations

import hmac
import json
import math
from collections import Counter, deque
from collections.abc import Iterable
from typing import Final

from predtrace.middleware._asgi import Message, Receive
from predtrace.middleware._json_codec import NOT_JSON, canonical_json
from predtrace.middleware._outputs import _top_level_strings
from predtrace.middleware._routes import PROTOCOL_KSERVE_V1, PROTOCOL_OIP_V2_REST
from predtrace.wire import CALLER_ID_RE

_MAX_INPUTS_SCANNED: Final = 64
# A body over the bound keeps its first bytes: its OIP ``id`` is read from there.
HEAD_BYTES: Final = 4096
_ID_KEY: Final = (b"id",)
_UTF8: Final = frozenset({"utf-8", "utf-8-sig"})
_FRAMING: Final = frozenset({b"content-length", b"transfer-encoding"})


class BodyRead:
    """What was read of a request body: the messages to replay and the bytes, if complete."""

    __slots__ = ("body", "head", "messages")

    def __init__(self, messages: list[Message], body: bytes | None, head: bytes = b"") -> None:
        self.messages = messages
        self.body = body  # None: over the bound or interrupted; not fingerprinted
        self.head = head  # over the bound: its first HEAD_BYTES (see head_caller_id)


async def read_rest(first: Message, receive: Receive, limit: int) -> BodyRead:
    """Read on after ``first`` until the body ends or passes ``limit`` bytes."""
    messages: list[Message] = []
    chunks: list[bytes] = []
    size = 0
    message = first
    while True:
        messages.append(message)
        if message["type"] != "http.request":
            return BodyRead(messages, None)  # a disconnect: the app will see it too
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return BodyRead(messages, None, head_of(chunks, chunk))
        chunks.append(chunk)
        if not message.get("more_body", False):
            return BodyRead(messages, b"".join(chunks))
        message = await receive()


class BodyTee:
    """The request body as the app reads it, kept up to ``limit`` bytes.

    For FastAPI's telemetry mode, where the middleware does not read the
    body first: when the route parsed none (a handler reading ``request``
    itself), the copy taken on the way is parsed instead. ``body`` is the
    whole body once the app has read it all, else None. ``head`` is set once
    the body passed the bound: its first ``HEAD_BYTES`` (then the body is
    treated as one read first and found too large: no fingerprint, no features).
    """

    __slots__ = ("_chunks", "_limit", "_receive", "_size", "body", "head")

    def __init__(self, receive: Receive, limit: int) -> None:
        self._receive = receive
        self._limit = limit
        self._chunks: list[bytes] | None = []
        self._size = 0
        self.body: bytes | None = None
        self.head: bytes | None = None

    async def receive(self) -> Message:
        """The server's ``receive``, copying body chunks as they pass."""
        message = await self._receive()
        chunks = self._chunks
        if chunks is not None:
            if message["type"] != "http.request":
                self._chunks = None  # a disconnect: the body is not whole
                return message
            chunk = message.get("body", b"")
            self._size += len(chunk)
            if self._size > self._limit:
                # Over the bound: no copy, like a body read first; only its head.
                self.head = head_of(chunks, chunk)
                self._chunks = None
            elif message.get("more_body", False):
                chunks.append(chunk)
            else:
                self.body = b"".join(chunks) + chunk if chunks else chunk
                self._chunks = None
        return message


def head_of(chunks: list[bytes], last: bytes) -> bytes:
    """The first ``HEAD_BYTES`` of ``chunks`` followed by ``last``."""
    head = b""
    for chunk in (*chunks, last):
        head += chunk[: HEAD_BYTES - len(head)]
        if len(head) >= HEAD_BYTES:
            break
    return head


def replay(messages: Iterable[Message], receive: Receive) -> Receive:
    """A ``receive`` that returns ``messages`` first, then calls through."""
    pending = deque(messages)

    async def replaying_receive() -> Message:
        if pending:
            return pending.popleft()
        return await receive()

    return replaying_receive


def body_caller_id(parsed: object) -> str | None:
    """The OIP request's own ``id``, when it is a usable prediction id."""
    if isinstance(parsed, dict):
        value = parsed.get("id")
        if isinstance(value, str) and CALLER_ID_RE.fullmatch(value):
            return value
    return None


def head_caller_id(head: bytes, counts: Counter[str]) -> str | None:
    """The OIP request's own ``id`` read from the first bytes of a body too large to parse.

    Found only as a top-level string member near the start (where clients
    write it); anywhere else, or when the scan is unsure, None: the body's id
    is then unknown, as for a body not read. One found but unusable is
    counted in ``counts`` (``invalid_caller_id``), like ``header_caller_id``.
    """
    members = _top_level_strings(head, _ID_KEY)
    value = members.get(b"id") if members else None
    if value is None:
        return None
    if CALLER_ID_RE.fullmatch(value):
        return value
    counts["invalid_caller_id"] += 1
    return None


def header_caller_id(
    request_id: bytes | None, ce_id: bytes | None, counts: Counter[str]
) -> str | None:
    """The caller's id from ``x-request-id``, then ``ce-id``, when usable.

    One it cannot use is counted in ``counts`` (``invalid_caller_id``) and replaced.
    """
    for raw in (request_id, ce_id):
        if raw is not None:
            text = raw.decode("latin-1")
            if CALLER_ID_RE.fullmatch(text):
                return text
            counts["invalid_caller_id"] += 1
    return None


def fingerprint(base: hmac.HMAC, parsed: object, body: bytes, protocol: str) -> bytes:
    """Keyed HMAC-SHA256 of the canonical input (raw bytes when not JSON).

    Returns empty bytes when there is nothing to fingerprint (no body bytes
    and a value JSON cannot encode, such as form data).
    """
    if parsed is NOT_JSON:
        return _mac(base, body)
    if protocol == PROTOCOL_OIP_V2_REST and isinstance(parsed, dict) and "id" in parsed:
        parsed = {k: v for k, v in parsed.items() if k != "id"}
    try:
        canonical = canonical_json(parsed)
    except (TypeError, ValueError, RecursionError):
        if not body:
            return b""
        canonical = body
    return _mac(base, canonical)


def new_hmac(key: bytes) -> hmac.HMAC:
    """The keyed HMAC-SHA256 that ``fingerprint`` copies for each input."""
    return hmac.new(key, digestmod="sha256")


def _mac(base: hmac.HMAC, data: bytes) -> bytes:
    # Copying a keyed HMAC skips the key setup, and small updates keep the
    # GIL (a one-shot ``hmac.digest`` releases it, which stalls the event loop
    # behind the export threads).
    mac = base.copy()
    mac.update(data)
    return mac.digest()


def request_features(parsed: object, protocol: str, allowed: frozenset[str]) -> dict[str, float]:
    """Allow-listed numeric features found in an OIP v2 or KServe v1 request."""
    if not isinstance(parsed, dict):
        return {}
    if protocol == PROTOCOL_OIP_V2_REST:
        return _oip_features(parsed.get("inputs"), allowed)
    if protocol == PROTOCOL_KSERVE_V1 and "instances" in parsed:
        # Features are the first instance's, when it is an object; a body's
        # other members (or rows of bare values) are not features.
        instances = parsed["instances"]
        if isinstance(instances, list) and instances and isinstance(instances[0], dict):
            return _pick(instances[0].items(), allowed)
        return {}
    return _pick(parsed.items(), allowed)


def _oip_features(inputs: object, allowed: frozenset[str]) -> dict[str, float]:
    found: dict[str, float] = {}
    if not isinstance(inputs, list):
        return found
    for tensor in inputs[:_MAX_INPUTS_SCANNED]:
        if not isinstance(tensor, dict):
            continue
        name = tensor.get("name")
        # A client's name may be any JSON value: a list or an object is unhashable.
        if not isinstance(name, str) or name not in allowed:
            continue
        data = tensor.get("data")
        first = data[0] if isinstance(data, list) and data else data
        number = _number(first)
        if number is not None:
            found[name] = number
    return found


def _pick(items: Iterable[tuple[object, object]], allowed: frozenset[str]) -> dict[str, float]:
    found: dict[str, float] = {}
    for key, value in items:
        if key in allowed:
            number = _number(value)
            if number is not None:
                found[str(key)] = number
    return found


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # a JSON integer beyond any float (valid JSON): no number
        return None
    return number if math.isfinite(number) else None


def is_utf8_json(body: bytes) -> bool:
    """Whether a JSON body is UTF-8 (with or without a BOM), not UTF-16 or UTF-32."""
    return json.detect_encoding(body) in _UTF8


def inject_oip_id(body: bytes, parsed: dict[str, object], prediction_id: str) -> bytes:
    """``body`` with ``"id": prediction_id`` added, so a conforming server echoes it.

    Only called for a UTF-8 JSON object without ``id`` (see ``is_utf8_json``);
    the rest of the bytes are kept as they were (no re-encoding).
    """
    start = body.index(b"{") + 1
    quoted = (
        f'"{prediction_id}"'
        if '"' not in prediction_id and "\\" not in prediction_id
        else json.dumps(prediction_id)
    )
    member = b'"id":' + quoted.encode()
    return body[:start] + member + (b"," if parsed else b"") + body[start:]


def with_oip_id(
    headers: Iterable[tuple[bytes, bytes]], body: bytes, parsed: object, prediction_id: str
) -> tuple[list[tuple[bytes, bytes]], tuple[Message]]:
    """Request headers and body message with ``"id": prediction_id`` added to the body.

    For a UTF-8 JSON object without ``id`` (see ``is_utf8_json``).
    """
    assert isinstance(parsed, dict)  # noqa: S101 - the caller checked it
    new_body = inject_oip_id(body, parsed, prediction_id)
    message: Message = {"type": "http.request", "body": new_body, "more_body": False}
    return with_content_length(headers, len(new_body)), (message,)


def with_content_length(
    headers: Iterable[tuple[bytes, bytes]], length: int
) -> list[tuple[bytes, bytes]]:
    """A copy of ASGI ``headers`` with content-length set to ``length``.

    A ``transfer-encoding`` goes too: the body is now whole and its length
    known, and HTTP forbids both headers on one message.
    """
    out = [(k, v) for k, v in headers if k not in _FRAMING]
    out.append((b"content-length", str(length).encode()))
    return out
