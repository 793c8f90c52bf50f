"""Generate the Python modules of costserve's .proto sources.

Two packages, committed under ``client/`` and installed under ``costserve``:

- ``costserve.v1`` (``client/v1``): costserve's own API.
- ``costserve.protocols`` (``client/protocols``): the standard protocols costserve
  also speaks (the Open Inference Protocol v2, TensorFlow Serving's API). Their
  proto packages are the protocols' own (``inference``, ``tensorflow.serving``), which
  tritonclient, TensorFlow and tensorflow-serving-api also register in protobuf's
  default descriptor pool; so these modules build their classes in a pool of their
  own (:data:`costserve.protocols.POOL`): the one line of protoc's output that names the
  default pool is rewritten to name it.

``make proto`` rewrites them; ``--check`` exits 1 when the committed files differ from
what ``grpc_tools.protoc`` makes now (the test suite runs the same comparison).

Usage::

    python protos/generate.py          # write client/v1/*, client/protocols/*
    python protos/generate.py --check  # compare only
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
#: google/protobuf/*.proto, as grpcio-tools ships them.
WELL_KNOWN_PROTOS = Path(protoc.__file__).parent / "_proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
#: Each generated package: its sources under protos/, its modules under client/.
PACKAGES = {Path("costserve") / "v1": REPO_ROOT / "client" / "v1"}
PROTOCOLS_PATH = Path("costserve") / "protocols"
PACKAGES[PROTOCOLS_PATH] = REPO_ROOT / "client" / "protocols"
DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
OWN_POOL = "_protocols_pool.POOL.AddSerializedFile("
OWN_POOL_IMPORT = "from costserve.protocols import pool as _protocols_pool\n"


def _use_own_pool(module: str) -> str:
    """Make a generated ``*_pb2.py`` of costserve.protocols build its classes in costserve.protocols.POOL."""
    if module.count(DEFAULT_POOL) != 1:
        raise RuntimeError("protoc's output no longer adds its file to the default pool in one known line")
    marker = "# @@protoc_insertion_point(imports)\n"
    return module.replace(DEFAULT_POOL, OWN_POOL).replace(marker, OWN_POOL_IMPORT + marker, 1)


def generate(package_path: Path, output_dir: Path) -> list[Path]:
    """Run protoc on every .proto of one package; return the files written to ``output_dir``."""
    sources = sorted((PROTO_ROOT / package_path).glob("*.proto"))
    with tempfile.TemporaryDirectory() as scratch:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{WELL_KNOWN_PROTOS}",
            f"--python_out={scratch}",
            f"--pyi_out={scratch}",
            f"--grpc_python_out={scratch}",
            *(str(source) for source in sources),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {[s.name for s in sources]}")
        output_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for generated in sorted((Path(scratch) / package_path).iterdir()):
            if generated.name.endswith(GENERATED_SUFFIXES):
                target = output_dir / generated.name
                text = generated.read_text()
                if package_path == PROTOCOLS_PATH and generated.name.endswith("_pb2.py"):
                    text = _use_own_pool(text)
                target.write_text(text)
                written.append(target)
    return written


def stale_files() -> list[str]:
    """Generated files that are missing from or differ in client/, relative to the repository."""
    stale = []
    for package_path, committed_dir in PACKAGES.items():
        with tempfile.TemporaryDirectory() as fresh:
            for path in generate(package_path, Path(fresh)):
                committed = committed_dir / path.name
                if not committed.exists() or not filecmp.cmp(path, committed, shallow=False):
                    stale.append(str(committed.relative_to(REPO_ROOT)))
    return stale


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
    for package_path, output_dir in PACKAGES.items():
        for path in generate(package_path, output_dir):
            print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
