"""The handler's view of the current prediction: ``current_prediction()``.

Backed by a contextvar that the middleware sets for each prediction request,
so a handler (async, or sync in a thread pool) can name the model it used and
record its output and features without touching the middleware. Outside a
prediction the helper returns a no-op object, so handler code never fails
because telemetry is off. Everything recorded here is bounded and filtered by
the allow-lists before it can reach an event, and no call raises: a text may
be a ``str`` or a number (a class index, a version: kept as its ``str``), made
safe by ``clean``; any other value is ignored and counted
(``context_value_ignored`` in ``runtime.stats()``).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from numbers import Number
from typing import Final

from predtrace.wire import ModelRef, OutputSummary

MAX_FEATURES: Final = 64
MAX_ATTRIBUTES: Final = 32
MAX_EXTRA_MODELS: Final = 8
MAX_TEXT: Final = 256
# C0 and C1 control characters: a NUL makes a collector refuse the event, the
# others garble a span name or a log line.
_CONTROL: Final = re.compile("[\x00-\x1f\x7f-\x9f]")
# A lone surrogate (a JSON "\ud800", say) cannot be encoded as UTF-8: the
# exporter would fail on the whole batch it travels in.
_SURROGATE: Final = re.compile("[\ud800-\udfff]")
IGNORED: Final = "context_value_ignored"
"""The count of handler values ``current_prediction()`` could not use (wrong type)."""


def clip(text: str) -> str:
    """Bound a text value carried by an event or a span."""
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT]


def clean(text: str) -> str:
    """``clip`` a text from a request, a response or a handler, made safe to export.

    Control characters are removed and a lone surrogate becomes U+FFFD: the
    result encodes as UTF-8 and holds no NUL.
    """
    if len(text) > MAX_TEXT:  # clip, inline: this runs for every text of every event
        text = text[:MAX_TEXT]
    # isprintable() is one C pass and true for the usual names (false for a
    # control character and a surrogate); it is also false for some harmless
    # characters (a no-break space): the regexes decide.
    if text.isprintable():
        return text
    return _SURROGATE.sub("\ufffd", _CONTROL.sub("", text))


def text_value(value: object) -> str | None:
    """A text a handler gave, made safe (``clean``); None when it is no text.

    A number (a class index, a version) is taken as its ``str``; any other
    type (a list, bytes, None) is no text. Never raises.
    """
    if type(value) is str:  # the usual case, first
        return clean(value)
    try:
        if isinstance(value, str):
            return clean(str.__str__(value))  # a subclass: a plain copy
        if isinstance(value, Number):
            # str.__str__: a plain str even from an odd __str__ (an int past
            # Python's digit limit raises ValueError: no text then).
            return clean(str.__str__(str(value)))
    except Exception:  # noqa: BLE001 - a value's own methods may raise anything
        return None
    return None


class PredictionContext:
    """The prediction being served; get it with ``current_prediction()``.

    Example:
        >>> p = current_prediction()
        >>> p.set_model(name="churn", version="7")
        >>> p.record_output(label="stay", score=0.93)
        >>> p.record_features({"tenure_months": 14.0})
    """

    __slots__ = (
        "_attributes",
        "_extra_models",
        "_features",
        "_id",
        "_ignored",
        "_late",
        "_limits",
        "id_hook",
        "model_override",
        "output",
        "sampled",
    )

    def __init__(
        self,
        prediction_id: str,
        *,
        sampled: bool,
        features: frozenset[str],
        attributes: frozenset[str],
    ) -> None:
        self._id = prediction_id
        self.id_hook: Callable[[], bool] | None = None
        self.sampled = sampled
        self._limits = (features, attributes)
        self.model_override: dict[str, str] | None = None
        self.output: OutputSummary | None = None
        self._features: dict[str, float] | None = None
        self._attributes: dict[str, str] | None = None
        self._extra_models: list[ModelRef] | None = None
        # Set when the prediction's event has left: where late calls are counted.
        self._late: Counter[str] | None = None
        self._ignored = 0  # values not used (wrong type), counted at _close

    @property
    def active(self) -> bool:
        """Whether a prediction is being traced and can still take what is recorded.

        False for the no-op object, and once the prediction is finished (in a
        background task that runs after the response, say).
        """
        return self._late is None

    @property
    def prediction_id(self) -> str:
        """The prediction id (also in the response header)."""
        if self.id_hook is not None:
            self._settle_id()
        return self._id

    def _settle_id(self) -> None:
        """Run the id hook (FastAPI telemetry mode): the final id and sampling decision."""
        hook = self.id_hook
        if hook is not None and hook():
            self.id_hook = None

    def _set_id(self, prediction_id: str, *, sampled: bool) -> None:
        self._id = prediction_id
        self.sampled = sampled

    def _close(self, counts: Counter[str]) -> None:
        """The prediction is finished: later calls are ignored and counted in ``counts``."""
        self._late = counts
        if self._ignored:
            counts[IGNORED] += self._ignored
            self._ignored = 0

    def _ignore(self) -> None:
        """Count a value (or a call) that could not be used: never an error for the handler."""
        late = self._late
        if late is None:
            self._ignored += 1
        else:
            late[IGNORED] += 1

    def _text(self, value: object) -> str | None:
        """``text_value``, counting a value of the wrong type."""
        if type(value) is str:
            # The usual case (a short printable str) without a call: a hot path.
            if len(value) <= MAX_TEXT and value.isprintable():
                return value
            return clean(value)
        text = text_value(value)
        if text is None:
            self._ignore()
        return text

    def _too_late(self) -> bool:
        """Whether the prediction is finished (the call is then counted, not applied)."""
        late = self._late
        if late is None:
            return False
        late["late_context_call"] += 1
        return True

    @property
    def is_sampled(self) -> bool:
        """Whether this prediction's output and features are captured."""
        if self.id_hook is not None:
            self._settle_id()
        return self.sampled

    def set_model(
        self,
        *,
        name: str | None = None,
        version: str | None = None,
        alias: str | None = None,
        registry_model_id: str | None = None,
        artifact_digest: str | None = None,
    ) -> None:
        """Name the model that served this prediction (overrides route and config).

        A value that is neither a text nor a number is ignored (and counted).
        """
        if self._too_late():
            return
        given = {
            "name": name,
            "version": version,
            "alias": alias,
            "registry_model_id": registry_model_id,
            "artifact_digest": artifact_digest,
        }
        override = self.model_override if self.model_override is not None else {}
        for key, value in given.items():
            if value is not None and (text := self._text(value)) is not None:
                override[key] = text
        self.model_override = override

    def add_model(self, *, role: str, name: str, version: str = "") -> None:
        """Record a further model of an ensemble or pipeline, with its role.

        Without a usable ``name`` (not a text or a number) the call is ignored
        (and counted); an unusable ``role`` or ``version`` is left empty.
        """
        if self._too_late():
            return
        models = self._extra_models if self._extra_models is not None else []
        if len(models) < MAX_EXTRA_MODELS:
            member = self._text(name)
            if member is None:
                return
            version_text = "" if version is None else self._text(version)
            role_text = "" if role is None else self._text(role)
            models.append(ModelRef(name=member, version=version_text or "", role=role_text or ""))
        self._extra_models = models

    def record_output(
        self, *, label: str | None = None, score: float | None = None, value: float | None = None
    ) -> None:
        """Record a bounded summary of the output (kept only when sampled).

        A number given as ``label`` (a class index) is kept as its ``str``;
        another type is ignored (and counted), the score and value kept.
        """
        try:
            if self._too_late() or not self.is_sampled:
                return
            self.output = OutputSummary(
                label=self._text(label) if label is not None else None,
                score=_finite(score),
                value=_finite(value),
            )
        except Exception:  # noqa: BLE001 - handler code never fails because of telemetry
            self._ignore()

    def record_features(self, features: Mapping[str, float]) -> None:
        """Record numeric features; only allow-listed, finite ones, only when sampled.

        Not a mapping, or a key that is not a text: ignored (and counted).
        """
        try:
            if self._too_late():
                return
            allowed = self._limits[0]
            if not allowed or not self.is_sampled:
                return
            kept = self._features if self._features is not None else {}
            self._features = kept
            for key, value in features.items():
                number = _finite(value)
                if key in allowed and number is not None and len(kept) < MAX_FEATURES:
                    # An allow-listed key equals a str: a subclass is kept as a plain one.
                    kept[key if type(key) is str else str.__str__(key)] = number
        except Exception:  # noqa: BLE001 - handler code never fails because of telemetry
            self._ignore()

    def set_attribute(self, key: str, value: str) -> None:
        """Attach a short attribute to the event; only allow-listed keys leave.

        The value is a text or a number (kept as its ``str``); another type is
        ignored (and counted), as is a key that cannot be looked up.
        """
        try:
            if self._too_late() or key not in self._limits[1]:
                return
            name = key if type(key) is str and key.isprintable() else clean(str.__str__(key))
        except Exception:  # noqa: BLE001 - an unhashable key, say: never the handler's error
            self._ignore()
            return
        text = self._text(value)
        if text is None:
            return
        kept = self._attributes if self._attributes is not None else {}
        if name in kept or len(kept) < MAX_ATTRIBUTES:
            kept[name] = text
        self._attributes = kept

    def _merge_features(self, features: dict[str, float]) -> None:
        """Add features found by the middleware itself (already filtered); handler's win."""
        kept = self._features if self._features is not None else {}
        for key, value in features.items():
            kept.setdefault(key, value)
        self._features = kept

    @property
    def features(self) -> dict[str, float] | None:
        """The captured features (None when none)."""
        return self._features

    @property
    def attributes(self) -> dict[str, str] | None:
        """The captured attributes (None when none)."""
        return self._attributes

    @property
    def extra_models(self) -> list[ModelRef] | None:
        """Further models recorded by ``add_model`` (None when none)."""
        return self._extra_models


class _NoPrediction(PredictionContext):
    """Returned outside a prediction: every call does nothing."""

    __slots__ = ()

    @property
    def active(self) -> bool:
        return False

    def _too_late(self) -> bool:
        # Every helper asks this first: outside a prediction each does nothing,
        # with a prediction's own signature (a misspelt keyword fails alike).
        return True


NO_PREDICTION: Final[PredictionContext] = _NoPrediction(
    "", sampled=False, features=frozenset(), attributes=frozenset()
)
CURRENT: Final[ContextVar[PredictionContext]] = ContextVar(
    "predtrace_prediction", default=NO_PREDICTION
)


def current_prediction() -> PredictionContext:
    """The prediction this code is serving, or a no-op object outside one.

    Example:
        >>> current_prediction().set_model(name="churn", version="7")
    """
    return CURRENT.get()


def _finite(value: object) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]  # checked here: anything may come
    except Exception:  # noqa: BLE001 - an int beyond any float, a bad __float__: no number
        return None
    return number if math.isfinite(number) else None
