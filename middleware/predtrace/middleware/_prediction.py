"""One prediction request on its way through the middleware (the responder).

Created per request by ``PredictionTracingMiddleware`` once the route matched.
It reads the body (bounded, replayed to the app), settles the prediction id,
joins or starts the span, exposes ``current_prediction()`` to the handler,
watches the response go by, and before the last body message leaves ends the
span and emits the PredictionEvent. Kept lean: every line here runs on the
request path.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextvars import Token
from typing import Final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind

from predtrace.middleware import _spans as spans
from predtrace.middleware._asgi import ASGIApp, Message, Receive, Scope, Send
from predtrace.middleware._context import CURRENT, PredictionContext
from predtrace.middleware._fastapi import telemetry_data
from predtrace.middleware._inputs import (
    HEAD_BYTES,
    BodyTee,
    body_caller_id,
    fingerprint,
    head_caller_id,
    header_caller_id,
    is_utf8_json,
    read_rest,
    replay,
    request_features,
    with_oip_id,
)
from predtrace.middleware._json_codec import NOT_JSON, parse_json
from predtrace.middleware._outputs import (
    ResponseCapture,
    capture_for,
    read_response,
    summarise,
)
from predtrace.middleware._routes import PROTOCOL_HTTP, PROTOCOL_OIP_V2_REST, RouteMatch
from predtrace.middleware._runtime import PredictionRuntime
from predtrace.wire import ModelRef, PredictionEvent, new_prediction_id
from predtrace.wire import Status as EventStatus

# Where a failed prediction leaves its id in the server's scope, for the
# ServerErrorMiddleware hook of ``instrument_app``.
ERROR_ID_SCOPE_KEY: Final = "predtrace.prediction_id"

# Shared empty containers for the (usual) events without extra models, features
# or attributes: fewer allocations per request and fewer objects for the
# garbage collector while events wait in the queue. Nothing downstream
# mutates an emitted event (the exporters only read it).
_NO_MODELS: Final[list[ModelRef]] = []
_NO_FEATURES: Final[dict[str, float]] = {}
_NO_ATTRIBUTES: Final[dict[str, str]] = {}


class Prediction:
    """Per-request state of one prediction."""

    __slots__ = (
        "_body",
        "_capture",
        "_ctx",
        "_downstream",
        "_ended",
        "_fingerprint",
        "_finished",
        "_head",
        "_own_span",
        "_parsed",
        "_span",
        "_start_model",
        "_status",
        "_t0",
        "_tee",
        "_telemetry",
        "_trailers",
        "_ts",
        "match",
        "rt",
    )

    def __init__(self, runtime: PredictionRuntime, match: RouteMatch) -> None:
        self.rt = runtime
        self.match = match
        self._status: int | None = None
        self._trailers = False
        self._ended = False  # the response's last message went to the server
        self._finished = False
        self._capture: ResponseCapture | None = None
        self._fingerprint = b""
        self._parsed: object = NOT_JSON
        self._body: bytes | None = None
        self._head = b""  # a body over the bound: its first bytes, for the OIP id
        self._telemetry: object | None = None
        self._tee: BodyTee | None = None
        self._own_span = False
        self._span: trace.Span | None = None

    async def run(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve the request through ``app``, traced."""
        rt = self.rt
        if "fastapi.telemetry" in scope:
            self._telemetry = telemetry_data(scope)
        messages: Sequence[Message] = ()
        if self._telemetry is None and (
            rt.wants_body or self.match.protocol == PROTOCOL_OIP_V2_REST
        ):
            messages = await self._read_body(receive)
        try:
            messages, span_token = self._begin(scope, messages)
        except Exception as exc:  # noqa: BLE001 - telemetry must never fail the request
            rt.failed("begin", exc)
            await app(scope, replay(messages, receive) if messages else receive, send)
            return
        if messages:
            # One replaying ``receive``: the body as read (or with the OIP id
            # added), then the server's own.
            receive = replay(messages, receive)
        elif self._telemetry is not None:
            # In case the route parses no body for FastAPI to keep.
            self._tee = BodyTee(receive, rt.config.max_body_bytes)
            receive = self._tee.receive
        ctx_token = CURRENT.set(self._ctx)
        self._downstream = send
        try:
            await app(scope, receive, self._send)
        except BaseException as exc:
            self._finish(exc)
            if self._status is None:
                # For the 500 that Starlette's ServerErrorMiddleware sends
                # outside this middleware (see ``instrument_app``).
                scope[ERROR_ID_SCOPE_KEY] = self._ctx.prediction_id
            raise
        finally:
            if not self._finished:
                self._finish(None)
            CURRENT.reset(ctx_token)
            if span_token is not None:
                otel_context.detach(span_token)

    async def _read_body(self, receive: Receive) -> Sequence[Message]:
        limit = self.rt.config.max_body_bytes
        message = await receive()
        messages: Sequence[Message] = (message,)
        if message["type"] == "http.request" and not message.get("more_body", False):
            body = message.get("body", b"")  # the usual case: one message
            if len(body) <= limit:
                self._body = body
            else:
                self._head = body[:HEAD_BYTES]
        else:
            # Several messages (or a disconnect): read on, up to the bound.
            rest = await read_rest(message, receive, limit)
            self._body, self._head, messages = rest.body, rest.head, rest.messages
        if self._body is None:
            self.rt.counts["body_unread"] += 1  # too large, or the client went away
        return messages

    # -- request start -----------------------------------------------------------

    def _begin(
        self, scope: Scope, messages: Sequence[Message]
    ) -> tuple[Sequence[Message], Token[Context] | None]:
        rt, protocol, body = self.rt, self.match.protocol, self._body
        echo: tuple[list[tuple[bytes, bytes]], Sequence[Message]] | None = None
        self._t0 = time.perf_counter_ns()
        self._ts = time.time_ns()
        is_oip = protocol == PROTOCOL_OIP_V2_REST
        # Read only when something needs it (see run): the OIP id, the
        # fingerprint or the allow-listed features. On a plain route the id
        # never comes from the body: without a key, parsed only when sampled.
        parsed_now = body is not None and (protocol != PROTOCOL_HTTP or rt.key is not None)
        if body is not None and parsed_now:
            self._parsed = parse_json(body)
        request_id = ce_id = None
        propagated = False
        fields = rt.propagation_fields
        for key, value in scope["headers"]:
            # The first of a repeated header, as the app reads it (Starlette's
            # ``headers.get``): the prediction id is the request id it logs.
            if key == b"x-request-id":
                request_id = value if request_id is None else request_id
            elif key == b"ce-id":
                ce_id = value if ce_id is None else ce_id
            elif key in fields:
                propagated = True
        body_id = self._body_id(self._parsed) if is_oip else None
        pid = body_id or header_caller_id(request_id, ce_id, rt.counts) or new_prediction_id()
        sampled = rt.samples(pid)
        self._ctx = ctx = PredictionContext(
            pid,
            sampled=sampled,
            features=rt.config.feature_allowlist,
            attributes=rt.config.attribute_allowlist,
        )
        if body is not None:
            if rt.key is not None:
                self._fingerprint = fingerprint(rt.key, self._parsed, body, protocol)
            if sampled and rt.config.feature_allowlist:
                self._capture_features(None if parsed_now else body)
            if body_id is None and is_oip and self._should_echo(body):
                # The app sees the prediction id as the OIP request id, so a
                # conforming server answers with the id the response header carries.
                echo = with_oip_id(scope["headers"], body, self._parsed, pid)
            # Nothing reads the parsed body from here on: a large one is not
            # kept alive for the whole request beside the app's own copy.
            self._parsed = NOT_JSON
        elif self._telemetry is not None:
            ctx.id_hook = self._adopt_telemetry_body
        self._start_model = rt.start_model(self.match)
        try:
            token = self._start_span(scope, propagated)
        except Exception as exc:  # noqa: BLE001 - a broken tracing setup: the event still goes
            rt.failed("span", exc)
            self._span, self._own_span, token = None, False, None
        if echo is not None:
            # Last, so a failure above leaves the request as it came. The app
            # gets the server's own scope, not a copy: what its router writes
            # there (path_params, route, endpoint) must reach the code around
            # this middleware (Starlette's 500 handler, an outer OTel middleware).
            # A new headers list: the old one may be shared with that code.
            scope["headers"], messages = echo
        return messages, token

    def _body_id(self, parsed: object) -> str | None:
        """The OIP request's own ``id`` when usable; one it cannot use is counted.

        A body over the bound is not parsed (``parsed`` is ``NOT_JSON``): its
        id is read from its first bytes, kept in ``_head``.
        """
        body_id = body_caller_id(parsed)
        if body_id is None:
            if isinstance(parsed, dict) and "id" in parsed:
                self.rt.counts["invalid_caller_id"] += 1  # replaced, like a bad header id
            elif self._head:
                return head_caller_id(self._head, self.rt.counts)
        return body_id

    def _capture_features(self, unparsed: bytes | None = None) -> None:
        """Merge the request's allow-listed features; a failure costs them, not the event.

        ``unparsed``: the body, when it was not parsed yet (a plain route without a key).
        """
        rt = self.rt
        if unparsed is not None:
            self._parsed = parse_json(unparsed)
        try:
            found = request_features(self._parsed, self.match.protocol, rt.config.feature_allowlist)
        except Exception as exc:  # noqa: BLE001 - a request we did not foresee: no features
            rt.failed("features", exc)
            return
        self._ctx._merge_features(found)

    def _should_echo(self, body: bytes) -> bool:
        parsed = self._parsed
        return (
            self.rt.config.oip_echo_id
            and isinstance(parsed, dict)
            and "id" not in parsed
            # The id is spliced in as UTF-8 bytes: in a UTF-16 or UTF-32 body
            # (valid JSON too) that would corrupt it. Such a body goes as sent.
            and is_utf8_json(body)
        )

    def _start_span(self, scope: Scope, propagated: bool) -> Token[Context] | None:
        rt = self.rt
        name, attributes = rt.span_start(self._start_model)
        if self._telemetry is None:
            attributes[spans.ATTR_PREDICTION_ID] = self._ctx.prediction_id
        # The current context, read once and handed on: the SDK and the
        # context API would otherwise each look it up again.
        current = otel_context.get_current()
        outer = spans.enclosing_server_span(current)
        if outer is None:
            parent = spans.extract_parent(scope["headers"]) if propagated else current
        elif CURRENT.get(None) is None or not spans.is_predtrace_span(outer):
            outer.set_attributes(attributes)
            self._span = outer
            return None
        else:
            # Called in-process from another prediction (an ensemble's
            # sub-model): its span is that prediction's, never to be joined.
            parent = current
        span = rt.tracer.start_span(name, parent, SpanKind.SERVER, attributes)
        self._span = span
        self._own_span = True
        return otel_context.attach(trace.set_span_in_context(span, parent))

    def _adopt_telemetry_body(self) -> bool:
        """FastAPI telemetry mode: take the parsed body from FastAPI, once it has one.

        The context's id hook: run once it succeeds. An OIP body id becomes
        the prediction id, and the sampling decision is taken again from it.
        A body over ``max_body_bytes`` is not taken, as when it is read first:
        its OIP id comes from its first bytes, and nothing else is read of it.
        """
        tee = self._tee
        if tee is not None and tee.head is not None:
            if self.match.protocol == PROTOCOL_OIP_V2_REST:
                body_id = head_caller_id(tee.head, self.rt.counts)
                if body_id is not None:
                    self._ctx._set_id(body_id, sampled=self.rt.samples(body_id))
            return True
        body = getattr(self._telemetry, "body", None)
        if body is None:
            # No body parsed by FastAPI: the one the app read, if it read it all.
            raw = tee.body if tee is not None else None
            if raw is None:
                return False
            self._body, body = raw, parse_json(raw)
        self._parsed = body
        if self.match.protocol == PROTOCOL_OIP_V2_REST:
            body_id = self._body_id(body)
            if body_id is not None:
                self._ctx._set_id(body_id, sampled=self.rt.samples(body_id))
        return True

    # -- response ----------------------------------------------------------------

    async def _send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            if self._capture is not None:
                self._capture.add(message.get("body", b""))
            if not message.get("more_body", False) and not self._trailers:
                self._end()
        elif kind == "http.response.start":
            message = self._on_start(message)
        elif kind == "http.response.trailers":
            if not message.get("more_trailers", False):
                self._end()
        elif kind == "http.response.pathsend":
            self._end()
        await self._downstream(message)

    def _on_start(self, message: Message) -> Message:
        try:
            self._status = message["status"]
            self._trailers = bool(message.get("trailers", False))
            pid = self._ctx.prediction_id  # settles the id in FastAPI telemetry mode
            # Read once into a new list, passed on in a new message: ASGI allows
            # any iterable, and a one-shot one (a generator) would reach the
            # server empty after the scan below; and a Response object reused
            # by the app is never changed.
            headers = list(message.get("headers") or ())
            message = {**message, "headers": headers}
            wanted = self.rt.id_header
            for key, _ in headers:
                if key == wanted:
                    break  # the app set it itself
            else:
                headers.append((wanted, pid.encode("latin-1")))
            if self._wants_response():
                rt = self.rt
                self._capture = capture_for(headers, rt.config.max_output_bytes, rt.counts)
        except Exception as exc:  # noqa: BLE001 - the response goes out regardless
            self.rt.failed("response_start", exc)
        return message

    def _wants_response(self) -> bool:
        protocol = self.match.protocol
        if protocol == PROTOCOL_HTTP:
            return False
        # An OIP v2 response names the model version actually served, which
        # wins over the configured or routed one: always read it. Elsewhere
        # the body is read only for a version still unknown or an output.
        if protocol != PROTOCOL_OIP_V2_REST:
            override = self._ctx.model_override
            version_known = self._start_model[1] or (override and override.get("version"))
            if version_known and not (self._ctx.sampled and self._ctx.output is None):
                return False
        return True

    # -- completion ---------------------------------------------------------------

    def _end(self) -> None:
        """The response's last message is leaving: complete the prediction first."""
        self._ended = True
        self._finish(None)

    def _finish(self, exc: BaseException | None) -> None:
        if self._finished:
            return
        self._finished = True
        try:
            self._complete(exc)
        except Exception as error:  # noqa: BLE001 - telemetry must never fail the request
            self.rt.failed("finish", error)
        # What the app records from now on (a background task) can reach no event.
        self._ctx._close(self.rt.counts)

    def _complete(self, exc: BaseException | None) -> None:
        rt, ctx, span = self.rt, self._ctx, self._span
        status = self._status
        if exc is not None:
            error_type, code = type(exc).__name__, str(status or 500)
        elif status is None or not self._ended:
            # No answer, or the app returned mid-body (a streamed answer the
            # client hung up on): the prediction was not delivered whole.
            error_type, code = "IncompleteResponse", str(status or "")
        else:
            error_type, code = ("" if status < 400 else str(status)), str(status)
        if self._telemetry is not None:
            self._settle_telemetry_inputs()  # first: it settles the id and sampling
        response, served = (
            read_response(self._capture, summary=ctx.sampled and ctx.output is None)
            if self._capture is not None
            else (None, ("", ""))
        )
        model, run_id = rt.final_model(
            self._start_model, ctx.model_override, served, succeeded=not error_type
        )
        if span is not None:
            try:
                attributes = rt.late_attributes(self._start_model, model, run_id)
                if self._telemetry is not None:  # the id was settled after the span started
                    attributes[spans.ATTR_PREDICTION_ID] = ctx.prediction_id
                if self._own_span:
                    status_code = status if exc is None else None
                    spans.end_own_span(span, attributes, error_type, status_code, self._ended)
                elif attributes:
                    span.set_attributes(attributes)
            except Exception as error:  # noqa: BLE001 - e.g. an app's span processor raising in on_end: the event still goes
                rt.failed("span_end", error)
        trace_id, span_id = spans.ids_of(span) if span is not None else (b"", b"")
        sampled = ctx.sampled
        output = ctx.output
        if sampled and output is None and response is not None:
            output = summarise(response, self.match.protocol)
        rt.emit(
            PredictionEvent(
                ctx.prediction_id,
                trace_id,
                span_id,
                self._ts,
                time.perf_counter_ns() - self._t0,
                model,
                ctx.extra_models or _NO_MODELS,
                rt.deployment,
                self.match.template,
                self.match.protocol,
                EventStatus.ERROR if error_type else EventStatus.OK,
                code,
                error_type,
                self._fingerprint,
                output if sampled else None,
                (ctx.features or _NO_FEATURES) if sampled else _NO_FEATURES,
                ctx.attributes or _NO_ATTRIBUTES,
                sampled,
            )
        )

    def _settle_telemetry_inputs(self) -> None:
        # FastAPI telemetry mode: use the body FastAPI parsed (never parse it
        # twice), else the copy of what the app read.
        rt, ctx = self.rt, self._ctx
        ctx._settle_id()  # adopts the body once, if the response start has not yet
        if self._tee is not None and self._tee.head is not None:
            # Over max_body_bytes: no fingerprint or features, as in plain mode
            # (canonicalising a body of many MB would stall the event loop).
            rt.counts["body_unread"] += 1
            return
        if self._body is not None:
            rt.counts["fastapi_body_copied"] += 1  # the route parsed none; the app read it
        elif self._parsed is NOT_JSON:
            rt.counts["fastapi_body_missing"] += 1  # not parsed, and not read whole
            return
        else:
            rt.counts["fastapi_body_used"] += 1
        if ctx.sampled and rt.config.feature_allowlist:
            self._capture_features()
        if rt.key is not None:
            body = self._body or b""
            self._fingerprint = fingerprint(rt.key, self._parsed, body, self.match.protocol)
            if not self._fingerprint:  # form data or another value JSON cannot encode
                rt.counts["fingerprint_unavailable"] += 1
