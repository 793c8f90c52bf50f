"""Static checks with pyflakes: no unused imports or variables, no undefined names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Hand-written Python; the generated client/v1 modules are checked by protos/generate.py --check.
CHECKED = ["server", "client/*.py", "benchmarks", "tests", "protos"]


def test_pyflakes_reports_nothing() -> None:
    paths = [str(path) for pattern in CHECKED for path in sorted(REPO_ROOT.glob(pattern))]
    done = subprocess.run([sys.executable, "-m", "pyflakes", *paths], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
