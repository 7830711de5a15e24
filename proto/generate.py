"""Regenerate the committed protobuf and gRPC code from the .proto sources.

Run from anywhere: ``python proto/generate.py``. ``--check`` regenerates into a
temporary folder and exits 1 if the committed code differs (CI runs it through
tests/unit/wire/test_generated.py).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent
PROTOS = [
    "predtrace/v1/event.proto",
    "predtrace/v1/batch.proto",
    "predtrace/v1/sidecar.proto",
    "predtrace/oip/v2/grpc_predict_v2.proto",
]
GRPC_PROTOS = {"predtrace/v1/sidecar.proto", "predtrace/oip/v2/grpc_predict_v2.proto"}


def generated_names(proto: str) -> list[str]:
    """Return the files protoc writes for one .proto, relative to the root."""
    stem = proto.removesuffix(".proto")
    names = [f"{stem}_pb2.py", f"{stem}_pb2.pyi"]
    if proto in GRPC_PROTOS:
        names.append(f"{stem}_pb2_grpc.py")
    return names


def generate(out: Path) -> None:
    """Run protoc for every proto, writing into ``out``."""
    include = str(Path(protoc.__file__).parent / "_proto")
    for proto in PROTOS:
        args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}"]
        if proto in GRPC_PROTOS:
            args.append(f"--grpc_python_out={out}")
        if protoc.main([*args, proto]) != 0:
            raise SystemExit(f"protoc failed on {proto}")


def main() -> int:
    """Regenerate in place, or with --check compare against a fresh generation."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed code is stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        generate(out)
        stale = []
        for proto in PROTOS:
            for name in generated_names(proto):
                fresh, committed = out / name, ROOT / name
                if args.check:
                    if not committed.exists() or not filecmp.cmp(fresh, committed, shallow=False):
                        stale.append(name)
                else:
                    shutil.copyfile(fresh, committed)
        if stale:
            print("stale generated code, run python proto/generate.py:", *stale, file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
