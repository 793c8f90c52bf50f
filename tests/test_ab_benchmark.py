"""The A/B benchmark runs end to end (``--quick``, against HEAD) and leaves no worktree behind.

Like the other benchmark tests, it asserts no speed: it proves that ``make bench-ab`` works
(the old commit is checked out and served beside the working tree, both answer under load,
every scenario row carries finite ratios, and the temporary worktree is gone afterwards).
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
from helpers import report_rows, run_quick_benchmark

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Rows of the report's table, by the start of their first cell.
ROWS = ("fp32, cache bypassed", "int8, cache bypassed", "cache hits (fp32)")


def _worktrees() -> set[str]:
    listing = subprocess.run(
        ["git", "worktree", "list", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout
    return {line.split(" ", 1)[1] for line in listing.splitlines() if line.startswith("worktree ")}


@pytest.mark.slow
def test_quick_ab_against_head_reports_both_servers(model_dir: Path, tmp_path: Path) -> None:
    before = _worktrees()
    output = tmp_path / "RESULTS-ab.md"
    figures = tmp_path / "ab.json"
    report = run_quick_benchmark("benchmarks.ab", model_dir, output, figures, "--against", "HEAD")
    assert _worktrees() <= before, f"the benchmark left a git worktree behind: {_worktrees() - before}"

    for row, cells in report_rows(report, "| scenario | old req/s |", ROWS).items():
        old_rps, new_rps, ratio = (float(cell) for cell in cells[:3])
        assert old_rps > 0 and new_rps > 0 and math.isfinite(ratio) and ratio > 0, f"row {row!r}: {cells}"
    assert "## Machine" in report

    results = json.loads(figures.read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    assert results["old"]["commit"] == head
    assert results["old"]["ready_file"], "HEAD's server knows --ready-file"
    for key, scenario in results["scenarios"].items():
        for name in ("old_rps", "new_rps", "ratio", "old_loop_cpu_us", "new_loop_cpu_us", "loop_cpu_ratio"):
            assert math.isfinite(scenario[name]) and scenario[name] > 0, f"{key}.{name} = {scenario[name]!r}"
        assert len(scenario["ratios"]) == results["plan"]["rounds"] == 1
        assert scenario["old_requests"] > 0 and scenario["new_requests"] > 0
        assert scenario["old_errors"] == scenario["new_errors"] == 0, f"{key}: the load tool saw errors"
