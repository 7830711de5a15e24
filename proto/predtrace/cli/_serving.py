"""Process settings shared by the long-running servers (collector, sidecar)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import resource
import socket
import time
from collections.abc import Callable
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

# Young-generation threshold of the cyclic GC while serving. Ingest allocates
# tens of thousands of containers per batch (maps, rows, event objects) that
# reference counting frees anyway; Python's default (700) runs a collection
# every few events.
GC_GEN0_THRESHOLD: Final = 50_000
# Seconds an HTTP connection may stay idle (collector, sidecar OTLP/HTTP and
# metrics): before its first request has fully arrived (request line and
# headers; a body has its own timeout), and between requests. Longer than the
# 15 s aiohttp's client keeps an idle connection (the sidecar's exporter), so
# a server never closes one the client is about to reuse.
IDLE_TIMEOUT_S: Final = 20.0
# At most one log line this often while accept() fails for want of
# descriptors (asyncio logs every failure, a traceback each, a hundred a tick).
ACCEPT_ERROR_LOG_INTERVAL_S: Final = 10.0
_ACCEPT_FAILED: Final = "socket.accept() out of system resource"
_ExceptionHandler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]
_log = logging.getLogger("predtrace.serving")


def tune_gc() -> None:
    """Freeze what startup allocated and collect young objects less often.

    Call once the server is up. Objects alive after startup (modules, the
    app) move to the permanent generation, so collections stop re-scanning
    them; with the higher threshold this is ~15 % of the CPU of decoding a
    batch in the collector, and of converting events in the sidecar. Garbage
    without cycles is still freed at once by reference counting.
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


class _ClientErrorLog(logging.Filter):
    """aiohttp's log of a client's fault: a malformed request, or a dropped connection.

    aiohttp logs a request it answered with a 4xx for being malformed (a
    request line or header over 8 KiB, bytes that are not HTTP), and a handler
    whose client hung up mid-body (``ConnectionResetError``), as an ERROR with a
    traceback: a client could fill the server's log with them. This makes them
    one WARNING line, at most one a second, with the count of those left out.
    """

    def __init__(self, interval: float = 1.0) -> None:
        super().__init__()
        self.interval = interval
        self.left_out = 0
        self._last = -interval

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        what = _client_fault(exc)
        if what is None:
            return True
        now = time.monotonic()
        if now - self._last < self.interval:
            self.left_out += 1
            return False
        self._last = now
        extra = f" ({self.left_out} more since the last one)" if self.left_out else ""
        record.msg = f"{record.getMessage()}: {what}{extra}"
        record.args = ()
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        self.left_out = 0
        return True


def _client_fault(exc: BaseException | None) -> str | None:
    """What the client did wrong, in a few words; None when it is not the client's fault."""
    if isinstance(exc, HttpProcessingError) and 400 <= exc.code < 500:
        reason = exc.message.split("\n", 1)[0].split(":", 1)[0][:120]
        return f"answered {exc.code}, {reason}"
    # How a client's hang-up mid-body reaches a handler (aiohttp's
    # ClientConnectionResetError is one too). Outgoing calls (MLflow) turn
    # their connection errors into our own before they could reach aiohttp.
    if isinstance(exc, ConnectionResetError):
        return f"the client disconnected ({str(exc)[:120] or type(exc).__name__})"
    return None


def quiet_client_errors() -> None:
    """Log malformed requests and dropped uploads to aiohttp servers as one line. Idempotent."""
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _ClientErrorLog) for f in server_log.filters):
        server_log.addFilter(_ClientErrorLog())


def raise_fd_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit; return the soft limit.

    Each client connection holds a descriptor: the soft limit (often 1,024)
    is what a burst of slow clients exhausts first, and raising it up to the
    hard limit needs no privilege.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An infinite hard limit is refused as a soft one by Linux (past nr_open).
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            _log.info("open files limit stays %d: %s", soft, exc)
            return soft
        return target
    return soft


class AcceptErrorLog:
    """The event loop's exception handler: accept() failures logged at most once an interval.

    asyncio reports every accept() that fails for want of descriptors (EMFILE)
    as an ERROR with a traceback, up to a hundred times per loop iteration:
    under a flood of connections that grew a log by hundreds of MB a minute.
    Those become one WARNING line per ``interval`` with the count left out;
    anything else goes to the handler that was there before (or the default).
    """

    def __init__(
        self,
        previous: _ExceptionHandler | None = None,
        interval: float = ACCEPT_ERROR_LOG_INTERVAL_S,
    ) -> None:
        self.previous, self.interval = previous, interval
        self.left_out = 0
        self._last = -interval

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """Handle one exception the loop reports."""
        if context.get("message") != _ACCEPT_FAILED:
            if self.previous is not None:
                self.previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now - self._last < self.interval:
            self.left_out += 1
            return
        self._last = now
        exc = context.get("exception")
        extra = f" ({self.left_out} more since the last one)" if self.left_out else ""
        _log.warning("cannot accept connections: %s%s", exc or "out of resources", extra)
        self.left_out = 0


def listen_error(listen: str, what: str, exc: OSError) -> OSError:
    """The error for an address an HTTP listener could not bind, naming it and its setting.

    Worded as the gRPC listeners' (``cannot listen on HOST:PORT (--flag): reason``),
    not as aiohttp's bare errno.
    """
    if isinstance(exc, socket.gaierror):  # a host name that does not resolve
        reason = f"cannot resolve the host ({exc.strerror})"
    elif exc.errno:
        reason = os.strerror(exc.errno).lower()
    else:
        reason = str(exc) or "the address is in use or unusable"
    return OSError(f"cannot listen on {listen} ({what}): {reason}")


# What a client's request headers may hold: aiohttp keeps them whole until its
# request is answered (a POST for its whole body deadline), outside every byte
# budget. Its own defaults (128 headers of 8 KiB) let one connection hold about
# 2 MB; our clients send a handful of short ones (a bearer token the longest).
MAX_HEADERS: Final = 32
MAX_FIELD_SIZE: Final = 4096
# Connections an HTTP listener serves at once, by default; one more is closed
# as soon as it is accepted (``cap_connections``). With the header limits, this
# bounds what clients' headers hold, and leaves descriptors to the rest.
MAX_CONNECTIONS: Final = 1024


def cap_connections(server: web.Server, most: int, refused: Callable[[], None]) -> None:
    """Close each connection accepted past ``most`` at once, calling ``refused`` for it.

    ``server`` is an ``AppRunner``'s, set up: its ``connection_made`` is wrapped
    (aiohttp calls it for each connection, before reading a byte of it).
    """
    made = server.connection_made

    def connection_made(handler: RequestHandler, transport: asyncio.Transport) -> None:
        made(handler, transport)
        if len(server.connections) > most:
            refused()
            # Not a byte of it is read. Closed once the handler's task has
            # started: closed now, the task would find its server gone and
            # log a traceback, one per refused connection.
            transport.pause_reading()
            asyncio.get_running_loop().call_soon(transport.close)

    server.connection_made = connection_made  # type: ignore[method-assign]
