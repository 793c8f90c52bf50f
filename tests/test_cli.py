"""The `costserve` command line against a real server, and the client's import weight."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import EXAMPLES, RunningServer
from costserve.cli import main


def test_predict_prints_each_file_with_its_label(server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--target", server.target, "predict", *map(str, EXAMPLES), "--precision", "int8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.startswith(str(EXAMPLES[0].parent))]
    assert len(rows) == 10
    for path, row in zip(EXAMPLES, rows):
        assert row[0] == str(path)
        assert row[1] == path.stem.split("_")[1]
        assert row[3] == "int8" and row[4] == "miss"


def test_predict_json_reports_cache_hits(server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    for _ in range(2):
        assert main(["--target", server.target, "predict", str(EXAMPLES[9]), "--json"]) == 0
    documents = capsys.readouterr().out.replace("}\n{", "}\n\x00{").split("\x00")
    first, second = (json.loads(document) for document in documents)
    assert first["predictions"][0]["label"] == second["predictions"][0]["label"] == "9"
    assert (first["predictions"][0]["cache_hit"], second["predictions"][0]["cache_hit"]) == (False, True)
    assert first["predictions"][0]["precision"] == "fp32" and first["model_version"] == "1"


def test_info_shows_both_variants(server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--target", server.target, "info"]) == 0
    out = capsys.readouterr().out
    assert "model digits version 1, input 28x28x1" in out
    assert any(line.startswith("fp32") and "saved_model" in line and "%" in line for line in out.splitlines())
    assert any(line.startswith("int8") and "tflite" in line and "%" in line for line in out.splitlines())


def test_health_exit_code(server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--target", server.target, "health"]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    server.run(server.server.health.set("", 2))  # NOT_SERVING
    assert main(["--target", server.target, "health"]) == 1


def test_unreachable_server_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--target", "127.0.0.1:1", "--timeout", "2", "health"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_bad_file_is_invalid_argument(server: RunningServer, tmp_path: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.png"  # type: ignore[operator]
    broken.write_bytes(b"not a png")
    assert main(["--target", server.target, "predict", str(broken)]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


def test_missing_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", "no/such/file.png"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_client_does_not_import_tensorflow_or_the_server() -> None:
    code = (
        "import sys, costserve, costserve.cli; "
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'; "
        "assert 'costserve.server' not in sys.modules, 'server imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
