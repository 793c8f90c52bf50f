"""Several serving processes on one port: the supervisor of ``--workers N``.

One Python process is bound by its event loop: one core. With ``--workers N`` the
supervisor runs N worker processes, each a whole costserve server (event loop,
batchers, runtimes, cache), all listening on the same gRPC port with ``SO_REUSEPORT``:
the kernel spreads new connections over them. The supervisor itself serves no RPC. It:

* reserves the port first (a bound, never listening ``SO_REUSEPORT`` socket), so that
  ``--port 0`` names one port for every worker and no other program takes it while a
  worker restarts;
* trains the default model, when the repository has none, once, before any worker starts;
* creates the machine's shared state (:mod:`~costserve.server.machine`): the CPU every
  worker attributed (the utilization R that prices requests is the machine's) and each
  tenant's spend (a budget holds across workers), and each worker's serving flag (health
  says SERVING when every worker does);
* restarts a worker that exits unasked, after a backoff (0.5 s, doubling up to 30 s;
  back to 0.5 s once a worker has run for a minute), logged and counted in
  ``costserve_worker_restarts_total``;
* serves the machine's one ``/metrics`` on ``--metrics-port``: every worker's metrics,
  scraped from its own loopback endpoint and merged (:mod:`~costserve.server.metrics_merge`);
* on SIGTERM or SIGINT passes the signal on: each worker drains as a single server does
  (no accepted call is lost), and the supervisor exits 0 once all have exited.

Its ``--ready-file`` holds what a single server's does (the supervisor's pid, the port,
the machine's metrics port, ``serving`` once every worker is SERVING) and ``workers``:
each worker's index, pid and loopback metrics port.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import math
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from costserve.server.app import prepare_models, serve, start_metrics_endpoint, write_ready_file
from costserve.server.budgets import load_budgets
from costserve.server.cost import CostMeter, load_prices
from costserve.server.errors import CostserveError, StartupError
from costserve.server.machine import MachineState
from costserve.server.metrics_http import MetricsHttpServer
from costserve.server.metrics_merge import WorkerEndpoint, WorkerMetrics
from costserve.server.settings import Settings

log = logging.getLogger(__name__)

#: First wait before restarting a worker that exited unasked, in seconds; doubled at each
#: restart in a row, up to :data:`MAX_BACKOFF_S`.
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
#: prctl(2)'s option that sends a signal to a process when its parent dies.
PR_SET_PDEATHSIG = 1
#: A worker that ran this long before exiting restarts after :data:`FIRST_BACKOFF_S` again, in seconds.
STABLE_AFTER_S = 60.0
#: How often the supervisor looks at its workers, in seconds.
WATCH_INTERVAL_S = 0.1
#: Time a worker may take beyond its drain (--drain-grace-seconds + --drain-seconds) before it is
#: killed, in seconds.
EXIT_MARGIN_S = 10.0


def worker_count(value: str) -> int:
    """``--workers``: a positive number, or ``auto`` for one per core this process may use."""
    if value.strip().lower() == "auto":
        return available_cores()
    count = int(value)
    if count < 1:
        raise ValueError(f"--workers must be at least 1 or auto, got {value!r}")
    return count


def available_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may use: its CPU affinity, capped by a container's CPU quota (cgroup v2 ``cpu.max``,
    or v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), rounded up; at least 1.

    A container limited to 2 CPUs on a 64-core node sees 64 cores in its affinity: 64 workers
    would each load the models and fight over 2 CPUs.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota: float | None = None
    try:
        limit, period = (cgroup / "cpu.max").read_text().split()[:2]
        if limit != "max":
            quota = int(limit) / int(period)
    except (OSError, ValueError):
        try:
            limit_us = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
            if limit_us > 0:
                quota = limit_us / int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            pass
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(cores, 1)


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with ``SO_REUSEPORT`` and never listening: the workers bind the same port.

    With ``port`` 0 the kernel picks a free one (read it from ``getsockname()``).
    """
    host = host.strip("[]")  # an IPv6 address as gRPC takes it, [::]
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    reserved = socket.socket(family, socket.SOCK_STREAM)
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        reserved.bind((host, port))
    except OSError:
        reserved.close()
        raise
    return reserved


@dataclass
class WorkerProcess:
    """One worker slot: its current process, and when and how often it was (re)started."""

    index: int
    process: BaseProcess | None = None
    ready_file: Path | None = None
    started_at: float = 0.0
    restarts_in_a_row: int = 0
    #: When to start it again after it exited unasked (monotonic seconds), or None.
    restart_at: float | None = None

    def metrics_port(self) -> int:
        """The worker's loopback /metrics port, once its ready file says it (0 before)."""
        if self.ready_file is None:
            return 0
        try:
            return int(json.loads(self.ready_file.read_text())["metrics_port"])
        except (OSError, ValueError, KeyError):
            return 0


