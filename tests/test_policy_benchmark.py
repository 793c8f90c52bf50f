"""The policy benchmark (``make bench-policy``) runs end to end (``--quick``) and reports what its policy chose and why.

As for the serving benchmark, no speed target lives here: this proves that the benchmark works and that its
report carries the host's CPU flags, the measured cost profile, each mode's decisions and every target row,
whatever the figures. Whether a target passes is what benchmarks/RESULTS-policy.md says.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import report_rows, report_table, run_quick_benchmark

from benchmarks import policy
from benchmarks.report import cost_profile, machine
from costserve import metrics_text
from costserve.v1 import classifier_pb2 as pb

#: Rows of the targets table that were there before the cost profile, per AUTO policy: never removed or changed.
EXISTING_TARGETS = (
    "cost per 1M ≤ 70% of fp32-only (compute)",
    "cost per 1M ≤ 70% of fp32-only (resources)",
    "cost per 1M ≤ 70% of fp32-only (charged)",
    "accuracy ≥ fp32-only − 0.5 points",
    "overload p99 ≤ 100 ms where fp32-only's is not",
    "fewer rejections than fp32-only in the overload",
    "a tenant over budget is refused within 1 s of crossing",
)
#: Rows judged against the variant really cheaper on this host.
CHEAPER_TARGETS = (
    "the variant cheaper on this host",
    "the cost profile's verdict agrees",
    "answered ≥ 90% of its computed images with the variant cheaper on this host",
    "cost per 1M (compute) ≤ the cheaper single variant's + 5%",
)
MODE_NAMES = tuple(name for name, _, _ in policy.MODES)


def _targets(report: str) -> list[list[str]]:
    """Every row of the targets table, cells stripped (rows repeat their first cell, once per AUTO policy)."""
    lines = report.split("## Targets", 1)[1].splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("| target |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.split("|")[1:-1]])
    return rows


def assert_policy_report(report: str) -> None:
    """The parts the cost profile added, and every target row, old and new."""
    line = next((line for line in report.splitlines() if line.startswith("CPU flags for int8 vs fp32:")), None)
    assert line is not None and ("avx2" in line or "none of" in line), f"no CPU flags line:\n{report}"
    assert "## Cost profile on this host" in report
    profile = report_table(report, "| variant | per image | batch 1")
    assert {"fp32", "int8"} <= set(profile), profile
    assert "Verdict: **on this host int8 costs" in report
    decided = report_rows(report, "| mode | its server's profile at load", MODE_NAMES)
    assert "`requested`" in decided["fp32"][1] and decided["fp32"][1].startswith("fp32")
    assert "`requested`" in decided["int8"][1] and decided["int8"][1].startswith("int8")
    for name in ("auto cost_first", "auto accuracy_first"):
        assert "`requested`" not in decided[name][1], "the channel's warm-up call is left out of the decisions"
        assert decided[name][0].startswith("on this host")
    rows = _targets(report)
    for target in EXISTING_TARGETS:
        policies = [row[1] for row in rows if row[0].startswith(target)]
        expected = ["–"] if target.startswith("a tenant") else ["auto cost_first", "auto accuracy_first"]
        assert policies == expected, f"target {target!r}: {policies}"
    for target in CHEAPER_TARGETS:
        matches = [row for row in rows if row[0].startswith(target)]
        assert len(matches) == 1, f"target {target!r} missing:\n{report}"
        assert matches[0][3] in ("PASS", "MISS", "stated", "–"), matches[0]
    # The new rows come after every existing one.
    assert [row[0] for row in rows[: len(rows) - len(CHEAPER_TARGETS)]][-1].startswith("a tenant over budget")


@pytest.mark.slow
def test_quick_policy_benchmark_reports_the_profile_and_the_decisions(model_dir: Path, tmp_path: Path) -> None:
    output, figures = tmp_path / "RESULTS-policy.md", tmp_path / "policy.json"
    report = run_quick_benchmark("benchmarks.policy", model_dir, output, figures)
    assert_policy_report(report)
    results = json.loads(figures.read_text())
    assert results["quick"] and results["machine"]["cpu_flags"]
    assert all(mode["verdict"] for mode in results["results"].values())
    assert set(results["profile"]["variants"]) == {"fp32", "int8"} and results["profile"]["verdict"]
    assert list(results["results"]) == list(MODE_NAMES)
    for name, mode in results["results"].items():
        assert mode["decisions"], f"{name}: no decisions read from its server"
        assert sum(mode["computed_images"].values()) > 0, name
    assert set(results["results"]["fp32"]["decisions"]) == {"fp32"}
    assert set(results["results"]["int8"]["decisions"]) == {"int8"}


# --------------------------------------------------------------------------- the report, from figures


def _profile(int8_over_fp32: float) -> dict[str, Any]:
    info = pb.ModelInfo(name="digits", version="1", cost_verdict=f"on this host int8 costs {int8_over_fp32:.2g}x fp32")
    for precision, cost in ((pb.PRECISION_FP32, 100.0), (pb.PRECISION_INT8, 100.0 * int8_over_fp32)):
        variant = info.variants.add(precision=precision, batch_limit=16)
        for size in (1, 2, 4, 8, 16, 32):
            variant.cost_profile.add(batch_size=size, cpu_seconds_per_image=cost / 1e6, seconds_per_image=cost / 1e6)
    return cost_profile(info)


def _mode(compute: float, decisions: dict[str, dict[str, int]], computed: dict[str, int]) -> dict[str, Any]:
    phase = {"sent": 100, "p50": 10.0, "p99": 50.0, "rejected": 0, "codes": []}
    return {
        "predictions": 1000, "charged_per_1m": 3 * compute, "list_per_1m": 2 * compute, "compute_per_1m": compute,
        "accuracy": 0.96, "shares": {"fp32": 1.0, "int8": 0.0}, "cache": 0.3, "rejected": 0,
        "phases": [phase, {**phase, "p99": 900.0, "rejected": 10}, phase], "inference_us": 150.0,
        "handling_us": 45.0, "verdict": "on this host int8 costs 1.6x fp32", "decisions": decisions,
        "computed_images": computed,
    }  # fmt: skip


def _figures(fp32: float, int8: float, auto: float, auto_computed: dict[str, int], ratio: float) -> dict[str, Any]:
    return {
        "command": "python -m benchmarks.policy", "quick": False, "date": "2026-12-01 00:00 UTC",
        "machine": machine(), "profile": _profile(ratio), "capacity_rps": 150.0, "phase_s": 12.0,
        "rates": [52.5, 300.0, 52.5], "requests": 4000, "elapsed_s": 200.0,
        "results": {
            "fp32": _mode(fp32, {"fp32": {"requested": 4000}}, {"fp32": 9000, "int8": 0}),
            "int8": _mode(int8, {"int8": {"requested": 4000}}, {"fp32": 0, "int8": 9000}),
            "auto cost_first": _mode(auto, {"fp32": {"dominates": 3000, "cache": 900}}, auto_computed),
            "auto accuracy_first": _mode(fp32, {"fp32": {"dominates": 3900}}, {"fp32": 9000, "int8": 0}),
        },
    }  # fmt: skip


def test_where_fp32_is_cheaper_auto_is_judged_against_fp32_and_the_note_says_why_70_percent_misses() -> None:
    report = policy.render_report(_figures(0.00200, 0.00320, 0.00204, {"fp32": 9000, "int8": 100}, 1.6))
    assert_policy_report(report)
    rows = {row[0]: row for row in _targets(report)}
    cheaper = next(row for name, row in rows.items() if name.startswith("the variant cheaper on this host"))
    assert cheaper[2].startswith("**fp32**: fp32-only $0.00200, int8-only $0.00320 (int8 1.60x fp32)")
    assert rows["the cost profile's verdict agrees"][3] == "PASS"
    share = rows["answered ≥ 90% of its computed images with the variant cheaper on this host"]
    assert (share[2], share[3]) == ("99% of 9,100 computed images with fp32", "PASS")
    cost = rows["cost per 1M (compute) ≤ the cheaper single variant's + 5%"]
    assert (cost[2], cost[3]) == ("$0.00204 vs fp32-only $0.00200 (102%)", "PASS")
    note = next(line for line in report.splitlines() if line.startswith("Note:"))
    assert "on this host fp32 is: int8-only cost $0.00320 per 1M (compute), 1.60x fp32-only's $0.00200" in note
    assert "AUTO cost_first cost $0.00204, 102% of fp32-only" in note
    decided = report_rows(report, "| mode | its server's profile at load", ("auto cost_first",))["auto cost_first"]
    assert decided[0] == "on this host int8 costs 1.6x fp32"
    assert decided[1] == "fp32 `dominates` 3,000 (77%); fp32 `cache` 900 (23%)"
    assert decided[2] == "9,000 / 100 (99% / 1%)"


def test_where_int8_is_cheaper_by_enough_there_is_no_note_and_a_wrong_profile_is_a_miss() -> None:
    report = policy.render_report(_figures(0.00300, 0.00180, 0.00200, {"fp32": 2000, "int8": 7000}, 1.6))
    rows = {row[0]: row for row in _targets(report)}
    assert rows["the cost profile's verdict agrees"][3] == "MISS"  # the profile said fp32, the modes say int8
    share = rows["answered ≥ 90% of its computed images with the variant cheaper on this host"]
    assert (share[2], share[3]) == ("78% of 9,000 computed images with int8", "MISS")
    assert rows["cost per 1M (compute) ≤ the cheaper single variant's + 5%"][3] == "MISS"  # 111% of int8-only's
    cost_first = [row for row in _targets(report) if row[1] == "auto cost_first"]
    assert cost_first[0][:4] == ["cost per 1M ≤ 70% of fp32-only (compute)", "auto cost_first", "67%", "PASS"]
    assert not any(line.startswith("Note:") for line in report.splitlines())


def test_decisions_and_computed_images_are_counted_since_the_warm_up() -> None:
    before = metrics_text.parse(
        'costserve_decisions_total{model="digits",precision="fp32",reason="requested"} 1\n'
        'costserve_decisions_total{model="digits",precision="int8",reason="dominates"} 0\n'
        'costserve_images_total{model="digits",precision="fp32",cache="miss"} 4\n'
    )
    after = metrics_text.parse(
        'costserve_decisions_total{model="digits",precision="fp32",reason="requested"} 1\n'
        'costserve_decisions_total{model="digits",precision="fp32",reason="dominates"} 30\n'
        'costserve_decisions_total{model="digits",precision="int8",reason="dominates"} 0\n'
        'costserve_decisions_total{model="digits",precision="int8",reason="load_shed"} 5\n'
        'costserve_images_total{model="digits",precision="fp32",cache="miss"} 484\n'
        'costserve_images_total{model="digits",precision="fp32",cache="hit"} 100\n'
        'costserve_images_total{model="digits",precision="int8",cache="miss"} 80\n'
    )
    assert policy.decisions(after, before) == {"fp32": {"dominates": 30}, "int8": {"load_shed": 5}}
    assert policy.computed_images(after, before) == {"fp32": 480, "int8": 80}
