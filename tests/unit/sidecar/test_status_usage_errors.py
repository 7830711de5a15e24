"""`sidecar status`: bad --tls-ca or target values are usage errors, named where they came from."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from predtrace.sidecar._cli import sidecar


@pytest.mark.timeout(10)
@pytest.mark.parametrize("content", [b"not a certificate\n", b"", b"\x00\xff binary"])
def test_a_tls_ca_that_is_not_pem_is_refused_before_connecting(
    content: bytes, tmp_path: Path
) -> None:
    ca = tmp_path / "ca.txt"
    ca.write_bytes(content)
    # Port 1 on loopback: were it asked, the answer would be UNAVAILABLE (exit 1).
    result = CliRunner().invoke(
        sidecar, ["status", "--target", "127.0.0.1:1", "--tls-ca", str(ca), "--timeout", "2"]
    )
    assert result.exit_code == 2, result.output
    assert f"--tls-ca is not a PEM certificate: {ca}" in result.stderr
    assert "cannot reach the sidecar" not in result.stderr


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("garbage", "--target (PREDTRACE_SIDECAR_TARGET) must be HOST:PORT"),
        ("http://127.0.0.1:4555", "--target (PREDTRACE_SIDECAR_TARGET) is the sidecar's"),
        ("127.0.0.1:0", "--target (PREDTRACE_SIDECAR_TARGET) needs the sidecar's port"),
    ],
)
def test_a_bad_target_from_the_environment_names_the_variable(value: str, message: str) -> None:
    result = CliRunner().invoke(sidecar, ["status"], env={"PREDTRACE_SIDECAR_TARGET": value})
    assert result.exit_code == 2, result.output
    assert message in result.stderr
