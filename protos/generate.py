"""Generate the costserve.v1 Python modules from the .proto sources.

The generated modules are committed under ``client/v1`` (installed as
``costserve.v1``). ``make proto`` rewrites them; ``--check`` exits 1 when the
committed files differ from what ``grpc_tools.protoc`` makes now (the test suite
runs the same comparison).

Usage::

    python protos/generate.py          # write client/v1/*
    python protos/generate.py --check  # compare only
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
GENERATED_DIR = REPO_ROOT / "client" / "v1"
PACKAGE_PATH = Path("costserve") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(output_dir: Path) -> list[Path]:
    """Run protoc on every .proto of costserve.v1; return the files written to ``output_dir``."""
    sources = sorted((PROTO_ROOT / PACKAGE_PATH).glob("*.proto"))
    with tempfile.TemporaryDirectory() as scratch:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={scratch}",
            f"--pyi_out={scratch}",
            f"--grpc_python_out={scratch}",
            *(str(source) for source in sources),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {[s.name for s in sources]}")
        output_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for generated in sorted((Path(scratch) / PACKAGE_PATH).iterdir()):
            if generated.name.endswith(GENERATED_SUFFIXES):
                target = output_dir / generated.name
                shutil.copyfile(generated, target)
                written.append(target)
    return written


def stale_files(committed_dir: Path = GENERATED_DIR) -> list[str]:
    """Names of generated files that are missing from or differ in ``committed_dir``."""
    with tempfile.TemporaryDirectory() as fresh:
        return [
            path.name
            for path in generate(Path(fresh))
            if not (committed_dir / path.name).exists()
            or not filecmp.cmp(path, committed_dir / path.name, shallow=False)
        ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 when stale")
    args = parser.parse_args()
    if args.check:
        stale = stale_files()
        if stale:
            print(f"stale generated modules (run `make proto`): {', '.join(stale)}", file=sys.stderr)
            return 1
        print("generated modules match protos/")
        return 0
    for path in generate(GENERATED_DIR):
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
