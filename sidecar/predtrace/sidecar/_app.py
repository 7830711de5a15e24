"""The sidecar process: sources -> processors -> spool -> shipper, and its listeners.

``SidecarApp`` wires the pipeline for ``predtrace sidecar serve``: the gRPC
API (with health checking and reflection), the optional OTLP receiver and
forwarder, OIP v2 proxies and the metrics listener all feed one ``Intake``;
one ``Shipper`` delivers the spool. ``stop`` stops accepting, lets in-flight
requests reach the spool, ships what it can within the drain deadline, and
leaves the rest durable in the spool for the next start. A shipper that
stops on an unexpected error is never left dead behind a sidecar that keeps
acknowledging: it is logged at once, health turns NOT_SERVING and ``failed``
is set, on which ``predtrace sidecar serve`` stops and exits non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import posixpath
import secrets
import socket
import ssl
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

import grpc
from grpc_health.v1 import _async as health_aio  # the package's asyncio servicer
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from predtrace.sidecar._config import (
    SidecarConfig,
    join_hostport,
    parse_hostport,
    producer_id_problem,
)
from predtrace.sidecar._errors import ConfigError
from predtrace.sidecar._grpc_api import SERVICE_NAME, STREAM_CHUNK_BYTES, GrpcSource
from predtrace.sidecar._intake import Intake
from predtrace.sidecar._processors import DeploymentEnricher, default_processors
from predtrace.sidecar._shipper import Shipper
from predtrace.sidecar._status import StatusView, build_status, spool_refusal
from predtrace.sidecar.pipeline import CollectorClient, Processor
from predtrace.sidecar.spool import FaultPoints, FileLayer, OsFileLayer, Spool, write_whole
from predtrace.v1 import sidecar_pb2
from predtrace.wire import producer_id_base, restarted_producer_id

if TYPE_CHECKING:
    # Imported where they start: a sidecar without OTLP, an OIP proxy or
    # /metrics does not load them (their protobuf and HTTP server modules
    # cost some 10-15 MB of memory).
    from predtrace.sidecar._metrics import MetricsServer
    from predtrace.sidecar._oip_proxy import OipProxy
    from predtrace.sidecar._otlp import OtlpReceiver
    from predtrace.sidecar._otlp_export import OtlpForwarder

_log = logging.getLogger("predtrace.sidecar")
# What a shipper gets to finish its last step once the drain deadline passed.
_SHIPPER_EXIT_GRACE_S: Final = 0.5
PRODUCER_FILE = "producer_id"
_PRODUCER_FILE_MAX_BYTES = 1024  # an id is at most 200 characters (4 bytes each in UTF-8)


_OTLP_STREAMS: Final = 8  # concurrent OTLP/gRPC calls per connection


def grpc_server_options(config: SidecarConfig) -> list[tuple[str, int]]:
    """Message size limits and keepalive for every gRPC listener of the sidecar.

    The server pings a connection with calls in flight every
    ``keepalive_time`` and closes it when a ping goes unanswered for
    ``keepalive_timeout``: a producer that vanished (an edge device losing
    its link) frees its streams instead of holding them open. A dead peer
    is cut off by ``grpc.http2.ping_timeout_ms`` (a minute in gRPC core
    by default), not by the keepalive timeout alone, so both are set.
    ``SO_REUSEPORT`` (on by default in gRPC) is off: with it, a second
    sidecar, or a second listener of this one, bound the same port and the
    kernel split producers between them.
    """
    return [
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.keepalive_time_ms", round(config.keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", round(config.keepalive_timeout * 1000)),
        ("grpc.http2.ping_timeout_ms", round(config.keepalive_timeout * 1000)),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


class SidecarApp:
    """One running sidecar. ``await start()``, then ``await stop()`` (safe twice)."""

    def __init__(
        self,
        config: SidecarConfig,
        *,
        files: FileLayer | None = None,
        faults: FaultPoints | None = None,
    ) -> None:
        self.config = config
        self.addresses: dict[str, str] = {}
        self._wrote_ready_file = False
        self.producer_id = ""
        self._files = files or OsFileLayer()
        self._faults = faults or FaultPoints()
        self._spool: Spool | None = None
        self._shipper: Shipper | None = None
        self._shipper_task: asyncio.Task[None] | None = None
        self._client = CollectorClient(config.collector)
        self._servers: list[grpc.aio.Server] = []
        self._forwarder: OtlpForwarder | None = None
        self._otlp: OtlpReceiver | None = None
        self._metrics: MetricsServer | None = None
        self._proxies: list[OipProxy] = []
        self.grpc_source: GrpcSource | None = None
        self.processors: list[Processor] = []
        self._health = health_aio.HealthServicer()
        self._stopped = False
        self.failed = asyncio.Event()
        """Set when the shipper stopped on its own (``failure`` says why)."""
        self.failure: BaseException | None = None
        self._failing: asyncio.Task[None] | None = None
        self._credentials, self._ssl_context = _tls(config)

    @property
    def spool(self) -> Spool:
        """The open spool (after ``start``)."""
        assert self._spool is not None  # noqa: S101 - only used after start
        return self._spool

    @property
    def shipper(self) -> Shipper:
        """The running shipper (after ``start``)."""
        assert self._shipper is not None  # noqa: S101 - only used after start
        return self._shipper

    async def start(self) -> None:
        """Open the spool, start shipping and every listener, then write the ready file.

        Raises:
            SpoolUnusableError: the spool directory cannot be used.
        """
        config = self.config
        self._spool = await asyncio.to_thread(
            Spool.open, config.spool, files=self._files, faults=self._faults
        )
        self.producer_id, fresh = await asyncio.to_thread(self._producer_id)
        enricher = DeploymentEnricher(config.deployment)
        # Kept: /metrics reads what the redaction processor removed.
        self.processors = default_processors(config.deployment, config.redaction)
        intake = Intake(self._spool, self.processors)
        self.intake = intake
        self._shipper = Shipper(
            self._spool,
            self._client,
            config.shipper,
            self.producer_id,
            files=self._files,
            faults=self._faults,
            fresh_numbering=fresh,
            renumber=self._renumbered_producer_id,
        )
        self._shipper_task = asyncio.create_task(self._shipper.run(), name="predtrace-shipper")
        self._shipper_task.add_done_callback(self._on_shipper_done)
        await self._start_api(intake)
        if config.otlp_export:
            from predtrace.sidecar._otlp_export import OtlpForwarder  # noqa: PLC0415 - see top

            self._forwarder = OtlpForwarder(
                config.otlp_export,
                headers=dict(config.otlp_export_headers),
                resource=enricher.resource_attributes(),
            )
            await self._forwarder.start()
        if config.otlp_listen:
            await self._start_otlp(intake)
        for index, (listen, upstream) in enumerate(config.oip_proxies):
            await self._start_oip(intake, listen, upstream, index)
        if config.metrics_listen:
            from predtrace.sidecar._metrics import MetricsServer  # noqa: PLC0415 - see top

            self._metrics = MetricsServer(self)
            self.addresses["metrics"] = await self._metrics.start(config.metrics_listen)
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        if config.ready_file:
            await asyncio.to_thread(self._write_ready_file, config.ready_file)

    async def _start_api(self, intake: Intake) -> None:
        config = self.config
        source = GrpcSource(
            intake,
            self.status_message,
            max_events_per_request=config.max_events_per_request,
            max_message_bytes=config.max_message_bytes,
            # Well within a segment (records take a little more than their
            # messages): on small flash, a chunk bigger than a segment found no
            # room while the shipper's batches filled the cap.
            chunk_bytes=min(STREAM_CHUNK_BYTES, config.spool.segment_bytes // 2),
        )
        self.grpc_source = source
        server = grpc.aio.server(options=grpc_server_options(config))
        server.add_generic_rpc_handlers((source.generic_handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        self.addresses["grpc"] = _bind(server, config.listen, "--listen", self._credentials)
        await server.start()
        self._servers.append(server)

    async def _start_otlp(self, intake: Intake) -> None:
        config = self.config
        assert config.otlp_listen is not None  # noqa: S101 - checked by the caller
        from predtrace.sidecar._otlp import OtlpReceiver, http_listen_what  # noqa: PLC0415

        self._otlp = OtlpReceiver(intake, self._forwarder)
        # Bounds the partial messages one connection can hold in memory (an
        # OTLP export is one unary call); further calls wait their turn at the
        # client, not refused. (maximum_concurrent_rpcs would refuse them with
        # RESOURCE_EXHAUSTED without RetryInfo, which OTLP clients drop.)
        options = [*grpc_server_options(config), ("grpc.max_concurrent_streams", _OTLP_STREAMS)]
        server = grpc.aio.server(options=options)
        self._otlp.add_to_grpc_server(server)
        self.addresses["otlp-grpc"] = _bind(
            server, config.otlp_listen, "--otlp-listen", self._credentials
        )
        await server.start()
        self._servers.append(server)
        http_listen = config.otlp_http_listen or _next_port(config.otlp_listen)
        self.addresses["otlp-http"] = await self._otlp.start_http(
            http_listen,
            max_body=config.max_message_bytes,
            ssl_context=self._ssl_context,
            what=http_listen_what(config.otlp_http_listen is not None),
        )

    async def _start_oip(self, intake: Intake, listen: str, upstream: str, index: int) -> None:
        from predtrace.sidecar._oip_proxy import OipProxy  # noqa: PLC0415 - see top

        proxy = OipProxy(
            intake,
            upstream,
            deployment=self.config.deployment,
            max_message_bytes=self.config.max_message_bytes,
        )
        # Room to send an answer up to the proxy's margin over the message limit.
        server = grpc.aio.server(options=proxy.server_options(grpc_server_options(self.config)))
        server.add_generic_rpc_handlers((proxy.generic_handler(),))
        name = "oip-proxy" if index == 0 else f"oip-proxy-{index + 1}"
        self.addresses[name] = _bind(server, listen, "--oip-proxy", self._credentials)
        await server.start()
        self._servers.append(server)
        self._proxies.append(proxy)

    # -- identity and readiness -------------------------------------------------------

    def _producer_id(self) -> tuple[str, bool]:
        """The configured id, else the one kept in the spool directory (made once).

        Also whether the id is new to the spool's numbering (its seqs then
        start at 1). When the spool's state was lost, its seq numbering can
        no longer be trusted, so the sidecar continues under a derived id
        (``<id>-r<hex>``, kept in the directory) that can never collide with
        the old seqs; a token made by ``predtrace collector token --producer
        <id>`` accepts it. A configured id other than the kept one (and not
        one of its ``-r`` restarts) is new too: it must not carry on the old
        id's numbering, which the collector would report as missing batches.
        A new id's numbering is reset in the spool state before the id is
        kept, so a death in between cannot leave the new id on the old seqs.

        A kept id that breaks the ``--producer-id`` rules (a damaged file), or
        none kept in a spool that was used (the file removed), is logged and
        replaced the same way, by a new id whose seqs start at 1:
        the old id is unknown, so nothing may continue its numbering. That
        loses nothing: the spooled events go out under the new id, and the
        sidecar keeps accepting (refusing to start would leave producers
        unacknowledged until someone repairs the file).
        """
        path = posixpath.join(self.config.spool.directory, PRODUCER_FILE)
        stored, damage = "", None
        if self._files.exists(path):
            stored, damage = _read_producer_file(self._files, path)
        elif self.spool.meta or self.spool.hwm > 0:
            # Lost while the spool kept the shipper's numbering: of an id
            # unknown now (the configured one may have been continued under a
            # derived id), so nothing may continue it, as for a damaged file.
            damage = "the file is missing, but the spool holds an earlier id's numbering"
        configured = self.config.producer_id
        if damage is not None:
            kept = restarted_producer_id(configured) if configured else _new_producer_id()
            _log.error(
                "the producer id kept in %s is not usable (%s); continuing as the new "
                "producer %s, its seqs from 1",
                path,
                damage,
                kept,
            )
            self._reset_numbering()
            _write_atomic(self._files, path, kept.encode())
            return kept, True
        kept, fresh = stored, False
        # The kept id is this one, or one it continued under (``<id>-r<6 hex>``);
        # not merely one that begins with it ("edge" is not "edge-rack-1").
        if configured and not (kept == configured or producer_id_base(kept) == configured):
            if stored:
                _log.warning(
                    "--producer-id %s replaces the producer id %s kept in %s; seqs start at 1",
                    configured,
                    stored,
                    path,
                )
                self._reset_numbering()
                fresh = True
            kept = configured
        if not kept:
            kept = _new_producer_id()
        elif self.spool.state_lost:
            # From the configured id when there is one: a configured id may
            # itself end in -r<6 hex> and must never be taken for a restart.
            kept = restarted_producer_id(configured or producer_id_base(kept))
        if kept != stored:
            _write_atomic(self._files, path, kept.encode())
        return kept, fresh

    def _reset_numbering(self) -> None:
        """Make the shipper's next start number from 1, durably (the mark stays).

        The shipper's state (next seq, chain, the batch in flight) belongs to
        the old id; an empty state is a fresh numbering.
        """
        self.spool.commit(self.spool.hwm, b"")

    def _renumbered_producer_id(self, current: str) -> str:
        """The id to continue under after the collector refused a seq of ``current`` as reused.

        Called by the shipper (in a thread) once it has reset its numbering:
        derived from the configured id when there is one, as for a lost spool
        state, and kept in the spool directory so a restart continues it.
        """
        path = posixpath.join(self.config.spool.directory, PRODUCER_FILE)
        new = restarted_producer_id(self.config.producer_id or producer_id_base(current))
        _write_atomic(self._files, path, new.encode())
        self.producer_id = new
        return new

    def _write_ready_file(self, path: str) -> None:
        lines = [self.addresses["grpc"]]
        lines += [f"{name} {addr}" for name, addr in self.addresses.items() if name != "grpc"]
        tmp = f"{path}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write("\n".join(lines) + "\n")
            os.replace(tmp, path)
        except OSError as exc:
            raise ConfigError(f"cannot write --ready-file {path}: {exc.strerror or exc}") from None
        self._wrote_ready_file = True

    # -- status -----------------------------------------------------------------------

    def now_ns(self) -> int:
        """Wall-clock now, for ages and lag."""
        return time.time_ns()

    def status_view(self) -> StatusView:
        """Everything ``predtrace sidecar status`` and the metrics show."""
        forwarder = self._forwarder.counters if self._forwarder else None
        return StatusView(
            producer_id=self.producer_id,
            collector_url=self.config.collector.url,
            spool=self.spool.stats(),
            spool_counters=self.spool.counters.snapshot(),
            shipper=self.shipper.counters,
            next_seq=self.shipper.next_seq,
            oldest_unsent_ns=self.shipper.oldest_unsent_ns,
            intake=self.intake.counters,
            spool_refusal=spool_refusal(self.spool, self.now_ns()),
            otlp_forward=forwarder,
            oip_dropped=sum(proxy.dropped for proxy in self._proxies),
            oip_invalid_caller_ids=sum(proxy.invalid_caller_ids for proxy in self._proxies),
            oip_unreadable_requests=sum(proxy.unreadable_requests for proxy in self._proxies),
            oip_ids_not_added=sum(proxy.ids_not_added for proxy in self._proxies),
            oip_budget_waits=sum(proxy.budget_waits for proxy in self._proxies),
            oip_slow_refusals=sum(proxy.slow_refused for proxy in self._proxies),
            oip_inflight_bytes=sum(proxy.budget.used for proxy in self._proxies),
            stream_held_bytes=self.grpc_source.held_bytes if self.grpc_source else 0,
            otlp_busy_refusals=dict(self._otlp.budget_refusals) if self._otlp else None,
            otlp_duplicate_exports=self._otlp.duplicate_exports if self._otlp else None,
        )

    def _on_shipper_done(self, task: asyncio.Task[None]) -> None:
        """The shipper ended: unless stopping, that is a failure the process must not outlive."""
        if self._stopped or task.cancelled():
            return
        error = task.exception()
        self.failure = error or RuntimeError("the shipper stopped by itself")
        _log.error(
            "the shipper stopped on an error; nothing more would be delivered, so the "
            "sidecar stops accepting events and exits (spooled events ship on the next start)",
            exc_info=(type(self.failure), self.failure, self.failure.__traceback__),
        )
        self.failed.set()
        self._failing = asyncio.ensure_future(self._not_serving())

    async def _not_serving(self) -> None:
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    def status_message(self) -> sidecar_pb2.SidecarStatus:
        """The ``Status`` RPC answer."""
        return build_status(self.status_view())

    # -- shutdown ---------------------------------------------------------------------

    async def stop(self) -> None:
        """Stop accepting, drain within the deadline, persist the rest. Safe twice."""
        if self._stopped:
            return
        self._stopped = True
        deadline = asyncio.get_running_loop().time() + self.config.drain_timeout
        await self._health.enter_graceful_shutdown()
        grace = min(2.0, max(0.1, self.config.drain_timeout / 4))
        await asyncio.gather(*(server.stop(grace) for server in self._servers))
        if self._otlp is not None:
            await self._otlp.stop()
        if self._forwarder is not None:
            await self._forwarder.stop(timeout=min(2.0, self.config.drain_timeout))
        for proxy in self._proxies:
            await proxy.close()
        try:
            await self._stop_shipper(deadline)
            if self._metrics is not None:
                await self._metrics.stop()
        finally:
            await self._client.close()
            if self._spool is not None:
                await asyncio.to_thread(self._spool.close)
        if self.config.ready_file and self._wrote_ready_file:
            # Only this sidecar's own: one that failed to start (the spool in
            # use by another) must not remove the running one's ready file.
            with contextlib.suppress(OSError):
                os.unlink(self.config.ready_file)

    async def _stop_shipper(self, deadline: float) -> None:
        """Drain until ``deadline``, then cancel a send still in flight."""
        if self._shipper is None or self._shipper_task is None:
            return
        # A shipper that already died has nothing to drain.
        drain = 0.0 if self._shipper_task.done() else self.config.drain_timeout
        await self._shipper.stop(drain)
        # A send still in flight (a collector that takes the connection
        # and never answers) must not hold the exit for the client
        # timeout: past the deadline it is cancelled; its batch stays
        # spooled and goes again on the next start.
        left = max(_SHIPPER_EXIT_GRACE_S, deadline - asyncio.get_running_loop().time())
        try:
            await asyncio.wait_for(self._shipper_task, left)
        except TimeoutError:
            _log.warning(
                "a delivery was still in flight at the drain deadline; it was cancelled"
                " and its events stay spooled for the next start"
            )
        except asyncio.CancelledError:
            pass
        except Exception:  # noqa: BLE001 - stop must finish closing
            # Whatever killed the shipper, the spool still closes
            # cleanly and what it holds is shipped on the next start.
            if self.failure is None:  # else logged when it happened
                _log.exception("the shipper had stopped on an error")


def _tls(config: SidecarConfig) -> tuple[grpc.ServerCredentials | None, ssl.SSLContext | None]:
    """gRPC credentials and the HTTP listener's TLS context; client certs required with a CA.

    Raises:
        ConfigError: a certificate, key or CA cannot be read or loaded.
    """
    files = config.tls_files()
    if files is None:
        return None, None
    chain, key, client_ca = files
    credentials = grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(config.tls_cert), str(config.tls_key))
        if client_ca is not None:
            context.load_verify_locations(cadata=client_ca.decode("ascii", "replace"))
            context.verify_mode = ssl.CERT_REQUIRED
    except ssl.SSLError as exc:
        raise ConfigError(f"cannot load the TLS certificate, key or client CA: {exc}") from None
    return credentials, context


def _bind(
    server: grpc.aio.Server,
    listen: str,
    what: str,
    credentials: grpc.ServerCredentials | None = None,
) -> str:
    host, port = parse_hostport(listen, what)
    address = join_hostport(host, port)
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError:  # what current grpcio raises where it used to return 0
        bound = 0
    if bound == 0:
        raise OSError(f"cannot listen on {listen} ({what}): the address is in use or unusable")
    return join_hostport(host, bound)


def _next_port(listen: str) -> str:
    host, port = parse_hostport(listen, "--otlp-listen")
    return join_hostport(host, port + 1 if port else 0)


def _new_producer_id() -> str:
    host = socket.gethostname().split(".")[0][:40] or "host"
    return f"sidecar-{host}-{secrets.token_hex(4)}"


def _read_producer_file(files: FileLayer, path: str) -> tuple[str, str | None]:
    """The id kept in ``path``, and what is wrong with it (None when usable)."""
    if files.size(path) > _PRODUCER_FILE_MAX_BYTES:
        return "", f"the file is larger than {_PRODUCER_FILE_MAX_BYTES} bytes"
    try:
        text = files.read(path, 0, _PRODUCER_FILE_MAX_BYTES).decode("utf-8").strip()
    except UnicodeDecodeError:
        return "", "the file is not UTF-8 text"
    # A restarted id is its base plus "-r" and 6 hex digits: the length rule
    # (room for that suffix) applies to the base, as it did to --producer-id.
    problem = producer_id_problem(producer_id_base(text))
    return (text, None) if problem is None else ("", problem)


def _write_atomic(files: FileLayer, path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    write_whole(files, tmp, data)
    files.rename(tmp, path)
    files.fsync_dir(posixpath.dirname(path))


def environ_fault_points(environ: Mapping[str, str]) -> FaultPoints:
    """Fault points armed from the environment (test harnesses only)."""
    return FaultPoints.from_env(environ)
