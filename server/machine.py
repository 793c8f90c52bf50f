"""State the worker processes of one machine share: attributed CPU, tenant spend, serving flags.

With ``--workers N`` a supervisor runs N costserve workers on one port. Each keeps its
own :class:`~costserve.server.cost.CostMeter` and
:class:`~costserve.server.budgets.TenantLedger`, and both must see the whole machine:
the utilization ``R`` counts the CPU every worker attributed, and a tenant's spend is
counted once however many workers served it. This module holds that state in one POSIX
shared-memory segment: the supervisor makes it (:meth:`MachineState.create`), each
worker attaches to its slot by the segment's name (:meth:`MachineState.attach`)::

    machine = MachineState.create(workers=4, tenants=budgets.tenants)   # supervisor
    ...                                                                  # pass machine.name
    machine = MachineState.attach(name, worker=2)                        # worker 2
    meter = CostMeter(prices, machine=machine)
    ledger = TenantLedger(budgets, machine=machine)
    ...
    machine.close()                                                      # every process
    machine.unlink()                                                     # supervisor, at exit

No lock: every value has one writer, the worker owning its slot, and readers sum the
slots. Aligned 8-byte stores and loads (every field here) are single instructions on
x86-64 and aarch64, so a reader sees each value whole, never torn, at worst one update
old. A worker that crashes and is restarted attaches to the same slot and keeps what it
wrote (the spend it charged still counts); its CPU total stops counting once it is older
than the window.

Layout (format version 1; every offset a multiple of 8 bytes, native byte order):

============  ==============  ==========================================================
offset        type, shape     field
============  ==============  ==========================================================
0             int64 [8]       header: magic ``b"CSTMACH1"``, format version, workers N,
                              tenants T, bytes of tenant names, segment bytes, 0, 0
64            float64 [1]     ``started``: when the machine started (monotonic seconds)
72            float64 [N]     CPU-seconds each worker attributed over its window
72 + 8N       float64 [N]     when each worker published it (monotonic s; -inf: never)
72 + 16N      int64 [N]       serving flag per worker (1 serving, 0 not)
72 + 24N      float64 [N, T]  start (Unix s) of the period each spend row counts (NaN: none)
72 + 24N+8NT  float64 [N, T]  USD each worker charged each tenant in that period
72 + 24N+16NT bytes           tenant names, sorted, UTF-8, joined by newlines (padded to 8)
============  ==============  ==========================================================

Rows are per worker (worker-major), so the values one worker writes lie together.
``time.monotonic()`` is CLOCK_MONOTONIC, one clock for every process on a Linux host,
so CPU stamps compare across workers.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Iterable
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from types import TracebackType

import numpy as np

MAGIC = int.from_bytes(b"CSTMACH1", "little")
FORMAT_VERSION = 1
_HEADER_FIELDS = 8
_DATA_OFFSET = 8 * (_HEADER_FIELDS + 1)  # the header, then ``started``

_TRACKER_LOCK = threading.Lock()


class MachineStateError(RuntimeError):
    """A shared segment that does not hold this machine's state, or a use it does not allow."""


def _layout(workers: int, tenants: int, names_nbytes: int) -> dict[str, int]:
    """Byte offset of each array, and the segment's size under ``size``."""
    offsets = {}
    at = _DATA_OFFSET
    for field, nbytes in (
        ("cpu_s", 8 * workers),
        ("cpu_at", 8 * workers),
        ("serving", 8 * workers),
        ("period", 8 * workers * tenants),
        ("spent", 8 * workers * tenants),
        ("names", names_nbytes + -names_nbytes % 8),
    ):
        offsets[field] = at
        at += nbytes
    offsets["size"] = at
    return offsets


def _open_untracked(name: str) -> SharedMemory:
    """Open an existing segment without handing it to this process's resource tracker."""
    if sys.version_info >= (3, 13):
        return SharedMemory(name, track=False)
    # Before 3.13, SharedMemory registers every segment it opens with the resource tracker,
    # which unlinks it when the process exits: one worker exiting, or crashing, would destroy
    # the machine's state for all. Unregistering afterwards is no fix: a worker started by
    # multiprocessing shares the supervisor's tracker and would drop the supervisor's entry.
    with _TRACKER_LOCK:
        register = resource_tracker.register
        setattr(resource_tracker, "register", lambda name, rtype: None)  # noqa: B010
        try:
            return SharedMemory(name)
        finally:
            setattr(resource_tracker, "register", register)  # noqa: B010


