"""The collector HTTP exporter: the queued pipeline's last stage, POSTing to the collector.

Queued pipeline (``_queued``) -> worker thread -> **CollectorHttpExporter** ->
``CollectorClient`` (``_collector_client``, where the answers are classified)
-> the collector's ``/v1/batches``. The exporter seals each batch once (its
producer id, seq and digest chain, gzip'd or not) so that a retry resends the
same bytes, and bounds each attempt by the pipeline's shutdown deadline.
The client, its configuration (``_collector_config``) and the answer
classification are imported from here too, by the package and the sidecar.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import threading
import time
import weakref

from predtrace.sidecar.pipeline._collector_client import (
    BATCH_CONTENT_TYPE,
    CREDENTIAL_STATUSES,
    ENDPOINT_STATUSES,
    RETRYABLE_STATUSES,
    CollectorClient,
    RefusedBatchError,
    parse_retry_after,
)
from predtrace.sidecar.pipeline._collector_config import (
    CollectorClientConfig,
    is_loopback_host,
    without_userinfo,
)
from predtrace.sidecar.pipeline._errors import RetryableExportError
from predtrace.sidecar.pipeline._stages import ExportResult, OutgoingBatch
from predtrace.wire import (
    EventBatch,
    IngestAck,
    batch_digest,
    encode_events_payload,
    gzip_bytes,
)

# Imported from here, wherever they are defined.
__all__ = [
    "BATCH_CONTENT_TYPE",
    "CREDENTIAL_STATUSES",
    "ENDPOINT_STATUSES",
    "RETRYABLE_STATUSES",
    "CollectorClient",
    "CollectorClientConfig",
    "CollectorHttpExporter",
    "RefusedBatchError",
    "is_loopback_host",
    "new_producer_id",
    "parse_retry_after",
    "without_userinfo",
]


def new_producer_id(prefix: str) -> str:
    """A producer id unique to this process start: ``<prefix>-<random>``."""
    return f"{prefix or 'predtrace'}-{secrets.token_hex(6)}"


class CollectorHttpExporter:
    """Exporter of the queued pipeline that POSTs batches to the collector.

    Runs its own event loop in the pipeline's worker thread, so it works the
    same under sync and asyncio model servers. Numbers each batch and chains
    its digest on the first attempt; retries resend identical bytes.

    In-process batches are not durable, so the producer id is unique per
    process start (``<prefix>-<random>``, renewed in a forked child) and seq
    starts at 1 for each: the collector never confuses two processes.
    """

    def __init__(self, config: CollectorClientConfig, *, producer_prefix: str = "") -> None:
        self.config = config
        self._prefix = producer_prefix
        self._reset()
        _INSTANCES.add(self)

    def _reset(self) -> None:
        self.producer_id = new_producer_id(self._prefix)
        self._client = CollectorClient(self.config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next_seq = 1
        self._prev_digest = b""
        # set_deadline comes from another thread (the pipeline's shutdown):
        # the deadline (time.monotonic) and the running attempt's timeout
        # scope are shared under this lock.
        self._lock = threading.Lock()
        self._deadline: float | None = None
        self._scope: asyncio.Timeout | None = None

    def export(self, batch: OutgoingBatch) -> ExportResult:
        """Deliver one batch (``_collector_client`` says how answers are classified).

        An attempt ends at the collector timeout or at the deadline given to
        ``set_deadline``, whichever comes first (retryable either way).
        """
        if batch.payload is None:
            self._seal(batch)
        assert batch.payload is not None  # noqa: S101 - set by _seal
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        try:
            ack = self._loop.run_until_complete(self._send_bounded(batch.payload))
        except TimeoutError:
            # Only the deadline's scope raises this: the client turns its own
            # timeouts into RetryableExportError.
            raise RetryableExportError("collector attempt cut at the shutdown deadline") from None
        return ExportResult(ack.accepted, ack.rejected, ack.duplicate)

    async def _send_bounded(self, payload: bytes) -> IngestAck:
        async with asyncio.timeout(None) as scope:
            with self._lock:
                self._scope = scope
                deadline = self._deadline
            try:
                if deadline is not None:
                    self._reschedule(scope, deadline)
                return await self._client.send(payload, compressed=self.config.compress)
            finally:
                with self._lock:
                    self._scope = None

    def set_deadline(self, timeout: float) -> None:
        """End the attempt in flight, and every later one, within ``timeout`` seconds.

        Thread-safe: the queued pipeline calls it from its shutdown, with the
        time left before its deadline, and with 0 when it gives up waiting.
        ``shutdown`` clears it.
        """
        with self._lock:
            self._deadline = time.monotonic() + max(0.0, timeout)
            loop = self._loop if self._scope is not None else None
        if loop is None:
            return  # no attempt running: the next one reads the deadline
        # A RuntimeError: the loop was closed meanwhile, nothing left to bound.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._apply_deadline)

    def _apply_deadline(self) -> None:
        # In the loop's thread, so the scope is not exiting under us.
        with self._lock:
            scope, deadline = self._scope, self._deadline
        if scope is not None and deadline is not None:
            self._reschedule(scope, deadline)

    @staticmethod
    def _reschedule(scope: asyncio.Timeout, deadline: float) -> None:
        when = asyncio.get_running_loop().time() + max(0.0, deadline - time.monotonic())
        current = scope.when()
        if current is None or when < current:
            scope.reschedule(when)

    def _seal(self, batch: OutgoingBatch) -> None:
        payload = encode_events_payload(
            EventBatch(
                producer_id=self.producer_id,
                seq=self._next_seq,
                events=batch.events,
                batch_id=secrets.token_bytes(16),
                created_at_unix_nano=time.time_ns(),
                prev_digest=self._prev_digest,
            )
        )
        batch.seq = self._next_seq
        self._next_seq += 1
        self._prev_digest = batch_digest(payload)
        batch.payload = gzip_bytes(payload) if self.config.compress else payload

    def shutdown(self, timeout: float) -> None:
        """Close the session and the private loop; clear the deadline. Safe twice."""
        with self._lock:
            self._deadline = None  # an export after this is bounded by the timeout alone
        if self._loop is None:
            return
        self._loop.run_until_complete(self._client.close())
        self._loop.close()
        self._loop = None
        self._client = CollectorClient(self.config)  # an export after this opens afresh


_INSTANCES: weakref.WeakSet[CollectorHttpExporter] = weakref.WeakSet()


def _reset_after_fork() -> None:
    # The parent's event loop and sockets are unusable in the child, and the
    # child must not reuse the parent's (producer, seq) numbering.
    for exporter in list(_INSTANCES):
        exporter._reset()


os.register_at_fork(after_in_child=_reset_after_fork)
