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

Here: the assembly, status and shutdown. The parts: the producer id kept in
the spool directory (``_app_identity``) and the listeners' options, TLS and
addresses (``_app_listeners``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

import grpc
from grpc_health.v1 import _async as health_aio  # the package's asyncio servicer
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from predtrace.sidecar._app_identity import PRODUCER_FILE, producer_id, renumbered_producer_id
from predtrace.sidecar._app_listeners import bind, grpc_server_options, next_port, tls
from predtrace.sidecar._config import SidecarConfig
from predtrace.sidecar._errors import ConfigError
from predtrace.sidecar._grpc_api import SERVICE_NAME, STREAM_CHUNK_BYTES, GrpcSource
from predtrace.sidecar._intake import Intake
from predtrace.sidecar._processors import DeploymentEnricher, default_processors
from predtrace.sidecar._shipper import Shipper
from predtrace.sidecar._status import StatusView, build_status, spool_refusal
from predtrace.sidecar.pipeline import CollectorClient, Processor
from predtrace.sidecar.spool import FaultPoints, FileLayer, OsFileLayer, Spool
from predtrace.v1 import sidecar_pb2

if TYPE_CHECKING:
    # Imported where they start: a sidecar without OTLP, an OIP proxy or
    # /metrics does not load them (their protobuf and HTTP server modules
    # cost some 10-15 MB of memory).
    from predtrace.sidecar._metrics import MetricsServer
    from predtrace.sidecar._oip_proxy import OipProxy
    from predtrace.sidecar._otlp import OtlpReceiver
    from predtrace.sidecar._otlp_export import OtlpForwarder

# Imported from here, wherever they are defined.
__all__ = ["PRODUCER_FILE", "SidecarApp", "environ_fault_points", "grpc_server_options"]

_log = logging.getLogger("predtrace.sidecar")
# What a shipper gets to finish its last step once the drain deadline passed.
_SHIPPER_EXIT_GRACE_S: Final = 0.5
_OTLP_STREAMS: Final = 8  # concurrent OTLP/gRPC calls per connection


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
        self._credentials, self._ssl_context = tls(config)

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
        self.producer_id, fresh = await asyncio.to_thread(
            producer_id, config, self.spool, self._files
        )
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
        self.addresses["grpc"] = bind(server, config.listen, "--listen", self._credentials)
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
        self.addresses["otlp-grpc"] = bind(
            server, config.otlp_listen, "--otlp-listen", self._credentials
        )
        await server.start()
        self._servers.append(server)
        http_listen = config.otlp_http_listen or next_port(config.otlp_listen)
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
        self.addresses[name] = bind(server, listen, "--oip-proxy", self._credentials)
        await server.start()
        self._servers.append(server)
        self._proxies.append(proxy)

    # -- identity and readiness -------------------------------------------------------

    def _renumbered_producer_id(self, current: str) -> str:
        """The id to continue under after the collector refused a seq of ``current`` as reused.

        Called by the shipper (in a thread) once it has reset its numbering:
        derived from the configured id when there is one, as for a lost spool
        state, and kept in the spool directory so a restart continues it.
        """
        self.producer_id = renumbered_producer_id(self.config, self._files, current)
        return self.producer_id

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
            oip_inflight_bytes=sum(proxy.inflight_bytes for proxy in self._proxies),
            stream_held_bytes=self.grpc_source.held_bytes if self.grpc_source else 0,
            otlp_busy_refusals=dict(self._otlp.budget_refusals) if self._otlp else None,
            otlp_duplicate_exports=self._otlp.duplicate_exports if self._otlp else None,
            otlp_connections_refused=self._otlp.connections_refused if self._otlp else None,
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
        if self.grpc_source is not None:
            self.grpc_source.answer_draining()  # before the grace ends and cancels them
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


def environ_fault_points(environ: Mapping[str, str]) -> FaultPoints:
    """Fault points armed from the environment (test harnesses only)."""
    return FaultPoints.from_env(environ)
