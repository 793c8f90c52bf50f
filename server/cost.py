"""What a request costs, in dollars: the seed's model, per request.

    Cost = (C_cpu·T_cpu + C_mem·T_mem) / R + C_net·T_net

* ``C_*`` come from a price file (:func:`load_prices`; defaults in
  ``deploy/prices.toml``, with their source and date).
* ``T_cpu``: CPU-seconds the request used, measured: its own handling on the
  event-loop thread (thread CPU time around its synchronous steps) plus an equal
  share of each inference batch it was part of (the inference thread's CPU time
  when the runtime works on that thread alone, the default; otherwise process
  CPU time around the runtime call, less the event loop's own CPU over that
  interval). A cache hit has no inference share.
* ``T_mem``: GB-seconds of provisioned memory it held. Memory comes with the CPU
  it is provisioned beside, so a request holds ``memory_gb / vcpus`` GB for each
  CPU-second it uses.
* ``R``: utilization of the provisioned CPU, the CPU-seconds attributed to
  requests over the trailing ``window_seconds`` divided by ``window × vcpus``,
  clamped to ``[min_utilization, 1]``. Dividing by ``R`` makes the requests served
  pay for the idle capacity beside them, so over a window of steady traffic the
  per-request costs add up to what the provisioned CPU and memory cost over that
  window. Below the clamp that no longer holds: idle capacity under
  ``min_utilization`` is not charged to anyone and shows as the gap between
  ``costserve_provisioned_cost_usd_total`` and the charged cost. With several
  worker processes on one machine (``--workers``), the CPU every worker
  attributed counts (:mod:`~costserve.server.machine`), and ``vcpus`` is the
  machine's.
* ``T_net``: GB moved (request plus response bytes). Network is paid per GB
  moved, not provisioned, so it is not divided by ``R``.
"""

from __future__ import annotations

import collections
import math
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from costserve.server.domain import CostBreakdown
from costserve.server.errors import CostserveError

if TYPE_CHECKING:
    from costserve.server.machine import MachineState

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

GB = 1024**3
#: Width of one bucket of the utilization window, in seconds.
BUCKET_S = 0.05
#: A worker's published CPU older than this no longer counts, in seconds: every live worker publishes
#: at least every 0.1 s (its health loop reads its utilization), so an older total is a dead worker's.
PUBLISHED_CPU_MAX_AGE_S = 1.0


@dataclass(frozen=True)
class Prices:
    """Prices and provisioned resources of one server (see ``deploy/prices.toml``)."""

    #: USD per vCPU-hour.
    vcpu_hour_usd: float = 0.031611
    #: USD per GB-hour of memory (GiB, as cloud providers bill it).
    memory_gb_hour_usd: float = 0.004237
    #: USD per GB (GiB) moved over the network.
    network_gb_usd: float = 0.01
    #: vCPUs provisioned for the server.
    vcpus: float = 2.0
    #: Memory provisioned for the server, in GB (GiB).
    memory_gb: float = 8.0
    #: Trailing window over which utilization is measured, in seconds.
    window_seconds: float = 60.0
    #: Lowest utilization used for pricing (0..1].
    min_utilization: float = 0.05
    #: Where the prices come from, and when they were recorded.
    source: str = "Google Cloud on-demand list prices, N2, us-central1 (recorded 2026-11-28)"

    @property
    def provisioned_usd_per_second(self) -> float:
        """What the provisioned CPU and memory cost per second of wall time."""
        return (self.vcpus * self.vcpu_hour_usd + self.memory_gb * self.memory_gb_hour_usd) / 3600.0


class PriceFileError(CostserveError):
    """The price file is missing, unreadable or inconsistent."""


def load_prices(path: Path | None) -> Prices:
    """Read a TOML price file (sections ``prices``, ``provisioned``, ``utilization``, ``source``)."""
    if path is None:
        return Prices()
    try:
        document: dict[str, Any] = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise PriceFileError(f"cannot read price file {path}: {error}") from None
    defaults = Prices()
    section = lambda name: document.get(name, {})  # noqa: E731
    source = section("source")
    values = {
        "vcpu_hour_usd": section("prices").get("vcpu_hour_usd", defaults.vcpu_hour_usd),
        "memory_gb_hour_usd": section("prices").get("memory_gb_hour_usd", defaults.memory_gb_hour_usd),
        "network_gb_usd": section("prices").get("network_gb_usd", defaults.network_gb_usd),
        "vcpus": section("provisioned").get("vcpus", defaults.vcpus),
        "memory_gb": section("provisioned").get("memory_gb", defaults.memory_gb),
        "window_seconds": section("utilization").get("window_seconds", defaults.window_seconds),
        "min_utilization": section("utilization").get("min_utilization", defaults.min_utilization),
    }
    for name, value in values.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise PriceFileError(f"{path}: {name} = {value!r} must be a finite number, 0 or more")
    if values["vcpus"] <= 0 or values["window_seconds"] <= 0:
        raise PriceFileError(f"{path}: vcpus and window_seconds must be above 0")
    if not 0 < values["min_utilization"] <= 1:
        raise PriceFileError(f"{path}: min_utilization must lie in (0, 1]")
    label = source.get("name", str(path))
    if "recorded" in source:
        label += f" (recorded {source['recorded']})"
    return Prices(**{name: float(value) for name, value in values.items()}, source=label)


