"""A serving process whose fp32 runs on LiteRT never imports TensorFlow.

Each test starts ``costserve-server serve`` as a process (``benchmarks.launch``, port 0) on a
copy of the session's trained model, with ``PYTHONPROFILEIMPORTTIME=1``: Python then writes
each module the process imports to its log, as it imports it. The module list is read once
the process has answered an fp32 prediction and exited.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from benchmarks.launch import start_costserve
from costserve import Client
from costserve.server.repository.store import FP32_LITERT_FILE
from costserve.v1 import classifier_pb2 as pb

pytestmark = pytest.mark.slow

#: A held-out digit of class 7 (examples/digits).
DIGIT_7 = Path(__file__).resolve().parent.parent / "examples" / "digits" / "digit_7.png"


def imported_modules(log: str) -> set[str]:
    """The modules a process imported, from its ``-X importtime`` lines (``import time: self | cumulative | name``)."""
    names = {
        line.rsplit("|", 1)[1].strip() for line in log.splitlines() if line.startswith("import time:") and "|" in line
    }
    return names - {"imported package"}


def serve_fp32(repository: Path, *flags: str) -> tuple[pb.Prediction, str]:
    """Serve ``repository`` with ``flags``, ask one fp32 prediction of digit 7; its answer and the process's log."""
    env = {"PYTHONPROFILEIMPORTTIME": "1"}
    flags = ("--drain-grace-seconds", "0", *flags)
    server = start_costserve(None, *flags, repository=repository, serving=True, env=env)
    with server, Client(server.target, timeout=30) as client:
        reply = client.predict([DIGIT_7], precision="fp32", skip_cache=True)
    return reply.predictions[0], server.log


@pytest.fixture
def repository(model_dir: Path, tmp_path: Path) -> Path:
    """A repository holding a copy of the session's digits version (with its model_fp32.tflite)."""
    shutil.copytree(model_dir / "1", tmp_path / "repository" / "digits" / "1")
    return tmp_path / "repository"


def test_litert_fp32_serves_without_importing_tensorflow(repository: Path) -> None:
    prediction, log = serve_fp32(repository)
    assert prediction.label == 7 and prediction.precision == pb.PRECISION_FP32
    modules = imported_modules(log)
    assert "ai_edge_litert" in modules and "costserve.server.app" in modules  # the log does list imports
    assert "tensorflow" not in modules, "the server imported TensorFlow with fp32 on LiteRT"


def test_fp32_runtime_tensorflow_imports_it(repository: Path) -> None:
    prediction, log = serve_fp32(repository, "--fp32-runtime", "tensorflow")
    assert prediction.label == 7 and prediction.precision == pb.PRECISION_FP32
    assert "tensorflow" in imported_modules(log)


def test_a_version_without_the_float_file_still_serves_fp32(repository: Path) -> None:
    (repository / "digits" / "1" / FP32_LITERT_FILE).unlink()
    prediction, log = serve_fp32(repository)
    assert prediction.label == 7 and prediction.precision == pb.PRECISION_FP32
    assert "tensorflow" in imported_modules(log)
    assert log.count("fp32 is served by TensorFlow from its SavedModel") == 1
