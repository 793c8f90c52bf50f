"""Several workers on one port (``--workers 2``), as real processes: sharing the port, a worker killed
under load, the drain, and cost and budgets counted for the machine.

Each test starts ``costserve-server serve --workers 2`` through the benchmarks' launcher; the
supervisor's ready file lists its workers (index, pid, loopback metrics port).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import EXAMPLES
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.launch import ServerProcess, start_costserve
from costserve.client import predict_request
from costserve.server.settings import Settings
from costserve.server.supervisor import available_cores, supervise, worker_count
from costserve.v1 import classifier_pb2 as pb
from costserve.v1 import classifier_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

#: Bound on every wait for the server, in seconds (start-up trains nothing: the model is in place).
WAIT_S = 120.0
#: Drain settings of the servers started here: a short grace keeps the tests quick.
DRAIN = ("--drain-grace-seconds", "0.5", "--drain-seconds", "10")


def _metric(url: str, name: str, labels: dict[str, str] | None = None) -> float:
    """The sum of ``name``'s samples at ``url`` (a /metrics endpoint) whose labels include ``labels``."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    wanted = (labels or {}).items()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and wanted <= sample.labels.items()
    )


def _worker_url(worker: dict[str, Any]) -> str:
    return f"http://127.0.0.1:{worker['metrics_port']}/metrics"


def _request(seed: int = 0) -> pb.PredictRequest:
    image = np.asarray(Image.open(EXAMPLES[seed % len(EXAMPLES)]))
    return predict_request([image], precision="fp32", skip_cache=True)


