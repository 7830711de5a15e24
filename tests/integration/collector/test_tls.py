"""The collector over HTTPS: ingest and queries through a real TLS listener."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme

from predtrace.collector.testing import ChainedProducer, make_events
from predtrace.sidecar.pipeline._collector_http import CollectorClient, CollectorClientConfig
from predtrace.wire import IngestAck

from .conftest import CLI, Served

pytestmark = pytest.mark.integration
TRACE = "6e0c63257de34c926f9efcd03899aef2"


async def _send(config: CollectorClientConfig, body: bytes) -> IngestAck:
    client = CollectorClient(config)
    try:
        return await client.send(body, compressed=True)
    finally:
        await client.close()


@pytest.fixture
def certificates(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1: (ca, cert chain, key)."""
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    ca_pem, chain, key = tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server.key"
    ca.cert_pem.write_to_path(str(ca_pem))
    server.private_key_pem.write_to_path(str(key))
    chain.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    return ca_pem, chain, key


def test_ingest_and_pivot_over_https(
    serve_collector: Callable[..., Served], tmp_path: Path, certificates: tuple[Path, Path, Path]
) -> None:
    ca, chain, key = certificates
    served = serve_collector(
        f"sqlite:///{tmp_path}/tls.db", "--tls-cert", str(chain), "--tls-key", str(key)
    )
    url = served.url.replace("http://", "https://")

    producer = ChainedProducer("tls-producer")
    body = producer.body(make_events(3, trace_id=bytes.fromhex(TRACE)), compress=True)
    ack = asyncio.run(_send(CollectorClientConfig(url=url, ca_file=str(ca)), body))
    assert ack.accepted == 3

    # The CLI trusts the CA through OpenSSL's own SSL_CERT_FILE.
    query = subprocess.run(
        [*CLI, "trace", TRACE, "-o", "json", "--collector", url],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, "SSL_CERT_FILE": str(ca)},
    )
    assert query.returncode in (0, 1), query.stderr  # 1: the chain has unregistered hops
    assert TRACE in query.stdout and query.stdout.count('"prediction_id"') == 3

    # Without the CA the certificate is refused; plaintext to the TLS port gets nowhere.
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(  # noqa: S310 - loopback
            f"{url}/healthz", timeout=5, context=ssl.create_default_context()
        )
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"{served.url}/healthz", timeout=5)  # noqa: S310 - loopback


def test_a_key_without_a_certificate_fails_at_startup(
    tmp_path: Path, certificates: tuple[Path, Path, Path]
) -> None:
    _, _, key = certificates
    result = subprocess.run(
        [*CLI, "collector", "serve", "--db", f"sqlite:///{tmp_path}/x.db", "--listen",
         "127.0.0.1:0", "--tls-key", str(key)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )  # fmt: skip
    assert result.returncode == 2  # a usage error (DESIGN §7)
    assert "TLS needs both --tls-cert and --tls-key" in result.stderr


def test_an_unreadable_certificate_is_named(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    result = subprocess.run(
        [*CLI, "collector", "serve", "--db", f"sqlite:///{tmp_path}/x.db", "--listen",
         "127.0.0.1:0", "--tls-cert", str(junk), "--tls-key", str(junk)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"cannot load the TLS certificate {junk}" in result.stderr
