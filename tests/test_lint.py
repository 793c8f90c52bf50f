"""Static checks: ruff's lint rules and formatting, and mypy on the costserve packages.

Configured in pyproject.toml ([tool.ruff], [tool.mypy]). ruff's F rules are pyflakes'
(unused imports and variables, undefined names), so pyflakes itself is not run. The
generated client/v1 modules are excluded: protos/generate.py --check guards them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Scripts mypy checks besides the packages of [tool.setuptools].
TYPED_SCRIPTS = ["protos/generate.py", "tools/typecheck.py"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_check_reports_nothing() -> None:
    done = _run(sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", ".")
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_format_changes_nothing() -> None:
    done = _run(sys.executable, "-m", "ruff", "format", "--no-cache", "--check", "--diff", ".")
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_reports_nothing() -> None:
    done = _run(sys.executable, "tools/typecheck.py", *TYPED_SCRIPTS)
    assert done.returncode == 0, done.stdout + done.stderr
