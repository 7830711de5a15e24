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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from predtrace.sidecar import _oip_reads
from predtrace.sidecar._grpc_answers import fail_call
from predtrace.sidecar._oip_metadata import Metadata, forwardable
from predtrace.sidecar._oip_reads import READ_GRACE_S, Cardinality, RequestReads, TooManySlowError
from predtrace.sidecar._oip_upstream import ByteBudget, ChannelPool


def passthrough_handler(
    pool: ChannelPool, method: str, reads: Reads, *, kind: Cardinality
) -> grpc.RpcMethodHandler[bytes, bytes]:
    """A handler passing each call of ``method`` through (``kind``: see ``passthrough``)."""

    async def handle(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        del requests  # read from the context, which ``passthrough`` does
        async for item in passthrough(pool, method, context, reads, kind=kind):
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
    kind: Cardinality,
) -> AsyncIterator[bytes]:
    """Forward one call of any cardinality; the upstream's status reaches the caller.

    A call of a method known to take one request (``kind`` "unary" or
    "one-request") reads its request within the budget of such calls
    (``_oip_reads``), and holds its size there until the answer. One whose
    caller sent exactly one, and half-closed, goes upstream with a single
    request, not as a request stream: grpc.aio reports a request write that
    fails because the upstream already ended the call (an unknown method, an
    early abort) as INTERNAL "Internal error from Core", overwriting the
    upstream's status (grpc/grpc#36066); a single request is sent in one
    batch whose failure defers to the status the upstream sent. A method
    known to answer once goes as unary-unary; one of the service the proxy
    does not know, as unary-stream, for any number of answers (cancelled,
    such a call keeps its request in a cycle until a GC pass: a grpc.aio
    fault). Calls that stream requests, or may (methods of other services),
    or a caller that has not half-closed ``READ_GRACE_S`` after its request,
    go as streams, one of at most ``MAX_STREAMS``, and keep that race.
    """
    if kind == "stream":
        async for item in _as_stream(pool, method, context, reads.reads, head=[]):
            yield item
        return
    share = reads.budget.share()
    pending: list[asyncio.Future[bytes]] = []  # the read after the first, until taken
    try:
        try:
            await share.take(reads.largest)
            first = await reads.reads.read(context, share)
        except TooManySlowError:
            refusal = _oip_reads.too_many_slow(_name(method), reads.reads.most_outside())
            fail_call(context, grpc.StatusCode.UNAVAILABLE, refusal)
            return
        if not isinstance(first, bytes):  # half-closed without a request
            share.release()
            async for item in _forward_stream(pool, method, context, _no_requests()):
                yield item
            return
        share.hold(len(first))  # until the answer, as a unary call
        head = [first]
        del first
        if await _half_closed(context, head, pending):
            forward = _forward_unary if kind == "unary" else _forward_one
            async for item in forward(pool, method, context, head[0]):
                yield item
            return
        # A second request, or not half-closed yet: a stream after all,
        # bounded in number, not in the budget.
        share.release()
        async for item in _as_stream(
            pool, method, context, reads.reads, head=head, pending=pending
        ):
            yield item
    finally:
        for future in pending:
            future.cancel()  # a read not taken yet
        share.release()


async def _half_closed(
    context: grpc.aio.ServicerContext[bytes, bytes],
    head: list[bytes],
    pending: list[asyncio.Future[bytes]],
) -> bool:
    """Whether the caller half-closed within ``READ_GRACE_S`` of its first request.

    If it sent another, that one joins ``head``; if nothing came yet, the
    read goes into ``pending``. Nothing of either is kept here: a call that
    goes on as a stream holds its messages only until they have gone on.
    """
    read = asyncio.ensure_future(context.read())
    try:
        await asyncio.wait_for(asyncio.shield(read), READ_GRACE_S)
    except TimeoutError:
        pending.append(read)
        return False
    except BaseException:  # the call ended (cancelled): no read is left behind
        read.cancel()
        raise
    request = read.result()
    del read
    if isinstance(request, bytes):
        head.append(request)
        return False
    return True


async def _as_stream(
    pool: ChannelPool,
    method: str,
    context: grpc.aio.ServicerContext[bytes, bytes],
    reads: RequestReads,
    *,
    head: list[bytes],
    pending: list[asyncio.Future[bytes]] | None = None,
) -> AsyncIterator[bytes]:
    """``head``, the ``pending`` read's request, then the rest, as a streaming call."""
    if reads.streams >= _oip_reads.MAX_STREAMS:
        head.clear()
        reads.streams_refused += 1
        refusal = _oip_reads.too_many_streams(_name(method))
        fail_call(context, grpc.StatusCode.UNAVAILABLE, refusal)
        return
    reads.streams += 1
    try:
        requests = _requests(context, head, pending or [])
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
    pending: list[asyncio.Future[bytes]],
) -> AsyncIterator[bytes]:
    """The call's requests: ``head``, the ``pending`` read's, then each read as the one
    before has gone on (each list emptied as it goes: what has gone on is not kept)."""
    while head:
        yield head.pop(0)
    if pending:
        read = pending.pop()
        try:
            request = await read
        finally:
            read.cancel()  # nothing once it is done
        del read
        if not isinstance(request, bytes):
            return
        yield request
        del request
    while isinstance(request := await context.read(), bytes):
        yield request


_Call = (
    grpc.aio.UnaryUnaryCall[bytes, bytes]
    | grpc.aio.UnaryStreamCall[bytes, bytes]
    | grpc.aio.StreamStreamCall[bytes, bytes]
)


def _forward_unary(
    pool: ChannelPool, method: str, context: grpc.aio.ServicerContext[bytes, bytes], request: bytes
) -> AsyncIterator[bytes]:
    """A single request upstream, a single answer back (unary-unary)."""
    return _forward(pool, context, lambda channel: channel.unary_unary(method, None, None), request)


def _forward_one(
    pool: ChannelPool, method: str, context: grpc.aio.ServicerContext[bytes, bytes], request: bytes
) -> AsyncIterator[bytes]:
    """A single request upstream, any number of answers back (unary-stream)."""
    return _forward(
        pool, context, lambda channel: channel.unary_stream(method, None, None), request
    )


def _forward_stream(
    pool: ChannelPool,
    method: str,
    context: grpc.aio.ServicerContext[bytes, bytes],
    requests: AsyncIterator[bytes],
) -> AsyncIterator[bytes]:
    """Requests and answers streamed both ways (stream-stream)."""
    return _forward(
        pool, context, lambda channel: channel.stream_stream(method, None, None), requests
    )


async def _forward(
    pool: ChannelPool,
    context: grpc.aio.ServicerContext[bytes, bytes],
    callable_of: Callable[[grpc.aio.Channel], Any],
    request: object,
) -> AsyncIterator[bytes]:
    """Open the upstream call on the least busy connection; its headers, answers,
    trailers and status to the caller."""
    metadata = forwardable(context.invocation_metadata())
    upstream = pool.take()
    try:
        call: _Call = callable_of(upstream.channel)(
            request, metadata=metadata, timeout=context.time_remaining()
        )
    except BaseException:
        pool.give_back(upstream)
        raise
    del request  # the call holds what it has yet to send
    try:
        await _send_headers(context, call)
        if isinstance(call, grpc.aio.UnaryUnaryCall):
            yield await call
        else:
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
    call: grpc.aio.Call,
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
