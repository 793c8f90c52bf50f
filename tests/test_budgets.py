"""Budgets file and the tenant ledger: near, over, reset at the period boundary, bounded labels."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO_ROOT

from costserve.server.budgets import (
    BudgetFileError,
    BudgetStatus,
    TenantLedger,
    load_budgets,
    period_start,
)

# 2026-11-28 18:30:00 UTC
HALF_PAST = 1795890600.0


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _budgets(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "budgets.toml"
    path.write_text(text)
    return load_budgets(path)


def test_the_example_file_loads() -> None:
    budgets = load_budgets(REPO_ROOT / "deploy" / "budgets.toml")
    assert set(budgets.tenants) == {"acme", "globex"}
    assert budgets.tenants["acme"].period == "hour" and budgets.tenants["globex"].period == "day"
    assert load_budgets(None).tenants == {}


@pytest.mark.parametrize(
    "text, message",
    [
        ("[tenants.a]\nusd_per_hour = 1\nusd_per_day = 2\n", "exactly one of"),
        ("[tenants.a]\nusd_per_week = 1\n", "exactly one of"),
        ("[tenants.a]\nusd_per_hour = -1\n", "finite number"),
        ("[tenants.other]\nusd_per_hour = 1\n", "reserved"),
        ("near_fraction = 1.5\n", "near_fraction"),
        ("[tenants.a\n", "cannot read"),
    ],
)
def test_bad_files_are_refused_with_the_reason(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(BudgetFileError, match=message):
        _budgets(tmp_path, text)


def test_ok_then_near_then_over(tmp_path: Path) -> None:
    ledger = TenantLedger(
        _budgets(tmp_path, "near_fraction = 0.5\n[tenants.acme]\nusd_per_hour = 1.0\n"), FakeClock(HALF_PAST)
    )
    assert ledger.state("acme").status is BudgetStatus.OK
    ledger.charge("acme", 0.5)
    assert ledger.state("acme").status is BudgetStatus.NEAR
    ledger.charge("acme", 0.49)
    assert ledger.state("acme").status is BudgetStatus.NEAR
    ledger.charge("acme", 0.01)
    state = ledger.state("acme")
    assert state.status is BudgetStatus.OVER
    assert state.refusal(HALF_PAST) == (
        "tenant 'acme' has spent $1 of its $1 per-hour budget; it resets at 2026-11-28T19:00:00Z (in 1800 s)"
    )


def test_spend_resets_at_the_start_of_the_next_hour_and_day(tmp_path: Path) -> None:
    clock = FakeClock(HALF_PAST)
    ledger = TenantLedger(_budgets(tmp_path, "[tenants.a]\nusd_per_hour = 1\n[tenants.b]\nusd_per_day = 1\n"), clock)
    ledger.charge("a", 2.0)
    ledger.charge("b", 2.0)
    clock.now = period_start(HALF_PAST, "hour") + 3600 - 0.001
    assert ledger.state("a").status is BudgetStatus.OVER
    clock.now += 0.001  # 19:00:00
    assert ledger.state("a").status is BudgetStatus.OK and ledger.state("a").spent_usd == 0
    assert ledger.state("b").status is BudgetStatus.OVER  # the day has not turned
    clock.now = period_start(HALF_PAST, "day") + 86400
    assert ledger.state("b").status is BudgetStatus.OK


def test_tenants_are_isolated_and_unbudgeted_ones_share_one_label(tmp_path: Path) -> None:
    ledger = TenantLedger(_budgets(tmp_path, "[tenants.acme]\nusd_per_hour = 1\n"), FakeClock(HALF_PAST))
    ledger.charge("acme", 5.0)
    ledger.charge("mallory", 5.0)
    assert ledger.state("acme").status is BudgetStatus.OVER
    assert ledger.state("mallory").status is BudgetStatus.NONE
    assert ledger.state("").status is BudgetStatus.NONE
    assert [ledger.label(name) for name in ("acme", "mallory", "")] == ["acme", "other", "other"]
