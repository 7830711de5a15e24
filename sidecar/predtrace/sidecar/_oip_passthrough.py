"""Every method of the OIP proxy but ModelInfer: passed through to the model server as bytes.

Client -> OipProxy -> **passthrough** -> model server (a connection of the
``_oip_upstream.ChannelPool``). Any cardinality (a generic stream
handler): requests and responses pass untouched, with the call's metadata,
trailers and status (rich error details and retry pushback included). A
single request to a method known to take one goes upstream as a unary
request (see ``passthrough``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from predtrace.sidecar._grpc_answers import fail_call
from predtrace.sidecar._oip_metadata import Metadata, forwardable
from predtrace.sidecar._oip_upstream import ChannelPool


def passthrough_handler(
    pool: ChannelPool, method: str, *, read_ahead: bool
) -> grpc.RpcMethodHandler[bytes, bytes]:
    """A handler passing each call of ``method`` through (``read_ahead``: see ``passthrough``)."""

    async def handle(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        async for item in passthrough(pool, method, requests, context, read_ahead=read_ahead):
            yield item

    return grpc.stream_stream_rpc_method_handler(handle)


async def passthrough(
    pool: ChannelPool,
    method: str,
    requests: AsyncIterator[bytes],
    context: grpc.aio.ServicerContext[bytes, bytes],
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
    """
    metadata = forwardable(context.invocation_metadata())
    head: list[bytes] = []
    if read_ahead:
        head = [item async for item in _take(requests, 2)]
    upstream = pool.take()
    try:
        call = _open_call(
            upstream.channel,
            method,
            head,
            requests,
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
    requests: AsyncIterator[bytes],
    *,
    metadata: Metadata,
    timeout: float | None,
) -> grpc.aio.UnaryStreamCall[bytes, bytes] | grpc.aio.StreamStreamCall[bytes, bytes]:
    """The upstream call: unary-stream for a single request to a one-request method."""
    if len(head) == 1:
        return channel.unary_stream(method, None, None)(head[0], metadata=metadata, timeout=timeout)
    return channel.stream_stream(method, None, None)(
        _chain(head, requests) if head else requests, metadata=metadata, timeout=timeout
    )


async def _take(items: AsyncIterator[bytes], n: int) -> AsyncIterator[bytes]:
    """The first ``n`` items (fewer if the caller half-closes), leaving the rest."""
    for _ in range(n):
        item = await anext(items, None)
        if item is None:
            return
        yield item


async def _chain(head: list[bytes], rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    for item in head:
        yield item
    async for item in rest:
        yield item
