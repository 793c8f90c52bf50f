"""The service end to end: a real server on port 0, real gRPC calls, the real model."""

from __future__ import annotations

import dataclasses
import re
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import EXAMPLES, RunningServer
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from helpers import SpyRuntime
from PIL import Image

from costserve import Client, image_message
from costserve.server.domain import Precision
from costserve.server.repository.store import LoadedModel
from costserve.v1 import classifier_pb2 as pb
from costserve.v1 import classifier_pb2_grpc as pb_grpc


def _label_of(path: Path) -> int:
    return int(re.search(r"digit_(\d)", path.name).group(1))  # type: ignore[union-attr]


def _png(pixels: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _uint8(image: np.ndarray) -> np.ndarray:
    return (image[:, :, 0] * 255).round().astype(np.uint8)


def _stub(target: str) -> tuple[grpc.Channel, pb_grpc.ClassifierStub]:
    channel = grpc.insecure_channel(target)
    return channel, pb_grpc.ClassifierStub(channel)


def _holdout_request(holdout: Any) -> Callable[[int], pb.PredictRequest]:
    """Builds the fp32 request for held-out image ``index``."""

    def request(index: int) -> pb.PredictRequest:
        return pb.PredictRequest(
            images=[image_message(_uint8(holdout.holdout_images[index]))], precision=pb.PRECISION_FP32
        )

    return request


def _spy_model(model: LoadedModel, **spy_options: Any) -> tuple[LoadedModel, dict[Precision, SpyRuntime]]:
    spies = {precision: SpyRuntime(runtime, **spy_options) for precision, runtime in model.runtimes.items()}
    return dataclasses.replace(model, runtimes=dict(spies)), spies


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_examples_get_the_label_in_their_file_name(client: Client, precision: str) -> None:
    assert len(EXAMPLES) == 10
    response = client.predict(EXAMPLES, precision=precision)
    assert [prediction.label for prediction in response.predictions] == [_label_of(path) for path in EXAMPLES]
    for prediction in response.predictions:
        assert prediction.precision == (pb.PRECISION_FP32 if precision == "fp32" else pb.PRECISION_INT8)
        assert prediction.label_name == str(prediction.label)
        assert len(prediction.probabilities) == 10
        assert prediction.score == pytest.approx(max(prediction.probabilities))
    assert response.model_version == "1"


def test_auto_is_answered_by_fp32(client: Client) -> None:
    response = client.predict(EXAMPLES[:1])
    assert response.predictions[0].precision == pb.PRECISION_FP32


def test_answers_match_the_runtime(client: Client, loaded_model: LoadedModel, holdout: Any) -> None:
    images = holdout.holdout_images[:8]
    for precision in (Precision.FP32, Precision.INT8):
        expected = loaded_model.runtimes[precision].predict(images)
        response = client.predict([_uint8(image) for image in images], precision=precision.value, skip_cache=True)
        got = np.array([prediction.probabilities for prediction in response.predictions])
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_cache_hit_returns_the_same_prediction(server: RunningServer, client: Client) -> None:
    first = client.predict(EXAMPLES[3:4], precision="fp32").predictions[0]
    second = client.predict(EXAMPLES[3:4], precision="fp32").predictions[0]
    assert (first.cache_hit, second.cache_hit) == (False, True)
    assert second.batch_size == 0 and first.batch_size >= 1
    assert list(second.probabilities) == list(first.probabilities)
    assert (second.label, second.score) == (first.label, first.score)
    assert server.metric("costserve_cache_hits_total") == 1
    assert server.metric("costserve_cache_misses_total") == 1


def test_png_and_the_same_raw_pixels_share_a_cache_entry(client: Client) -> None:
    pixels = np.asarray(Image.open(EXAMPLES[5]))
    assert client.predict([EXAMPLES[5]], precision="int8").predictions[0].cache_hit is False
    assert client.predict([pixels], precision="int8").predictions[0].cache_hit is True


def test_fp32_and_int8_entries_never_mix(client: Client) -> None:
    fp32 = client.predict(EXAMPLES[:2], precision="fp32").predictions
    int8 = client.predict(EXAMPLES[:2], precision="int8").predictions
    assert [p.cache_hit for p in [*fp32, *int8]] == [False] * 4
    again = client.predict(EXAMPLES[:2], precision="int8").predictions
    assert all(p.cache_hit and p.precision == pb.PRECISION_INT8 for p in again)
    assert [list(p.probabilities) for p in again] == [list(p.probabilities) for p in int8]


def test_skip_cache_neither_reads_nor_fills(server: RunningServer, client: Client) -> None:
    client.predict(EXAMPLES[:1], precision="fp32", skip_cache=True)
    assert client.predict(EXAMPLES[:1], precision="fp32", skip_cache=True).predictions[0].cache_hit is False
    assert client.predict(EXAMPLES[:1], precision="fp32").predictions[0].cache_hit is False
    assert server.metric("costserve_cache_entries") == 1


def test_cache_off_with_size_zero(start_server: Callable[..., RunningServer]) -> None:
    server = start_server(cache_size=0)
    with Client(server.target) as client:
        for _ in range(2):
            assert client.predict(EXAMPLES[:1]).predictions[0].cache_hit is False


def test_stream_answers_each_request_in_order(client: Client) -> None:
    order = [EXAMPLES[index % 10] for index in (3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4)]
    responses = list(client.predict_stream([[path] for path in order], precision="int8"))
    assert [response.predictions[0].label for response in responses] == [_label_of(path) for path in order]


def test_stream_error_aborts_with_its_status_after_earlier_answers(client: Client) -> None:
    requests = [[EXAMPLES[0]], [EXAMPLES[1]], [b"not an image"], [EXAMPLES[2]]]
    answers = []
    with pytest.raises(grpc.RpcError) as error:
        for response in client.predict_stream(requests):
            answers.append(response.predictions[0].label)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "images[0].encoded" in error.value.details()
    assert answers == [0, 1]


def test_model_info_describes_both_variants(client: Client, loaded_model: LoadedModel) -> None:
    info = client.model_info()
    assert (info.name, info.version) == ("digits", "1")
    assert list(info.input_shape) == [28, 28, 1]
    assert list(info.labels) == [str(label) for label in range(10)]
    variants = {variant.precision: variant for variant in info.variants}
    assert set(variants) == {pb.PRECISION_FP32, pb.PRECISION_INT8}
    # fp32 as served: by LiteRT from the float model beside the SavedModel.
    assert (variants[pb.PRECISION_FP32].format, variants[pb.PRECISION_FP32].path) == ("tflite", "model_fp32.tflite")
    assert variants[pb.PRECISION_FP32].size_bytes == (loaded_model.version_dir / "model_fp32.tflite").stat().st_size
    assert variants[pb.PRECISION_INT8].format == "tflite"
    assert variants[pb.PRECISION_FP32].accuracy == pytest.approx(loaded_model.metadata.variants["fp32"].accuracy)
    assert variants[pb.PRECISION_INT8].size_bytes == loaded_model.metadata.variants["int8"].size_bytes > 0
    assert info.holdout_examples == 360 and info.max_images_per_request == 64


def test_health_and_reflection(server: RunningServer, client: Client) -> None:
    assert client.health() == "SERVING"
    assert client.health("costserve.v1.Classifier") == "SERVING"
    with grpc.insecure_channel(server.target) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "costserve.v1.Classifier" in services
    assert "grpc.health.v1.Health" in services


def test_metrics_endpoint_counts_requests(server: RunningServer, client: Client) -> None:
    for _ in range(3):
        client.predict(EXAMPLES[:2], precision="int8")
    with urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    assert (
        'costserve_requests_total{code="OK",method="Predict",model="digits",precision="int8",protocol="v1"} 3.0' in text
    )
    assert "process_cpu_seconds_total" in text


def _bad_requests(holdout: Any) -> dict[str, tuple[pb.PredictRequest, str]]:
    png = EXAMPLES[0].read_bytes()
    image = _uint8(holdout.holdout_images[0])

    def pixels(shape: list[int], dtype: int, data: bytes) -> pb.PredictRequest:
        return pb.PredictRequest(images=[pb.Image(pixels=pb.Pixels(shape=shape, dtype=dtype, data=data))])

    floats = holdout.holdout_images[0][:, :, 0].astype("<f4")
    with_nan, with_inf, too_big = floats.copy(), floats.copy(), floats.copy()
    with_nan[3, 3], with_inf[4, 4], too_big[5, 5] = np.nan, np.inf, 2.0
    return {
        "no images": (pb.PredictRequest(), "no images"),
        "too many images": (pb.PredictRequest(images=[pb.Image(encoded=png)] * 65), "at most 64"),
        "empty image": (pb.PredictRequest(images=[pb.Image()]), "images[0] is empty"),
        "empty bytes": (pb.PredictRequest(images=[pb.Image(encoded=b"")]), "empty"),
        "corrupt bytes": (pb.PredictRequest(images=[pb.Image(encoded=b"\x89PNG garbage" * 10)]), "PNG or JPEG"),
        "truncated png": (pb.PredictRequest(images=[pb.Image(encoded=png[: len(png) // 2])]), "truncated or corrupt"),
        "length mismatch": (pixels([28, 28], pb.DTYPE_UINT8, image.tobytes()[:-1]), "needs 784"),
        "wrong rank": (pixels([784], pb.DTYPE_UINT8, image.tobytes()), "rank 1"),
        "wrong size": (pixels([14, 56], pb.DTYPE_UINT8, image.tobytes()), "28 x 28"),
        "nan": (pixels([28, 28], pb.DTYPE_FLOAT32, with_nan.tobytes()), "NaN"),
        "inf": (pixels([28, 28], pb.DTYPE_FLOAT32, with_inf.tobytes()), "infinite"),
        "out of range": (pixels([28, 28], pb.DTYPE_FLOAT32, too_big.tobytes()), "[0, 1]"),
        "unknown precision": (pb.PredictRequest(images=[pb.Image(encoded=png)], precision=7), "precision 7"),
        "unknown dtype": (pixels([28, 28], 5, image.tobytes()), "dtype 5"),
    }


def test_bad_input_is_invalid_argument_while_others_are_served(server: RunningServer, holdout: Any) -> None:
    bad = _bad_requests(holdout)
    stop = threading.Event()
    good_answers: list[int] = []

    def keep_serving() -> None:
        with Client(server.target) as client:
            while not stop.is_set() and len(good_answers) < 10_000:
                good_answers.append(client.predict([EXAMPLES[7]], skip_cache=True).predictions[0].label)

    worker = threading.Thread(target=keep_serving)
    worker.start()
    channel, stub = _stub(server.target)
    try:
        for name, (request, expected) in bad.items():
            with pytest.raises(grpc.RpcError) as error:
                stub.Predict(request, timeout=10)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            assert expected in error.value.details(), f"{name}: {error.value.details()!r}"
    finally:
        stop.set()
        worker.join(timeout=60)
        channel.close()
    assert good_answers and set(good_answers) == {7}
    assert server.metric("costserve_rejected_total", {"reason": "invalid_input"}) == len(bad)
    with Client(server.target) as client:
        assert client.predict([EXAMPLES[2]]).predictions[0].label == 2


def test_message_larger_than_the_limit_is_refused(start_server: Callable[..., RunningServer]) -> None:
    server = start_server(max_message_bytes=64 * 1024)
    channel, stub = _stub(server.target)
    with channel:
        with pytest.raises(grpc.RpcError) as error:
            stub.Predict(pb.PredictRequest(images=[pb.Image(encoded=b"\0" * 100_000)]), timeout=10)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (
            stub.Predict(pb.PredictRequest(images=[image_message(EXAMPLES[1])]), timeout=10).predictions[0].label == 1
        )


def _distinct_images(holdout: Any, count: int) -> np.ndarray:
    pool = np.concatenate([holdout.holdout_images, holdout.train_images])
    return pool[:count]


def test_500_concurrent_distinct_requests_each_get_their_own_answer(
    server: RunningServer, loaded_model: LoadedModel, holdout: Any
) -> None:
    images = _distinct_images(holdout, 500)
    expected = loaded_model.runtimes[Precision.INT8].predict(images)
    channel, stub = _stub(server.target)
    with channel:
        futures = [
            stub.Predict.future(
                pb.PredictRequest(images=[image_message(_uint8(image))], precision=pb.PRECISION_INT8), timeout=60
            )
            for image in images
        ]
        responses = [future.result() for future in futures]
    got = np.array([response.predictions[0].probabilities for response in responses])
    np.testing.assert_array_equal(got, expected)
    batch_sizes = [response.predictions[0].batch_size for response in responses]
    assert max(batch_sizes) > 1, "concurrent requests were never batched"
    assert server.metric("costserve_batch_size_count", {"precision": "int8"}) < 500


def test_batched_answers_equal_unbatched(
    start_server: Callable[..., RunningServer], loaded_model: LoadedModel, holdout: Any
) -> None:
    images = [_uint8(image) for image in _distinct_images(holdout, 96)]
    results: dict[str, dict[int, np.ndarray]] = {}
    for mode, overrides in {"unbatched": {"max_batch_size": 1}, "batched": {}}.items():
        server = start_server(cache_size=0, **overrides)
        channel, stub = _stub(server.target)
        with channel:
            results[mode] = {}
            for precision in (pb.PRECISION_FP32, pb.PRECISION_INT8):
                futures = [
                    stub.Predict.future(
                        pb.PredictRequest(images=[image_message(image)], precision=precision), timeout=60
                    )
                    for image in images
                ]
                responses = [future.result() for future in futures]
                results[mode][precision] = np.array([r.predictions[0].probabilities for r in responses])
                sizes = {r.predictions[0].batch_size for r in responses}
                assert sizes == {1} if mode == "unbatched" else max(sizes) > 1
    np.testing.assert_allclose(
        results["batched"][pb.PRECISION_FP32], results["unbatched"][pb.PRECISION_FP32], atol=1e-5, rtol=0
    )
    np.testing.assert_array_equal(results["batched"][pb.PRECISION_INT8], results["unbatched"][pb.PRECISION_INT8])


def test_multi_image_requests_are_split_and_joined_in_order(
    client: Client, holdout: Any, loaded_model: LoadedModel
) -> None:
    images = holdout.holdout_images[:40]
    response = client.predict([_uint8(image) for image in images], precision="int8")
    expected = loaded_model.runtimes[Precision.INT8].predict(images)
    np.testing.assert_array_equal(np.array([p.probabilities for p in response.predictions]), expected)


def test_queue_overflow_is_resource_exhausted_and_the_server_recovers(
    start_server: Callable[..., RunningServer], loaded_model: LoadedModel, holdout: Any
) -> None:
    model, spies = _spy_model(loaded_model)
    server = start_server(model=model, max_queue=4, max_batch_size=1, cache_size=0, max_images_per_request=4)
    spy = spies[Precision.FP32]
    spy.gate.clear()
    spy.entered.clear()
    channel, stub = _stub(server.target)
    with channel:
        request = _holdout_request(holdout)
        running = stub.Predict.future(request(0), timeout=60)
        assert spy.entered.wait(30)  # the runtime holds image 0; the queue is empty
        queued = [stub.Predict.future(request(index), timeout=60) for index in range(1, 5)]
        deadline = time.monotonic() + 30
        while server.core.batchers[Precision.FP32].queue_depth < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(grpc.RpcError) as error:
            stub.Predict(request(5), timeout=10)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue is full" in error.value.details() and "4 of 4" in error.value.details()
        spy.gate.set()
        assert [future.result().predictions[0].label for future in [running, *queued]] == list(
            holdout.holdout_labels[:5]
        )
        assert stub.Predict(request(6), timeout=10).predictions[0].label == holdout.holdout_labels[6]
    assert server.metric("costserve_rejected_total", {"reason": "queue_full"}) == 1


def test_an_expired_deadline_is_never_computed(
    start_server: Callable[..., RunningServer], loaded_model: LoadedModel, holdout: Any
) -> None:
    model, spies = _spy_model(loaded_model)
    server = start_server(model=model, cache_size=0)
    spy = spies[Precision.FP32]
    spy.gate.clear()
    channel, stub = _stub(server.target)
    with channel:
        request = _holdout_request(holdout)
        running = stub.Predict.future(request(0), timeout=60)
        assert spy.entered.wait(30)
        with pytest.raises(grpc.RpcError) as error:
            stub.Predict(request(1), timeout=0.3)
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        spy.gate.set()
        assert running.result().predictions[0].label == holdout.holdout_labels[0]
        assert stub.Predict(request(2), timeout=10).predictions[0].label == holdout.holdout_labels[2]
    assert spy.batches == [1, 1]  # image 0 and image 2; image 1 expired in the queue
    # Whether the batcher dropped it or gRPC cancelled the handler at the deadline, the
    # server counts what the client saw: DEADLINE_EXCEEDED, not CANCELLED.
    assert server.metric("costserve_rejected_total", {"reason": "deadline_exceeded"}) == 1
    assert server.metric("costserve_rejected_total", {"reason": "cancelled"}) == 0
    assert (
        server.metric(
            "costserve_requests_total", {"method": "Predict", "precision": "fp32", "code": "DEADLINE_EXCEEDED"}
        )
        == 1
    )


def test_a_failing_batch_fails_only_its_own_callers(
    start_server: Callable[..., RunningServer], loaded_model: LoadedModel, holdout: Any
) -> None:
    model, spies = _spy_model(loaded_model, poison_value=1.0)
    server = start_server(model=model, max_batch_size=1, cache_size=0)
    poison = np.full((28, 28), 255, dtype=np.uint8)
    channel, stub = _stub(server.target)
    with channel:
        good = [
            stub.Predict.future(
                pb.PredictRequest(images=[image_message(_uint8(holdout.holdout_images[index]))]), timeout=60
            )
            for index in range(20)
        ]
        bad = stub.Predict.future(pb.PredictRequest(images=[image_message(poison)]), timeout=60)
        with pytest.raises(grpc.RpcError) as error:
            bad.result()
        assert error.value.code() == grpc.StatusCode.INTERNAL
        assert "inference failed on a batch of 1" in error.value.details()
        assert [future.result().predictions[0].label for future in good] == list(holdout.holdout_labels[:20])
        after = stub.Predict(pb.PredictRequest(images=[image_message(EXAMPLES[4])]), timeout=10)
        assert after.predictions[0].label == 4
