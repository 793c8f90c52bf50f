"""The real `costserve-server serve` process: start-up, its ready file, health, and a SIGTERM drain under load."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import EXAMPLES

from benchmarks.launch import ServerProcess, start_costserve
from costserve import Client, image_message, metrics_text
from costserve.v1 import classifier_pb2 as pb
from costserve.v1 import classifier_pb2_grpc as pb_grpc


@pytest.fixture
def served(model_dir: Path) -> Iterator[ServerProcess]:
    server = start_costserve(model_dir, serving=True)
    try:
        yield server
    finally:
        server.kill()


def _wait_for_calls(server: ServerProcess, calls: int) -> None:
    """Wait until the server's gRPC has received ``calls`` calls (channelz, through /metrics)."""
    deadline = time.monotonic() + 60
    while metrics_text.total(metrics_text.scrape(server.metrics_url), "costserve_grpc_calls_started_total") < calls:
        assert time.monotonic() < deadline, f"the server never received {calls} calls"
        time.sleep(0.05)


def test_sigterm_during_a_burst_answers_every_accepted_request_and_exits_0(model_dir: Path) -> None:
    # Calls the server received before SIGTERM are taken up within the drain grace, however
    # loaded the host: 5 s is far more than that takes.
    served = start_costserve(model_dir, "--drain-grace-seconds", "5", metrics=True, serving=True)
    try:
        _sigterm_during_a_burst(served)
    finally:
        served.kill()


def _sigterm_during_a_burst(served: ServerProcess) -> None:
    channel = grpc.insecure_channel(served.target)
    stub = pb_grpc.ClassifierStub(channel)
    request = pb.PredictRequest(images=[image_message(EXAMPLES[8])], precision=pb.PRECISION_FP32, skip_cache=True)
    streams = 32
    per_stream = 40
    first_answers = threading.Barrier(streams + 1)
    signal_sent = threading.Event()
    results: list[list[int]] = [[] for _ in range(streams)]
    errors: list[BaseException] = []

    def stream_requests(index: int) -> None:
        def messages() -> Iterator[pb.PredictRequest]:
            yield request
            signal_sent.wait(timeout=60)  # the rest are sent on accepted streams, during the drain
            for _ in range(per_stream - 1):
                yield request

        try:
            for response in stub.PredictStream(messages(), timeout=120):
                results[index].append(response.predictions[0].label)
                if len(results[index]) == 1:
                    first_answers.wait(timeout=60)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    workers = [threading.Thread(target=stream_requests, args=(index,)) for index in range(streams)]
    for worker in workers:
        worker.start()
    # Also in flight: unary calls started before the signal.
    unary = [stub.Predict.future(request, timeout=120) for _ in range(100)]
    first_answers.wait(timeout=60)
    _wait_for_calls(served, streams + len(unary))  # sent before SIGTERM, and on the server's side of the wire
    served.process.send_signal(signal.SIGTERM)
    signal_sent.set()
    for worker in workers:
        worker.join(timeout=120)
    exit_code = served.process.wait(timeout=120)
    outcomes = [future.exception(timeout=60) for future in unary]
    channel.close()

    assert not errors, f"accepted streams lost answers: {errors[:3]}\n{served.log}"
    assert [len(answers) for answers in results] == [per_stream] * streams
    assert {label for answers in results for label in answers} == {8}
    assert outcomes == [None] * len(unary), "unary calls sent before SIGTERM were not all answered"
    assert {future.result().predictions[0].label for future in unary} == {8}
    assert exit_code == 0, served.log
    assert "draining" in served.log and "stopped" in served.log


def test_new_calls_are_refused_after_the_drain(served: ServerProcess) -> None:
    with Client(served.target, timeout=10) as client:
        assert client.health() == "SERVING"
        served.process.send_signal(signal.SIGINT)
        assert served.process.wait(timeout=60) == 0
        with pytest.raises(grpc.RpcError) as error:
            client.predict(EXAMPLES[:1], timeout=5)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE


def test_serve_trains_the_default_model_when_none_exists(tmp_path: Path) -> None:
    model_dir = tmp_path / "fresh"
    server = start_costserve(model_dir)
    try:
        # Bound, model not ready yet; /metrics is off unless asked for.
        assert server.ready() == {
            "pid": server.pid,
            "host": "127.0.0.1",
            "port": server.port,
            "metrics_port": 0,
            "serving": False,
        }
        with Client(server.target, timeout=10) as client:
            assert client.health() == "NOT_SERVING"
        server.wait_serving(300)
        assert (model_dir / "1" / "metadata.json").is_file()
        with Client(server.target, timeout=10) as client:
            assert client.health() == "SERVING"
            assert client.predict(EXAMPLES[6:7]).predictions[0].label == 6
    finally:
        server.kill()


def test_ready_file_carries_the_bound_ports_and_goes_when_the_drain_starts(model_dir: Path) -> None:
    server = start_costserve(model_dir, "--drain-grace-seconds", "2", metrics=True, serving=True)
    try:
        assert server.port > 0 and server.metrics_port > 0
        assert server.ready() == {
            "pid": server.pid,
            "host": "127.0.0.1",
            "port": server.port,
            "metrics_port": server.metrics_port,
            "serving": True,
        }
        with Client(server.target, timeout=10) as client:
            assert client.health() == "SERVING"
        assert "costserve_provisioned_cost_usd_total" in metrics_text.scrape(server.metrics_url)
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while server.ready() is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.ready() is None, "the ready file outlived the start of the drain"
        assert server.process.poll() is None, "removed only at exit, not when the drain started"
        assert server.process.wait(timeout=60) == 0
    finally:
        server.kill()
