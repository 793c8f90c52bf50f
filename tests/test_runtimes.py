"""Contract tests every runtime passes: fp32 (SavedModel) and int8 (LiteRT) alike."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

from costserve.server.domain import Precision
from costserve.server.runtimes import Runtime, allowed_batch_sizes
from costserve.server.training import accuracy


@pytest.fixture(params=[Precision.FP32, Precision.INT8], ids=lambda precision: precision.value)
def runtime(request: pytest.FixtureRequest, loaded_model: Any) -> Runtime:
    return loaded_model.runtimes[request.param]


def _images(holdout: Any, count: int) -> np.ndarray:
    return holdout.holdout_images[:count]


def test_input_shape_is_read_from_the_model(runtime: Runtime, loaded_model: Any) -> None:
    assert runtime.input_shape == tuple(loaded_model.metadata.input_shape) == (28, 28, 1)
    assert runtime.num_classes == len(loaded_model.metadata.labels) == 10


@pytest.mark.parametrize("count", [1, 3, 32, 45])
def test_one_row_of_probabilities_per_image(runtime: Runtime, holdout: Any, count: int) -> None:
    probabilities = runtime.predict(_images(holdout, count))
    assert probabilities.shape == (count, 10)
    assert probabilities.dtype == np.float32
    assert np.all(probabilities >= 0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=0.02)


def test_rows_do_not_depend_on_their_batch(runtime: Runtime, holdout: Any) -> None:
    images = _images(holdout, 7)
    together = runtime.predict(images)
    alone = np.concatenate([runtime.predict(images[index : index + 1]) for index in range(len(images))])
    # int8 is exact; fp32 may differ in the last bits between batch shapes.
    tolerance = 0.0 if runtime.precision is Precision.INT8 else 1e-5
    np.testing.assert_allclose(together, alone, atol=tolerance, rtol=0)


@pytest.mark.parametrize("count", [3, 45])
def test_levels_give_exactly_the_answer_of_their_floats(runtime: Runtime, holdout: Any, count: int) -> None:
    levels = np.random.default_rng(count).integers(0, 256, size=(count, 28, 28, 1), dtype=np.uint8)
    levels[0] = np.round(holdout.holdout_images[0] * 255).astype(np.uint8)
    np.testing.assert_array_equal(
        runtime.predict_levels(levels), runtime.predict(levels.astype(np.float32) / np.float32(255.0))
    )


def test_predictions_are_deterministic(runtime: Runtime, holdout: Any) -> None:
    images = _images(holdout, 5)
    np.testing.assert_array_equal(runtime.predict(images), runtime.predict(images))


def test_wrong_batch_shape_is_refused(runtime: Runtime) -> None:
    with pytest.raises(ValueError, match="does not match"):
        runtime.predict(np.zeros((2, 27, 28, 1), dtype=np.float32))
    with pytest.raises(ValueError, match="does not match"):
        runtime.predict(np.zeros((28, 28, 1), dtype=np.float32))


def test_held_out_accuracy_matches_metadata(runtime: Runtime, holdout: Any, loaded_model: Any) -> None:
    measured = accuracy(runtime, holdout.holdout_images, holdout.holdout_labels)
    assert measured == pytest.approx(loaded_model.metadata.variant(runtime.precision).accuracy, abs=1e-9)


def test_fp32_accuracy_and_int8_within_one_point(loaded_model: Any, holdout: Any) -> None:
    fp32 = accuracy(loaded_model.runtimes[Precision.FP32], holdout.holdout_images, holdout.holdout_labels)
    int8 = accuracy(loaded_model.runtimes[Precision.INT8], holdout.holdout_images, holdout.holdout_labels)
    assert fp32 >= 0.97, f"fp32 held-out accuracy {fp32:.4f} is below 97%"
    assert int8 >= fp32 - 0.01, f"int8 accuracy {int8:.4f} is more than 1 point below fp32 {fp32:.4f}"


def test_int8_agrees_with_fp32_on_most_images(loaded_model: Any, holdout: Any) -> None:
    images = holdout.holdout_images
    fp32 = loaded_model.runtimes[Precision.FP32].predict(images).argmax(axis=1)
    int8 = loaded_model.runtimes[Precision.INT8].predict(images).argmax(axis=1)
    assert (fp32 == int8).mean() >= 0.98


def test_allowed_batch_sizes() -> None:
    assert allowed_batch_sizes(1) == [1]
    assert allowed_batch_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert allowed_batch_sizes(48) == [1, 2, 4, 8, 16, 32, 48]


def test_metadata_records_both_variants(loaded_model: Any) -> None:
    metadata = loaded_model.metadata
    assert set(metadata.variants) == {"fp32", "int8"}
    assert metadata.variants["fp32"].format == "saved_model"
    assert metadata.variants["int8"].format == "tflite"
    assert metadata.variants["int8"].size_bytes < metadata.variants["fp32"].size_bytes
    assert (loaded_model.version_dir / metadata.variants["int8"].path).stat().st_size == metadata.variants[
        "int8"
    ].size_bytes
    assert metadata.holdout_examples == 360
    assert "sklearn-digits" in metadata.training_data


def test_one_thread_runtimes_do_all_their_work_on_the_calling_thread(runtime: Runtime, holdout: Any) -> None:
    """The batcher charges a batch its inference thread's CPU clock: no work may run elsewhere."""
    assert runtime.runs_on_calling_thread
    batch = _images(holdout, 16)
    measured: dict[str, float] = {}

    def work() -> None:
        thread_started, process_started = time.thread_time(), time.process_time()
        for _ in range(100):
            runtime.predict(batch)
        measured["thread"] = time.thread_time() - thread_started
        measured["process"] = time.process_time() - process_started

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    # The process clock also counts whatever else runs meanwhile (gRPC's idle pollers, the
    # garbage collector): most, not all, of it is the runtime's.
    assert measured["thread"] >= 0.8 * measured["process"] > 0
