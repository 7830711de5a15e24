"""The wheel holds every component of the namespace and imports without the source tree."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPONENTS = [
    "predtrace.wire",
    "predtrace.v1.event_pb2",
    "predtrace.v1.sidecar_pb2_grpc",
    "predtrace.oip.v2.grpc_predict_v2_pb2_grpc",
    "predtrace.cli",
    "predtrace.middleware",
    "predtrace.sidecar.pipeline",
    "predtrace.sidecar.testing",
    "predtrace.collector",
]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, f"building the wheel failed:\n{result.stdout}\n{result.stderr}"
    (built,) = out.glob("predtrace-*.whl")
    return built


def test_wheel_has_each_component_and_type_markers_but_no_namespace_init(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("wire", "middleware", "sidecar", "collector", "cli"):
        assert f"predtrace/{folder}/__init__.py" in names
        assert f"predtrace/{folder}/py.typed" in names
    assert "predtrace/v1/event.proto" in names
    # A predtrace/__init__.py would turn the namespace into a regular package.
    assert "predtrace/__init__.py" not in names


def test_installed_wheel_imports_every_component_from_site_packages(
    wheel: Path, tmp_path: Path
) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    deps = sysconfig.get_paths()["purelib"]
    platdeps = sysconfig.get_paths()["platlib"]
    # -S: no site processing, so the editable install's .pth (which points at
    # the source tree) is not read; dependencies come from the venv directly.
    code = (
        "import importlib, sys\n"
        f"sys.path[:0] = [{str(target)!r}, {deps!r}, {platdeps!r}]\n"
        f"for name in {COMPONENTS!r}:\n"
        "    module = importlib.import_module(name)\n"
        f"    assert module.__file__.startswith({str(target)!r}), module.__file__\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-S", "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
