"""The sidecar process raises its open-files limit: each connection holds a descriptor.

A burst of slow or idle clients (OTLP/HTTP, metrics scrapes, gRPC callers)
first exhausts the soft limit, often 1,024; raising it to the hard limit
needs no privilege. The collector does the same (tests/unit/collector/test_server.py).
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .procs import PREDTRACE

# Starts the sidecar with a soft limit of 256, as a login shell may give it.
_LOW_LIMIT = (
    "import os, resource as r, sys; "
    "r.setrlimit(r.RLIMIT_NOFILE, (256, r.getrlimit(r.RLIMIT_NOFILE)[1])); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def _soft_open_files(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open-files line")


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="needs /proc")
def test_the_sidecar_raises_its_open_files_limit_to_the_hard_limit(tmp_path: Path) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip("the hard limit leaves nothing to raise")
    ready = tmp_path / "sidecar.ready"
    args = [sys.executable, "-c", _LOW_LIMIT, PREDTRACE, "sidecar", "serve"]
    args += ["--listen", "127.0.0.1:0"]
    args += ["--collector", "http://127.0.0.1:9", "--spool", str(tmp_path / "spool")]
    args += ["--ready-file", str(ready)]
    with (tmp_path / "sidecar.log").open("wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), (tmp_path / "sidecar.log").read_text()
        assert _soft_open_files(proc.pid) > 256
    finally:
        proc.terminate()
        proc.wait(30)
