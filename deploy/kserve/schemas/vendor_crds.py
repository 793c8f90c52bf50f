"""Vendor the openAPIV3Schema of KServe's ServingRuntime and InferenceService CRDs for tests/test_kserve_manifests.py.

Reads the CRDs KServe installs (``config/crd/full/``) from a clone of the KServe repository at
one tag, and writes one JSON file per CRD beside this script: where it came from (repository,
tag, commit, the CRD file's git blob), the CRD's group, version, kind and scope, and its
``openAPIV3Schema`` with keys sorted, so the same tag always gives the same bytes::

    git clone --filter=blob:none https://github.com/kserve/kserve /tmp/kserve
    python deploy/kserve/schemas/vendor_crds.py /tmp/kserve v0.20.0

Needs git and PyYAML (a test extra). Nothing else reads the clone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPOSITORY_URL = "https://github.com/kserve/kserve"
#: CRD file in the KServe repository -> the vendored file's name.
CRDS = {
    "config/crd/full/serving.kserve.io_servingruntimes.yaml": "servingruntime.json",
    "config/crd/full/serving.kserve.io_inferenceservices.yaml": "inferenceservice.json",
}


def _git(clone: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(clone), *args], capture_output=True, check=True)
    return done.stdout.decode()


def vendored(clone: Path, ref: str, path: str) -> dict[str, Any]:
    """The vendored document of one CRD file of ``clone`` at ``ref``."""
    commit = _git(clone, "rev-parse", f"{ref}^{{commit}}").strip()
    blob = _git(clone, "rev-parse", f"{commit}:{path}").strip()
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the pure-Python loader takes ~1 min on 2 MB
    crd = yaml.load(_git(clone, "show", f"{commit}:{path}"), Loader=loader)
    versions = [version for version in crd["spec"]["versions"] if version.get("served") and version.get("storage")]
    if len(versions) != 1:
        raise SystemExit(f"{path}: expected one served storage version, found {len(versions)}")
    schema = versions[0]["schema"]["openAPIV3Schema"]
    return {
        "source": {"repository": REPOSITORY_URL, "ref": ref, "commit": commit, "path": path, "blob": blob},
        "crd": crd["metadata"]["name"],
        "group": crd["spec"]["group"],
        "version": versions[0]["name"],
        "kind": crd["spec"]["names"]["kind"],
        "scope": crd["spec"]["scope"],
        "openAPIV3Schema": json.loads(json.dumps(schema, sort_keys=True)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("clone", type=Path, help="a clone of the KServe repository (bare or not)")
    parser.add_argument("ref", help="the tag (or commit) to vendor, e.g. v0.20.0")
    parser.add_argument("--out", type=Path, default=HERE, help="where to write the JSON files (default: beside this)")
    args = parser.parse_args(argv)
    for path, name in CRDS.items():
        document = vendored(args.clone, args.ref, path)
        # One line: the schema is ~0.6 MB compact, 2.5 times that indented.
        (args.out / name).write_text(json.dumps(document, separators=(",", ":")) + "\n", encoding="utf-8")
        print(f"{name}: {document['kind']} {document['group']}/{document['version']} from {args.ref} ({path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
