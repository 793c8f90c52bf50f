"""`pip install costserve` is the client alone: build the wheel, install it with only its own
requirements into a clean virtualenv, and use it against a real server."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from email.message import Message
from email.parser import Parser
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import EXAMPLES, REPO_ROOT, RunningServer

#: What the wheel is built from (as the Dockerfile copies it).
SOURCES = ("pyproject.toml", "README.md", "client", "server")
SERVER_ONLY = ("tensorflow", "ai_edge_litert", "sklearn", "cachetools", "grpc_reflection", "keras", "pydantic_settings")


def _run(*command: str | Path, cwd: Path, timeout: float = 300) -> str:
    # No PYTHONPATH: the clean virtualenv must find costserve only where pip put it.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(
        [str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, (
        f"{' '.join(map(str, command))} exited {result.returncode}:\n{result.stdout}{result.stderr}"
    )
    return result.stdout


def _metadata(wheel: Path) -> tuple[Message, list[str]]:
    """The wheel's METADATA, and its Requires-Dist lines without an ``extra ==`` marker."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(entry for entry in archive.namelist() if entry.endswith(".dist-info/METADATA"))
        message = Parser().parsestr(archive.read(name).decode())
    requires = [line for line in message.get_all("Requires-Dist", []) if "extra ==" not in line]
    return message, requires


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The costserve wheel, built in isolation from a copy of the sources (the work tree gets no build/)."""
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(path, source / name)
    dist = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", dist, source, cwd=source)
    (built,) = dist.glob("costserve-*.whl")
    return built


@pytest.mark.slow
def test_the_wheel_declares_the_client_alone(wheel: Path) -> None:
    metadata, requires = _metadata(wheel)
    assert metadata["License-Expression"] == "Apache-2.0"
    names = {re.match(r"[A-Za-z0-9._-]+", requirement).group().lower() for requirement in requires}  # type: ignore[union-attr]
    assert names == {"grpcio", "grpcio-health-checking", "protobuf", "numpy", "pillow", "prometheus-client"}
    assert set(metadata.get_all("Provides-Extra", [])) == {"server", "loadtest", "plot", "test"}


@pytest.mark.slow
def test_client_only_install_predicts_against_a_server(wheel: Path, server: RunningServer, tmp_path: Path) -> None:
    _, requires = _metadata(wheel)
    venv = tmp_path / "venv"
    # A clean environment (no --system-site-packages); pip itself is the one running the tests.
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    pip = (sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--disable-pip-version-check")
    _run(*pip, "--no-deps", wheel, cwd=tmp_path)
    _run(*pip, *requires, cwd=tmp_path)

    probe = (
        f"import importlib.util, json; print(json.dumps([m for m in {SERVER_ONLY!r} if importlib.util.find_spec(m)]))"
    )
    assert json.loads(_run(python, "-c", probe, cwd=tmp_path)) == []
    assert _run(python, "-c", "import costserve, costserve.cli; print(costserve.__file__)", cwd=tmp_path).startswith(
        str(venv)
    )

    costserve = venv / "bin" / "costserve"
    assert _run(costserve, "--version", cwd=tmp_path).strip() == f"costserve {version('costserve')}"
    digit = next(path for path in EXAMPLES if path.stem == "digit_3")
    answer = json.loads(_run(costserve, "--target", server.target, "predict", digit, "--json", cwd=tmp_path))
    assert answer["predictions"][0]["label"] == "3" and answer["cost_usd"] > 0

    # The server is not there, and says how to get it rather than failing on an import.
    refused = subprocess.run(
        [venv / "bin" / "costserve-server", "serve", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert refused.returncode != 0 and "pip install 'costserve[server]'" in refused.stderr, refused.stderr
