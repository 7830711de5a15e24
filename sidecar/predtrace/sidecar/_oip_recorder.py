"""The OIP proxy's prediction events on their way to the intake, off the response path.

Client -> OipProxy -> **Recorder** (a bounded buffer) -> Intake (spool).
A ModelInfer call's event is finished with its outcome (``finish``) and
buffered; the recorder's own task hands the buffer to the intake in
batches, so the model's answer never waits for telemetry. Events the buffer
has no room for, or the spool refuses, are counted as dropped; events the
intake refuses, as rejected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc

from predtrace.sidecar._errors import SpoolError
from predtrace.sidecar._intake import Intake
from predtrace.sidecar.pipeline import RateLimitedLog
from predtrace.wire import PredictionEvent, Status

_log = logging.getLogger("predtrace.sidecar.oip")


class Recorder:
    """A bounded buffer between the proxy and the intake (drops and rejections counted)."""

    def __init__(self, intake: Intake, capacity: int = 10_000) -> None:
        self._intake = intake
        self._queue: asyncio.Queue[PredictionEvent] = asyncio.Queue(capacity)
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0
        self.rejected = 0
        """Events the intake refused (also in its counters): logged, with the reason."""
        self._log = RateLimitedLog(_log)

    def finish(self, event: PredictionEvent, started: int, *, status: grpc.StatusCode) -> None:
        """Record ``event`` with the call's ``status`` and its duration since ``started``."""
        event.duration_nanos = time.perf_counter_ns() - started
        event.status = Status.OK if status == grpc.StatusCode.OK else Status.ERROR
        event.status_code = status.name
        if event.status == Status.ERROR:
            event.error_type = "grpc"
        self.record(event)

    def record(self, event: PredictionEvent) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="predtrace-oip-recorder")
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < 1000:
                batch.append(self._queue.get_nowait())
            try:
                result = await self._intake.record(batch)
            except SpoolError as exc:
                self.dropped += len(batch)
                self._log.warning("spool", "OIP proxy events not spooled: %s", exc)
            except Exception as exc:  # noqa: BLE001 - the recorder must go on recording
                self.dropped += len(batch)
                self._log.warning("error", "OIP proxy events not recorded: %r", exc)
            else:
                for rejection in result.rejected:
                    self.rejected += 1
                    reason = rejection.reason
                    self._log.warning("rejected", "OIP proxy: an event was refused: %s", reason)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def close(self, timeout: float = 2.0) -> None:  # noqa: ASYNC109 - a flush deadline
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), timeout)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.dropped += self._queue.qsize()
