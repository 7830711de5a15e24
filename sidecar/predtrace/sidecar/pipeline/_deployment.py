"""Who serves: the deployment identity read from the environment.

One chain for the middleware and the sidecar, so the same pod gives the same
deployment (id, namespace, pod, node, image) whichever of them stamps an
event. Each field is the first of its variables that is set (non-empty),
else its OpenTelemetry resource attribute from ``OTEL_RESOURCE_ATTRIBUTES``.
The deployment id is left empty when ``PREDTRACE_DEPLOYMENT_ID`` is unset:
the collector then keys the deployment ``namespace/service`` (or
``service``), the same for every producer.

A value no event could carry (over 64 KiB, a NUL, not UTF-8) is refused here,
at startup, naming its variable: not on every event after it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final
from urllib.parse import unquote

from predtrace.sidecar import environment_variables as ev
from predtrace.wire import DEFAULT_LIMITS

OTEL_RESOURCE_ATTRIBUTES: Final = "OTEL_RESOURCE_ATTRIBUTES"
OTEL_SERVICE_NAME: Final = "OTEL_SERVICE_NAME"

# Each deployment field: its variables (first set wins), then its OTel resource attribute.
DEPLOYMENT_SOURCES: Final[tuple[tuple[str, tuple[str, ...], str], ...]] = (
    ("id", (ev.DEPLOYMENT_ID,), ""),
    ("service", (ev.SERVICE_NAME, OTEL_SERVICE_NAME), "service.name"),
    ("namespace", ev.K8S_NAMESPACE, "k8s.namespace.name"),
    ("pod", ev.K8S_POD, "k8s.pod.name"),
    ("node", ev.K8S_NODE, "k8s.node.name"),
    ("image_digest", (ev.IMAGE_DIGEST,), "container.image.id"),
    ("image_name", (ev.IMAGE_NAME,), "container.image.name"),
)
DEPLOYMENT_FIELDS: Final = tuple(name for name, _, _ in DEPLOYMENT_SOURCES)


class DeploymentEnvError(ValueError):
    """A deployment value of the environment no event could carry; the message names its source."""


def identity_problem(value: str) -> str | None:
    """Why ``value`` cannot be stamped on events as an identity field (None when it can).

    The rules of ``predtrace.wire.event_problem`` for a text field: an event
    carrying such a value would be refused, every one of them.
    """
    if "\x00" in value:
        return "it holds a NUL character"
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return "it is not valid UTF-8 text"
    limit = DEFAULT_LIMITS.max_str_len
    if size > limit:
        return f"it is {size} bytes long, more than the {limit} bytes a text field may hold"
    return None


def resource_attributes(text: str) -> dict[str, str]:
    """``OTEL_RESOURCE_ATTRIBUTES`` as the OTel SDK reads it: values are percent-decoded."""
    out = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            out[key.strip()] = unquote(value.strip())
    return out


def _pick(environ: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, str]:
    """The first of ``names`` set (not blank) and its name, stripped; ``("", "")`` if none is.

    A value of only whitespace counts as unset: the next name is asked.
    """
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            return value, name
    return "", ""


def deployment_from_env(environ: Mapping[str, str]) -> dict[str, str]:
    """Each field of ``DEPLOYMENT_FIELDS`` (``""`` when unset) read from ``environ``.

    Raises:
        DeploymentEnvError: a value no event could carry, named by its variable
            (``OTEL_RESOURCE_ATTRIBUTES (k8s.pod.name)`` for a resource attribute).
    """
    resource = resource_attributes(environ.get(OTEL_RESOURCE_ATTRIBUTES, ""))
    values: dict[str, str] = {}
    for name, variables, attribute in DEPLOYMENT_SOURCES:
        value, source = _pick(environ, variables)
        if not value and attribute:
            value = resource.get(attribute, "").strip()
            source = f"{OTEL_RESOURCE_ATTRIBUTES} ({attribute})"
        problem = identity_problem(value)
        if problem is not None:
            raise DeploymentEnvError(
                f"{source} cannot be the deployment's {name} stamped on events: {problem}"
            )
        values[name] = value
    return values
