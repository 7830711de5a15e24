"""Plain event maps: the checks that let a consumer keep an event as its msgpack map.

A producer that receives events as msgpack maps (the sidecar, from
``packed_events``) would otherwise build an object from each map only to
encode it back into the same map. For a *plain* map (every field of the type
the decoder keeps without conversion, no additional models) the map itself
is the event: ``event_from_map`` would accept it as it is.

``plain_event_map`` says whether a map is plain; ``canonical_event_map`` is
``event_to_map(event_from_map(raw))`` for a plain map (the same keys, as
ints, in the same order: the same bytes once packed); ``plain_map_problem``
is ``event_problem`` for a canonical map, with the same rules, in the same
order and with the same reasons. Anything not plain takes the precise path
(``event_from_map``, then ``event_problem``), which alone decides the rest.
"""

from __future__ import annotations

import math
from typing import Any, Final

from predtrace.wire._codec import (
    _DEPLOYMENT_KEYS,
    _MODEL_KEYS,
    DEFAULT_LIMITS,
    INT63_MAX,
    DecodeLimits,
    plain_scalars,
)

_EMPTY: Final[dict[Any, Any]] = {}


def _finite(value: object) -> bool:
    return value is None or (type(value) is float and math.isfinite(value))


def plain_event_map(  # noqa: PLR0911 - one answer per field group, flat on purpose
    raw: object, limits: DecodeLimits = DEFAULT_LIMITS
) -> bool:
    """True when ``raw`` needs no conversion to be the event it encodes.

    Never true for a map ``event_from_map`` would refuse or convert; false
    also for some it would accept (an integer feature value, additional
    models), which then take the precise path. Keys it does not know are
    ignored, as the decoder ignores them.
    """
    if type(raw) is not dict or raw.get(7):  # additional models: the precise path
        return False
    g = raw.get
    model, dep, features, attributes = g(6, _EMPTY), g(8, _EMPTY), g(16, _EMPTY), g(17, _EMPTY)
    pid, trace_id, span_id = g(1), g(2, b""), g(3, b"")
    ts, duration, status = g(4, 0), g(5, 0), g(11, 0)
    if (
        type(model) is not dict
        or type(dep) is not dict
        or type(features) is not dict
        or type(attributes) is not dict
        or not plain_scalars(pid, trace_id, span_id, ts, duration, status, limits.max_id_len)
        or type(g(14, b"")) is not bytes
        or type(g(18, False)) is not bool
    ):
        return False
    try:
        # One join type-checks every text field at C speed (a non-str raises).
        "".join(
            (
                g(9, ""),
                g(10, ""),
                g(12, ""),
                g(13, ""),
                *model.values(),
                *dep.values(),
                *features,
                *attributes,
                *attributes.values(),
            )
        )
    except TypeError:
        return False
    for number in features.values():
        if type(number) is not float or not math.isfinite(number):
            return False
    if 15 in raw:
        out = raw[15]
        if type(out) is not dict:
            return False
        label = out.get(1)
        if (label is not None and type(label) is not str) or not (
            _finite(out.get(2)) and _finite(out.get(3))
        ):
            return False
    return True


def canonical_event_map(raw: dict[Any, Any]) -> dict[int, Any]:
    """``event_to_map(event_from_map(raw))`` for a plain map, without the event in between.

    Empty fields are left out and keys are the wire's ints in ``event_to_map``'s
    order, whatever the map held (``1.0`` or ``True`` look up as ``1`` in a
    dict, and are written back as ``1``).
    """
    g = raw.get
    m: dict[int, Any] = {1: g(1)}
    for key in (2, 3, 4, 5):
        value = g(key)
        if value:
            m[key] = value
    model = g(6)
    if model:
        kept = {k: v for k in _MODEL_KEYS if (v := model.get(k))}
        if kept:
            m[6] = kept
    dep = g(8)
    if dep:
        kept = {k: v for k in _DEPLOYMENT_KEYS if (v := dep.get(k))}
        if kept:
            m[8] = kept
    for key in (9, 10, 11, 12, 13, 14, 16, 17):
        value = g(key)
        if value:
            m[key] = value
    if g(18) is True:
        m[18] = True
    out = g(15)
    if out is not None:
        # Present even when empty, as event_to_map writes it.
        m[15] = {k: v for k in (1, 2, 3) if (v := out.get(k)) is not None}
    return m


def plain_map_problem(raw: dict[Any, Any], limits: DecodeLimits = DEFAULT_LIMITS) -> str | None:
    """``event_problem`` for a canonical map (``canonical_event_map``): same rules, same reasons."""
    g = raw.get
    if g(4, 0) > INT63_MAX or g(5, 0) > INT63_MAX:
        return "timestamp_unix_nano and duration_nanos must fit in int64"
    features, attributes, out = g(16, _EMPTY), g(17, _EMPTY), g(15)
    texts = [
        g(1),
        g(9, ""),
        g(10, ""),
        g(12, ""),
        g(13, ""),
        *g(6, _EMPTY).values(),
        *g(8, _EMPTY).values(),
        *features,
        *attributes,
        *attributes.values(),
    ]
    label = out.get(1) if out is not None else None
    if label:
        texts.append(label)
    joined = "".join(texts)
    if "\x00" in joined:
        return "text fields must not contain NUL characters"
    if len(features) > limits.max_map_len or len(attributes) > limits.max_map_len:
        return f"features and attributes hold at most {limits.max_map_len} entries each"
    if len(g(14, b"")) > limits.max_bin_len:
        return f"input_fingerprint longer than {limits.max_bin_len} bytes"
    if len(joined) * 4 > limits.max_str_len:  # UTF-8 is at most 4 bytes a character
        for text in texts:
            if len(text.encode("utf-8", "surrogatepass")) > limits.max_str_len:
                return f"a text field is longer than {limits.max_str_len} bytes"
    return None
