"""Running the collector: bind, write the ready file, serve until told to stop.

``--listen 127.0.0.1:0`` binds a free port; the ready file's first line is the
bound ``host:port``, written (atomically) only once the store is open and the
socket accepts connections. SIGTERM/SIGINT stop it gracefully: uploads still
arriving and answers still being sent get ``STOP_GRACE_S``, then end (503, or
the connection closed); batches being committed finish and are acknowledged.

Slow clients are let go: a connection is closed once it has been idle for
``IDLE_TIMEOUT_S``, including one whose request line or headers never end
(aiohttp's own default keeps such a connection an hour: a thousand of them
held every file descriptor). The process raises its descriptor limit to
what it may, and a full table is logged once in a while, not per accept.
At most ``max_connections`` are served at once (more are closed as soon as
accepted, counted), each with at most ``MAX_HEADERS`` request headers of
``MAX_FIELD_SIZE`` bytes: what clients' headers hold is bounded too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Final

from aiohttp import web

from predtrace.cli._serving import (
    IDLE_TIMEOUT_S,
    MAX_FIELD_SIZE,
    MAX_HEADERS,
    AcceptErrorLog,
    cap_connections,
    quiet_client_errors,
    raise_fd_limit,
    tune_gc,
)
from predtrace.collector._app import PARTS, build_app
from predtrace.collector._config import CollectorConfig, parse_listen
from predtrace.collector._stopping import STOPPING, Stopping

log = logging.getLogger("predtrace.collector")
# On stop, what uploads still arriving and answers still being sent are given
# before they end: a stalled one held SIGTERM for the 30 s body deadline (the
# default grace of a Kubernetes pod); well within it, a batch in flight on a
# healthy link arrives.
STOP_GRACE_S: Final = 2.0


def _no_count() -> None:
    """A prebuilt app without the collector's parts counts nothing."""


class RunningCollector:
    """A collector serving on a socket; ``stop`` shuts it down. Safe twice."""

    def __init__(
        self,
        runner: web.AppRunner,
        host: str,
        port: int,
        *,
        tls: bool = False,
        stopping: Stopping | None = None,
        stop_grace_s: float = STOP_GRACE_S,
    ) -> None:
        self.runner, self.host, self.port, self.tls = runner, host, port, tls
        self.stopping, self.stop_grace_s = stopping, stop_grace_s

    @property
    def url(self) -> str:
        """The base URL clients use."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    async def stop(self) -> None:
        """Stop accepting, end what no client was promised, finish the rest, clean up.

        Uploads still arriving and answers still being sent get
        ``stop_grace_s``, then end (see ``Stopping``): a stalled one no
        longer holds the stop for the body deadline or the send timeout.
        Batches being committed finish and are acknowledged.
        """
        for site in list(self.runner.sites):
            await site.stop()
        if self.stopping is not None:
            await self.stopping.stop(self.stop_grace_s)
        await self.runner.cleanup()


async def start_collector(
    config: CollectorConfig,
    *,
    app: web.Application | None = None,
    idle_timeout_s: float = IDLE_TIMEOUT_S,
    stop_grace_s: float = STOP_GRACE_S,
) -> RunningCollector:
    """Start serving ``config`` (or a prebuilt ``app``) on its listen address.

    ``idle_timeout_s``: a connection idle that long is closed (see the module
    docstring; tests shorten it). ``stop_grace_s``: see ``RunningCollector.stop``.

    Raises:
        ConfigError / StoreError: the collector cannot start.
        OSError: the address cannot be bound.
    """
    host, port = parse_listen(config.listen)
    ssl_context = config.ssl_context()  # a bad certificate fails before anything binds
    quiet_client_errors()
    app = app or build_app(config)
    stopping = app.get(STOPPING)
    if stopping is None:
        stopping = app[STOPPING] = Stopping()
    runner = web.AppRunner(
        app,
        # Off: the bounded decoder inflates gzip itself (gzip bombs -> 413).
        auto_decompress=False,
        access_log=None,
        # aiohttp starts this clock when a connection opens and restarts it
        # only after a response: headers trickling in never extend it.
        keepalive_timeout=idle_timeout_s,
        max_headers=MAX_HEADERS,
        max_field_size=MAX_FIELD_SIZE,
    )
    await runner.setup()
    if runner.server is not None:
        refused = app[PARTS].metrics.connections_refused.inc if PARTS in app else _no_count
        cap_connections(runner.server, config.max_connections, refused)
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True, ssl_context=ssl_context)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = port
    server = site._server
    if isinstance(server, asyncio.base_events.Server) and server.sockets:
        sock: socket.socket = server.sockets[0]
        bound = sock.getsockname()[1]
    return RunningCollector(
        runner,
        host,
        bound,
        tls=ssl_context is not None,
        stopping=stopping,
        stop_grace_s=stop_grace_s,
    )


def write_ready_file(path: str, lines: list[str]) -> None:
    """Write the ready file atomically (readers never see a partial line)."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    tmp.replace(target)


async def serve(config: CollectorConfig, *, ready_file: str | None = None) -> None:
    """Serve until SIGTERM or SIGINT."""
    raise_fd_limit()
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(AcceptErrorLog(loop.get_exception_handler()))
    running = await start_collector(config)
    tune_gc()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    wrote_ready_file = False
    try:
        host = f"[{running.host}]" if ":" in running.host else running.host
        if ready_file:
            write_ready_file(ready_file, [f"{host}:{running.port}"])
            wrote_ready_file = True
        log.info("collector ready on %s (store %s)", running.url, _store_name(config.db))
        await stop.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await running.stop()
        if ready_file and wrote_ready_file:
            # A supervisor polling the file must not find a dead address in it.
            with contextlib.suppress(OSError):
                os.unlink(ready_file)


def _store_name(db: str) -> str:
    """The store URL without its credentials (``user:password@``)."""
    scheme, sep, rest = db.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return scheme + sep + rest
