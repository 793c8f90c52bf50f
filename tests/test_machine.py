"""The machine's shared state across real worker processes: spend counted once, every worker's CPU, serving flags.

Workers here are spawned processes attached to real shared memory, each driven over a
pipe and running on its own fake clock, so the tests decide what time it is in every
process and pass however busy the host is.
"""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np
import pytest

from costserve.server.budgets import Budget, Budgets, BudgetStatus, TenantLedger, period_start
from costserve.server.cost import PUBLISHED_CPU_MAX_AGE_S, UtilizationWindow
from costserve.server.machine import MachineState, MachineStateError

# 2026-11-28 18:30:00 UTC; the workers' cost clock (monotonic) uses the same numbers.
HALF_PAST = 1795890600.0
HOUR = period_start(HALF_PAST, "hour")
BUDGETS = Budgets({"acme": Budget("acme", 1.0, "hour"), "globex": Budget("globex", 5.0, "day")})
ACME, GLOBEX = 0, 1  # their places in the sorted budget tenants
WINDOW_S = 10.0
VCPUS = 2.0
#: How long a worker may take to answer before the test fails (a hang guard, not a measurement).
TIMEOUT_S = 60.0
SPAWN = multiprocessing.get_context("spawn")


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _spend_until_refused(ledger: TenantLedger, tenant: str, step_usd: float, start: Any) -> int:
    """Charge ``step_usd`` per request until the ledger refuses ``tenant``; the number of charges."""
    if start is not None:
        start.wait(TIMEOUT_S)
    charges = 0
    while ledger.state(tenant).status is not BudgetStatus.OVER:
        ledger.charge(tenant, step_usd)
        charges += 1
    return charges


def _worker_main(conn: Connection, name: str, slot: int, start: Any) -> None:
    """A worker process: attaches to slot ``slot`` and runs the commands the test sends until it sends None."""
    clock = _Clock(HALF_PAST)
    machine = MachineState.attach(name, slot)
    window = UtilizationWindow(WINDOW_S, VCPUS, clock, machine)
    ledger = TenantLedger(BUDGETS, clock, machine)
    operations: dict[str, Callable[..., Any]] = {
        "at": lambda now: setattr(clock, "now", now),
        "add_cpu": window.add,
        "utilization": window.utilization,
        "charge": ledger.charge,
        "state": lambda tenant: (ledger.state(tenant).status, ledger.state(tenant).spent_usd),
        "serving": machine.set_serving,
        "spend_until_refused": lambda tenant, step: _spend_until_refused(ledger, tenant, step, start),
    }
    try:
        while (command := conn.recv()) is not None:
            operation, *args = command
            try:
                conn.send(operations[operation](*args))
            except Exception as error:  # noqa: BLE001 - handed to the test, which raises it
                conn.send(error)
    finally:
        machine.close()


class Worker:
    """The test's handle on one worker process."""

    def __init__(self, name: str, slot: int, start: Any = None) -> None:
        self._conn, child = SPAWN.Pipe()
        self.process = SPAWN.Process(target=_worker_main, args=(child, name, slot, start), daemon=True)
        self.process.start()
        child.close()

    def send(self, operation: str, *args: Any) -> None:
        self._conn.send((operation, *args))

    def result(self) -> Any:
        assert self._conn.poll(TIMEOUT_S), "the worker did not answer"
        reply = self._conn.recv()
        if isinstance(reply, Exception):
            raise reply
        return reply

    def __call__(self, operation: str, *args: Any) -> Any:
        self.send(operation, *args)
        return self.result()

    def kill(self) -> None:
        """End the process as a crash would: no cleanup, no close."""
        self.process.kill()
        self.process.join(TIMEOUT_S)

    def stop(self) -> None:
        if self.process.is_alive():
            self._conn.send(None)
            self.process.join(TIMEOUT_S)
        self._conn.close()


@pytest.fixture
def machine() -> Iterator[MachineState]:
    """The supervisor's view: a machine of two worker slots, started at HALF_PAST on the fake clocks."""
    state = MachineState.create(2, BUDGETS.tenants, started=HALF_PAST)
    yield state
    state.close()
    state.unlink()


