"""Identifiers: UUIDv7 prediction ids, and parsing of trace/span/prediction ids.

Ids are made on the request path, so ``new_prediction_id`` costs no syscall:
a PRNG seeded once from the OS (and again in every forked child, so a parent
and its workers never produce the same ids) fills the random bits, and a
counter in ``rand_a`` keeps ids monotonic within a millisecond (RFC 9562 §6.2,
method 1).
"""

from __future__ import annotations

import os
import random
import re
import secrets
import threading
import time
import uuid
from typing import Final

from predtrace.wire._errors import InvalidIdError

_COUNTER_MAX: Final = 0xFFF
_UUID_FORMAT: Final = "%08x-%04x-%04x-%04x-%012x"
_HEX_RE: Final = re.compile(r"[0-9a-fA-F]+")
_TRACEPARENT_RE: Final = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")
CALLER_ID_RE: Final = re.compile(r"[\x21-\x7e]{1,256}")
"""A caller's id usable as a prediction id (``fullmatch``): printable ASCII, no space, 1-256."""
_RESTARTED_RE: Final = re.compile(r"^(.+)-r[0-9a-f]{6}$")


class UuidV7Generator:
    """Fast, thread-safe, fork-safe generator of time-ordered UUIDv7 strings.

    Example:
        >>> gen = UuidV7Generator()
        >>> a, b = gen.new(), gen.new()
        >>> a < b
        True
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rng = random.Random()  # noqa: S311 - ids need uniqueness, not secrecy
        self._last_ms = 0
        self._counter = 0
        self.reseed()

    def reseed(self) -> None:
        """Seed from the OS; called at start and in every forked child."""
        self._lock = threading.Lock()
        self._rng.seed(os.urandom(32))
        self._last_ms = 0
        self._counter = 0

    def _next(self) -> tuple[int, int, int]:
        """(unix ms, counter, 62 random bits) of the next id, monotonic within a millisecond."""
        now_ms = time.time_ns() // 1_000_000
        with self._lock:
            if now_ms > self._last_ms:
                self._last_ms = now_ms
                # Start the counter in the lower half so it rarely overflows.
                self._counter = self._rng.getrandbits(11)
            else:
                # Same millisecond, or the clock went back: keep order by
                # counting on from the last id instead of trusting the clock.
                self._counter += 1
                if self._counter > _COUNTER_MAX:
                    self._last_ms += 1
                    self._counter = 0
            return self._last_ms & 0xFFFFFFFFFFFF, self._counter, self._rng.getrandbits(62)

    def new_int(self) -> int:
        """Return a new UUIDv7 as a 128-bit integer."""
        ms, counter, rand_b = self._next()
        return ms << 80 | 0x7 << 76 | counter << 64 | 0b10 << 62 | rand_b

    def new(self) -> str:
        """Return a new UUIDv7 in its canonical text form."""
        # The same bits as ``new_int``, formatted field by field: one
        # %-format of small ints instead of a 128-bit int, hex and slices
        # (this runs once per request).
        ms, counter, rand_b = self._next()
        return _UUID_FORMAT % (
            ms >> 16,
            ms & 0xFFFF,
            0x7000 | counter,
            0x8000 | rand_b >> 48,
            rand_b & 0xFFFFFFFFFFFF,
        )


_GENERATOR: Final = UuidV7Generator()
os.register_at_fork(after_in_child=_GENERATOR.reseed)


def new_prediction_id() -> str:
    """Return a new time-ordered prediction id (UUIDv7 text)."""
    return _GENERATOR.new()


def uuid7_timestamp_ms(prediction_id: str) -> int | None:
    """Return the unix-ms timestamp of a UUIDv7 id, or None for other ids."""
    try:
        value = uuid.UUID(prediction_id)
    except ValueError:
        return None
    return value.int >> 80 if value.version == 7 else None


def _strip_hex(text: str, kind: str, size: int) -> bytes:
    cleaned = text.strip().lower().removeprefix("0x")
    if len(cleaned) != size * 2 or not _HEX_RE.fullmatch(cleaned):
        raise InvalidIdError(f"{kind} must be {size * 2} hex digits, got {len(cleaned)} characters")
    raw = bytes.fromhex(cleaned)
    if raw == bytes(size):
        raise InvalidIdError(f"{kind} must not be all zeros")
    return raw


def parse_trace_id(text: str) -> bytes:
    """Parse a trace id: 32 hex digits (Jaeger, Tempo, Phoenix) or a traceparent.

    Raises:
        InvalidIdError: not a valid, non-zero 16-byte trace id.
    """
    match = _TRACEPARENT_RE.match(text.strip())
    if match:
        return _strip_hex(match.group(1), "trace id", 16)
    return _strip_hex(text, "trace id", 16)


def parse_span_id(text: str) -> bytes:
    """Parse a span id of 16 hex digits.

    Raises:
        InvalidIdError: not a valid, non-zero 8-byte span id.
    """
    return _strip_hex(text, "span id", 8)


def format_trace_id(trace_id: bytes) -> str:
    """Return the 32-hex-digit text form of a trace id (empty for none)."""
    return trace_id.hex()


def parse_prediction_id(text: str) -> str:
    """Normalise a prediction id: UUIDs to canonical form, caller ids as given.

    Accepts ``urn:uuid:...``, braces, dashes or none, any case. Other text is a
    caller's own id (1-256 printable ASCII characters, no spaces).

    Raises:
        InvalidIdError: empty, too long, or with spaces or control characters.
    """
    stripped = text.strip()
    candidate = stripped.lower().removeprefix("urn:uuid:").strip("{}")
    if len(candidate.replace("-", "")) == 32 and _HEX_RE.fullmatch(candidate.replace("-", "")):
        return str(uuid.UUID(candidate))
    if not CALLER_ID_RE.fullmatch(stripped):
        raise InvalidIdError(
            "prediction id must be a UUID or 1-256 printable characters without spaces"
        )
    return stripped


def classify_lookup_id(text: str) -> tuple[bytes | None, str | None]:
    """Read an id typed by a person: return (trace id, prediction id) candidates.

    32 hex digits are both a valid trace id and a dash-less UUID, so both are
    returned and the caller looks up each.

    Raises:
        InvalidIdError: neither a trace id nor a prediction id.
    """
    trace_id: bytes | None
    try:
        trace_id = parse_trace_id(text)
    except InvalidIdError:
        trace_id = None
    prediction_id: str | None
    try:
        prediction_id = parse_prediction_id(text)
    except InvalidIdError:
        prediction_id = None
    if trace_id is None and prediction_id is None:
        raise InvalidIdError("not a trace id (32 hex digits) nor a prediction id")
    return trace_id, prediction_id


def restarted_producer_id(base: str) -> str:
    """The id producer ``base`` continues under after losing its seq state: ``<base>-r<6 hex>``.

    A collector token bound to ``base`` accepts it when its producers also
    list ``<base>-r??????`` (``predtrace collector token`` writes both).
    """
    return f"{base}-r{secrets.token_hex(3)}"


def producer_id_base(producer_id: str) -> str:
    """``edge-7`` for ``edge-7-r1a2b3c``; the id itself when it has no restart suffix."""
    match = _RESTARTED_RE.match(producer_id)
    return match.group(1) if match else producer_id
