"""Tenants and their budgets: who spent what in the current hour or day (UTC).

A call's tenant is its caller's (:mod:`~costserve.server.auth`), or with authentication
off the one its ``x-costserve-tenant`` metadata names. Budgets come from a TOML file
(``--budgets``, example ``deploy/budgets.toml``)::

    near_fraction = 0.8          # from this share of the budget on, AUTO degrades

    [tenants.acme]
    usd_per_hour = 0.02

    [tenants.globex]
    usd_per_day = 0.25

Spend is added when a response is priced (:meth:`TenantLedger.charge`), so the
first request after a tenant crosses its budget is refused. Spend resets at the
start of each UTC hour (``usd_per_hour``) or day (``usd_per_day``). Tenants not in
the file have no budget and share the metric label ``other``. Tenant names in the file are
normalised like every tenant name (:func:`~costserve.server.auth.normalize_tenant`).
With several worker processes on one machine (``--workers``), spend is counted once
across them (:mod:`~costserve.server.machine`): one worker refuses a tenant the others
together brought to its budget.
"""

from __future__ import annotations

import enum
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from costserve.server.auth.identity import tenant_name
from costserve.server.errors import CostserveError
from costserve.server.machine import MachineState, MachineStateError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

#: Label value of every tenant without a configured budget (keeps label values bounded).
OTHER_TENANT = "other"
#: Default share of a budget from which AUTO requests degrade to the cheaper variant and the cache.
NEAR_FRACTION = 0.8
PERIOD_SECONDS = {"hour": 3600, "day": 86400}


class BudgetFileError(CostserveError):
    """The budgets file is missing, unreadable or inconsistent."""


@dataclass(frozen=True)
class Budget:
    """A tenant's spend limit per UTC hour or day."""

    tenant: str
    usd: float
    period: str  # "hour" | "day"


@dataclass(frozen=True)
class Budgets:
    """Every configured budget, and the share of a budget that counts as near it."""

    tenants: dict[str, Budget]
    near_fraction: float = NEAR_FRACTION


def load_budgets(path: Path | None) -> Budgets:
    """Read a TOML budgets file; ``None`` means no budgets."""
    if path is None:
        return Budgets({})
    try:
        document: dict[str, Any] = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise BudgetFileError(f"cannot read budgets file {path}: {error}") from None
    near = document.get("near_fraction", NEAR_FRACTION)
    if not isinstance(near, (int, float)) or isinstance(near, bool) or not 0 < near <= 1:
        raise BudgetFileError(f"{path}: near_fraction = {near!r} must lie in (0, 1]")
    tenants = {}
    for written, section in document.get("tenants", {}).items():
        try:
            name = tenant_name(written)
        except ValueError as error:
            raise BudgetFileError(f"{path}: {error}") from None
        if name in tenants:
            raise BudgetFileError(f"{path}: tenant {written!r} is {name!r}, named twice (names ignore case)")
        if name == OTHER_TENANT:
            raise BudgetFileError(f"{path}: tenant name {OTHER_TENANT!r} is reserved for tenants without a budget")
        periods = [period for period in PERIOD_SECONDS if f"usd_per_{period}" in section]
        if len(periods) != 1:
            raise BudgetFileError(f"{path}: tenant {name!r} needs exactly one of usd_per_hour or usd_per_day")
        usd = section[f"usd_per_{periods[0]}"]
        if not isinstance(usd, (int, float)) or isinstance(usd, bool) or not math.isfinite(usd) or usd < 0:
            raise BudgetFileError(f"{path}: tenant {name!r} budget {usd!r} must be a finite number, 0 or more")
        tenants[name] = Budget(name, float(usd), periods[0])
    return Budgets(tenants, float(near))


class BudgetStatus(enum.Enum):
    """Where a tenant stands against its budget."""

    NONE = "none"  # no budget configured
    OK = "ok"
    NEAR = "near"
    OVER = "over"


@dataclass(frozen=True)
class BudgetState:
    """A tenant's spend in the current period, and when the period ends."""

    status: BudgetStatus
    spent_usd: float = 0.0
    budget: Budget | None = None
    #: Unix time at which the spend resets to 0.
    resets_at: float = 0.0

    def refusal(self, now: float) -> str:
        """The message of a request refused for being over budget."""
        assert self.budget is not None
        resets = datetime.fromtimestamp(self.resets_at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return (
            f"tenant {self.budget.tenant!r} has spent ${self.spent_usd:.6g} of its ${self.budget.usd:.6g} "
            f"per-{self.budget.period} budget; it resets at {resets} (in {max(self.resets_at - now, 0):.0f} s)"
        )


_NO_BUDGET = BudgetState(BudgetStatus.NONE)


def period_start(now: float, period: str) -> float:
    """Start (Unix time) of the UTC hour or day holding ``now``."""
    return now - now % PERIOD_SECONDS[period]


class _LocalSpend:
    """One process's spend per tenant index in its current period: the ledger's store without a machine."""

    def __init__(self) -> None:
        self._rows: dict[int, tuple[float, float]] = {}  # tenant index -> (period start, USD)

    def add_spend(self, tenant_index: int, period_start: float, usd: float) -> None:
        self._rows[tenant_index] = (period_start, self.spend(tenant_index, period_start) + usd)

    def spend(self, tenant_index: int, period_start: float) -> float:
        period, spent = self._rows.get(tenant_index, (period_start, 0.0))
        return spent if period == period_start else 0.0


class TenantLedger:
    """Spend per tenant in the current period; ``clock`` is Unix time (tests pass their own).

    With a ``machine`` (this worker's slot of :class:`~costserve.server.machine.MachineState`),
    :meth:`state` reads the spend of every worker and :meth:`charge` adds to this worker's;
    the machine must hold the same budget tenants.
    """

    def __init__(
        self, budgets: Budgets, clock: Callable[[], float] = time.time, machine: MachineState | None = None
    ) -> None:
        self.budgets = budgets
        self.clock = clock
        tenants = tuple(sorted(budgets.tenants))
        if machine is not None and machine.tenants != tenants:
            raise MachineStateError(
                f"the machine's shared state has budgets for {list(machine.tenants)}, this worker for "
                f"{list(tenants)}: supervisor and workers must read the same budgets file"
            )
        self._index = {tenant: index for index, tenant in enumerate(tenants)}
        self._spend: _LocalSpend | MachineState = _LocalSpend() if machine is None else machine

    def label(self, tenant: str) -> str:
        """The metric label of ``tenant``: its name when it has a budget, else ``other``."""
        return tenant if tenant in self.budgets.tenants else OTHER_TENANT

    def state(self, tenant: str) -> BudgetState:
        """Where ``tenant`` stands now."""
        budget = self.budgets.tenants.get(tenant)
        if budget is None:
            return _NO_BUDGET
        start = period_start(self.clock(), budget.period)
        spent = self._spend.spend(self._index[tenant], start)
        if spent >= budget.usd:
            status = BudgetStatus.OVER
        elif spent >= budget.usd * self.budgets.near_fraction:
            status = BudgetStatus.NEAR
        else:
            status = BudgetStatus.OK
        return BudgetState(status, spent, budget, start + PERIOD_SECONDS[budget.period])

    def charge(self, tenant: str, usd: float) -> None:
        """Add ``usd`` to ``tenant``'s spend in the current period (no-op without a budget)."""
        budget = self.budgets.tenants.get(tenant)
        if budget is None:
            return
        self._spend.add_spend(self._index[tenant], period_start(self.clock(), budget.period), usd)