class UtilizationWindow:
    """CPU-seconds attributed to requests over a trailing window, in small time buckets.

    With a ``machine``, the other workers' CPU counts too: this window publishes its own
    total there and reads theirs, each at most once per :data:`BUCKET_S` (so a figure
    seen from another worker is at most that much older than its own), and the window
    spans the time since the machine started rather than since this worker did.
    ``clock`` and ``machine.started`` are monotonic seconds on the same clock.
    """

    def __init__(
        self,
        window_s: float,
        vcpus: float,
        clock: Callable[[], float] = time.monotonic,
        machine: MachineState | None = None,
    ) -> None:
        self.window_s = window_s
        self.vcpus = vcpus
        self._clock = clock
        self._buckets: collections.deque[list[float]] = collections.deque()  # [bucket start, cpu seconds]
        self._total = 0.0
        self._machine = machine
        self._others = 0.0  # the other workers' CPU-seconds, as last read from the machine
        self._next_share = -math.inf
        self._started = clock() if machine is None else machine.started
        self._lock = threading.Lock()

    def add(self, cpu_seconds: float) -> float:
        """Record CPU-seconds used now; return the utilization with them counted."""
        now = self._clock()
        start = now - (now % BUCKET_S)
        with self._lock:
            if self._buckets and self._buckets[-1][0] == start:
                self._buckets[-1][1] += cpu_seconds
            else:
                self._buckets.append([start, cpu_seconds])
            self._total += cpu_seconds
            self._expire(now)
            return self._utilization(now)

    def _expire(self, now: float) -> None:
        while self._buckets and self._buckets[0][0] + BUCKET_S <= now - self.window_s:
            self._total -= self._buckets.popleft()[1]

    def utilization(self) -> float:
        """Measured utilization of the provisioned CPU over the window (not clamped)."""
        now = self._clock()
        with self._lock:
            self._expire(now)
            return self._utilization(now)

    def _utilization(self, now: float) -> float:
        own = max(self._total, 0.0)
        if self._machine is not None and now >= self._next_share:
            self._machine.publish_cpu(own, now)
            self._others = self._machine.others_cpu(now, PUBLISHED_CPU_MAX_AGE_S)
            self._next_share = now + BUCKET_S
        span = min(self.window_s, max(now - self._started, BUCKET_S))
        return (own + self._others) / (span * self.vcpus)


class CostMeter:
    """Prices requests from their measured resources and the current utilization.

    ``clock`` is monotonic seconds (tests pass a fake one). With a ``machine``, this is
    one worker's meter and the utilization counts every worker's CPU (see
    :class:`UtilizationWindow`).
    """

    def __init__(
        self, prices: Prices, clock: Callable[[], float] = time.monotonic, machine: MachineState | None = None
    ) -> None:
        self.prices = prices
        self.clock = clock
        self.window = UtilizationWindow(prices.window_seconds, prices.vcpus, clock, machine)
        self.started = clock()

    def utilization(self) -> float:
        """Measured utilization R over the trailing window, before clamping."""
        return self.window.utilization()

    def provisioned_usd(self) -> float:
        """What the provisioned CPU and memory have cost since the meter started."""
        return self.prices.provisioned_usd_per_second * (self.clock() - self.started)

    def charge(self, cpu_seconds: float, network_bytes: int) -> CostBreakdown:
        """Price a request that used ``cpu_seconds`` and moved ``network_bytes``; records its CPU."""
        return self._price(cpu_seconds, network_bytes, self.window.add(cpu_seconds))

    def predict(self, cpu_seconds: float, network_bytes: int = 0) -> float:
        """What a request using ``cpu_seconds`` and moving ``network_bytes`` would cost now, in USD (not recorded)."""
        return self._price(cpu_seconds, network_bytes, self.window.utilization()).usd

    def _price(self, cpu_seconds: float, network_bytes: int, measured_utilization: float) -> CostBreakdown:
        utilization = min(max(measured_utilization, self.prices.min_utilization), 1.0)
        memory_gb_seconds = cpu_seconds * self.prices.memory_gb / self.prices.vcpus
        cpu_usd = self.prices.vcpu_hour_usd / 3600.0 * cpu_seconds / utilization
        memory_usd = self.prices.memory_gb_hour_usd / 3600.0 * memory_gb_seconds / utilization
        network_usd = self.prices.network_gb_usd * network_bytes / GB
        return CostBreakdown(
            usd=cpu_usd + memory_usd + network_usd,
            cpu_usd=cpu_usd,
            memory_usd=memory_usd,
            network_usd=network_usd,
            cpu_seconds=cpu_seconds,
            memory_gb_seconds=memory_gb_seconds,
            network_bytes=network_bytes,
            utilization=utilization,
        )
