"""JSON of a request body: its value, and the canonical form the fingerprint covers.

Used by the request side (``_inputs``, ``_prediction``) on every prediction
that has a JSON body. The canonical form is fixed: sorted keys, no whitespace,
UTF-8, numbers as Python's ``json`` writes them (``1e-05``, ``NaN``), so a
fingerprint stays the same across releases. orjson, when installed, does the
parsing and the encoding several times faster on large bodies (a tensor of a
MB, on the event loop, was a stall the app's own parse did not make); the
few spots where its output differs from ``json``'s are set right, and any
value it would read or write differently takes the ``json`` path instead.
"""

from __future__ import annotations

import json
import json.encoder
import json.scanner
from collections.abc import Callable, Sequence
from typing import Final

try:
    import orjson
except ImportError:  # the middleware works without it, only slower on large bodies
    orjson = None  # type: ignore[assignment]

NOT_JSON: Final = object()

_CANONICAL_ENCODER: Final = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, check_circular=False
)
_CANONICAL: Final = _CANONICAL_ENCODER.encode
# The C scanner and encoder behind ``json.loads`` and ``_CANONICAL``, built once:
# the public entry points detect the encoding, skip whitespace and rebuild the
# encoder on every call, a few microseconds per request for small bodies.
_SCAN: Final[Callable[[str, int], tuple[object, int]]] = json.scanner.make_scanner(
    json.JSONDecoder()  # type: ignore[arg-type]  # typeshed: the class is typed, not the decoder it takes
)
_C_MAKE_ENCODER: Final = getattr(json.encoder, "c_make_encoder", None)  # not in typeshed
_C_ENCODER: Final[Callable[[object, int], Sequence[str]] | None] = (
    _C_MAKE_ENCODER(
        None,  # markers: no circularity check, as check_circular=False
        _CANONICAL_ENCODER.default,
        json.encoder.encode_basestring,  # ensure_ascii=False
        None,  # indent
        ":",
        ",",
        True,  # sort_keys
        False,  # skipkeys
        True,  # allow_nan
    )
    if _C_MAKE_ENCODER is not None
    else None
)
# orjson reads an integer of more than 64 bits as a float; ``json`` keeps it
# exact. A run of 19 digits anywhere (a string's included) sends the body to
# ``json``. Found with C-speed bytes methods: ``re`` crawls over a MB of digits.
_DIGITS_AS_ZERO: Final = bytes.maketrans(b"123456789", b"000000000")
_LONG_INTEGER: Final = b"0" * 19


def parse_json(body: bytes) -> object:
    """The JSON value of ``body``, or ``NOT_JSON``: always what ``json.loads`` gives."""
    if not body:
        return NOT_JSON
    if orjson is not None and _LONG_INTEGER not in body.translate(_DIGITS_AS_ZERO):
        try:
            return orjson.loads(body)
        except ValueError:  # orjson.JSONDecodeError
            pass  # NaN, a BOM, UTF-16, a lone surrogate, deep nesting: as ``json`` reads it
    try:
        # The usual body: UTF-8 that starts with the value. Anything else
        # (leading whitespace, a BOM, UTF-16, an error) takes ``json.loads``.
        text = body.decode()
        value, end = _SCAN(text, 0)
    except (ValueError, StopIteration, RecursionError):
        return _parse_slow(body)
    if end != len(text) and text[end:].strip(" \t\n\r"):
        # Trailing data (json.loads refuses it too), or a UTF-16 or UTF-32
        # body that reads as a number and NULs: json.loads tells them apart.
        return _parse_slow(body)
    return value


def _parse_slow(body: bytes) -> object:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return NOT_JSON


def canonical_json(value: object) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the form the fingerprint covers.

    Raises:
        TypeError, ValueError, RecursionError: a value JSON cannot encode.
    """
    if isinstance(value, str):
        return _CANONICAL(value).encode("utf-8", "surrogatepass")
    if orjson is not None:
        try:
            out = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:
            pass  # a lone surrogate, an integer past 64 bits, a key not a string...
        else:
            # orjson writes NaN and the infinities as null, ``json`` as NaN and
            # Infinity: a value with a null in it (rare) takes ``json``.
            respelt = None if b"null" in out else _with_python_floats(out)
            if respelt is not None:
                return respelt
    if _C_ENCODER is None:
        return _CANONICAL(value).encode("utf-8", "surrogatepass")
    return "".join(_C_ENCODER(value, 0)).encode("utf-8", "surrogatepass")


def _with_python_floats(out: bytes) -> bytes | None:
    """orjson's output with its floats as ``repr`` writes them; None: let ``json`` write it.

    orjson writes a one-digit exponent as ``1e-7`` (``repr``: ``1e-07``), and
    1e-5 <= |x| < 1e-4 in fixed notation (``0.00001`` for ``1e-05``); the
    digits are the same (both the shortest that read back). The first is
    respelt here; the second (rare) and a quote in a string (which would hide
    where strings are) are left to ``json``.
    """
    if b"0.0000" in out:
        return None
    if b"e-" not in out:
        return out  # the usual body: no float to respell
    if b'\\"' in out:
        return None
    parts = out.split(b'"')
    for i in range(0, len(parts), 2):  # the even parts are outside strings: numbers and punctuation
        if b"e-" in parts[i]:
            parts[i] = _two_digit_exponents(parts[i])
    return b'"'.join(parts)


def _two_digit_exponents(numbers: bytes) -> bytes:
    """``1e-7`` as ``1e-07`` throughout a run of numbers (one split, not a regex scan)."""
    pieces = numbers.split(b"e-")
    for j in range(1, len(pieces)):
        piece = pieces[j]
        if not piece[1:2].isdigit():
            pieces[j] = b"0" + piece
    return b"e-".join(pieces)
