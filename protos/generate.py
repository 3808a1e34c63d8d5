"""Regenerate the gRPC Python code (control plane, device agent) from protos/**/*.proto.

The include root is the repository root, so generated imports read `from protos.dress.fleet.v1 import ...`
and resolve as a package without touching sys.path. tests/test_protos.py checks the committed output is fresh.

    python protos/generate.py            # regenerate in place
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_FILES = sorted(p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "protos").rglob("*.proto"))
WELL_KNOWN_TYPES = Path(grpc_tools.__file__).parent / "_proto"


def generate(out_dir: Path = REPO_ROOT) -> list[Path]:
    """Run protoc on every .proto under protos/; returns the generated files (under out_dir/protos/)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"-I{WELL_KNOWN_TYPES}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *PROTO_FILES,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted(p for p in (out_dir / "protos").rglob("*_pb2*.py*"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output root (default: the repository)")
    for path in generate(parser.parse_args().out):
        print(path, file=sys.stderr)


if __name__ == "__main__":
    main()
