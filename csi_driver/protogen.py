"""Regenerate the committed gRPC stubs from ``proto/*.proto``.

The stubs are committed so that an installed package needs no code generator,
and ``tests/test_protogen.py`` regenerates them into a scratch directory and
compares byte for byte, so a .proto edit without ``make proto`` fails CI.

Each proto is mapped onto the package that owns it with protoc's
``virtual=disk`` include form, which makes the generated imports absolute
(``from csi_driver.gen import csi_pb2``) without any post-processing.
"""

from __future__ import annotations

import sys
from pathlib import Path

#: proto file name -> Python package (as a path) that its stubs live in.
TARGETS: dict[str, str] = {
    "csi.proto": "csi_driver/gen",
    "fusefs.proto": "fusefs/gen",
}

REPO = Path(__file__).resolve().parent.parent


def generate(out_root: Path, proto_dir: Path = REPO / "proto") -> list[Path]:
    """Generate every stub under ``out_root``; returns the files written."""
    from grpc_tools import protoc  # imported late: only a dev dependency

    written: list[Path] = []
    for proto, package in TARGETS.items():
        if not (proto_dir / proto).exists():
            continue
        (out_root / package).mkdir(parents=True, exist_ok=True)
        args = [
            "protoc",
            f"-I{package}={proto_dir}",
            f"-I{Path(protoc.__file__).parent / '_proto'}",
            f"--python_out={out_root}",
            f"--grpc_python_out={out_root}",
            f"--pyi_out={out_root}",
            f"{package}/{proto}",
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed for {proto}")
        stem = proto.removesuffix(".proto")
        written += [out_root / package / f"{stem}{suffix}" for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]
    return written


def main() -> int:
    for path in generate(REPO):
        print(path.relative_to(REPO))
    return 0


if __name__ == "__main__":
    sys.exit(main())
