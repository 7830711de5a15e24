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
import re
from collections.abc import Sequence
from typing import Any

from predtrace.sidecar._config import DeploymentConfig, RedactionConfig
from predtrace.sidecar.pipeline import Processor
from predtrace.wire import DeploymentRef, PredictionEvent
from predtrace.wire._maps import _DEPLOYMENT_FIELDS  # the wire's deployment keys

REDACTED = "[redacted]"


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

    Example:
        >>> RedactionProcessor(RedactionConfig(allow_features=("age", "tenure_*")))
    """

    def __init__(self, config: RedactionConfig) -> None:
        self.config = config
        self._features = _Globs(config.allow_features)
        self._attributes = _Globs(config.allow_attributes)
        joined = "|".join(f"(?:{p})" for p in config.patterns)
        self._mask = re.compile(joined) if joined else None

    def __call__(self, event: PredictionEvent) -> PredictionEvent:
        """Return the event with what may not leave removed (in place)."""
        if event.features and not self._features.everything:
            event.features = {k: v for k, v in event.features.items() if self._features(k)}
        if event.attributes:
            if not self._attributes.everything:
                kept = {k: v for k, v in event.attributes.items() if self._attributes(k)}
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
            raw[16] = {k: v for k, v in features.items() if self._features(k)}
        attributes = raw.get(17)
        if attributes:
            if not self._attributes.everything:
                attributes = {k: v for k, v in attributes.items() if self._attributes(k)}
            if self._mask is not None:
                attributes = {k: self._mask.sub(REDACTED, v) for k, v in attributes.items()}
            raw[17] = attributes
        output = raw.get(15)
        if self._mask is not None and output and output.get(1):
            output[1] = self._mask.sub(REDACTED, output[1])
        return raw


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
