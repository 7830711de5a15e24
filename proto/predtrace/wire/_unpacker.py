"""A bounded msgpack unpacker, and msgpack's errors told as ours.

The batch header (``_reader``), the events one at a time (``_event_reader``)
and the values built whole (``_codec``) all read through here: every declared
length is bounded before anything is allocated, and what msgpack raises on bad
bytes becomes a ``WireError`` with a short reason (users catch our errors,
never msgpack's).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any, Final

import msgpack

from predtrace.wire._errors import WireError
from predtrace.wire._limits import DecodeLimits

# The reader's buffer: what it reads at once, plus the longest string or
# binary it must hold whole to step over it.
_READ_SIZE: Final = 256 * 1024


def _unpacker(
    payload: bytes, limits: DecodeLimits, start: int, hook: Callable[[Any], Any] | None
) -> msgpack.Unpacker:
    """An unpacker reading ``payload`` from ``start`` with every declared length bounded."""
    stream = io.BytesIO(payload)  # shares the bytes object: no copy
    stream.seek(start)
    hooks: dict[str, object] = {"object_hook": hook, "list_hook": hook} if hook else {}
    longest = max(limits.max_str_len, limits.max_bin_len)
    return msgpack.Unpacker(
        stream,
        raw=False,
        strict_map_key=False,
        use_list=True,
        max_str_len=limits.max_str_len,
        max_bin_len=limits.max_bin_len,
        # Arrays in an event (the events array's own length is read apart).
        max_array_len=limits.max_map_len,
        max_map_len=limits.max_map_len,
        max_ext_len=0,
        read_size=_READ_SIZE,
        # Stepping over a string needs it whole in the buffer: one longer
        # than the limits (which building it would refuse) is refused too.
        max_buffer_size=_READ_SIZE + longest + 16,
        **hooks,
    )


# What msgpack raises on bad bytes: its own errors, and ValueError or TypeError
# (a length over a limit, invalid UTF-8, an unhashable key) building a value.
_MSGPACK_ERRORS: Final = (msgpack.UnpackException, ValueError, TypeError)


def _malformed(exc: Exception) -> WireError:
    """Our error for one of msgpack's (or a value error building what it read)."""
    if isinstance(exc, msgpack.BufferFull):
        # Only a value the reader must hold whole to step over it fills its
        # buffer: a string or binary longer than any field's bound, under a
        # key this version does not know.
        return WireError(
            "a string or binary value under an unknown key too long to step over "
            "(longer than the reader's buffer, some hundreds of KiB)"
        )
    if isinstance(exc, msgpack.OutOfData | msgpack.FormatError | msgpack.StackError):
        return WireError(f"malformed msgpack: {type(exc).__name__}")
    return WireError(f"malformed msgpack: {short_reason(exc)}")


def short_reason(exc: BaseException) -> str:
    """The first line of an exception's message, at most 120 characters."""
    return str(exc).split("\n", 1)[0][:120]
