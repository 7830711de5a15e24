"""What a lineage value may look like: the rules every way lineage arrives shares.

Lineage values are evidence an on-call engineer reads in a terminal and pastes
into the next query, so the registration API and OpenLineage events are held
to these shapes (a refusal names the field), and what MLflow sends is cleaned
to them (``clean_text``, ``is_token``) instead of failing the link:

- ``check_text``: bounded text without control characters (C0, DEL, C1), line
  or paragraph separators, bidirectional overrides, or lone surrogates; only
  the values of params and tags (``multiline``) may hold tabs and newlines.
- ``check_id``: a name or id (model, version, alias, run, deployment, keys):
  text as above, at most ``MAX_NAME`` characters, with no invisible format
  characters and no whitespace at either end.
- ``check_token``: a digest or commit: 1 to ``MAX_NAME`` printable ASCII
  characters without spaces (the prediction id's rule). The design fixes no
  encoding: MLflow's dataset digests are 8 hex digits without an algorithm, a
  commit may be a tag ("v1.2"), placeholders like ``sha256:train`` are used.
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Final

from predtrace.collector._errors import LineageError

MAX_TEXT: Final = 2048
"""URLs, sources, OpenLineage dataset identities, param and tag values."""
MAX_NAME: Final = 512
"""Names, ids, digests and commits: a table cell, a query argument."""
MAX_ITEMS: Final = 256
DIGEST: Final = "a digest like sha256:<hex>"
"""``check_token``'s ``what`` for a dataset, image or artifact digest."""
COMMIT: Final = "a commit sha"
"""``check_token``'s ``what`` for a commit."""

# Why each range: C0 but tab and newline (ESC starts the sequences that clear
# the screen, retitle the window or recolour a line; CR and backspace
# overwrite what was printed); DEL and C1 (CSI, OSC); U+2028/2029 (new lines
# to some terminals and editors); the bidirectional marks, embeddings,
# overrides and isolates that make a terminal show text in another order
# than it is stored ("Trojan Source"); lone surrogates (no store keeps them).
_UNSAFE_RANGES: Final = (
    "\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff"
)
_UNSAFE: Final = re.compile(f"[\t\n{_UNSAFE_RANGES}]")
_UNSAFE_MULTILINE: Final = re.compile(f"[{_UNSAFE_RANGES}]")
_TOKEN: Final = re.compile(r"[\x21-\x7e]+")
_REPLACEMENT: Final = "\ufffd"


def _as_text(value: object, where: str, required: bool) -> str:
    """``value`` as a string: None is "", an integer its digits, a finite float its text.

    A float does not name an id (``required``): its text is not what was sent
    (1.10 reads "1.1", 1e400 "inf").
    """
    if value is None:
        return ""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if required or not math.isfinite(value):
            raise LineageError(f"{where} must be a string, not the number {value!r}")
        return str(value)
    if not isinstance(value, str):
        raise LineageError(f"{where} must be a string")
    return value


def _unsafe_reason(text: str, where: str, multiline: bool) -> str | None:
    found = (_UNSAFE_MULTILINE if multiline else _UNSAFE).search(text)
    if found is None:
        return None
    code, at = ord(found.group()), found.start()
    if 0xD800 <= code <= 0xDFFF:
        return f"{where} must be valid Unicode text (a lone surrogate at {at})"
    allowed = "; tabs and newlines are allowed" if multiline else ""
    return (
        f"{where} must be text without NUL or other control characters"
        f" (U+{code:04X} at {at}){allowed}"
    )


def check_text(
    value: object,
    where: str,
    *,
    required: bool = False,
    limit: int = MAX_TEXT,
    multiline: bool = False,
) -> str:
    """Return ``value`` as bounded, printable text, or raise LineageError naming ``where``.

    An integer reads as its digits (a version written as a JSON number); a
    float only where it does not name an id (not ``required``) and is finite.

    Args:
        value: the JSON value.
        where: the field's name in the body, for the reason.
        required: refuse "" and None.
        limit: the most characters.
        multiline: tabs and newlines allowed (param and tag values).
    """
    text = _as_text(value, where, required)
    if required and not text:
        raise LineageError(f"{where} is required")
    if len(text) > limit:
        raise LineageError(f"{where} must be at most {limit} characters, not {len(text)}")
    if not text.isascii() or not text.isprintable():
        reason = _unsafe_reason(text, where, multiline)
        if reason is not None:
            raise LineageError(reason)
    return text


def check_id(value: object, where: str, *, required: bool = False) -> str:
    """A name or id: ``check_text`` within ``MAX_NAME``, nothing invisible, no edge spaces.

    "r1 " or "r\\u200b1" would be another id than "r1" that looks the same in a
    table: a query by what the engineer sees would never find it.
    """
    text = check_text(value, where, required=required, limit=MAX_NAME)
    if text != text.strip():
        raise LineageError(f"{where} must not begin or end with whitespace")
    if not text.isascii():
        for at, char in enumerate(text):
            if unicodedata.category(char) == "Cf":
                raise LineageError(
                    f"{where} must not hold invisible characters (U+{ord(char):04X} at {at})"
                )
    return text


def check_token(value: object, where: str, *, required: bool = False, what: str) -> str:
    """A digest or commit: 1 to ``MAX_NAME`` printable ASCII characters, no spaces.

    Args:
        value: the JSON value; a number is refused (a digest is not a quantity).
        where: the field's name in the body, for the reason.
        required: refuse "" and None.
        what: what it should be, for the reason ("a digest like sha256:<hex>").
    """
    if value is None or value == "":
        if required:
            raise LineageError(f"{where} is required")
        return ""
    if not isinstance(value, str):
        raise LineageError(f"{where} must be a string: {what}")
    if len(value) > MAX_NAME:
        raise LineageError(
            f"{where} must be {what} of at most {MAX_NAME} characters, not {len(value)}"
        )
    if not is_token(value):
        raise LineageError(
            f"{where} must be {what}: printable ASCII without spaces or control characters"
        )
    return value


def is_token(text: str) -> bool:
    """Whether ``text`` passes ``check_token`` (1 to MAX_NAME printable ASCII, no spaces)."""
    return len(text) <= MAX_NAME and _TOKEN.fullmatch(text) is not None


def clean_text(text: str, limit: int, *, multiline: bool = False) -> str:
    """``text`` cut to ``limit`` characters, each character ``check_text`` refuses as U+FFFD.

    For values read from a registry we do not control: the link is kept, the
    value shown as received but for what a terminal must not be handed.
    """
    pattern = _UNSAFE_MULTILINE if multiline else _UNSAFE
    return pattern.sub(_REPLACEMENT, text[:limit])
