"""The `costserve` command line against a real server, and the client's import weight."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from conftest import EXAMPLES, RunningServer

from costserve.cli import _predict, build_parser, main
from costserve.v1 import classifier_pb2 as pb


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
    # fp32 as served: by LiteRT, from the float model converted from the SavedModel.
    assert any(line.startswith("fp32") and "tflite" in line and "%" in line for line in out.splitlines())
    assert any(line.startswith("int8") and "tflite" in line and "%" in line for line in out.splitlines())


def test_health_exit_code(server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--target", server.target, "health"]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    server.run(server.server.health.set("", 2))  # NOT_SERVING
    assert main(["--target", server.target, "health"]) == 1


def test_unreachable_server_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--target", "127.0.0.1:1", "--timeout", "2", "health"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_bad_file_is_invalid_argument(
    server: RunningServer, tmp_path: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
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


@pytest.mark.parametrize("argv", [["--help"], ["predict", "--help"], ["--version"]])
def test_help_and_version_do_not_import_tensorflow(argv: list[str]) -> None:
    code = (
        "import sys\n"
        "from costserve.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        "assert 'tensorflow' not in sys.modules and 'sklearn' not in sys.modules, 'heavy module imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, capture_output=True)


@pytest.mark.parametrize("command", ["costserve", "costserve-server"])
def test_version(command: str) -> None:
    script = Path(sys.executable).with_name(command)
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == f"costserve {version('costserve')}"


def test_server_refuses_bad_settings_with_status_2(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("costserve-server")
    environ = {name: value for name, value in os.environ.items() if not name.upper().startswith("COSTSERVE_")}
    result = subprocess.run(
        [str(script), "serve", "--model-dir", str(tmp_path / "models"), "--max-batch-size", "0"],
        env={**environ, "COSTSERVE_PORT": "abc"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "costserve-server: --port (COSTSERVE_PORT): must be a whole number, got abc",
        "costserve-server: --max-batch-size (COSTSERVE_MAX_BATCH_SIZE): must be at least 1, got 0",
    ]
    assert not (tmp_path / "models").exists()  # refused before training a model


class RecordingClient:
    """Stands in for Client: records what predict was asked."""

    def __init__(self) -> None:
        self.options: dict[str, Any] = {}

    def predict(self, images: Sequence[Path], **options: Any) -> pb.PredictResponse:
        self.options = options
        return pb.PredictResponse(predictions=[pb.Prediction(label=3, label_name="3") for _ in images])


def test_predict_flags_reach_the_client(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    client = RecordingClient()
    argv = ["predict", str(EXAMPLES[3]), "--tenant", "acme", "--min-accuracy", "0.97", "--max-cost-usd", "1e-6"]
    assert _predict(client, build_parser().parse_args(argv)) == 0  # type: ignore[arg-type]
    assert client.options == {
        "precision": "auto",
        "skip_cache": False,
        "tenant": "acme",
        "min_accuracy": 0.97,
        "max_cost_usd": 1e-6,
        "model": "",
        "version": "",
        "top_k": 0,
    }
    monkeypatch.setenv("COSTSERVE_TENANT", "globex")
    assert _predict(client, build_parser().parse_args(["predict", str(EXAMPLES[3])])) == 0  # type: ignore[arg-type]
    assert client.options["tenant"] == "globex" and client.options["min_accuracy"] == 0.0
    assert client.options["max_cost_usd"] == 0.0
    assert _predict(client, build_parser().parse_args(["predict", str(EXAMPLES[3]), "--tenant", "acme"])) == 0  # type: ignore[arg-type]
    assert client.options["tenant"] == "acme"  # the flag wins over the environment
    capsys.readouterr()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--min-accuracy", "1.5"], "1.5 is not between 0 and 1"),
        (["--min-accuracy", "high"], "'high' is not a number"),
        (["--max-cost-usd", "-1"], "-1 is not a cost of 0 USD or more"),
    ],
)
def test_bad_constraint_flags_are_usage_errors(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["predict", str(EXAMPLES[0]), *flags])
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_predict_charges_the_tenant(
    start_budgeted_server: Callable[..., RunningServer], capsys: pytest.CaptureFixture[str]
) -> None:
    server = start_budgeted_server("[tenants.acme]\nusd_per_hour = 100.0\n")
    assert main(["--target", server.target, "predict", str(EXAMPLES[1]), "--tenant", "acme", "--json"]) == 0
    cost = json.loads(capsys.readouterr().out)["cost_usd"]
    assert server.metric("costserve_tenant_spend_usd_total", {"tenant": "acme"}) == pytest.approx(cost)


def test_a_refused_constraint_is_a_clear_error(server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    for _ in range(5):  # recent costs: what the server predicts the next one from
        assert (
            main(["--target", server.target, "predict", str(EXAMPLES[2]), "--skip-cache", "--precision", "fp32"]) == 0
        )
    argv = ["--target", server.target, "predict", str(EXAMPLES[2]), "--precision", "fp32", "--max-cost-usd", "1e-15"]
    assert main(argv) == 1
    assert "FAILED_PRECONDITION" in capsys.readouterr().err


def test_loadtest_without_scikit_learn_says_which_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else find_spec(name, *a)
    )
    assert main(["loadtest", "--requests", "1"]) == 2
    assert "pip install 'costserve[loadtest]'" in capsys.readouterr().err