def _wait(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never {what} within {timeout_s:.0f} s")
        time.sleep(0.05)


@pytest.fixture
def workers(model_dir: Path, tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Factory: start ``--workers 2`` with extra flags; every server is stopped after the test."""
    started: list[ServerProcess] = []

    def start(*flags: str) -> ServerProcess:
        server = start_costserve(
            model_dir, "--workers", "2", *DRAIN, *flags, metrics=True, serving=True, timeout_s=WAIT_S
        )
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def test_two_workers_share_one_port_and_both_answer(workers: Callable[..., ServerProcess]) -> None:
    server = workers()
    ready = server.ready()
    assert ready is not None and ready["serving"]
    pids = {worker["pid"] for worker in ready["workers"]}
    assert len(pids) == 2 and server.pid not in pids
    sent = 60
    for sequence in range(sent):
        # A new connection each time: the kernel spreads connections, not calls, over the workers.
        with grpc.insecure_channel(server.target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            pb_grpc.ClassifierStub(channel).Predict(_request(sequence), timeout=30)
    answered = [_metric(_worker_url(worker), "costserve_requests_total", {"code": "OK"}) for worker in ready["workers"]]
    assert all(count > 0 for count in answered), f"a worker answered nothing: {answered}"
    assert sum(answered) == sent
    # The machine's /metrics sums the workers' counters and keeps what describes one worker per worker.
    assert _metric(server.metrics_url, "costserve_requests_total", {"code": "OK"}) == sent
    lags = [_metric(server.metrics_url, "costserve_event_loop_lag_seconds", {"worker": str(i)}) for i in (0, 1)]
    assert len(lags) == 2
    assert _metric(server.metrics_url, "costserve_workers") == 2


def _call_with_retry(target: str, request: pb.PredictRequest, statuses: list[grpc.StatusCode]) -> None:
    """One prediction; an UNAVAILABLE answer is recorded and retried (as gRPC clients retry it), up to 20 times."""
    for _ in range(20):
        with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            try:
                pb_grpc.ClassifierStub(channel).Predict(request, timeout=30, wait_for_ready=True)
            except grpc.RpcError as error:
                statuses.append(error.code())
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                time.sleep(0.05)
                continue
        statuses.append(grpc.StatusCode.OK)
        return
    raise AssertionError("a call was never answered in 20 tries")


def test_a_killed_worker_loses_only_its_calls_and_is_restarted(workers: Callable[..., ServerProcess]) -> None:
    server = workers()
    ready = server.ready()
    assert ready is not None
    victim = ready["workers"][0]["pid"]
    statuses: list[grpc.StatusCode] = []
    requests = [_request(sequence) for sequence in range(200)]
    killed = threading.Event()

    def call(index: int) -> None:
        if index == 60:
            os.kill(victim, signal.SIGKILL)
            killed.set()
        _call_with_retry(server.target, requests[index], statuses)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(call, range(len(requests))))  # raises if any call failed other than UNAVAILABLE
    assert killed.is_set()
    assert set(statuses) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
    assert statuses.count(grpc.StatusCode.OK) == len(requests)

    def restarted() -> bool:
        now = server.ready()
        return bool(now and now["serving"] and now["workers"][0]["pid"] not in (0, victim))

    _wait(restarted, "restarted the killed worker")
    assert _metric(server.metrics_url, "costserve_worker_restarts_total", {"worker": "0"}) == 1
    # The restarted worker answers too.
    _call_with_retry(server.target, requests[0], statuses)


def test_sigterm_drains_every_worker_and_loses_no_accepted_call(workers: Callable[..., ServerProcess]) -> None:
    server = workers()
    outcomes: list[grpc.StatusCode] = []
    stop = threading.Event()

    def load(seed: int) -> None:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.ClassifierStub(channel)
            sequence = 0
            while not stop.is_set() and sequence < 2000:
                sequence += 1
                try:
                    stub.Predict(_request(seed + sequence), timeout=30)
                    outcomes.append(grpc.StatusCode.OK)
                except grpc.RpcError as error:
                    outcomes.append(error.code())
                    if error.code() == grpc.StatusCode.UNAVAILABLE:
                        return  # refused after the drain began: a client retries it elsewhere

    threads = [threading.Thread(target=load, args=(seed * 1000,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    _wait(lambda: len(outcomes) >= 50, "answered 50 calls")
    exit_code = server.stop(timeout_s=60)
    stop.set()
    for thread in threads:
        thread.join(60)
    assert exit_code == 0
    assert set(outcomes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, set(outcomes)
    assert outcomes.count(grpc.StatusCode.OK) >= 50


def test_workers_exit_when_their_supervisor_is_killed(workers: Callable[..., ServerProcess]) -> None:
    server = workers()
    ready = server.ready()
    assert ready is not None
    pids = [worker["pid"] for worker in ready["workers"]]
    server.kill()  # SIGKILL: no drain is passed on; the kernel tells each worker its parent died

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    _wait(lambda: all(gone(pid) for pid in pids), "stopped the workers of a killed supervisor")


def test_auto_is_one_worker_per_core_within_a_containers_cpu_quota(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    assert available_cores(tmp_path) == cores  # no cgroup files: the affinity
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cores(tmp_path) == cores
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs
    assert available_cores(tmp_path) == min(cores, 2)
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert available_cores(tmp_path) == 1
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")  # cgroup v1: 1 CPU
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cores(tmp_path) == 1
    assert worker_count("3") == 3


def test_files_that_cannot_be_used_stop_the_supervisor_before_any_worker(model_dir: Path, tmp_path: Path) -> None:
    budgets = tmp_path / "budgets.toml"
    budgets.write_text("[tenants.acme]\n")  # no budget
    settings = Settings(model_dir=model_dir, port=0, metrics_port=-1, budgets=budgets)
    assert supervise(settings, 2) == 2


def test_a_budget_holds_across_two_workers(workers: Callable[..., ServerProcess], tmp_path: Path) -> None:
    budgets = tmp_path / "budgets.toml"
    budgets.write_text("[tenants.acme]\nusd_per_day = 0.00002\n")
    server = workers("--budgets", str(budgets))
    statuses: list[grpc.StatusCode] = []
    lock = threading.Lock()

    def call(sequence: int) -> None:
        with grpc.insecure_channel(server.target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            try:
                pb_grpc.ClassifierStub(channel).Predict(
                    _request(sequence), timeout=30, metadata=[("x-costserve-tenant", "acme")]
                )
                code = grpc.StatusCode.OK
            except grpc.RpcError as error:
                code = error.code()
        with lock:
            statuses.append(code)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(call, range(120)))
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in statuses
    ready = server.ready()
    assert ready is not None
    per_worker = [
        _metric(_worker_url(worker), "costserve_tenant_spend_usd_total", {"tenant": "acme"})
        for worker in ready["workers"]
    ]
    assert all(spent > 0 for spent in per_worker), f"one worker served the tenant alone: {per_worker}"
    spent = _metric(server.metrics_url, "costserve_tenant_spend_usd_total", {"tenant": "acme"})
    assert spent == pytest.approx(sum(per_worker))
    most = _metric(server.metrics_url, "costserve_request_cost_usd_sum") / max(
        _metric(server.metrics_url, "costserve_request_cost_usd_count"), 1
    )
    # Spend may pass the budget only by the calls admitted before it was crossed: one in flight per
    # concurrent client, never a budget per worker.
    assert spent <= 0.00002 + 4 * 3 * most, (spent, per_worker)


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("taken", ["--port", "--metrics-port"])
def test_a_port_in_use_is_a_one_line_error_leaving_nothing_behind(
    model_dir: Path, tmp_path: Path, workers: str, taken: str
) -> None:
    """A port another process holds: exit 2 naming the address and the flag to change, no traceback, and
    (with workers) no scratch directory left in the temporary directory."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = str(holder.getsockname()[1])
        ports = {"--port": "0", "--metrics-port": "0", taken: port}
        done = subprocess.run(
            [
                sys.executable, "-m", "costserve.server.cli", "serve", "--model-dir", str(model_dir),
                "--host", "127.0.0.1", *(item for flag, value in ports.items() for item in (flag, value)),
                "--workers", workers,
            ],
            env={**os.environ, "TMPDIR": str(scratch)}, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("costserve-server: ")]
    assert f"127.0.0.1:{port}" in line and f"choose another {taken}" in line
    assert "Traceback" not in done.stderr
    assert not any(scratch.iterdir()), list(scratch.iterdir())
