"""The serving benchmark runs end to end (``--quick``) and reports every row with figures.

Speed targets never live in unit tests: the machine is shared and figures drift, so
this only proves that ``make bench`` works: servers start and stop, the load tool
drives them, and every row of the report carries numbers. Whether a target passes
is what benchmarks/RESULTS.md says, not what this test asserts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import report_rows, run_quick_benchmark

from benchmarks import realistic, serving
from benchmarks.loadclient import LoadResult
from benchmarks.report import machine
from costserve.v1 import classifier_pb2 as pb

#: Rows of the report's table, by the start of their first cell.
ROWS = (
    "fp32, cache bypassed",
    "int8, cache bypassed",
    "cache hits (fp32)",
    "fp32, cache bypassed, batching off",
    "fp32 batching on vs off",
    "one stream, fp32 cache miss",
    "server peak memory (VmHWM)",
    "cache bound",
)
NUMBER = re.compile(r"\d+(?:\.\d+)?")


def _on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_quick_benchmark_reports_every_row(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    has_h2load = shutil.which("h2load") is not None
    if not has_h2load and _on_ci():
        pytest.fail("h2load is not installed on CI; .ci/run installs it (apt-get install nghttp2-client)")
    model_dir: Path = request.getfixturevalue("model_dir")  # trained only once the check above passed
    output = tmp_path / "RESULTS.md"
    figures = tmp_path / "results.json"
    report = run_quick_benchmark("benchmarks.serving", model_dir, output, figures)
    for row, cells in report_rows(report, "|  | measured | target | result", ROWS).items():
        measured, target, result = cells[:3]
        assert NUMBER.search(measured), f"row {row!r} has no measured figure: {measured!r}"
        assert result in ("PASS", "MISS", "-", "partial fill"), f"row {row!r}: result {result!r}"
    assert "## Machine" in report and "cores" in report

    results = json.loads(figures.read_text())
    assert results["plan"]["tool"] == ("h2load" if has_h2load else "python")
    for key in ("fp32", "int8", "hits", "fp32_nobatch"):
        scenario = results["saturation"][key]
        for name in ("costserve_rps", "ceiling_rps", "ratio", "p50_ms", "p99_ms"):
            assert _finite(scenario[name]), f"{key}.{name} = {scenario[name]!r}"
        assert scenario["errors"] == 0, f"{key}: the load tool saw errors"
    assert _finite(results["batching_gain"])
    latency = results["one_stream"]
    for name in ("ceiling_p50_ms", "costserve_p50_ms", "costserve_p99_ms", "inference_ms", "bound_ms"):
        assert _finite(latency[name]), f"one_stream.{name} = {latency[name]!r}"
    memory = results["memory"]
    assert _finite(memory["default_cache"]["vmhwm_bytes"])
    assert memory["small_cache"]["images_sent"] > 0 and _finite(memory["small_cache"]["entries"])


# --------------------------------------------------------------------------- the realistic model
#
# `make bench` also measures a MobileNetV2 at 96x96x3, imported into a repository and served
# from it. A quick run of that part (`--quick --only realistic`) takes about two minutes, most
# of it the import, so the suite checks its pieces instead: the request, the model files, and
# the report made from its figures.

REALISTIC_ROWS = (
    "MobileNetV2 96x96x3 fp32, batching on",
    "MobileNetV2 96x96x3 int8, batching on",
    "MobileNetV2 96x96x3 fp32, batching off",
    "MobileNetV2 96x96x3 int8, batching off",
    "MobileNetV2 fp32: batching on vs off",
    "MobileNetV2 int8: batching on vs off",
    "MobileNetV2 int8 vs fp32, batching on",
    "MobileNetV2 int8 vs fp32, batching off",
)


def test_realistic_request_is_one_raw_96x96x3_image_for_the_model() -> None:
    request = pb.PredictRequest.FromString(realistic.request_bytes(pb.PRECISION_INT8))
    assert request.model_name == realistic.MODEL_NAME and request.skip_cache
    assert request.precision == pb.PRECISION_INT8 and len(request.images) == 1
    pixels = request.images[0].pixels
    assert list(pixels.shape) == [96, 96, 3] and pixels.dtype == pb.DTYPE_UINT8 and len(pixels.data) == 96 * 96 * 3
    assert realistic.request_bytes(pb.PRECISION_INT8) == realistic.request_bytes(pb.PRECISION_INT8), "one fixed image"


def _fake_measured(scenario: serving.Scenario, rps: float, batch: float) -> serving.Measured:
    """Two rounds of ``rps`` against a 2,500 req/s ceiling."""
    measured = serving.Measured(scenario)
    for _ in range(2):
        latencies = [64_000 / rps + step for step in range(100)]
        measured.costserve.append(LoadResult("h2load", 100, 0, 4.0, rps, latencies))
        measured.ceiling.append(LoadResult("h2load", 10_000, 0, 4.0, 2500.0, [25.0] * 100))
        measured.mean_batch.append(batch)
        measured.cache_hit_share.append(0.0)
    return measured


def test_realistic_report_has_every_row_and_says_what_batching_and_int8_buy() -> None:
    throughput = {
        "mobilenet_fp32": 110.0, "mobilenet_int8": 330.0,
        "mobilenet_fp32_nobatch": 55.0, "mobilenet_int8_nobatch": 110.0,
    }  # fmt: skip
    measured = {
        scenario.key: _fake_measured(scenario, throughput[scenario.key], 1.0 if scenario.batching_off else 30.0)
        for scenario in serving.REALISTIC_SCENARIOS
    }
    variant = {"accuracy": 0.1, "size_bytes": 2**20, "latency_ms_batch_1": 8.0, "latency_ms_per_image_max_batch": 6.0}
    gains = serving.realistic_gains(measured)
    figures: dict[str, Any] = {
        "model": {
            "name": "mobilenet_v2", "alpha": 1.0, "input_shape": [96, 96, 3], "version": "1", "holdout_examples": 100,
            "int8_agreement": 0.9, "variants": {"fp32": variant, "int8": variant}, "build_s": 9.0, "import_s": 40.0,
        },
        "max_batch_size": 32,
        "sizes": {
            key: {"request_bytes": 27683, "costserve_response_bytes": 170, "ceiling_response_bytes": 149}
            for key in measured
        },
        "saturation": {key: value.summary() for key, value in measured.items()},
        "gains": gains,
        "vmhwm_bytes": {"batching_on": 900 * 2**20, "batching_off": 800 * 2**20},
    }  # fmt: skip
    args = serving.build_parser().parse_args(["--only", "realistic", "--tool", "python"])
    results = {
        "plan": dataclasses.asdict(serving.make_plan(args)),
        "machine": machine(),
        "command": "python -m benchmarks.serving --only realistic",
        "code": "test",
        "tool_version": "python grpc.aio",
        "realistic": figures,
    }
    rows = serving.build_rows(results)
    report = serving.render_report(results, rows, "notes kept")
    for row, cells in report_rows(report, "|  | measured | target | result", REALISTIC_ROWS).items():
        assert NUMBER.search(cells[0]), f"row {row!r} has no measured figure: {cells[0]!r}"
    assert gains["batching_fp32"]["median"] == pytest.approx(2.0)
    assert gains["int8_batching_on"]["median"] == pytest.approx(3.0)
    assert "gives fp32 2.00x the throughput (110 req/s against 55 req/s)" in report
    assert "**int8** gives 3.00x fp32's throughput with batching on and 2.00x with it off" in report
    assert "Accuracy is meaningless here" in report and "notes kept" in report


@pytest.mark.slow
def test_realistic_model_files(tmp_path: Path) -> None:
    """The model builder, as the benchmark runs it (a small alpha here, to be quick)."""
    repo_root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.realistic", "--out", str(tmp_path), "--holdout", "8", "--alpha", "0.35"],
        cwd=repo_root, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with np.load(tmp_path / realistic.HOLDOUT_FILE) as holdout:
        assert holdout["x"].shape == (8, 96, 96, 3) and holdout["x"].dtype == np.uint8
        assert holdout["y"].shape == (8,) and set(holdout["y"].tolist()) <= set(range(10))
    assert len((tmp_path / realistic.LABELS_FILE).read_text().split()) == 10

    import tensorflow as tf

    model = tf.keras.models.load_model(tmp_path / realistic.KERAS_FILE)
    assert tuple(model.input_shape) == (None, 96, 96, 3) and tuple(model.output_shape) == (None, 10)
    probabilities = np.asarray(model(realistic.random_images(4, 0).astype(np.float32) / 127.5 - 1.0))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    assert probabilities.std() > 0.01, "the random model answers the same for every class (dead activations)"