def run_worker(settings_json: str, index: int, machine_name: str) -> None:
    """A worker process's entry point: one costserve server on the shared port, in slot ``index``."""
    from costserve.server.cli import configure_logging

    _exit_with_parent()
    settings = Settings.model_validate_json(settings_json)
    configure_logging(settings.log_level, f"worker {index}")
    machine = MachineState.attach(machine_name, index)
    asyncio.run(serve(settings, machine=machine))


def _exit_with_parent() -> None:
    """Have the kernel send this worker SIGTERM (a drain) when its supervisor dies, even by SIGKILL (Linux).

    Without it, a killed supervisor would leave its workers serving, and charging budgets into
    shared memory no new supervisor sees.
    """
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return  # not Linux: the supervisor's drain still stops its workers
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class Supervisor:
    """Runs ``settings.workers`` workers until SIGTERM or SIGINT; see the module docstring."""

    settings: Settings
    workers: int
    # Collectors without names (the merged workers' metrics) are asked for them when /metrics?name[]= filters.
    registry: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(support_collectors_without_names=True)
    )

    def __post_init__(self) -> None:
        self.restarts = Counter(
            "costserve_worker_restarts",
            "Workers restarted after exiting unasked (a crash, or killed), by worker index.",
            ["worker"],
            registry=self.registry,
        )
        self.running = Gauge("costserve_workers", "Worker processes running now.", registry=self.registry)
        self.slots = [WorkerProcess(index) for index in range(self.workers)]
        self.meter = CostMeter(load_prices(self.settings.prices))
        self._stopping = False
        self._ready: dict[str, Any] | None = None
        self._context = multiprocessing.get_context("spawn")
        #: The workers' ready files and the budgets' snapshot, made by :meth:`run` and removed when it ends.
        self._scratch = Path()

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT, then drain every worker; the exit status (0 when all drained).

        Raises :class:`StartupError` when the port cannot be had; what it made so far is undone either way.
        """
        self._install_signals()
        with contextlib.ExitStack() as undo:
            self._scratch = Path(tempfile.mkdtemp(prefix="costserve-workers-"))
            undo.callback(shutil.rmtree, self._scratch, ignore_errors=True)
            try:
                reserved = reserve_port(self.settings.host, self.settings.port)
            except OSError as error:
                raise StartupError(
                    f"cannot listen on {self.settings.host}:{self.settings.port}: {error.strerror or error}; choose "
                    "another --port or --host (or stop the server using it)"
                ) from error
            undo.callback(reserved.close)
            port = reserved.getsockname()[1]
            prepare_models(self.settings)
            # Read from the snapshot every worker reads, so the shared memory's tenants are theirs.
            budgets_snapshot = self._snapshot(self.settings.budgets)
            budgets = load_budgets(budgets_snapshot)
            machine = MachineState.create(self.workers, sorted(budgets.tenants))
            undo.callback(machine.unlink)
            undo.callback(machine.close)
            worker_settings = self.settings.model_copy(
                update={
                    "port": port,
                    "workers": "1",
                    "ready_file": None,
                    # Every worker, restarted ones too, reads the budgets as they were at start: they match
                    # the tenants of the shared memory.
                    "budgets": budgets_snapshot,
                    # A worker's /metrics is for the supervisor only, on loopback; none when the machine has none.
                    "metrics_port": 0 if self.settings.metrics_port >= 0 else -1,
                    "metrics_tls_cert": None,
                    "metrics_tls_key": None,
                    "metrics_tls_client_ca": None,
                    "metrics_basic_auth": None,
                }
            )
            metrics = self._start_metrics()
            if metrics is not None:
                undo.callback(metrics.close)
            if self.settings.ready_file is not None:
                undo.callback(self.settings.ready_file.unlink, missing_ok=True)
            log.info(
                "supervising %d workers on %s:%d%s",
                self.workers,
                self.settings.host,
                port,
                f", metrics on {metrics.scheme}://{self.settings.host}:{metrics.port}/metrics" if metrics else "",
            )
            serving = False
            settings_json = worker_settings.model_dump_json()
            while not self._stopping:
                self._watch(settings_json, machine)
                if machine.all_serving() != serving:
                    serving = not serving
                    log.info("%s", "SERVING: every worker is" if serving else "NOT_SERVING: a worker is not serving")
                self._write_ready(port, metrics, serving)
                time.sleep(WATCH_INTERVAL_S)
            if self.settings.ready_file is not None:
                self.settings.ready_file.unlink(missing_ok=True)  # as a single server: gone once the drain starts
            return self._drain()

    def check_files(self) -> None:
        """Read every file a worker reads at start (prices, budgets, keys, TLS): one that cannot be used stops the
        supervisor with the reason, rather than failing each worker at every restart."""
        from costserve.server.auth import Authenticator
        from costserve.server.tls import ServerCertificates

        load_budgets(self.settings.budgets)  # the prices were read when the supervisor was made
        Authenticator.from_settings(self.settings)
        if self.settings.tls_cert is not None and self.settings.tls_key is not None:
            ServerCertificates(self.settings.tls_cert, self.settings.tls_key, self.settings.tls_client_ca)

    def _snapshot(self, path: Path | None) -> Path | None:
        """A copy of ``path`` in the supervisor's scratch directory (None for None)."""
        if path is None:
            return None
        copy = self._scratch / path.name
        shutil.copyfile(path, copy)
        return copy

    def _install_signals(self) -> None:
        def stop(signum: int, frame: Any) -> None:
            self._stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    def _start_metrics(self) -> MetricsHttpServer | None:
        if self.settings.metrics_port < 0:
            return None
        self.registry.register(WorkerMetrics(self._endpoints, provisioned_usd=self.meter.provisioned_usd))
        return start_metrics_endpoint(self.settings, self.registry, self.settings.host)

    def _endpoints(self) -> list[WorkerEndpoint]:
        """The workers running now, for the merged /metrics."""
        endpoints = []
        for slot in self.slots:
            port = slot.metrics_port()
            if slot.process is not None and slot.process.is_alive() and slot.process.pid and port:
                endpoints.append(WorkerEndpoint(slot.index, slot.process.pid, port))
        return endpoints

    def _watch(self, settings_json: str, machine: MachineState) -> None:
        """Start workers that are not running yet, and restart those that exited unasked, after their backoff."""
        now = time.monotonic()
        for slot in self.slots:
            process = slot.process
            if process is not None and process.exitcode is not None and slot.restart_at is None:
                machine.set_serving(False, worker=slot.index)  # it exited without saying so
                ran_s = now - slot.started_at
                slot.restarts_in_a_row = 0 if ran_s >= STABLE_AFTER_S else slot.restarts_in_a_row + 1
                backoff = min(FIRST_BACKOFF_S * 2 ** max(slot.restarts_in_a_row - 1, 0), MAX_BACKOFF_S)
                slot.restart_at = now + backoff
                log.warning(
                    "worker %d (pid %s) exited with %s after %.1f s: restarting in %.1f s",
                    slot.index,
                    process.pid,
                    process.exitcode,
                    ran_s,
                    backoff,
                )
            if process is None or (slot.restart_at is not None and now >= slot.restart_at):
                if process is not None:
                    self.restarts.labels(str(slot.index)).inc()
                self._start(slot, settings_json, machine.name)
        self.running.set(sum(1 for slot in self.slots if slot.process is not None and slot.process.is_alive()))

    def _start(self, slot: WorkerProcess, settings_json: str, machine_name: str) -> None:
        slot.ready_file = self._scratch / f"worker-{slot.index}.json"
        slot.ready_file.unlink(missing_ok=True)
        settings = json.loads(settings_json)
        settings["ready_file"] = str(slot.ready_file)
        process = self._context.Process(
            target=run_worker,
            args=(json.dumps(settings), slot.index, machine_name),
            name=f"costserve-worker-{slot.index}",
        )
        process.start()
        slot.process, slot.started_at, slot.restart_at = process, time.monotonic(), None
        log.info("worker %d started (pid %d)", slot.index, process.pid)

    def _drain(self) -> int:
        """Pass SIGTERM to every worker and wait until all have exited (killing those past their drain)."""
        log.info("draining %d workers", self.workers)
        alive = [slot.process for slot in self.slots if slot.process is not None and slot.process.is_alive()]
        for process in alive:
            if process.pid:
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.drain_grace_seconds + self.settings.drain_seconds + EXIT_MARGIN_S
        status = 0
        for process in alive:
            process.join(max(deadline - time.monotonic(), 0))
            if process.exitcode is None:
                log.warning("worker pid %s did not exit after its drain: killing it", process.pid)
                process.kill()
                process.join()
            if process.exitcode != 0:
                status = 1
        log.info("stopped")
        return status

    def _write_ready(self, port: int, metrics: MetricsHttpServer | None, serving: bool) -> None:
        """Write the ready file (atomically) when what it says changed."""
        ready_file = self.settings.ready_file
        if ready_file is None:
            return
        ready = {
            "pid": os.getpid(),
            "host": self.settings.host,
            "port": port,
            "metrics_port": metrics.port if metrics is not None else 0,
            "serving": serving,
            "workers": [
                {
                    "index": slot.index,
                    "pid": slot.process.pid if slot.process is not None else 0,
                    "metrics_port": slot.metrics_port(),
                }
                for slot in self.slots
            ],
        }
        if ready == self._ready:
            return
        self._ready = ready
        write_ready_file(ready_file, ready)


def supervise(settings: Settings, workers: int) -> int:
    """Run ``workers`` workers under a supervisor until SIGTERM or SIGINT; the process's exit status.

    Files that cannot be used (prices, budgets, keys, TLS) end it at once with status 2 and the reason.
    """
    try:
        supervisor = Supervisor(settings, workers)
        supervisor.check_files()
    except (ValueError, CostserveError) as error:
        print(f"costserve-server: {error}", file=sys.stderr)
        return 2
    try:
        status = supervisor.run()
    except StartupError as error:
        print(f"costserve-server: {error}", file=sys.stderr)
        return 2
    logging.shutdown()
    sys.stdout.flush()
    return status