@pytest.fixture
def start_worker(machine: MachineState) -> Iterator[Callable[..., Worker]]:
    """Starts worker processes attached to ``machine``; stops them after the test."""
    started: list[Worker] = []

    def start(slot: int, start: Any = None) -> Worker:
        started.append(Worker(machine.name, slot, start))
        return started[-1]

    yield start
    for worker in started:
        worker.stop()


def test_concurrent_workers_count_every_charge_once_and_stop_together_at_the_budget(
    machine: MachineState, start_worker: Callable[..., Worker]
) -> None:
    step = 1e-4
    start = SPAWN.Barrier(2)
    workers = [start_worker(0, start), start_worker(1, start)]
    for worker in workers:
        worker.send("spend_until_refused", "acme", step)
    charges = [worker.result() for worker in workers]
    total = sum(charges) * step
    assert machine.spend(ACME, HOUR) == pytest.approx(total, rel=1e-9), "a charge was lost or counted twice"
    # Each stops once both together reached the budget: at most one charge each past it.
    assert 1.0 - 1e-9 <= total <= 1.0 + 2 * step + 1e-9
    assert all(count * step < 1.0 for count in charges)
    assert all(worker("state", "acme")[0] is BudgetStatus.OVER for worker in workers)
    assert TenantLedger(BUDGETS, lambda: HALF_PAST, machine).state("acme").status is BudgetStatus.OVER
    assert machine.spend(GLOBEX, period_start(HALF_PAST, "day")) == 0.0


def test_a_worker_cannot_spend_the_budget_another_has_nearly_spent(
    machine: MachineState, start_worker: Callable[..., Worker]
) -> None:
    first, second = start_worker(0), start_worker(1)
    first("charge", "acme", 0.9)
    status, spent = second("state", "acme")
    assert (status, spent) == (BudgetStatus.NEAR, pytest.approx(0.9))
    charges = second("spend_until_refused", "acme", 0.01)
    assert charges * 0.01 <= 0.1 + 0.01 + 1e-9
    assert first("state", "acme")[0] is BudgetStatus.OVER
    assert first("spend_until_refused", "acme", 0.01) == 0


def test_utilization_counts_the_cpu_of_every_worker_while_its_total_is_fresh(
    machine: MachineState, start_worker: Callable[..., Worker]
) -> None:
    first, second = start_worker(0), start_worker(1)
    capacity = WINDOW_S * VCPUS
    first("at", HALF_PAST + 20.0)
    assert first("add_cpu", 3.0) == pytest.approx(3.0 / capacity)
    second("at", HALF_PAST + 20.5)
    assert second("add_cpu", 5.0) == pytest.approx(8.0 / capacity)
    first("at", HALF_PAST + 21.0)
    assert first("utilization") == pytest.approx(8.0 / capacity)
    assert machine.others_cpu(HALF_PAST + 21.0, PUBLISHED_CPU_MAX_AGE_S) == pytest.approx(8.0)
    # A live worker publishes at least every 0.1 s (its health loop reads its utilization); the
    # first stops publishing at +21 s, as a dead one would.
    second("at", HALF_PAST + 21.8)
    assert second("add_cpu", 1.0) == pytest.approx(9.0 / capacity)
    # Past +22 s the first worker's total is stale and no longer counts.
    second("at", HALF_PAST + 22.5)
    assert second("utilization") == pytest.approx(6.0 / capacity)
    assert machine.others_cpu(HALF_PAST + 22.5, PUBLISHED_CPU_MAX_AGE_S) == pytest.approx(6.0)


def test_utilization_spans_the_time_since_the_machine_started(
    machine: MachineState, start_worker: Callable[..., Worker]
) -> None:
    worker = start_worker(1)  # as a restarted worker: it starts 4 s after the machine
    worker("at", HALF_PAST + 4.0)
    assert worker("add_cpu", 2.0) == pytest.approx(2.0 / (4.0 * VCPUS))


