"""What a store cannot hold: the checks a producer runs before it acknowledges an event.

``event_problem`` (an event object) and ``stored_problem`` (its parts, any
form of the event) give the reason the collector would refuse an event, or
None; the sidecar's intake asks before it acknowledges, so one bad event
never costs the batch it would travel in.
"""

from __future__ import annotations

from typing import Final

from predtrace.wire._event import ModelRef, PredictionEvent
from predtrace.wire._ids import CALLER_ID_RE
from predtrace.wire._limits import _UINT64_MAX, DEFAULT_LIMITS, INT63_MAX, DecodeLimits

PREDICTION_ID_RULE: Final = (
    "prediction_id must be a UUID or 1-256 printable ASCII characters without spaces"
)
"""Why an id outside ``CALLER_ID_RE`` is refused: ``predtrace trace`` could never find it."""


def _texts(event: PredictionEvent) -> list[str]:
    # One list display instead of a generator of ``yield from``: this runs
    # once per event in the sidecar's intake (about twice as fast).
    model, dep, out = event.model, event.deployment, event.output
    texts = [
        event.prediction_id,
        event.endpoint,
        event.protocol,
        event.status_code,
        event.error_type,
        model.name,
        model.version,
        model.alias,
        model.registry_model_id,
        model.artifact_digest,
        model.role,
        dep.id,
        dep.service,
        dep.namespace,
        dep.pod,
        dep.node,
        dep.image_digest,
        dep.image_name,
        *event.features,
        *event.attributes,
        *event.attributes.values(),
    ]
    if out is not None and out.label:
        texts.append(out.label)
    for extra in event.additional_models:
        texts += (
            extra.name,
            extra.version,
            extra.alias,
            extra.registry_model_id,
            extra.artifact_digest,
            extra.role,
        )
    return texts


def event_problem(event: PredictionEvent, limits: DecodeLimits = DEFAULT_LIMITS) -> str | None:
    """Why a collector would refuse ``event`` (None when it would store it).

    The decoder's bounds (a string or binary over its limit, a map over its
    entries) would refuse a whole batch, a store cannot hold a time past
    int64 or a NUL in text, an encoder cannot write a text that is not a
    ``str`` or holds a lone surrogate, and an id outside ``CALLER_ID_RE``
    could never be looked up: a producer checks here before it acknowledges
    an event, so one bad event never costs the batch it would travel in. A
    NaN or infinite number is no problem: the decoders leave it out.
    """
    # An event object was built by code, not decoded (which checks numbers):
    # what the collector's decoder would refuse is refused here.
    if not 0 < len(event.prediction_id) <= limits.max_id_len:
        return f"prediction_id must be 1 to {limits.max_id_len} characters"
    if CALLER_ID_RE.fullmatch(event.prediction_id) is None:
        # The query API and the CLI look up no other id (parse_prediction_id):
        # stored, the event could never be found by its id.
        return PREDICTION_ID_RULE
    numbers = _number_problem(event)
    if numbers is not None:
        return numbers
    if _EMPTY_MODEL in event.additional_models:
        # One byte on the wire: a batch of such would pass the decoder's bound
        # of containers per byte and be refused whole.
        return "additional_models[] must not be empty"
    return stored_problem(
        limits,
        times=(event.timestamp_unix_nano, event.duration_nanos),
        texts=_texts(event),
        map_sizes=(len(event.features), len(event.attributes)),
        extra_models=len(event.additional_models),
        fingerprint_len=len(event.input_fingerprint),
    )


_EMPTY_MODEL: Final = ModelRef()


def _number_problem(event: PredictionEvent) -> str | None:
    """Why the event's feature or output numbers could not be packed, if they could not.

    A NaN or an infinity is no problem: every decoder leaves it out (FORMAT.md).
    """
    out = event.output
    if out is not None:
        for name, value in (("score", out.score), ("value", out.value)):
            if value is not None and not _packable_number(value):
                return f"output.{name} must be a float or a 64-bit integer"
    if event.features and not all(map(_packable_number, event.features.values())):
        return "features values must be floats or 64-bit integers"
    return None


def _packable_number(value: object) -> bool:
    """A number msgpack packs and the decoder reads: a float, or an int (not a bool) in 64 bits."""
    if type(value) is float:
        return True
    return type(value) is int and _INT64_MIN <= value <= _UINT64_MAX


_INT64_MIN: Final = -(2**63)


def _utf8(text: str) -> bool:
    """Whether ``text`` can be encoded as UTF-8 (it holds no lone surrogate)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def stored_problem(  # noqa: PLR0911 - one answer per rule, flat on purpose
    limits: DecodeLimits,
    *,
    times: tuple[int, int],
    texts: list[str],
    map_sizes: tuple[int, int],
    extra_models: int,
    fingerprint_len: int,
) -> str | None:
    """The rules of ``event_problem`` on an event's parts (any form of the event)."""
    if times[0] > INT63_MAX or times[1] > INT63_MAX:
        return "timestamp_unix_nano and duration_nanos must fit in int64"
    # One scan of the joined text instead of one per field (a hot path).
    try:
        joined = "".join(texts)
    except TypeError:  # an event object built by code with, say, a list for a label
        return "text fields must be strings"
    if "\x00" in joined:
        return "text fields must not contain NUL characters"
    if not joined.isascii() and not _utf8(joined):  # isascii: one quick pass, the usual case
        # A lone surrogate: the encoder would fail on the whole batch.
        return "text fields must be valid Unicode (no lone surrogates)"
    if map_sizes[0] > limits.max_map_len or map_sizes[1] > limits.max_map_len:
        return f"features and attributes hold at most {limits.max_map_len} entries each"
    if extra_models > limits.max_map_len:
        # The decoder takes no longer array inside an event: it bounds what a
        # decode holds before it can count it (``_reader``).
        return f"too many additional_models (at most {limits.max_map_len})"
    if fingerprint_len > limits.max_bin_len:
        return f"input_fingerprint longer than {limits.max_bin_len} bytes"
    if len(joined) * 4 > limits.max_str_len:  # UTF-8 is at most 4 bytes a character
        for text in texts:
            if len(text.encode("utf-8", "surrogatepass")) > limits.max_str_len:
                return f"a text field is longer than {limits.max_str_len} bytes"
    return None