class MachineState:
    """One machine's shared state, seen by the supervisor (no slot) or by one worker (its slot).

    Build it with :meth:`create` or :meth:`attach`, not directly.
    """

    def __init__(self, shm: SharedMemory, worker: int | None) -> None:
        if shm.size < _DATA_OFFSET:
            raise MachineStateError(f"shared memory {shm.name!r} is not a costserve machine segment ({shm.size} bytes)")
        header = np.ndarray((_HEADER_FIELDS,), np.int64, shm.buf)
        magic, version, workers, tenants, names_nbytes, size = (int(value) for value in header[:6])
        del header
        if magic != MAGIC:
            raise MachineStateError(f"shared memory {shm.name!r} is not a costserve machine segment")
        if version != FORMAT_VERSION:
            raise MachineStateError(
                f"shared memory {shm.name!r} holds machine state format {version}; this costserve reads "
                f"format {FORMAT_VERSION} (supervisor and workers must run the same costserve)"
            )
        layout = _layout(workers, tenants, names_nbytes)
        if size != layout["size"] or shm.size < size:
            raise MachineStateError(
                f"shared memory {shm.name!r} is {shm.size} bytes; its header ({workers} workers, "
                f"{tenants} tenants) needs {layout['size']}"
            )
        if worker is not None and not 0 <= worker < workers:
            raise MachineStateError(f"worker {worker} is not a slot of {shm.name!r} (slots 0 to {workers - 1})")
        #: Name of the shared-memory segment (what workers attach by).
        self.name = shm.name
        #: Worker slots the segment holds.
        self.workers = workers
        #: This process's slot, or None for the supervisor.
        self.worker = worker
        names = np.ndarray((names_nbytes,), np.uint8, shm.buf, layout["names"]).tobytes().decode()
        #: Tenants with a budget, sorted; a tenant's index into the spend rows is its place here.
        self.tenants: tuple[str, ...] = tuple(names.split("\n")) if names else ()
        if len(self.tenants) != tenants:
            raise MachineStateError(f"shared memory {shm.name!r} names {len(self.tenants)} tenants, not {tenants}")
        self._started = np.ndarray((1,), np.float64, shm.buf, 8 * _HEADER_FIELDS)
        self._cpu_s = np.ndarray((workers,), np.float64, shm.buf, layout["cpu_s"])
        self._cpu_at = np.ndarray((workers,), np.float64, shm.buf, layout["cpu_at"])
        self._serving = np.ndarray((workers,), np.int64, shm.buf, layout["serving"])
        self._period = np.ndarray((workers, tenants), np.float64, shm.buf, layout["period"])
        self._spent = np.ndarray((workers, tenants), np.float64, shm.buf, layout["spent"])
        # Each tenant's column across workers, made once: :meth:`spend` runs on every request.
        self._tenant_period = [self._period[:, index] for index in range(tenants)]
        self._tenant_spent = [self._spent[:, index] for index in range(tenants)]
        # Set last: attributes are released in order, and the segment cannot close while views remain.
        self._segment = shm
        self._open = True

    @classmethod
    def create(cls, workers: int, tenants: Iterable[str], *, started: float | None = None) -> MachineState:
        """Make the segment for ``workers`` workers and the budget ``tenants`` (stored sorted).

        ``started`` is when the machine started, on the workers' cost clock (monotonic
        seconds; now by default): utilization is measured over the time since then until
        a full window has passed. The caller owns the segment: :meth:`close` and
        :meth:`unlink` it at exit.
        """
        names = sorted(tenants)
        if workers < 1:
            raise ValueError(f"a machine needs 1 worker or more, not {workers}")
        if len(set(names)) != len(names) or any(not name or "\n" in name for name in names):
            raise ValueError(f"tenant names must be distinct, not blank, one line each: {names!r}")
        blob = "\n".join(names).encode()
        layout = _layout(workers, len(names), len(blob))
        shm = SharedMemory(create=True, size=layout["size"])
        try:
            np.ndarray((len(blob),), np.uint8, shm.buf, layout["names"])[:] = np.frombuffer(blob, np.uint8)
            header = np.ndarray((_HEADER_FIELDS,), np.int64, shm.buf)
            header[:6] = (MAGIC, FORMAT_VERSION, workers, len(names), len(blob), layout["size"])
            del header
            state = cls(shm, None)
        except BaseException:
            shm.close()
            shm.unlink()
            raise
        state._started[0] = time.monotonic() if started is None else started
        state._cpu_at[:] = -math.inf
        state._period[:] = math.nan
        return state

    @classmethod
    def attach(cls, name: str, worker: int) -> MachineState:
        """Attach to the segment ``name`` as worker slot ``worker`` (0 to workers - 1).

        Raises :class:`MachineStateError` when the segment holds another layout, format or
        slot count. Attaching never resets the slot: a restarted worker keeps its spend.
        """
        try:
            shm = _open_untracked(name)
        except FileNotFoundError:
            raise MachineStateError(f"no shared memory named {name!r}: has the supervisor exited?") from None
        try:
            return cls(shm, worker)
        except BaseException:
            shm.close()
            raise

    @property
    def started(self) -> float:
        """When the machine started, in monotonic seconds (the workers' cost clock)."""
        return float(self._started[0])

    def _slot(self) -> int:
        if self.worker is None:
            raise MachineStateError("the supervisor's view of the machine has no worker slot to write")
        return self.worker

    # CPU attributed to requests (utilization).

    def publish_cpu(self, window_cpu_s: float, now: float) -> None:
        """Publish this worker's CPU-seconds attributed over its trailing window, as of ``now`` (monotonic s)."""
        slot = self._slot()
        self._cpu_s[slot] = window_cpu_s
        self._cpu_at[slot] = now

    def others_cpu(self, now: float, max_age_s: float) -> float:
        """CPU-seconds the other workers published within ``max_age_s`` seconds before ``now``.

        From the supervisor, every worker's. A total older than ``max_age_s`` (a worker
        that crashed, or has been idle that long) does not count.
        """
        fresh = now - self._cpu_at <= max_age_s
        if self.worker is not None:
            fresh[self.worker] = False
        return float(self._cpu_s.sum(where=fresh))

    # Tenant spend (budgets).

    def add_spend(self, tenant_index: int, period_start: float, usd: float) -> None:
        """Add ``usd`` to this worker's spend for tenant ``tenant_index`` in the period starting at ``period_start``.

        A row holding an earlier period starts again from ``usd``.
        """
        slot = self._slot()
        if self._period[slot, tenant_index] == period_start:
            self._spent[slot, tenant_index] += usd
        else:
            # Spend before period: a reader between the two stores sees the row's old period
            # (and skips it, or counts it toward the old period), never the old period's spend
            # under the new one. That takes ordered stores and loads (x86-64); on aarch64 one
            # read at the turn of a period may still see it, counting the old spend once.
            self._spent[slot, tenant_index] = usd
            self._period[slot, tenant_index] = period_start

    def spend(self, tenant_index: int, period_start: float) -> float:
        """USD every worker charged tenant ``tenant_index`` in the period starting at ``period_start`` (Unix s)."""
        # Periods before spend, the reverse of add_spend's stores (see there).
        periods = self._tenant_period[tenant_index].tolist()
        spent = self._tenant_spent[tenant_index].tolist()
        return math.fsum(usd for period, usd in zip(periods, spent) if period == period_start)

    # Serving flags (health).

    def set_serving(self, flag: bool, *, worker: int | None = None) -> None:
        """Mark this worker serving or not; the supervisor passes ``worker`` to clear a dead worker's slot."""
        self._serving[self._slot() if worker is None else worker] = int(flag)

    def serving_count(self) -> int:
        """How many worker slots are marked serving."""
        return int(self._serving.sum())

    def all_serving(self) -> bool:
        """Whether every worker slot is marked serving."""
        return self.serving_count() == self.workers

    # Lifetime.

    def close(self) -> None:
        """Detach this process from the segment (idempotent); the state stays for the others."""
        if not self._open:
            return
        self._open = False
        # Views first: the segment cannot close while arrays still point into it.
        del self._started, self._cpu_s, self._cpu_at, self._serving, self._period, self._spent
        del self._tenant_period, self._tenant_spent
        self._segment.close()

    def unlink(self) -> None:
        """Remove the segment (the supervisor, at exit); processes still attached keep their mapping."""
        if self.worker is not None:
            raise MachineStateError("only the supervisor that created the machine's segment removes it")
        self._segment.unlink()

    def __enter__(self) -> MachineState:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
