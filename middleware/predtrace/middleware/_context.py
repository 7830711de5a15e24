"""The handler's view of the current prediction: ``current_prediction()``.

Backed by a contextvar that the middleware sets for each prediction request,
so a handler (async, or sync in a thread pool) can name the model it used and
record its output and features without touching the middleware. Outside a
prediction the helper returns a no-op object, so handler code never fails
because telemetry is off. Everything recorded here is bounded and filtered by
the allow-lists before it can reach an event.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Final

from predtrace.wire import ModelRef, OutputSummary

MAX_FEATURES: Final = 64
MAX_ATTRIBUTES: Final = 32
MAX_EXTRA_MODELS: Final = 8
MAX_TEXT: Final = 256


def clip(text: str) -> str:
    """Bound a text value carried by an event or a span."""
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT]


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

    @property
    def active(self) -> bool:
        """Whether a prediction is being traced (False for the no-op object)."""
        return True

    @property
    def prediction_id(self) -> str:
        """The prediction id (also in the response header)."""
        hook = self.id_hook
        if hook is not None and hook():
            self.id_hook = None
        return self._id

    def _set_id(self, prediction_id: str) -> None:
        self._id = prediction_id

    @property
    def is_sampled(self) -> bool:
        """Whether this prediction's output and features are captured."""
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
        """Name the model that served this prediction (overrides route and config)."""
        given = {
            "name": name,
            "version": version,
            "alias": alias,
            "registry_model_id": registry_model_id,
            "artifact_digest": artifact_digest,
        }
        override = self.model_override if self.model_override is not None else {}
        override.update({k: clip(str(v)) for k, v in given.items() if v is not None})
        self.model_override = override

    def add_model(self, *, role: str, name: str, version: str = "") -> None:
        """Record a further model of an ensemble or pipeline, with its role."""
        models = self._extra_models if self._extra_models is not None else []
        if len(models) < MAX_EXTRA_MODELS:
            models.append(ModelRef(name=clip(name), version=clip(version), role=clip(role)))
        self._extra_models = models

    def record_output(
        self, *, label: str | None = None, score: float | None = None, value: float | None = None
    ) -> None:
        """Record a bounded summary of the output (kept only when sampled)."""
        if not self.sampled:
            return
        self.output = OutputSummary(
            label=clip(label) if label is not None else None,
            score=_finite(score),
            value=_finite(value),
        )

    def record_features(self, features: Mapping[str, float]) -> None:
        """Record numeric features; only allow-listed, finite ones, only when sampled."""
        allowed = self._limits[0]
        if not self.sampled or not allowed:
            return
        kept = self._features if self._features is not None else {}
        for key, value in features.items():
            number = _finite(value)
            if key in allowed and number is not None and len(kept) < MAX_FEATURES:
                kept[key] = number
        self._features = kept

    def set_attribute(self, key: str, value: str) -> None:
        """Attach a short attribute to the event; only allow-listed keys leave."""
        if key not in self._limits[1]:
            return
        kept = self._attributes if self._attributes is not None else {}
        if key in kept or len(kept) < MAX_ATTRIBUTES:
            kept[key] = clip(str(value))
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

    def set_model(self, **_: str | None) -> None:
        return

    def add_model(self, *, role: str, name: str, version: str = "") -> None:
        return

    def set_attribute(self, key: str, value: str) -> None:
        return


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


def _finite(value: float | None) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int beyond any float
        return None
    return number if math.isfinite(number) else None