def test_a_restarted_worker_keeps_its_spend_and_a_new_period_starts_from_zero(
    machine: MachineState, start_worker: Callable[..., Worker]
) -> None:
    first, second = start_worker(0), start_worker(1)
    second("charge", "acme", 0.3)
    second("charge", "globex", 2.0)
    second.kill()
    second = start_worker(1)
    assert second("state", "acme") == (BudgetStatus.OK, pytest.approx(0.3))
    second("charge", "acme", 0.2)
    first("charge", "acme", 0.1)
    assert machine.spend(ACME, HOUR) == pytest.approx(0.6)
    next_hour = HOUR + 3600
    for worker in (first, second):
        worker("at", next_hour + 1)
    assert second("state", "acme") == (BudgetStatus.OK, 0.0)
    second("charge", "acme", 0.25)
    assert first("state", "acme") == (BudgetStatus.OK, pytest.approx(0.25))  # its own row is an hour old
    assert machine.spend(ACME, next_hour) == pytest.approx(0.25)
    assert first("state", "globex") == (BudgetStatus.OK, pytest.approx(2.0))  # a per-day budget: the day goes on


def test_the_state_outlives_a_worker_that_is_not_a_multiprocessing_child(machine: MachineState) -> None:
    """A worker with its own resource tracker (any process not started by multiprocessing) must not unlink it."""
    script = (
        "import sys\n"
        "from multiprocessing import resource_tracker\n"
        "from costserve.server.machine import MachineState\n"
        "worker = MachineState.attach(sys.argv[1], 1)\n"
        "worker.add_spend(0, float(sys.argv[2]), 0.25)\n"
        "worker.close()\n"
        "# Wait for this process's resource tracker, if attaching started one: it would unlink the segment now.\n"
        "resource_tracker._resource_tracker._stop()\n"
    )
    subprocess.run([sys.executable, "-c", script, machine.name, repr(HOUR)], check=True, timeout=TIMEOUT_S)
    assert machine.spend(ACME, HOUR) == 0.25
    with MachineState.attach(machine.name, 1) as again:
        assert again.spend(ACME, HOUR) == 0.25


def test_serving_flags_count_each_worker(machine: MachineState, start_worker: Callable[..., Worker]) -> None:
    first, second = start_worker(0), start_worker(1)
    assert (machine.serving_count(), machine.all_serving()) == (0, False)
    first("serving", True)
    assert (machine.serving_count(), machine.all_serving()) == (1, False)
    second("serving", True)
    assert (machine.serving_count(), machine.all_serving()) == (2, True)
    second.kill()
    machine.set_serving(False, worker=1)  # the supervisor, on seeing the worker exit
    assert (machine.serving_count(), machine.all_serving()) == (1, False)


def _poke_header(name: str, field: int, value: int) -> None:
    segment = SharedMemory(name)
    header = np.ndarray((8,), np.int64, segment.buf)
    header[field] = value
    del header
    segment.close()


@pytest.mark.parametrize(
    "field, value, message",
    [
        (0, 0, "is not a costserve machine segment"),
        (1, 99, "holds machine state format 99; this costserve reads format 1"),
        (2, 3, r"its header \(3 workers, 2 tenants\) needs"),
    ],
    ids=["magic", "format-version", "worker-count"],
)
def test_attaching_to_another_layout_says_what_differs(
    machine: MachineState, field: int, value: int, message: str
) -> None:
    _poke_header(machine.name, field, value)
    with pytest.raises(MachineStateError, match=message):
        MachineState.attach(machine.name, 0)


def test_attaching_to_what_is_not_this_machine_is_refused(machine: MachineState) -> None:
    with pytest.raises(MachineStateError, match="not a slot"):
        MachineState.attach(machine.name, 2)
    with pytest.raises(MachineStateError, match="no shared memory named"):
        MachineState.attach(machine.name + "-missing", 0)
    other = Budgets({"acme": BUDGETS.tenants["acme"]})
    with MachineState.attach(machine.name, 0) as worker:
        with pytest.raises(MachineStateError, match="must read the same budgets file"):
            TenantLedger(other, machine=worker)
        with pytest.raises(MachineStateError, match="only the supervisor"):
            worker.unlink()
    with pytest.raises(MachineStateError, match="no worker slot"):
        machine.add_spend(ACME, HOUR, 1.0)
    tiny = SharedMemory(create=True, size=16)
    try:
        with pytest.raises(MachineStateError, match="is not a costserve machine segment"):
            MachineState.attach(tiny.name, 0)
    finally:
        tiny.close()
        tiny.unlink()
