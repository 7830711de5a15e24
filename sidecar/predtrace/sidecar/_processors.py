"""Processors run on every event before the spool: enrichment, then redaction.

Intake -> **processors** -> spool. A processor is ``event -> event | None``
(STYLE: "a processor is just a callable"). Redaction runs last and before any
byte reaches the disk, so values that must not leave never reach the spool.

The built-in processors also have ``on_map``: the same change made to a plain
event map (``predtrace.wire.plain_event_map``), so events that arrive as
msgpack maps are processed without being turned into objects and back. The
two forms are held equal by a test.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Sequence
from typing import Any

from predtrace.sidecar._config import DeploymentConfig, RedactionConfig
from predtrace.sidecar.pipeline import Processor
from predtrace.wire import DeploymentRef, PredictionEvent
from predtrace.wire._maps import _DEPLOYMENT_FIELDS  # the wire's deployment keys

REDACTED = "[redacted]"
_log = logging.getLogger("predtrace.sidecar.redaction")


class _Globs:
    """Fast membership for a list of shell globs (exact names need no regex)."""

    def __init__(self, globs: Sequence[str]) -> None:
        self.everything = "*" in globs
        self.exact = frozenset(g for g in globs if not any(c in g for c in "*?["))
        patterns = [fnmatch.translate(g) for g in globs if g not in self.exact]
        self.regex = re.compile("|".join(patterns)) if patterns else None

    def __call__(self, name: str) -> bool:
        if self.everything or name in self.exact:
            return True
        return self.regex is not None and self.regex.match(name) is not None


class RedactionProcessor:
    """Keeps only allow-listed features and attributes and masks sensitive patterns.

    The sidecar's allow-lists are a second gate after the middleware's: a
    feature the middleware sends is removed here unless allowed too. What
    is removed is counted (``removed_features``, ``removed_attributes``:
    the ``predtrace_sidecar_redacted_total`` metric), and the first removal
    of each kind is logged with the setting that would keep it.

    Example:
        >>> RedactionProcessor(RedactionConfig(allow_features=("age", "tenure_*")))
    """

    def __init__(self, config: RedactionConfig) -> None:
        self.config = config
        self._features = _Globs(config.allow_features)
        self._attributes = _Globs(config.allow_attributes)
        joined = "|".join(f"(?:{p})" for p in config.patterns)
        self._mask = re.compile(joined) if joined else None
        self.removed_features = 0
        """Features removed, not allow-listed (one add per event that lost some)."""
        self.removed_attributes = 0
        """Attributes removed, not allow-listed."""

    def counts(self) -> dict[str, int]:
        """What was removed so far, by kind (``feature``, ``attribute``)."""
        return {"feature": self.removed_features, "attribute": self.removed_attributes}

    def _removed_features(self, given: dict[Any, Any], kept: dict[Any, Any]) -> None:
        if not self.removed_features:
            _log_first("feature", given, kept, "--allow-feature", "PREDTRACE_ALLOW_FEATURES")
        self.removed_features += len(given) - len(kept)

    def _removed_attributes(self, given: dict[Any, Any], kept: dict[Any, Any]) -> None:
        if not self.removed_attributes:
            _log_first("attribute", given, kept, "--allow-attribute", "PREDTRACE_ALLOW_ATTRIBUTES")
        self.removed_attributes += len(given) - len(kept)

    def __call__(self, event: PredictionEvent) -> PredictionEvent:
        """Return the event with what may not leave removed (in place)."""
        if event.features and not self._features.everything:
            features = event.features
            event.features = {k: v for k, v in features.items() if self._features(k)}
            if len(event.features) != len(features):
                self._removed_features(features, event.features)
        if event.attributes:
            if not self._attributes.everything:
                kept = {k: v for k, v in event.attributes.items() if self._attributes(k)}
                if len(kept) != len(event.attributes):
                    self._removed_attributes(event.attributes, kept)
                event.attributes = kept
            if self._mask is not None:
                event.attributes = {
                    k: self._mask.sub(REDACTED, v) for k, v in event.attributes.items()
                }
        if self._mask is not None and event.output is not None and event.output.label:
            event.output.label = self._mask.sub(REDACTED, event.output.label)
        return event

    def on_map(self, raw: dict[Any, Any]) -> dict[Any, Any]:
        """``__call__`` on a plain event map (in place)."""
        features = raw.get(16)
        if features and not self._features.everything:
            raw[16] = kept = {k: v for k, v in features.items() if self._features(k)}
            if len(kept) != len(features):
                self._removed_features(features, kept)
        attributes = raw.get(17)
        if attributes:
            if not self._attributes.everything:
                kept = {k: v for k, v in attributes.items() if self._attributes(k)}
                if len(kept) != len(attributes):
                    self._removed_attributes(attributes, kept)
                attributes = kept
            if self._mask is not None:
                attributes = {k: self._mask.sub(REDACTED, v) for k, v in attributes.items()}
            raw[17] = attributes
        output = raw.get(15)
        if self._mask is not None and output and output.get(1):
            output[1] = self._mask.sub(REDACTED, output[1])
        return raw


def _log_first(
    kind: str, given: dict[Any, Any], kept: dict[Any, Any], flag: str, variable: str
) -> None:
    """Say once, at the first removal, why the names an event carried do not leave."""
    removed = sorted(str(name) for name in given if name not in kept)
    _log.warning(
        "the sidecar removes every %s not on its allow-list (%s or %s), a gate after "
        "the middleware's: removed %s%s; counted in predtrace_sidecar_redacted_total",
        kind,
        flag,
        variable,
        ", ".join(repr(name[:60]) for name in removed[:5]),
        f" and {len(removed) - 5} more" if len(removed) > 5 else "",
    )


def redaction_counts(processors: Sequence[object]) -> dict[str, int]:
    """Features and attributes the ``RedactionProcessor`` among ``processors`` removed."""
    for processor in processors:
        if isinstance(processor, RedactionProcessor):
            return processor.counts()
    return {"feature": 0, "attribute": 0}


class DeploymentEnricher:
    """Fills the deployment fields an event left empty from the sidecar's own identity."""

    def __init__(self, config: DeploymentConfig) -> None:
        self.config = config
        self._fields = tuple(
            (name, value)
            for name, value in (
                ("id", config.id),
                ("service", config.service),
                ("namespace", config.namespace),
                ("pod", config.pod),
                ("node", config.node),
                ("image_digest", config.image_digest),
                ("image_name", config.image_name),
            )
            if value
        )
        keys = {name: key for key, name in enumerate(_DEPLOYMENT_FIELDS, start=1)}
        self._keyed = tuple((keys[name], value) for name, value in self._fields)

    def __call__(self, event: PredictionEvent) -> PredictionEvent:
        """Return the event with empty deployment fields filled (in place)."""
        dep: DeploymentRef = event.deployment
        for name, value in self._fields:
            if not getattr(dep, name):
                setattr(dep, name, value)
        return event

    def on_map(self, raw: dict[Any, Any]) -> dict[Any, Any]:
        """``__call__`` on a plain event map (in place)."""
        if self._keyed:
            dep = raw.get(8)
            if dep is None:
                raw[8] = dep = {}
            for key, value in self._keyed:
                if not dep.get(key):
                    dep[key] = value
        return raw

    def resource_attributes(self) -> dict[str, str]:
        """The same identity as OTel resource attributes (semantic conventions)."""
        c = self.config
        pairs = {
            "predtrace.deployment.id": c.id,
            "service.name": c.service,
            "k8s.namespace.name": c.namespace,
            "k8s.pod.name": c.pod,
            "k8s.node.name": c.node,
            "container.image.name": c.image_name,
            "container.image.id": c.image_digest,
        }
        return {k: v for k, v in pairs.items() if v}


def default_processors(deployment: DeploymentConfig, redaction: RedactionConfig) -> list[Processor]:
    """Enrichment, then redaction (last, so nothing it removes reaches the disk)."""
    return [DeploymentEnricher(deployment), RedactionProcessor(redaction)]
