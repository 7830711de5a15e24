"""Which requests are predictions: route patterns and their matcher.

First stage of the middleware: a request whose method and path match no
pattern passes through untouched. Built in are the Open Inference Protocol v2
REST route and KServe v1; users add their own templates, where ``{name}`` and
``{version}`` capture the model identity from the path, each with the protocol
it speaks (an OIP v2 server mounted under a prefix is still OIP v2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, NamedTuple

from predtrace.middleware._context import clean
from predtrace.middleware._errors import ConfigError

PROTOCOL_OIP_V2_REST: Final = "oip-v2-rest"
PROTOCOL_KSERVE_V1: Final = "kserve-v1"
PROTOCOL_HTTP: Final = "http"
PROTOCOLS: Final = (PROTOCOL_OIP_V2_REST, PROTOCOL_KSERVE_V1, PROTOCOL_HTTP)
"""The protocols a route may speak: what the middleware reads of its request and answer.

``oip-v2-rest``: the body ``id`` is the caller's prediction id, the answer
names the model version served, its outputs are summarised. ``kserve-v1``:
``instances`` and ``predictions``. ``http``: any other JSON route (the id
comes from the headers only).
"""

_PLACEHOLDER_RE: Final = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_CACHE_SIZE: Final = 1024
_METHODS: Final = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "QUERY"})


@dataclass(frozen=True, slots=True, kw_only=True)
class RoutePattern:
    """A prediction route: method, path template and the protocol it speaks.

    ``protocol`` is one of ``PROTOCOLS`` (default ``http``).

    Example:
        >>> RoutePattern(template="/models/{name}/predict")
        >>> RoutePattern.parse("POST /v1/score")
        >>> RoutePattern.parse("POST /api/v2/models/{name}/infer oip-v2-rest")
    """

    template: str
    method: str = "POST"
    protocol: str = PROTOCOL_HTTP

    def __post_init__(self) -> None:
        if not self.template.startswith("/"):
            raise ConfigError(f"route template must start with '/', got {self.template!r}")
        if self.method not in _METHODS:
            raise ConfigError(
                f"route method must be one of {sorted(_METHODS)}, got {self.method!r}"
            )
        if self.protocol not in PROTOCOLS:
            raise ConfigError(
                f"route protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}"
                f" (route {self.template!r})"
            )
        names = _PLACEHOLDER_RE.findall(self.template)
        if len(names) != len(set(names)):
            raise ConfigError(f"route template repeats a placeholder: {self.template!r}")
        rest = _PLACEHOLDER_RE.sub("", self.template)
        if "{" in rest or "}" in rest:
            raise ConfigError(
                f"route template has an unclosed or stray brace: {self.template!r}"
                " (placeholders look like {name})"
            )

    @classmethod
    def parse(cls, text: str) -> RoutePattern:
        """Read ``"[METHOD ]/path/{name}[ PROTOCOL]"`` (method POST, protocol ``http`` by default).

        Example: ``POST /api/v2/models/{name}/infer oip-v2-rest``.

        Raises:
            ConfigError: not an optional method, a template starting with ``/``
                and an optional protocol among ``PROTOCOLS``.
        """
        parts = text.split()
        method = "POST"
        if len(parts) > 1 and not parts[0].startswith("/"):
            method = parts.pop(0).upper()
        if len(parts) == 1:
            return cls(method=method, template=parts[0])
        if len(parts) == 2 and parts[0].startswith("/"):
            return cls(method=method, template=parts[0], protocol=parts[1].lower())
        raise ConfigError(
            f"route must be '[METHOD ]/path[ PROTOCOL]' (PROTOCOL one of {', '.join(PROTOCOLS)}),"
            f" got {text!r}"
        )

    def compile(self) -> re.Pattern[str]:
        """The regular expression matching a request path in full."""
        out: list[str] = []
        pos = 0
        for found in _PLACEHOLDER_RE.finditer(self.template):
            out.append(re.escape(self.template[pos : found.start()]))
            name = found.group(1)
            group = name if name in ("name", "version") else None
            # A segment never spans '/'; KServe's "{name}:predict" backtracks over ':'.
            out.append(f"(?P<{group}>[^/]+)" if group else "[^/]+")
            pos = found.end()
        out.append(re.escape(self.template[pos:]))
        return re.compile("".join(out))


BUILTIN_ROUTES: Final = (
    RoutePattern(template="/v2/models/{name}/infer", protocol=PROTOCOL_OIP_V2_REST),
    RoutePattern(
        template="/v2/models/{name}/versions/{version}/infer", protocol=PROTOCOL_OIP_V2_REST
    ),
    RoutePattern(template="/v1/models/{name}:predict", protocol=PROTOCOL_KSERVE_V1),
)


class RouteMatch(NamedTuple):
    """A request that is a prediction: its route template, protocol and path model."""

    template: str
    protocol: str
    name: str
    version: str


class RouteTable:
    """Matches (method, path) against the prediction routes, in order."""

    __slots__ = ("_cache", "_entries", "_prefixes")

    def __init__(self, patterns: tuple[RoutePattern, ...]) -> None:
        self._entries = tuple(
            (p.method, p.compile().fullmatch, p.template, p.protocol) for p in patterns
        )
        # A cheap first test: the literal text before the first placeholder.
        self._prefixes = tuple({p.template.split("{", 1)[0] for p in patterns})
        # Results by (method, path); bounded, as paths come from clients.
        self._cache: dict[tuple[str, str], RouteMatch | None] = {}

    def match(self, method: str, path: str) -> RouteMatch | None:
        """Return the first matching route, or None for a non-prediction request."""
        if not path.startswith(self._prefixes):
            return None
        key = (method, path)
        try:
            return self._cache[key]
        except KeyError:
            pass
        found = self._search(method, path)
        if len(self._cache) < _CACHE_SIZE:
            self._cache[key] = found
        return found

    def _search(self, method: str, path: str) -> RouteMatch | None:
        for route_method, fullmatch, template, protocol in self._entries:
            if route_method != method:
                continue
            found = fullmatch(path)
            if found is not None:
                groups = found.groupdict()
                # From the client's path: bounded and cleaned like a name the
                # response gives (a NUL would cost the event, 64 KiB the span).
                # Here, not per request: the match is cached by path.
                return RouteMatch(
                    template,
                    protocol,
                    clean(groups.get("name") or ""),
                    clean(groups.get("version") or ""),
                )
        return None
