"""The model repository served end to end: several models at once, NOT_FOUND, top_k, hot reload, failures.

Real servers on port 0, real TensorFlow and LiteRT: a gray 28x28 digits model (the
session's trained one) beside an RGB 32x32 model imported through the importer.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import REPO_ROOT, RGB_CLASSES, RunningServer
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import png
from PIL import Image, ImageOps

from costserve.v1 import classifier_pb2 as pb
from costserve.v1 import classifier_pb2_grpc as pb_grpc


def _copy_version(source: Path, model_dir: Path, version: str) -> Path:
    """Publish a copy of ``source`` as ``model_dir/version`` the way writers do: build aside, then rename."""
    from costserve.server.repository.store import METADATA_FILE, ModelMetadata

    staging = model_dir / f".{version}-copy"
    shutil.copytree(source, staging)
    metadata = ModelMetadata.from_json((staging / METADATA_FILE).read_text())
    metadata_dict = metadata.to_json().replace(f'"version": "{metadata.version}"', f'"version": "{version}"')
    (staging / METADATA_FILE).write_text(metadata_dict)
    staging.rename(model_dir / version)
    return model_dir / version


@pytest.fixture
def repository_copy(repository: Path, tmp_path: Path) -> Path:
    """A copy of the repository a test may change."""
    shutil.copytree(repository, tmp_path / "repository")
    return tmp_path / "repository"


@pytest.fixture
def stub_of() -> Iterator[Callable[[RunningServer], pb_grpc.ClassifierStub]]:
    channels: list[grpc.Channel] = []

    def stub(server: RunningServer) -> pb_grpc.ClassifierStub:
        channel = grpc.insecure_channel(server.target)
        channels.append(channel)
        return pb_grpc.ClassifierStub(channel)

    yield stub
    for channel in channels:
        channel.close()


def _digit(label: int) -> pb.Image:
    """The sample digit ``label`` as an encoded image."""
    return pb.Image(encoded=(REPO_ROOT / "examples" / "digits" / f"digit_{label}.png").read_bytes())


def _rgb_request(pixels: np.ndarray, **fields: Any) -> pb.PredictRequest:
    return pb.PredictRequest(images=[pb.Image(encoded=png(pixels))], model_name="shapes", **fields)


def test_two_models_at_once_with_their_own_batchers_and_caches(
    start_server: Callable[..., RunningServer],
    repository: Path,
    rgb_source: tuple[Path, Path, Any],
    stub_of: Callable[[RunningServer], pb_grpc.ClassifierStub],
) -> None:
    server = start_server(model_dir=None, model_repository=repository)
    stub = stub_of(server)
    listing = stub.ListModels(pb.ListModelsRequest(), timeout=10)
    assert [(model.name, model.is_default) for model in listing.models] == [("digits", True), ("shapes", False)]
    assert all(
        [(version.version, version.state) for version in model.versions] == [("1", pb.VersionStatus.STATE_AVAILABLE)]
        for model in listing.models
    )

    digits_png = (REPO_ROOT / "examples" / "digits" / "digit_3.png").read_bytes()
    digits = stub.Predict(pb.PredictRequest(images=[pb.Image(encoded=digits_png)]), timeout=30)
    assert (digits.model_name, len(digits.predictions[0].probabilities)) == ("digits", 10)
    assert digits.predictions[0].label_name == "3"

    # The same PNG to the RGB model: decoded to its own shape, keyed under its own name.
    shapes = stub.Predict(pb.PredictRequest(images=[pb.Image(encoded=digits_png)], model_name="shapes"), timeout=30)
    assert (shapes.model_name, len(shapes.predictions[0].probabilities)) == ("shapes", RGB_CLASSES)
    assert not shapes.predictions[0].cache_hit
    again = stub.Predict(pb.PredictRequest(images=[pb.Image(encoded=digits_png)], model_name="shapes"), timeout=30)
    assert again.predictions[0].cache_hit

    core = server.core
    digits_batchers, shapes_batchers = core.models["digits"]["1"].batchers, core.models["shapes"]["1"].batchers
    assert not set(map(id, digits_batchers.values())) & set(map(id, shapes_batchers.values()))
    assert {key.model for key in core.cache._entries} == {"digits", "shapes"}
    assert server.metric("costserve_requests_total", {"model": "shapes", "code": "OK"}) == 2
    assert server.metric("costserve_requests_total", {"model": "digits", "code": "OK"}) == 1
    assert server.metric("costserve_images_total", {"model": "shapes", "cache": "hit"}) == 1

    info = stub.GetModelInfo(pb.GetModelInfoRequest(model_name="shapes"), timeout=10)
    assert (list(info.input_shape), info.preprocessing.resize, info.preprocessing.output) == (
        [32, 32, 3],
        "crop",
        "logits",
    )


def test_fp32_answers_equal_keras_on_the_same_image(
    start_server: Callable[..., RunningServer],
    repository: Path,
    rgb_source: tuple[Path, Path, Any],
    stub_of: Callable[[RunningServer], pb_grpc.ClassifierStub],
) -> None:
    """Crop of a wide PNG, [-1, 1] scaling and logits, applied by the server as the test applies them by hand."""
    _, _, keras_model = rgb_source
    server = start_server(model_dir=None, model_repository=repository)
    wide = np.random.default_rng(11).integers(0, 256, (40, 64, 3), dtype=np.uint8)
    answer = stub_of(server).Predict(_rgb_request(wide, precision=pb.PRECISION_FP32), timeout=30)

    cropped = ImageOps.fit(Image.fromarray(wide), (32, 32), Image.Resampling.BILINEAR)
    x = (np.asarray(cropped, dtype=np.float32) / np.float32(255))[None] * 2 - 1
    logits = np.asarray(keras_model(x))[0]
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose(answer.predictions[0].probabilities, expected, atol=1e-4)


def test_unknown_model_and_version_are_not_found_naming_what_exists(
    start_server: Callable[..., RunningServer],
    repository: Path,
    stub_of: Callable[[RunningServer], pb_grpc.ClassifierStub],
) -> None:
    server = start_server(model_dir=None, model_repository=repository)
    stub = stub_of(server)
    image = _digit(1)
    with pytest.raises(grpc.RpcError) as unknown_model:
        stub.Predict(pb.PredictRequest(images=[image], model_name="cats"), timeout=10)
    assert unknown_model.value.code() is grpc.StatusCode.NOT_FOUND
    assert "'cats'" in unknown_model.value.details() and "digits, shapes" in unknown_model.value.details()

    with pytest.raises(grpc.RpcError) as unknown_version:
        stub.Predict(pb.PredictRequest(images=[image], model_name="digits", model_version="7"), timeout=10)
    assert unknown_version.value.code() is grpc.StatusCode.NOT_FOUND
    assert "'7'" in unknown_version.value.details() and "versions served: 1" in unknown_version.value.details()

    with pytest.raises(grpc.RpcError) as info:
        stub.GetModelInfo(pb.GetModelInfoRequest(model_name="cats"), timeout=10)
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
    assert server.metric("costserve_rejected_total", {"reason": "not_found"}) == 3
    assert stub.Predict(pb.PredictRequest(images=[image], model_version="1"), timeout=30).model_name == "digits"


def test_top_k_trims_to_the_most_probable_classes(
    start_server: Callable[..., RunningServer],
    repository: Path,
    stub_of: Callable[[RunningServer], pb_grpc.ClassifierStub],
) -> None:
    server = start_server(model_dir=None, model_repository=repository)
    stub = stub_of(server)
    image = _digit(7)
    full = stub.Predict(pb.PredictRequest(images=[image], precision=pb.PRECISION_FP32), timeout=30).predictions[0]
    top = stub.Predict(pb.PredictRequest(images=[image], precision=pb.PRECISION_FP32, top_k=3), timeout=30)
    prediction = top.predictions[0]
    order = np.argsort(-np.asarray(full.probabilities), kind="stable")[:3]
    assert list(prediction.classes) == order.tolist()
    np.testing.assert_allclose(prediction.probabilities, np.asarray(full.probabilities)[order], rtol=1e-6)
    assert (prediction.label, prediction.label_name) == (full.label, full.label_name) == (order[0], "7")
    assert not full.classes
    assert top.ByteSize() < stub.Predict(pb.PredictRequest(images=[image]), timeout=30).ByteSize()
    with pytest.raises(grpc.RpcError) as negative:
        stub.Predict(pb.PredictRequest(images=[image], top_k=-1), timeout=10)
    assert negative.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def _wait_for(condition: Callable[[], Any], what: str, timeout_s: float = 120) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _states(stub: pb_grpc.ClassifierStub, name: str) -> dict[str, tuple[int, str]]:
    listing = stub.ListModels(pb.ListModelsRequest(), timeout=10)
    model = next((model for model in listing.models if model.name == name), None)
    return {} if model is None else {version.version: (version.state, version.reason) for version in model.versions}


@pytest.mark.slow
def test_a_new_version_switches_in_under_load_with_no_failed_request(
    start_server: Callable[..., RunningServer],
    repository_copy: Path,
    stub_of: Callable[[RunningServer], pb_grpc.ClassifierStub],
) -> None:
    """``costserve loadtest`` at a steady rate while version 2 appears: no request fails, answers switch in time.

    "In time" is checked by order, not by a clock bound: the first repository scan begun after the
    version was published finds it, and once the listing says it is AVAILABLE every answer comes from it.
    """
    from costserve.cli import main as costserve_main

    poll_s = 0.5
    server = start_server(model_dir=None, model_repository=repository_copy, poll_seconds=poll_s)
    manager = server.server.repository
    assert manager is not None
    stub = stub_of(server)
    report_path = repository_copy.parent / "loadtest.json"
    load_args = [
        "loadtest", "--target", server.target, "--rate", "40", "--duration", "12", "--warmup", "0",
        "--json", str(report_path),
    ]  # fmt: skip
    outcome: dict[str, int] = {}
    load = threading.Thread(target=lambda: outcome.update(code=costserve_main(load_args)), name="loadtest")
    load.start()
    time.sleep(3)
    _copy_version(repository_copy / "digits" / "1", repository_copy / "digits", "2")
    published_at = time.monotonic()
    scans_before = manager.scans  # read after the rename: scan scans_before + 1 begins after it
    image = _digit(2)
    health_channel = grpc.insecure_channel(server.target)
    health = health_pb2_grpc.HealthStub(health_channel)

    def switched() -> float | bool:
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING, "health left SERVING during the reload"
        listed_available = _states(stub, "digits").get("2", (0, ""))[0] == pb.VersionStatus.STATE_AVAILABLE
        answered_by = stub.Predict(pb.PredictRequest(images=[image]), timeout=10).model_version
        assert answered_by == "2" or not listed_available, "version 2 was listed AVAILABLE but did not answer"
        return answered_by == "2" and time.monotonic()

    switched_at = _wait_for(switched, "answers from version 2")
    _wait_for(lambda: set(_states(stub, "digits")) == {"2"} and switched(), "version 1 unloaded")
    health_channel.close()
    load.join(timeout=120)
    assert outcome.get("code") == 0, f"loadtest exited {outcome}"

    load_s = manager.load_seconds[("digits", "2")]
    print(
        f"version 2 answered {switched_at - published_at:.2f} s after it was published "
        f"(poll {poll_s} s, load {load_s:.2f} s)"
    )
    assert manager.found_in_scan[("digits", "2")] <= scans_before + 1, (manager.found_in_scan, scans_before)
    (step,) = json.loads(report_path.read_text())["steps"]
    assert step["requests"] > 200
    assert step["errors"] == {}, step
    assert server.metric("costserve_requests_total", {"model": "digits", "code": "OK"}) >= step["requests"]
    assert server.metric("costserve_requests_total", {"code": "UNAVAILABLE"}) == 0


def test_a_corrupt_version_fails_and_leaves_serving_untouched(
    start_server: Callable[..., RunningServer],
    repository_copy: Path,
    stub_of: Callable[[RunningServer], pb_grpc.ClassifierStub],
    caplog: pytest.LogCaptureFixture,
) -> None:
    (repository_copy / "digits" / "notes").mkdir()  # not a version: ignored, with a warning
    server = start_server(model_dir=None, model_repository=repository_copy, poll_seconds=0.2)
    assert "model digits: notes is not a version" in caplog.text
    stub = stub_of(server)
    broken = _copy_version(repository_copy / "digits" / "1", repository_copy / "digits", "2")
    (broken / "saved_model" / "saved_model.pb").write_bytes(b"not a saved model")
    (broken / "model_int8.tflite").unlink()

    states = _wait_for(
        lambda: (states := _states(stub, "digits")).get("2", (0, ""))[0] == pb.VersionStatus.STATE_FAILED and states,
        "version 2 marked failed",
    )
    assert states["1"][0] == pb.VersionStatus.STATE_AVAILABLE
    assert states["2"][1], "a failed version says why"
    image = _digit(5)
    answer = stub.Predict(pb.PredictRequest(images=[image]), timeout=30)
    assert (answer.model_version, answer.predictions[0].label_name) == ("1", "5")
    assert server.metric("costserve_model_load_failures_total", {"model": "digits"}) == 1
    assert server.metric("costserve_model_versions", {"model": "digits", "state": "failed"}) == 1

    # A version that goes away is forgotten; the shapes model was never disturbed.
    shutil.rmtree(broken)
    _wait_for(lambda: "2" not in _states(stub, "digits"), "the removed failed version forgotten")
    assert server.metric("costserve_model_versions", {"model": "digits", "state": "failed"}) == 0

    # A whole model that only failed, then removed, leaves no version counts behind.
    lone = repository_copy / "lone"
    _copy_version(repository_copy / "digits" / "1", lone, "1")
    (lone / "1" / "model_int8.tflite").write_bytes(b"not a model")
    _wait_for(lambda: _states(stub, "lone").get("1", (0, ""))[0] == pb.VersionStatus.STATE_FAILED, "lone failed")
    assert server.metric("costserve_model_versions", {"model": "lone", "state": "failed"}) == 1
    shutil.rmtree(lone)
    _wait_for(lambda: not _states(stub, "lone"), "the removed model forgotten")
    assert server.metric("costserve_model_versions", {"model": "lone"}) == 0
    assert _states(stub, "shapes") == {"1": (pb.VersionStatus.STATE_AVAILABLE, "")}


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_rss_stops_growing_over_twenty_load_unload_cycles(repository_copy: Path) -> None:
    """A server process reloads digits 20 times on SIGHUP; its resident memory ends within 10% of where it started.

    A version's runtimes hold ~19 MiB, so one leaked per reload would pass the bound many times
    over. Without the fixed mmap threshold (:mod:`costserve.server.memory`) the C heap kept
    ~18 MiB after the first few reloads and this failed.
    """
    from benchmarks.launch import start_costserve

    shutil.rmtree(repository_copy / "shapes")
    digits = repository_copy / "digits"
    pristine = repository_copy.parent / "digits-1"
    shutil.copytree(digits / "1", pristine)
    channel: grpc.Channel | None = None
    flags = ("--poll-seconds", "0")
    with start_costserve(None, *flags, name="reload-rss", serving=True, repository=repository_copy) as server:
        channel = grpc.insecure_channel(server.target)
        stub = pb_grpc.ClassifierStub(channel)
        image = _digit(4)
        stub.Predict(pb.PredictRequest(images=[image]), timeout=30)
        started = _rss_bytes(server.pid)
        for cycle in range(2, 22):
            _copy_version(pristine, digits, str(cycle))
            shutil.rmtree(digits / str(cycle - 1))
            os.kill(server.pid, signal.SIGHUP)
            _wait_for(
                lambda cycle=cycle: _states(stub, "digits") == {str(cycle): (pb.VersionStatus.STATE_AVAILABLE, "")},
                f"cycle {cycle}",
            )
            answer = stub.Predict(pb.PredictRequest(images=[image], skip_cache=True), timeout=30)
            assert answer.model_version == str(cycle)
        ended = _rss_bytes(server.pid)
        print(f"RSS {started / 2**20:.0f} MiB before 20 reloads, {ended / 2**20:.0f} MiB after")
        channel.close()
    assert ended <= started * 1.10, f"RSS {started / 2**20:.0f} MiB -> {ended / 2**20:.0f} MiB after 20 reloads"


def test_an_fp32_only_version_is_served_and_described_as_such(
    start_server: Callable[..., RunningServer],
    repository_copy: Path,
    stub_of: Callable[[RunningServer], pb_grpc.ClassifierStub],
) -> None:
    """A version published without int8 (as the importer does when int8 loses too much) serves AUTO and fp32."""
    version_dir = repository_copy / "shapes" / "1"
    metadata = json.loads((version_dir / "metadata.json").read_text())
    del metadata["variants"]["int8"]
    metadata["int8_agreement"] = None
    (version_dir / "metadata.json").write_text(json.dumps(metadata))
    (version_dir / "model_int8.tflite").unlink()
    server = start_server(model_dir=None, model_repository=repository_copy, policy="cost_first")
    stub = stub_of(server)
    pixels = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    answer = stub.Predict(_rgb_request(pixels), timeout=30)
    assert (answer.predictions[0].precision, answer.decision_reason) == (pb.PRECISION_FP32, "cost_first")
    with pytest.raises(grpc.RpcError) as int8:
        stub.Predict(_rgb_request(pixels, precision=pb.PRECISION_INT8), timeout=10)
    assert int8.value.code() is grpc.StatusCode.FAILED_PRECONDITION and "no int8 variant" in int8.value.details()
    info = stub.GetModelInfo(pb.GetModelInfoRequest(model_name="shapes"), timeout=10)
    assert [variant.precision for variant in info.variants] == [pb.PRECISION_FP32]
    assert not info.HasField("int8_agreement")
    assert server.metric("costserve_model_info", {"name": "shapes"}) == 1


def test_a_policy_that_selects_only_a_failed_version_keeps_the_serving_one(
    start_server: Callable[..., RunningServer],
    repository_copy: Path,
    stub_of: Callable[[RunningServer], pb_grpc.ClassifierStub],
) -> None:
    server = start_server(model_dir=None, model_repository=repository_copy, poll_seconds=0.2)
    stub = stub_of(server)
    broken = _copy_version(repository_copy / "digits" / "1", repository_copy / "digits", "2")
    (broken / "saved_model" / "saved_model.pb").write_bytes(b"not a saved model")
    (broken / "model_fp32.tflite").write_bytes(b"not a LiteRT model")
    (repository_copy / "digits" / "model.toml").write_text('version_policy = "specific"\nversions = [2]\n')
    _wait_for(lambda: _states(stub, "digits").get("2", (0, ""))[0] == pb.VersionStatus.STATE_FAILED, "version 2 failed")
    time.sleep(0.5)  # a few more polls: none of them may switch version 1 out
    assert _states(stub, "digits")["1"] == (pb.VersionStatus.STATE_AVAILABLE, "")
    assert stub.Predict(pb.PredictRequest(images=[_digit(3)]), timeout=30).model_version == "1"
