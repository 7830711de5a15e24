"""A sidecar running in the test's event loop, in front of the in-test collector."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from predtrace.sidecar._app import SidecarApp
from predtrace.sidecar._config import ShipperConfig, SidecarConfig
from predtrace.sidecar.pipeline import CollectorClientConfig
from predtrace.sidecar.spool import FileLayer, SpoolConfig
from tests.reliability.sidecar.fake_collector import FakeCollector


@dataclass
class Running:
    """A started sidecar and the collector it ships to."""

    app: SidecarApp
    collector: FakeCollector

    @property
    def target(self) -> str:
        return self.app.addresses["grpc"]


StartSidecar = Callable[..., Any]


@pytest.fixture
async def collector() -> AsyncIterator[FakeCollector]:
    fake = FakeCollector()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def start_sidecar(tmp_path: Path, collector: FakeCollector) -> AsyncIterator[StartSidecar]:
    started: list[SidecarApp] = []

    async def start(files: FileLayer | None = None, **overrides: Any) -> Running:
        values: dict[str, Any] = {
            "collector": CollectorClientConfig(url=collector.url, timeout=2),
            "spool": SpoolConfig(directory=str(tmp_path / f"spool{len(started)}")),
            "listen": "127.0.0.1:0",
            "producer_id": "test-sidecar",
            "shipper": ShipperConfig(linger=0.01),
            "drain_timeout": 1.0,
        }
        values.update(overrides)
        app = SidecarApp(SidecarConfig(**values), files=files)
        started.append(app)
        await app.start()
        return Running(app, collector)

    yield start
    for app in started:
        await app.stop()


@contextlib.asynccontextmanager
async def traces_endpoint(
    receive: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    """A real OTLP/HTTP ``/v1/traces`` endpoint on 127.0.0.1 port 0; yields its URL."""
    app = web.Application()
    app.router.add_post("/v1/traces", receive)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1/traces"
    finally:
        await runner.cleanup()
