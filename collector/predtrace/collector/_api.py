"""The query and lineage HTTP API (JSON), plus health and metrics endpoints.

Queries (scope ``read``): the on-call pivot by trace id or prediction id, model
lineage by version or alias, impact from a dataset, commit or image, completeness
and the per-producer gap report. A pivot answer is bounded in rows and bytes and
says what it left out; so do the producer list and completeness's models, a page
at a time (``?limit=``, ``?after=``; ``_api_responses``); model lineage and impact
list a model version's busiest deployments and count them all. A path or query value
holding NUL is refused (400) before any handler runs: no store holds one. Lineage
registration (scope ``ingest``, on a token bound to no producer;
``_api_registration``): the CI/CD hook body and OpenLineage run events, read as
batches are (a deadline, the shared in-flight byte budget). Retention (scope
``admin``). Answers are bounded in memory (``_answers``); store failures and
dropped clients are logged at a bounded rate (``_api_logs``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web

from predtrace.collector._answers import (
    ANSWER_BUDGET_BYTES,
    MIN_SEND_RATE,
    SEND_TIMEOUT_S,
    AnswerSender,
)
from predtrace.collector._api_logs import DisconnectLog, StoreFaultLog
from predtrace.collector._api_registration import RegistrationHandler
from predtrace.collector._api_responses import (
    BadArgumentError,
    error_response,
    json_response,
    page_args,
    paged,
    pivot_body,
)
from predtrace.collector._auth import Scope
from predtrace.collector._budget import _Refused
from predtrace.collector._errors import RegistryError, StoreError, StoreUnavailableError
from predtrace.collector._metrics import CollectorMetrics
from predtrace.collector._retention import Retainer
from predtrace.collector._security import Authorizer, AuthRefusal
from predtrace.collector._service import LineageService
from predtrace.collector.lineage import parse_registration, parse_run_event
from predtrace.collector.store._chain import Json
from predtrace.collector.store._maintenance import PAGE_LIMIT, producers_plan
from predtrace.collector.store._reads import AmbiguousCommitError, completeness_plan
from predtrace.wire import InvalidIdError, parse_prediction_id, parse_trace_id

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_IMPACT_KINDS: Final = ("dataset", "commit", "image")
# A path segment: any text but "/" (aiohttp's default, [^{}/]+, leaves ids
# holding a brace unreachable, though ingest and registration accept them).
_SEGMENT: Final = "[^/]+"


def _refused_argument(request: web.Request) -> str | None:
    """Why a path or query value of ``request`` is refused, or None.

    NUL only: ingest and registration refuse it, so it matches nothing
    stored, and PostgreSQL cannot take it as an argument (it failed the
    query, a 503 that told the client to retry). Other control characters
    stay allowed: ingest keeps them in producer ids, model names and
    deployments, which must stay reachable. (aiohttp hands no lone surrogate
    over: it keeps undecodable escapes in a path, U+FFFD in a query.)
    """
    parts = (("path part", request.match_info.items()), ("query argument", request.query.items()))
    for where, items in parts:
        for name, value in items:
            if "\x00" in name or "\x00" in value:
                return f"the {where} {name!r} holds a NUL character (%00): no stored value does"
    return None


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
        answer_budget_bytes: int = ANSWER_BUDGET_BYTES,
        send_timeout_s: float = SEND_TIMEOUT_S,
        min_send_rate: float = MIN_SEND_RATE,
    ) -> None:
        self.service, self.retainer, self.authorizer = service, retainer, authorizer
        self.metrics, self.limit = metrics, query_limit
        self.retry_after = str(retry_after_s)
        self.disconnects = DisconnectLog()
        self.stalled = DisconnectLog(what="answer(s) not read by the client in time, aborted")
        self.store_faults = StoreFaultLog()
        self.registration = RegistrationHandler(service, self.retry_after, self.disconnects)
        self.answers = AnswerSender(
            budget_bytes=answer_budget_bytes,
            send_timeout_s=send_timeout_s,
            min_send_rate=min_send_rate,
            on_stalled=self.stalled.record,
            gauge=metrics.answer_bytes,
        )

    def _guard(
        self, scope: Scope, name: str, handler: Handler, *, unbound: bool = False
    ) -> Handler:
        """``handler`` behind the scope check; ``unbound``: no producer-bound token either.

        A token bound to producer ids (an edge device's, a sidecar's) may send
        those producers' batches and nothing else: lineage is registry
        evidence that no single producer owns, so writing it takes an ingest
        token without producers (a CI/CD hook's) or an admin one.
        """

        async def guarded(request: web.Request) -> web.StreamResponse:
            started = time.perf_counter()
            try:
                entry = self.authorizer.check(request, scope)
                bound = entry is not None and entry.producers and not entry.allows(Scope.ADMIN)
                if unbound and bound:
                    raise AuthRefusal(
                        403,
                        "this token is bound to producers: it may send their batches, not "
                        "register lineage (use an ingest token without --producer)",
                    )
                refused = _refused_argument(request)
                if refused is not None:
                    return error_response(400, refused)
                return await handler(request)
            except AuthRefusal as refusal:
                return refusal.response()
            except StoreError as exc:
                return self._store_failed(name, exc)
            except _Refused as refused:  # 503: the answers' byte budget is full
                headers = {"Retry-After": self.retry_after} if refused.status == 503 else None
                return error_response(refused.status, refused.reason, headers)
            finally:
                self.metrics.query_seconds.labels(name).observe(time.perf_counter() - started)

        return guarded

    def _store_failed(self, route: str, exc: StoreError) -> web.Response:
        """503 for a store failure (logged); Retry-After only when the store said it is transient.

        As ingest answers: a store failure is never a 500, which tells a
        client the request itself is at fault and ends the retries of a
        sidecar (ingest must keep its batch). Arguments are checked first
        (``_refused_argument``), so what fails here is the store's: a 503,
        yet without Retry-After unless the store called it transient (locked,
        unreachable, out of space), since a wait is then not known to help.
        The engines' list of transient errors is not exhaustive (a server
        restart may end a query with another error): a client may still retry.
        """
        self.store_faults.record(route, exc)
        if isinstance(exc, StoreUnavailableError):
            return error_response(
                503, "store unavailable, retry later", {"Retry-After": self.retry_after}
            )
        return error_response(503, "the store failed this query; the collector's log says why")

    def routes(self) -> list[web.RouteDef]:
        """Every route of the API."""
        read, ingest, admin = Scope.READ, Scope.INGEST, Scope.ADMIN
        seg = _SEGMENT
        return [
            web.get(f"/v1/traces/{{trace_id:{seg}}}", self._guard(read, "trace", self.trace)),
            web.get(
                f"/v1/predictions/{{id:{seg}}}", self._guard(read, "prediction", self.prediction)
            ),
            web.get(
                f"/v1/models/{{name:{seg}}}/versions/{{version:{seg}}}/lineage",
                self._guard(read, "model_lineage", self.model_lineage),
            ),
            web.get(
                f"/v1/models/{{name:{seg}}}/aliases/{{alias:{seg}}}/lineage",
                self._guard(read, "model_lineage", self.alias_lineage),
            ),
            web.get("/v1/impact", self._guard(read, "impact", self.impact)),
            web.get("/v1/completeness", self._guard(read, "completeness", self.completeness)),
            web.get("/v1/producers", self._guard(read, "producers", self.producers)),
            web.get(f"/v1/producers/{{id:{seg}}}", self._guard(read, "producer", self.producer)),
            web.post("/v1/lineage", self._guard(ingest, "register", self.register, unbound=True)),
            web.post(
                "/v1/openlineage",
                self._guard(ingest, "openlineage", self.openlineage, unbound=True),
            ),
            web.get("/v1/retention", self._guard(admin, "retention", self.retention)),
            web.post("/v1/retention/run", self._guard(admin, "retention", self.run_retention)),
        ]

    async def _pivot(self, column: str, value: object, what: str) -> web.Response | Json:
        return pivot_body(await self.service.pivot(column, value, self.limit), what)

    async def trace(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/traces/{trace_id}``: predictions of a trace and their chains."""
        try:
            trace_id = parse_trace_id(request.match_info["trace_id"])
        except InvalidIdError as exc:
            return error_response(400, str(exc))
        what = f"trace {trace_id.hex()}"
        return await self.answers.answer(
            request, lambda: self._pivot("trace_id", trace_id, what), big=True
        )

    async def prediction(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/predictions/{id}``: one prediction (or several sharing a caller id)."""
        given = request.match_info["id"].strip()
        try:
            canonical = parse_prediction_id(given)
        except InvalidIdError as exc:
            return error_response(400, str(exc))
        # Ingest keeps a caller's id as sent: a UUID may be stored upper case or
        # without dashes. The text given and every such spelling, in one query.
        spellings = (given, *_uuid_spellings(canonical))
        return await self.answers.answer(
            request,
            lambda: self._pivot("prediction_id", spellings, f"prediction {given}"),
            big=True,
        )

    def _registry_failed(self, what: str, exc: RegistryError) -> web.Response:
        # Not "not registered": MLflow may have it. The CLI retries a 503.
        return error_response(
            503,
            f"{what} is not in the store; the MLflow lookup failed: {exc}",
            {"Retry-After": self.retry_after},
        )

    async def _lineage(self, name: str, version: str, what: str) -> web.Response | Json:
        try:
            lineage = await self.service.model_lineage(name, version)
        except RegistryError as exc:
            return self._registry_failed(f"model version {what}", exc)
        if lineage is None:
            return error_response(404, f"model version {what} is not registered")
        return lineage

    async def model_lineage(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/models/{name}/versions/{version}/lineage``."""
        name, version = request.match_info["name"], request.match_info["version"]
        # Big: it lists up to DEPLOYMENTS_LISTED deployments and the run's
        # params, tags and datasets, which registration lets grow.
        return await self.answers.answer(
            request, lambda: self._lineage(name, version, f"{name}/{version}"), big=True
        )

    async def alias_lineage(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/models/{name}/aliases/{alias}/lineage``."""
        return await self.answers.answer(request, lambda: self._alias_lineage(request), big=True)

    async def _alias_lineage(self, request: web.Request) -> web.Response | Json:
        name, alias = request.match_info["name"], request.match_info["alias"]
        try:
            version = await self.service.resolve_alias(name, alias)
        except RegistryError as exc:
            return self._registry_failed(f"alias {name}@{alias}", exc)
        if version is None:
            return error_response(404, f"alias {name}@{alias} is not registered")
        return await self._lineage(name, version, f"{name}@{alias} (version {version})")

    async def impact(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/impact?dataset=D | commit=SHA | image=D``."""
        given = [(k, request.query[k]) for k in _IMPACT_KINDS if request.query.get(k)]
        if len(given) != 1:
            return error_response(400, "give exactly one of dataset=, commit= or image=")
        return await self.answers.answer(request, lambda: self._impact(*given[0]), big=True)

    async def _impact(self, kind: str, value: str) -> web.Response | Json:
        # A commit shorter than git's 7-digit abbreviation finds only itself:
        # registration stores any name an OpenLineage source gives.
        try:
            result = await self.service.store.impact(kind, value)
        except AmbiguousCommitError as exc:
            # As git refuses an ambiguous short sha: the impact of which
            # commit is asked is not known, and a sum of both is no answer.
            return json_response({"error": str(exc), "matches": exc.commits}, 400)
        if result is None:
            return error_response(404, f"nothing known about {kind} {value}")
        return result

    async def completeness(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/completeness[?limit=N&after=MODEL]``: complete share, per model.

        The totals cover every model; ``models`` is one page of them by name
        (see ``_api_responses.paged``).
        """
        try:
            limit, after = page_args(request)
        except BadArgumentError as exc:
            return error_response(400, str(exc))
        return await self.answers.answer(
            request, lambda: self._completeness(limit, after), big=True
        )

    async def _completeness(self, limit: int, after: str | None) -> Json:
        answer: dict[str, object] | None = None
        if self.service.registry is not None and after is None:
            # The service first fetches served versions the store lacks from
            # MLflow, then answers the default page; a page that continues
            # one (``after``) was preceded by that fetch.
            answer = await self.service.completeness()
        if answer is None or limit != PAGE_LIMIT:
            # Store.completeness() takes no page: its plan, run on the engine.
            answer = await self.service.store.engine.read(completeness_plan(limit, after))
        models = answer["models"]
        return paged(answer, len(models) if isinstance(models, list) else 0, "models")

    async def producers(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/producers[?limit=N&after=ID]``: producers by id, with missing batch counts."""
        try:
            limit, after = page_args(request)
        except BadArgumentError as exc:
            return error_response(400, str(exc))
        return await self.answers.answer(request, lambda: self._producers(limit, after), big=True)

    async def _producers(self, limit: int, after: str | None) -> Json:
        # Store.producers() takes no page: its plan, run on the engine.
        page = await self.service.store.engine.read(producers_plan(limit, after))
        body: dict[str, object] = {
            "producers": list(page),
            "total": page.total,
            "truncated": page.truncated,
        }
        if page.truncated:
            body["next_after"] = page.next_after
        return paged(body, len(page), "producers")

    async def producer(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/producers/{id}``: the gap report of one producer."""
        return await self.answers.answer(request, lambda: self._producer(request.match_info["id"]))

    async def _producer(self, producer_id: str) -> web.Response | Json:
        report = await self.service.store.producer(producer_id)
        return report if report is not None else error_response(404, "unknown producer")

    async def register(self, request: web.Request) -> web.Response:
        """``POST /v1/lineage``: a CI/CD hook registers lineage."""
        return await self.registration.handle(request, parse_registration, "refuse")

    async def openlineage(self, request: web.Request) -> web.Response:
        """``POST /v1/openlineage``: an OpenLineage RunEvent."""
        # An OpenLineage run is not the authority on which run made a model
        # version (its runId is its own): conflicting links are kept as stored.
        return await self.registration.handle(request, parse_run_event, "keep")

    async def retention(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/retention``: the policy and the latest reports."""
        return await self.answers.answer(request, self._retention)

    async def _retention(self) -> Json:
        policy = self.retainer.policy
        return {
            "policy": {
                "predictions_days": policy.predictions_days,
                "batches_days": policy.batches_days,
                "chain_events_days": policy.chain_events_days,
                "lineage": "kept",
            },
            "reports": await self.retainer.reports(),
        }

    async def run_retention(self, request: web.Request) -> web.Response:
        """``POST /v1/retention/run``: one pass now; answers its report."""
        return json_response(await self.retainer.run_once())


def _uuid_spellings(canonical: str) -> tuple[str, ...]:
    """The spellings a UUID prediction id may be stored in; a caller's own id as it is.

    Lower and upper case, with and without dashes: what producers send. Each
    is an exact match on the indexed column (no function over it).
    """
    try:
        if str(uuid.UUID(canonical)) != canonical:
            return (canonical,)
    except ValueError:
        return (canonical,)
    bare = canonical.replace("-", "")
    return (canonical, canonical.upper(), bare, bare.upper())
