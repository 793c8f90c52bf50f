"""The serving benchmark runs end to end (``--quick``) and reports every row with figures.

Speed targets never live in unit tests: the machine is shared and figures drift, so
this only proves that ``make bench`` works: servers start and stop, the load tool
drives them, and every row of the report carries numbers. Whether a target passes
is what benchmarks/RESULTS.md says, not what this test asserts.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
from helpers import report_rows, run_quick_benchmark

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
