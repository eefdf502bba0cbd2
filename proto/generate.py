"""Regenerate the Python stubs of the gRPC API: `python -m expertmesh.proto.generate [--out DIR]`.

Runs `grpc_tools.protoc` (the `grpcio-tools` package, in the `test` extra) over every
`expertmesh/**/*.proto` below this folder, writing `*_pb2.py`, `*_pb2.pyi` and `*_pb2_grpc.py`
beside the `.proto` files (or under DIR). The include root is this folder, so a file's
proto name (`expertmesh/v1/expertmesh.proto`, what reflection shows) follows the proto package;
the generated imports of our own modules (`from expertmesh.v1 import ...`) are then rewritten
to the import package they really live in (`expertmesh.proto.expertmesh.v1`).
"""
from __future__ import annotations

import argparse
import re
import sys
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent
"""The include root: `.proto` files live at `ROOT/expertmesh/<version>/`."""
PACKAGE = __package__ or "expertmesh.proto"
"""The import package ROOT is installed as."""

# `from expertmesh.v1 import x_pb2` / `import expertmesh.v1.x_pb2`, at the start of a line.
_OWN_IMPORT = re.compile(r"^(\s*)(from|import) expertmesh\.(?=v\d)", re.MULTILINE)


def proto_files(root: Path = ROOT) -> list[Path]:
    return sorted(p.relative_to(root) for p in (root / "expertmesh").rglob("*.proto"))


def generate(out: Path = ROOT, root: Path = ROOT) -> list[Path]:
    """Compile every .proto under root into out; return the files written."""
    from grpc_tools import protoc

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    protos = proto_files(root)
    if not protos:
        raise FileNotFoundError(f"no .proto files under {root / 'expertmesh'}")
    well_known = resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    args = ["grpc_tools.protoc", f"-I{root}", f"-I{well_known}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", *(str(p) for p in protos)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    written = []
    for proto in protos:
        stem = out / proto.with_suffix("")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            path = stem.with_name(stem.name + suffix)
            text = path.read_text(encoding="utf-8")
            fixed = _OWN_IMPORT.sub(rf"\1\2 {PACKAGE}.expertmesh.", text)
            if fixed != text:
                path.write_text(fixed, encoding="utf-8")
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m expertmesh.proto.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: beside the .proto files)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
