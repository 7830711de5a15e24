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

from typing import Any, Final

from predtrace.wire._limits import DEFAULT_LIMITS, DecodeLimits
from predtrace.wire._maps import (
    _DEPLOYMENT_KEYS,
    _MODEL_KEYS,
    _fast_output,
    finite_floats,
    no_additional_models,
    plain_scalars,
)
from predtrace.wire._problems import stored_problem

_EMPTY: Final[dict[Any, Any]] = {}


def plain_event_map(raw: object, limits: DecodeLimits = DEFAULT_LIMITS) -> bool:
    """True when ``raw`` needs no conversion to be the event it encodes.

    Never true for a map ``event_from_map`` would refuse or convert; false
    also for some it would accept (an integer feature value, additional
    models), which then take the precise path. Keys it does not know are
    ignored, as the decoder ignores them.
    """
    if type(raw) is not dict or not no_additional_models(raw):  # for the precise path
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
    if not finite_floats(features.values()):
        return False
    return 15 not in raw or _fast_output(raw[15]) is not None


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
    """``event_problem`` for a canonical map (``canonical_event_map``): the same rules.

    The id's rules (its length, ``CALLER_ID_RE``) are left out:
    ``plain_event_map`` checked them before the processors, which never
    change the id, and this runs once per event on the sidecar's hot path.
    """
    g = raw.get
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
    return stored_problem(
        limits,
        times=(g(4, 0), g(5, 0)),
        texts=texts,
        map_sizes=(len(features), len(attributes)),
        extra_models=0,  # a plain map has none
        fingerprint_len=len(g(14, b"")),
    )
