"""TLS end to end: middleware exporter --mTLS--> sidecar --HTTPS--> collector.

Real processes, one throwaway CA (trustme) that signs the servers' certificates
for 127.0.0.1 and the model server's client certificate.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
import trustme

from predtrace.middleware import SidecarGrpcExporter
from predtrace.sidecar.pipeline import OutgoingBatch, RetryableExportError
from predtrace.v1 import sidecar_pb2, sidecar_pb2_grpc
from predtrace.wire import ModelRef, PredictionEvent
from tests.reliability.sidecar.polling import eventually_sync
from tests.reliability.sidecar.procs import PREDTRACE, Proc, _spawn, start_sidecar

pytestmark = pytest.mark.integration


class Pki:
    """PEM files of a test CA, a server certificate for 127.0.0.1 and a client certificate."""

    def __init__(self, folder: Path) -> None:
        ca = trustme.CA()
        self.ca = folder / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca))
        self.server_cert, self.server_key = self._issue(ca, folder / "server", "127.0.0.1")
        self.client_cert, self.client_key = self._issue(ca, folder / "client", "model-server")

        expired = datetime.now(UTC) - timedelta(days=1)
        self.expired_cert, self.expired_key = self._issue(
            ca, folder / "expired", "model-server", not_before=expired - timedelta(days=30),
            not_after=expired,
        )  # fmt: skip
        self.stranger_cert, self.stranger_key = self._issue(
            trustme.CA(), folder / "stranger", "model-server"
        )

    @staticmethod
    def _issue(ca: trustme.CA, stem: Path, name: str, **validity: datetime) -> tuple[Path, Path]:
        leaf = ca.issue_cert(name, **validity)
        cert, key = stem.with_suffix(".pem"), stem.with_suffix(".key")
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        return cert, key


def _https_collector(tmp: Path, pki: Pki) -> Proc:
    args = [PREDTRACE, "collector", "serve", "--db", f"sqlite:///{tmp / 'c.db'}"]
    args += ["--listen", "127.0.0.1:0", "--ready-file", str(tmp / "collector.ready")]
    args += ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    return _spawn(args, tmp / "collector.ready", tmp / "collector.log", None).wait_ready()


def _batch(count: int) -> OutgoingBatch:
    events = [
        PredictionEvent(prediction_id=f"tls-{i}", model=ModelRef(name="churn", version="3"))
        for i in range(count)
    ]
    return OutgoingBatch(events=events)


def test_mtls_from_the_model_server_to_an_https_collector(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    collector = _https_collector(tmp_path, pki)
    sidecar = start_sidecar(
        tmp_path,
        f"https://{collector.address}",
        "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
        "--tls-client-ca", str(pki.ca), "--collector-ca", str(pki.ca),
    )  # fmt: skip
    try:
        exporter = SidecarGrpcExporter(
            sidecar.address,
            tls_ca=str(pki.ca),
            tls_cert=str(pki.client_cert),
            tls_key=str(pki.client_key),
        )
        try:
            result = exporter.export(_batch(5))
        finally:
            exporter.shutdown(1)
        assert result.accepted == 5

        # Shipped over HTTPS, trusted through --collector-ca.
        collector_http = _QueryOverTls(collector.address, pki.ca)
        eventually_sync(lambda: all(collector_http.has(f"tls-{i}") for i in range(5)), 30)

        # RELIABILITY row 31: no client certificate, one from another CA, an expired
        # one: the handshake fails and nothing is recorded.
        for cert, key in (
            (None, None),
            (pki.stranger_cert, pki.stranger_key),
            (pki.expired_cert, pki.expired_key),
        ):
            refused = SidecarGrpcExporter(
                sidecar.address,
                tls_ca=str(pki.ca),
                tls_cert=str(cert) if cert else None,
                tls_key=str(key) if key else None,
                timeout=3,
            )
            try:
                with pytest.raises(RetryableExportError):
                    refused.export(_batch(1))
            finally:
                refused.shutdown(1)
        # Plaintext gets nowhere either.
        with grpc.insecure_channel(sidecar.address) as channel:
            stub = sidecar_pb2_grpc.SidecarStub(channel)  # type: ignore[no-untyped-call]
            with pytest.raises(grpc.RpcError):
                stub.Status(sidecar_pb2.StatusRequest(), timeout=3)

        status = subprocess.run(
            [PREDTRACE, "sidecar", "status", "--target", sidecar.address, "-o", "json",
             "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert),
             "--tls-key", str(pki.client_key)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["exported_events"] >= 5
    finally:
        sidecar.stop()
        collector.stop()


def test_half_a_tls_config_fails_at_startup(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    result = subprocess.run(
        [PREDTRACE, "sidecar", "serve", "--listen", "127.0.0.1:0",
         "--collector", "http://127.0.0.1:9", "--spool", str(tmp_path / "spool"),
         "--tls-client-ca", str(pki.ca)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--tls-client-ca (mTLS) needs --tls-cert and --tls-key" in result.stderr


class _QueryOverTls:
    """GET /v1/predictions/{id} from the HTTPS collector, trusting the test CA."""

    def __init__(self, address: str, ca: Path) -> None:
        self._base = f"https://{address}"
        self._context = ssl.create_default_context(cafile=str(ca))

    def has(self, prediction_id: str) -> bool:
        url = f"{self._base}/v1/predictions/{prediction_id}"
        try:
            with urllib.request.urlopen(url, timeout=5, context=self._context) as resp:  # noqa: S310
                return bool(json.loads(resp.read()).get("predictions"))
        except OSError:
            return False
