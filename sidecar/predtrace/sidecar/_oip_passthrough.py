"""Every method of the OIP proxy but ModelInfer: passed through to the model server as bytes.

Client -> OipProxy -> **passthrough** -> model server (a connection of the
``_oip_upstream.ChannelPool``). Any cardinality (a generic stream
handler): requests and responses pass untouched, with the call's metadata,
trailers and status (rich error details and retry pushback included). A
single request to a method known to take one goes upstream as a unary call
(see ``passthrough``). Their requests are read within a budget of their own
(never in line behind inference), streams bounded in number (``_oip_reads``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from predtrace.sidecar import _oip_reads
from predtrace.sidecar._grpc_answers import fail_call
from predtrace.sidecar._oip_metadata import Metadata, forwardable
from predtrace.sidecar._oip_reads import READ_GRACE_S, RequestReads, TooManySlowError
from predtrace.sidecar._oip_upstream import ByteBudget, ChannelPool


def passthrough_handler(
    pool: ChannelPool, method: str, reads: Reads, *, one_request: bool
) -> grpc.RpcMethodHandler[bytes, bytes]:
    """A handler passing each call of ``method`` through (``one_request``: see ``passthrough``)."""

    async def handle(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        del requests  # read from the context, which ``passthrough`` does
        async for item in passthrough(pool, method, context, reads, one_request=one_request):
            yield item

    return grpc.stream_stream_rpc_method_handler(handle)


@dataclass(frozen=True, slots=True)
class Reads:
    """How the calls passed through are read: their budget, of ``largest`` requests."""

    budget: ByteBudget
    largest: int
    reads: RequestReads


async def passthrough(
    pool: ChannelPool,
    method: str,
    context: grpc.aio.ServicerContext[bytes, bytes],
    reads: Reads,
    *,
    one_request: bool,
) -> AsyncIterator[bytes]:
    """Forward one call of any cardinality; the upstream's status reaches the caller.

    A call of a method known to take one request and answer once
    (``one_request``) reads its request within the budget of such calls
    (``_oip_reads``), and holds its size there until the answer. One whose
    caller sent exactly one, and half-closed, goes upstream as a unary call,
    not as a request stream: grpc.aio reports a request write that fails
    because the upstream already ended the call (an unknown method, an early
    abort) as INTERNAL "Internal error from Core", overwriting the upstream's
    status (grpc/grpc#36066); a unary request is sent in one batch whose
    failure defers to the status the upstream sent. (A unary-stream call,
    cancelled, kept its request in a cycle until a GC pass.) Calls that
    stream requests, or may (methods of other services), or a caller that has
    not half-closed ``READ_GRACE_S`` after its request, go as streams, one of
    at most ``MAX_STREAMS``, and keep that race.
    """
    if not one_request:
        async for item in _as_stream(pool, method, context, reads.reads, head=[]):
            yield item
        return
    share = reads.budget.share()
    after: asyncio.Future[bytes] | None = None
    try:
        try:
            await share.take(reads.largest)
            first = await reads.reads.read(context, share)
        except TooManySlowError:
            refusal = _oip_reads.too_many_slow(_name(method))
            fail_call(context, grpc.StatusCode.UNAVAILABLE, refusal)
            return
        if not isinstance(first, bytes):  # half-closed without a request
            share.release()
            async for item in _forward_stream(pool, method, context, _no_requests()):
                yield item
            return
        share.hold(len(first))  # until the answer, as a unary call
        after = asyncio.ensure_future(context.read())  # the half-close, normally
        done, _ = await asyncio.wait((after,), timeout=READ_GRACE_S)
        if done and not isinstance(after.result(), bytes):
            async for item in _forward_unary(pool, method, context, first):
                yield item
            return
        # A second request, or not half-closed yet: a stream after all,
        # bounded in number, not in the budget.
        share.release()
        async for item in _as_stream(pool, method, context, reads.reads, head=[first], after=after):
            yield item
    finally:
        if after is not None:
            after.cancel()  # nothing once it is done
        share.release()


async def _as_stream(
    pool: ChannelPool,
    method: str,
    context: grpc.aio.ServicerContext[bytes, bytes],
    reads: RequestReads,
    *,
    head: list[bytes],
    after: asyncio.Future[bytes] | None = None,
) -> AsyncIterator[bytes]:
    """``head``, ``after``'s request once read, then the rest, as a streaming call."""
    if reads.streams >= _oip_reads.MAX_STREAMS:
        head.clear()
        reads.streams_refused += 1
        refusal = _oip_reads.too_many_streams(_name(method))
        fail_call(context, grpc.StatusCode.UNAVAILABLE, refusal)
        return
    reads.streams += 1
    try:
        requests = _requests(context, head, after)
        async for item in _forward_stream(pool, method, context, requests):
            yield item
    finally:
        reads.streams -= 1


def _name(method: str) -> str:
    return method.rsplit("/", 1)[-1]


async def _no_requests() -> AsyncIterator[bytes]:
    return
    yield  # an async generator that yields nothing


async def _requests(
    context: grpc.aio.ServicerContext[bytes, bytes],
    head: list[bytes],
    after: asyncio.Future[bytes] | None,
) -> AsyncIterator[bytes]:
    """The call's requests: ``head`` (emptied as it goes: what has gone on is not kept),
    ``after``'s, then each read as the one before has gone on."""
    while head:
        yield head.pop(0)
    if after is not None:
        request = await after
        if not isinstance(request, bytes):
            return
        yield request
        del request
    while isinstance(request := await context.read(), bytes):
        yield request


async def _forward_unary(
    pool: ChannelPool,
    method: str,
    context: grpc.aio.ServicerContext[bytes, bytes],
    request: bytes,
) -> AsyncIterator[bytes]:
    metadata = forwardable(context.invocation_metadata())
    upstream = pool.take()
    try:
        call = upstream.channel.unary_unary(method, None, None)(
            request, metadata=metadata, timeout=context.time_remaining()
        )
    except BaseException:
        pool.give_back(upstream)
        raise
    del request  # the call holds it until it is sent
    try:
        await _send_headers(context, call)
        yield await call
        context.set_trailing_metadata(forwardable(await call.trailing_metadata()))
    except grpc.aio.AioRpcError as exc:
        fail_with(context, exc, forwardable(exc.trailing_metadata()))
    finally:
        call.cancel()  # see _forward_stream
        pool.give_back(upstream)


async def _forward_stream(
    pool: ChannelPool,
    method: str,
    context: grpc.aio.ServicerContext[bytes, bytes],
    requests: AsyncIterator[bytes],
) -> AsyncIterator[bytes]:
    metadata = forwardable(context.invocation_metadata())
    upstream = pool.take()
    try:
        call = upstream.channel.stream_stream(method, None, None)(
            requests, metadata=metadata, timeout=context.time_remaining()
        )
    except BaseException:
        pool.give_back(upstream)
        raise
    try:
        await _send_headers(context, call)
        async for response in call:
            yield response
        context.set_trailing_metadata(forwardable(await call.trailing_metadata()))
    except grpc.aio.AioRpcError as exc:
        fail_with(context, exc, forwardable(exc.trailing_metadata()))
    finally:
        # A caller that cancels (or whose deadline passes) ends the
        # upstream call too; grpc.aio does not cancel a call a cancelled
        # task was iterating. Cancelling a finished call does nothing.
        call.cancel()
        pool.give_back(upstream)


async def _send_headers(
    context: grpc.aio.ServicerContext[bytes, bytes],
    call: grpc.aio.UnaryUnaryCall[bytes, bytes] | grpc.aio.StreamStreamCall[bytes, bytes],
) -> None:
    """The upstream's headers, before the first response (and also when there is none:
    the caller may read the headers before, or without, a message)."""
    initial = forwardable(await call.initial_metadata())
    if initial:  # none: grpc sends its own headers, or a trailers-only error
        await context.send_initial_metadata(initial)


def fail_with(
    context: grpc.aio.ServicerContext[bytes, bytes],
    exc: grpc.aio.AioRpcError,
    trailing: Metadata,
) -> None:
    """End the call with the model server's error, the handler returning normally.

    Not ``context.abort()`` (see ``fail_call``): every failed call of a MB
    request kept its MB until a cyclic GC pass.
    """
    fail_call(context, exc.code(), exc.details() or "", metadata=tuple(trailing))
