"""Generate the Python gRPC/protobuf modules from the .proto files under proto/.

The Python module path of each generated file follows the .proto file's path under
proto/ (proto/runtimed/api/... -> runtimed/api/...), while the wire names come from
each file's `package` line. Output is deterministic for a given grpcio-tools version,
which pyproject.toml pins; tests/unit/test_generated_code.py fails when the committed
code is stale.

    python proto/generate.py            # regenerate in place
    python proto/generate.py --check    # exit 1 if the committed code differs
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
GENERATED_PACKAGE = Path("runtimed") / "api"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


def _include_dirs() -> list[str]:
    import grpc_tools

    dirs = [str(PROTO_ROOT), str(Path(grpc_tools.__file__).parent / "_proto")]
    # google/rpc/status.proto ships with googleapis-common-protos, whose Python
    # module (google.rpc.status_pb2) is what the generated code imports.
    import google.rpc.status_pb2 as status_pb2

    dirs.append(str(Path(status_pb2.__file__).parent.parent.parent))
    return dirs


def proto_files() -> list[Path]:
    return sorted(p.relative_to(PROTO_ROOT) for p in (PROTO_ROOT / GENERATED_PACKAGE).rglob("*.proto"))


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    files = [str(p) for p in proto_files()]
    args = ["grpc_tools.protoc"]
    args += [f"-I{d}" for d in _include_dirs()]
    args += [f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}"]
    args += files
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # Every directory of generated code is a regular package so that setuptools
    # ships it and imports never depend on namespace-package lookup.
    for directory, _, _ in os.walk(out_dir / GENERATED_PACKAGE):
        init = Path(directory) / "__init__.py"
        if not init.exists():
            init.write_text("")


def _generated_files(root: Path) -> set[Path]:
    base = root / GENERATED_PACKAGE
    if not base.exists():
        return set()
    return {
        p.relative_to(root)
        for p in base.rglob("*")
        if p.is_file() and (p.name.endswith(GENERATED_SUFFIXES) or p.name == "__init__.py")
    }


def check() -> list[str]:
    """Return the generated files that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh_root = Path(tmp)
        generate(fresh_root)
        fresh = _generated_files(fresh_root)
        committed = _generated_files(REPO_ROOT)
        problems = [f"missing: {p}" for p in sorted(fresh - committed)]
        problems += [f"stale extra file: {p}" for p in sorted(committed - fresh)]
        problems += [
            f"differs: {p}"
            for p in sorted(fresh & committed)
            if not filecmp.cmp(fresh_root / p, REPO_ROOT / p, shallow=False)
        ]
        return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only verify the committed code is current")
    args = parser.parse_args()
    if args.check:
        problems = check()
        for line in problems:
            print(line, file=sys.stderr)
        return 1 if problems else 0
    # Regenerate into a scratch tree first so a protoc failure leaves the old code intact.
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        for stale in _generated_files(REPO_ROOT):
            (REPO_ROOT / stale).unlink()
        shutil.copytree(Path(tmp) / GENERATED_PACKAGE, REPO_ROOT / GENERATED_PACKAGE, dirs_exist_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
