"""Every method of the OIP proxy but ModelInfer: passed through to the model server as bytes.

Client -> OipProxy -> **passthrough** -> model server (a connection of the
``_oip_upstream.ChannelPool``). Any cardinality (a generic stream
handler): requests and responses pass untouched, with the call's metadata,
trailers and status (rich error details and retry pushback included). A
single request to a method known to take one goes upstream as a unary
request (see ``passthrough``). Requests are read within the proxy's byte
budget, as ModelInfer's are (``_oip_reads``); streaming calls are bounded
in number.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from predtrace.sidecar import _oip_reads
from predtrace.sidecar._grpc_answers import fail_call
from predtrace.sidecar._oip_metadata import Metadata, forwardable
from predtrace.sidecar._oip_reads import RequestReads, TooManySlowError
from predtrace.sidecar._oip_upstream import BudgetShare, ByteBudget, ChannelPool


def passthrough_handler(
    pool: ChannelPool, method: str, budget: ByteBudget, reads: RequestReads, *, read_ahead: bool
) -> grpc.RpcMethodHandler[bytes, bytes]:
    """A handler passing each call of ``method`` through (``read_ahead``: see ``passthrough``)."""

    async def handle(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        del requests  # read from the context (``RequestReads``)
        share = budget.share()
        try:
            async for item in passthrough(
                pool, method, context, share, reads, read_ahead=read_ahead
            ):
                yield item
        finally:
            share.release()

    return grpc.stream_stream_rpc_method_handler(handle)


async def passthrough(
    pool: ChannelPool,
    method: str,
    context: grpc.aio.ServicerContext[bytes, bytes],
    share: BudgetShare,
    reads: RequestReads,
    *,
    read_ahead: bool,
) -> AsyncIterator[bytes]:
    """Forward one call of any cardinality; the upstream's status reaches the caller.

    A call to a method known to take one request (``read_ahead``) that
    sent exactly one goes upstream as unary-stream, not as a request
    stream: grpc.aio reports a request write that fails because the
    upstream already ended the call (an unknown method, an early abort) as
    INTERNAL "Internal error from Core", overwriting the upstream's status
    (grpc/grpc#36066); a unary request is sent in one batch whose failure
    defers to the status the upstream sent. Calls that stream requests (or
    may: methods of other services) keep that race.

    Its first request and the check that no second one follows are read
    in the room the share takes for the largest request; the share then
    holds them until the call ends. Any further requests, and all those of
    a method not read ahead, are read as a stream (``read_stream``), and
    the call counts as one of at most ``MAX_STREAMS``.
    """
    metadata = forwardable(context.invocation_metadata())
    head: list[bytes] = []
    try:
        if read_ahead:
            await share.take(reads.largest)
            first = await reads.read(context, share)
            if isinstance(first, bytes):
                head.append(first)
                second = await reads.read(context, share, held=len(first))
                if isinstance(second, bytes):
                    head.append(second)
            share.hold(sum(map(len, head)))
    except TooManySlowError:
        fail_call(context, grpc.StatusCode.UNAVAILABLE, _oip_reads.too_many_slow(_name(method)))
        return
    # A method read ahead whose caller sent nothing goes on with no requests.
    streams = len(head) > 1 or not read_ahead
    if streams:
        if reads.streams >= _oip_reads.MAX_STREAMS:
            reads.streams_refused += 1
            head.clear()
            refusal = _oip_reads.too_many_streams(_name(method))
            fail_call(context, grpc.StatusCode.UNAVAILABLE, refusal)
            return
        reads.streams += 1
    try:
        rest = reads.read_stream(context, share) if head or not read_ahead else _nothing()
        async for item in _forward(pool, method, context, head=head, rest=rest, metadata=metadata):
            yield item
    finally:
        if streams:
            reads.streams -= 1


async def _forward(
    pool: ChannelPool,
    method: str,
    context: grpc.aio.ServicerContext[bytes, bytes],
    *,
    head: list[bytes],
    rest: AsyncIterator[bytes],
    metadata: Metadata,
) -> AsyncIterator[bytes]:
    upstream = pool.take()
    try:
        call = _open_call(
            upstream.channel,
            method,
            head,
            rest,
            metadata=metadata,
            timeout=context.time_remaining(),
        )
    except BaseException:
        pool.give_back(upstream)
        raise
    try:
        # Before the first response, and also when there is none: the
        # caller may read the headers before (or without) a message.
        initial = forwardable(await call.initial_metadata())
        if initial:  # none: grpc sends its own headers, or a trailers-only error
            await context.send_initial_metadata(initial)
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


def _name(method: str) -> str:
    return method.rsplit("/", 1)[-1]


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


def _open_call(
    channel: grpc.aio.Channel,
    method: str,
    head: list[bytes],
    rest: AsyncIterator[bytes],
    *,
    metadata: Metadata,
    timeout: float | None,
) -> grpc.aio.UnaryStreamCall[bytes, bytes] | grpc.aio.StreamStreamCall[bytes, bytes]:
    """The upstream call: unary-stream for a single request to a one-request method."""
    if len(head) == 1:
        return channel.unary_stream(method, None, None)(head[0], metadata=metadata, timeout=timeout)
    return channel.stream_stream(method, None, None)(
        _chain(head, rest), metadata=metadata, timeout=timeout
    )


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield  # an async generator that yields nothing


async def _chain(head: list[bytes], rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """``head`` (emptied as it goes: what has gone on is not kept), then ``rest``."""
    while head:
        yield head.pop(0)
    async for item in rest:
        yield item
