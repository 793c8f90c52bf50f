"""The reliability benchmark runs end to end (``--quick``) and reports every part with figures.

Whether a target passes is what benchmarks/RESULTS-reliability.md says, not what this
test asserts: it only proves that ``make bench-reliability`` works (servers start and
stop, every part runs, and every row and section carries numbers).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import report_rows, run_quick_benchmark

#: Rows of the summary table, by the start of their first cell.
ROWS = (
    "a. fuzzing",
    "b. small calls' p99",
    "c. goodput at 2x capacity",
    "c. server counters vs client statuses",
    "c. RSS under overload",
    "c. time to recover",
    "d. flood of",
    "e. SIGTERM under load",
)
SECTIONS = (
    "## a. Fuzzing",
    "## b. One request can't stall others",
    "## c. Overload",
    "## d. Flood",
    "## e. SIGTERM under load",
    "## Machine",
)
NUMBER = re.compile(r"\d+(?:\.\d+)?")


@pytest.mark.slow
def test_quick_reliability_benchmark_reports_every_part(model_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "RESULTS-reliability.md"
    figures = tmp_path / "reliability.json"
    report = run_quick_benchmark("benchmarks.reliability", model_dir, output, figures)
    for row, (_target, measured, result) in report_rows(report, "| part | target | measured | result |", ROWS).items():
        assert not measured.startswith("error"), f"row {row!r}: the part failed: {measured}"
        assert NUMBER.search(measured), f"row {row!r} has no measured figure: {measured!r}"
        assert result in ("PASS", "MISS", "-"), f"row {row!r}: result {result!r}"
    for section in SECTIONS:
        assert section in report, f"section {section!r} missing:\n{report}"

    results = json.loads(figures.read_text())
    parts = results["parts"]
    assert all("error" not in figures for figures in parts.values()), {
        part: f.get("error") for part, f in parts.items()
    }
    assert parts["fuzz"]["cases"] >= results["plan"]["fuzz_cases"]
    assert parts["stall"]["alone"]["calls"] > 0 and parts["stall"]["with_worst"]["calls"] > 0
    assert all(worst["sent"] > 0 for worst in parts["stall"]["worst"].values())
    overload = parts["overload"]
    assert overload["capacity"]["rps"] > 0 and overload["offered"]["calls"] > 0
    assert overload["rss"]["max_bytes"] > 0
    assert parts["flood"]["client_total"] == parts["flood"]["calls"]
    assert parts["sigterm"]["calls_before"] > 0 and parts["sigterm"]["exit_code"] is not None
