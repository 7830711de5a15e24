"""The query and lineage HTTP API (JSON), plus health and metrics endpoints.

Queries (scope ``read``): the on-call pivot by trace id or prediction id, model
lineage by version or alias, impact from a dataset, commit or image, completeness
and the per-producer gap report. Lineage registration (scope ``ingest``): the
CI/CD hook body and OpenLineage run events. Retention (scope ``admin``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web

from predtrace.collector._auth import Scope
from predtrace.collector._errors import LineageConflictError, LineageError, StoreError
from predtrace.collector._metrics import CollectorMetrics
from predtrace.collector._retention import Retainer
from predtrace.collector._security import Authorizer, AuthRefusal
from predtrace.collector._service import LineageService
from predtrace.collector.lineage import Registration, parse_registration, parse_run_event
from predtrace.collector.store import OnConflict
from predtrace.wire import InvalidIdError, parse_prediction_id, parse_trace_id

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_IMPACT_KINDS: Final = ("dataset", "commit", "image")

# ``?replace=`` of the lineage endpoints: overwrite links that disagree.
_FLAGS: Final = {"true": True, "1": True, "false": False, "0": False}


def _json(data: object, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, default=str))


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


class QueryApi:
    """Route handlers of one collector; every handler checks its scope first."""

    def __init__(
        self,
        service: LineageService,
        retainer: Retainer,
        authorizer: Authorizer,
        metrics: CollectorMetrics,
        *,
        query_limit: int,
        retry_after_s: int,
    ) -> None:
        self.service, self.retainer, self.authorizer = service, retainer, authorizer
        self.metrics, self.limit = metrics, query_limit
        self.retry_after = str(retry_after_s)

    def _guard(self, scope: Scope, name: str, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            started = time.perf_counter()
            try:
                self.authorizer.check(request, scope)
                return await handler(request)
            except AuthRefusal as refusal:
                return refusal.response()
            except StoreError:
                return web.Response(
                    status=503, text="store unavailable", headers={"Retry-After": self.retry_after}
                )
            finally:
                self.metrics.query_seconds.labels(name).observe(time.perf_counter() - started)

        return guarded

    def routes(self) -> list[web.RouteDef]:
        """Every route of the API."""
        read, ingest, admin = Scope.READ, Scope.INGEST, Scope.ADMIN
        return [
            web.get("/v1/traces/{trace_id}", self._guard(read, "trace", self.trace)),
            web.get("/v1/predictions/{id}", self._guard(read, "prediction", self.prediction)),
            web.get(
                "/v1/models/{name}/versions/{version}/lineage",
                self._guard(read, "model_lineage", self.model_lineage),
            ),
            web.get(
                "/v1/models/{name}/aliases/{alias}/lineage",
                self._guard(read, "model_lineage", self.alias_lineage),
            ),
            web.get("/v1/impact", self._guard(read, "impact", self.impact)),
            web.get("/v1/completeness", self._guard(read, "completeness", self.completeness)),
            web.get("/v1/producers", self._guard(read, "producers", self.producers)),
            web.get("/v1/producers/{id}", self._guard(read, "producer", self.producer)),
            web.post("/v1/lineage", self._guard(ingest, "register", self.register)),
            web.post("/v1/openlineage", self._guard(ingest, "openlineage", self.openlineage)),
            web.get("/v1/retention", self._guard(admin, "retention", self.retention)),
            web.post("/v1/retention/run", self._guard(admin, "retention", self.run_retention)),
        ]

    async def _pivot(self, column: str, value: object, what: str) -> web.Response:
        predictions = await self.service.pivot(column, value, self.limit)
        if not predictions:
            return _error(404, f"no predictions for {what}")
        complete = all(p["lineage"]["complete"] for p in predictions)  # type: ignore[index]
        return _json({"query": what, "predictions": predictions, "complete": complete})

    async def trace(self, request: web.Request) -> web.Response:
        """``GET /v1/traces/{trace_id}``: predictions of a trace and their chains."""
        try:
            trace_id = parse_trace_id(request.match_info["trace_id"])
        except InvalidIdError as exc:
            return _error(400, str(exc))
        return await self._pivot("trace_id", trace_id, f"trace {trace_id.hex()}")

    async def prediction(self, request: web.Request) -> web.Response:
        """``GET /v1/predictions/{id}``: one prediction (or several sharing a caller id)."""
        try:
            prediction_id = parse_prediction_id(request.match_info["id"])
        except InvalidIdError as exc:
            return _error(400, str(exc))
        return await self._pivot("prediction_id", prediction_id, f"prediction {prediction_id}")

    async def _lineage(self, name: str, version: str, what: str) -> web.Response:
        lineage = await self.service.model_lineage(name, version)
        if lineage is None:
            return _error(404, f"model version {what} is not registered")
        return _json(lineage)

    async def model_lineage(self, request: web.Request) -> web.Response:
        """``GET /v1/models/{name}/versions/{version}/lineage``."""
        name, version = request.match_info["name"], request.match_info["version"]
        return await self._lineage(name, version, f"{name}/{version}")

    async def alias_lineage(self, request: web.Request) -> web.Response:
        """``GET /v1/models/{name}/aliases/{alias}/lineage``."""
        name, alias = request.match_info["name"], request.match_info["alias"]
        version = await self.service.resolve_alias(name, alias)
        if version is None:
            return _error(404, f"alias {name}@{alias} is not registered")
        return await self._lineage(name, version, f"{name}@{alias} (version {version})")

    async def impact(self, request: web.Request) -> web.Response:
        """``GET /v1/impact?dataset=D | commit=SHA | image=D``."""
        given = [(k, request.query[k]) for k in _IMPACT_KINDS if request.query.get(k)]
        if len(given) != 1:
            return _error(400, "give exactly one of dataset=, commit= or image=")
        kind, value = given[0]
        if kind == "commit" and len(value) < 7:
            return _error(400, "a commit needs at least 7 hex digits")
        result = await self.service.store.impact(kind, value)
        if result is None:
            return _error(404, f"nothing known about {kind} {value}")
        return _json(result)

    async def completeness(self, request: web.Request) -> web.Response:
        """``GET /v1/completeness``: share of predictions with a complete chain, per model."""
        return _json(await self.service.completeness())

    async def producers(self, request: web.Request) -> web.Response:
        """``GET /v1/producers``: every producer with its missing batch count."""
        return _json({"producers": await self.service.store.producers()})

    async def producer(self, request: web.Request) -> web.Response:
        """``GET /v1/producers/{id}``: the gap report of one producer."""
        report = await self.service.store.producer(request.match_info["id"])
        return _json(report) if report is not None else _error(404, "unknown producer")

    async def _read_json(self, request: web.Request) -> object:
        body = await request.read()  # bounded by the app's client_max_size (413)
        try:
            # UTF-8 whatever charset the header claims (RFC 8259 §8.1).
            return json.loads(body.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise LineageError("the body is not valid JSON") from None
        except RecursionError:
            raise LineageError("the body is nested too deeply") from None

    async def _register(
        self,
        request: web.Request,
        parse: Callable[[object], Registration],
        on_conflict: OnConflict,
    ) -> web.Response:
        replace = request.query.get("replace", "false").lower()
        if replace not in _FLAGS:
            return _error(400, "replace must be true or false")
        try:
            registration = parse(await self._read_json(request))
        except LineageError as exc:
            return _error(400, str(exc))
        except web.HTTPRequestEntityTooLarge:
            return _error(413, "lineage body too large")
        try:
            conflicts = await self.service.register(
                registration, on_conflict="replace" if _FLAGS[replace] else on_conflict
            )
        except LineageConflictError as exc:
            return _error(409, str(exc))
        answer: dict[str, object] = {"registered": True, "source": registration.source}
        if conflicts:
            answer["conflicts_kept_as_stored"] = conflicts
        return _json(answer, 201)

    async def register(self, request: web.Request) -> web.Response:
        """``POST /v1/lineage``: a CI/CD hook registers lineage."""
        return await self._register(request, parse_registration, "refuse")

    async def openlineage(self, request: web.Request) -> web.Response:
        """``POST /v1/openlineage``: an OpenLineage RunEvent."""
        # An OpenLineage run is not the authority on which run made a model
        # version (its runId is its own): conflicting links are kept as stored.
        return await self._register(request, parse_run_event, "keep")

    async def retention(self, request: web.Request) -> web.Response:
        """``GET /v1/retention``: the policy and the latest reports."""
        policy = self.retainer.policy
        return _json(
            {
                "policy": {
                    "predictions_days": policy.predictions_days,
                    "batches_days": policy.batches_days,
                    "chain_events_days": policy.chain_events_days,
                    "lineage": "kept",
                },
                "reports": await self.retainer.reports(),
            }
        )

    async def run_retention(self, request: web.Request) -> web.Response:
        """``POST /v1/retention/run``: one pass now; answers its report."""
        return _json(await self.retainer.run_once())
