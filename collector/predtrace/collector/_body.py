"""Reading a request's body: capped, within a deadline, charged to the budget as it arrives.

Batches (``_ingest``) and lineage registrations (``_api_registration``) are
read here: a body past its cap is refused (413), one not all received in time
too (408), one the in-flight budget (``_budget``) cannot hold waits for an
idle collector (503), and a stopping collector ends one still arriving (503,
``_stopping``): nothing of it was kept.
"""

from __future__ import annotations

import asyncio
from typing import Final

from aiohttp import web

from predtrace.collector._budget import _Refused, _Reservation
from predtrace.collector._stopping import ShuttingDownError, reading

_CHUNK: Final = 64 * 1024


async def read_body(
    request: web.Request,
    reservation: _Reservation,
    *,
    cap: int,
    timeout_s: float,
    name: str,
    unsaved: str,
) -> bytes:
    """The request's body, ``cap`` bytes at most, each chunk charged to ``reservation``.

    Reserved as it arrives, never the declared length up front: a stalled
    upload holds only the bytes it sent. ``name`` names the body in a
    refusal ("body", "lineage body"); ``unsaved`` says what a stopping
    collector did not do with it ("batch not stored").

    Raises:
        _Refused: 413 past ``cap``, 408 not all received within ``timeout_s``,
            503 the budget is spent or the collector is stopping.
        ConnectionResetError: the client hung up mid-body.
    """
    chunks: list[bytes] = []
    total = 0
    try:
        with reading(request):
            async with asyncio.timeout(timeout_s):
                async for chunk in request.content.iter_chunked(_CHUNK):
                    total += len(chunk)
                    if total > cap:
                        raise _Refused(413, f"{name} exceeds {cap} bytes", "too_large")
                    reservation.grow_to(total)
                    chunks.append(chunk)
    except ShuttingDownError:
        # Nothing of it was kept: the client sends it again (here once
        # restarted, or to another replica).
        raise _Refused(
            503, f"collector shutting down: {unsaved}, send it again", "shutting_down"
        ) from None
    except TimeoutError:
        # A stalled upload must not hold its bytes (and a connection) for ever.
        raise _Refused(408, f"body not received within {timeout_s:g} s", "timeout") from None
    return b"".join(chunks)
