"""Contract tests every runtime passes: fp32 on LiteRT (the float .tflite), fp32 on TensorFlow (the SavedModel)
and int8 (LiteRT) alike; then what tells the two fp32 runtimes apart."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from costserve.server.domain import Precision
from costserve.server.repository.importer import FP32_LITERT_TOLERANCE, predict_all
from costserve.server.repository.store import FP32_LITERT_FILE, METADATA_FILE, LoadedModel, load_model
from costserve.server.runtimes import LiteRTRuntime, Runtime, SavedModelRuntime, allowed_batch_sizes
from costserve.server.training import accuracy


@pytest.fixture(scope="module")
def tensorflow_model(loaded_model: Any) -> Iterator[LoadedModel]:
    """The session's model loaded as ``--fp32-runtime tensorflow`` loads it: fp32 from the SavedModel."""
    model = load_model(loaded_model.version_dir, max_batch_size=32, fp32_runtime="tensorflow")
    yield model
    model.close()


#: (variant, the runtime serving it): fp32 as served by default (LiteRT), fp32 with --fp32-runtime tensorflow, int8.
RUNTIMES = {"fp32-litert": Precision.FP32, "fp32-tensorflow": Precision.FP32, "int8": Precision.INT8}


@pytest.fixture(params=RUNTIMES)
def runtime(request: pytest.FixtureRequest, loaded_model: Any) -> Runtime:
    model = request.getfixturevalue("tensorflow_model") if request.param == "fp32-tensorflow" else loaded_model
    return model.runtimes[RUNTIMES[request.param]]


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
    assert metadata.variants["fp32"].measured_runtime == metadata.variants["int8"].measured_runtime == "litert"
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


# --- fp32 on LiteRT and on TensorFlow -----------------------------------------------------------------------------


def test_fp32_is_served_by_litert_unless_tensorflow_is_asked_for(loaded_model: Any, tensorflow_model: Any) -> None:
    litert = loaded_model.runtimes[Precision.FP32]
    assert isinstance(litert, LiteRTRuntime) and litert.precision is Precision.FP32
    assert loaded_model.variant(Precision.FP32).path == FP32_LITERT_FILE
    assert loaded_model.variant(Precision.FP32).format == "tflite"
    assert (
        loaded_model.variant(Precision.FP32).size_bytes == (loaded_model.version_dir / FP32_LITERT_FILE).stat().st_size
    )
    assert isinstance(tensorflow_model.runtimes[Precision.FP32], SavedModelRuntime)
    assert tensorflow_model.variant(Precision.FP32) == tensorflow_model.metadata.variant(Precision.FP32)
    assert isinstance(tensorflow_model.runtimes[Precision.INT8], LiteRTRuntime)
    # TF Serving's clients name the input and output as the SavedModel's signature does: LiteRT keeps them.
    assert loaded_model.signature_keys == tensorflow_model.signature_keys == ("image", "output_0")
    assert loaded_model.runtimes[Precision.INT8].signature_keys == ("image", "output_0")


def test_litert_fp32_equals_the_saved_model_on_the_holdout(
    loaded_model: Any, tensorflow_model: Any, holdout: Any
) -> None:
    """Training kept model_fp32.tflite only because of this: the same class on every held-out image, and
    every probability within 1e-5 of the SavedModel's (the metadata records the largest difference)."""
    images = holdout.holdout_images
    litert = predict_all(loaded_model.runtimes[Precision.FP32], images)
    saved_model = predict_all(tensorflow_model.runtimes[Precision.FP32], images)
    np.testing.assert_array_equal(litert.argmax(axis=1), saved_model.argmax(axis=1))
    np.testing.assert_allclose(litert, saved_model, atol=FP32_LITERT_TOLERANCE, rtol=0)
    fp32 = loaded_model.metadata.variant(Precision.FP32)
    assert fp32.litert_path == FP32_LITERT_FILE
    assert fp32.litert_max_abs_diff == pytest.approx(float(np.abs(litert - saved_model).max()), abs=1e-9)


def test_a_quantized_model_does_not_serve_fp32_nor_a_float_one_int8(loaded_model: Any) -> None:
    with pytest.raises(ValueError, match="a quantized model cannot serve fp32"):
        LiteRTRuntime(loaded_model.version_dir / "model_int8.tflite", precision=Precision.FP32)
    with pytest.raises(ValueError, match="a float model cannot serve int8"):
        LiteRTRuntime(loaded_model.version_dir / FP32_LITERT_FILE, precision=Precision.INT8)


#: How a version comes to lack model_fp32.tflite, and what the log says about it.
WITHOUT_FLOAT_FILE = {
    # Made before costserve wrote the file: metadata.json without the fields that name it.
    "older": f"the version has no {FP32_LITERT_FILE}",
    # The file deleted by hand: metadata.json still names it.
    "deleted": f"names {FP32_LITERT_FILE}, which is missing",
}


@pytest.mark.parametrize("case", WITHOUT_FLOAT_FILE)
def test_a_version_without_the_float_file_serves_fp32_from_the_saved_model(
    case: str, loaded_model: Any, holdout: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Such a version is still served, fp32 by TensorFlow; the fallback is logged once per version."""
    version_dir = tmp_path / "digits" / "1"
    shutil.copytree(loaded_model.version_dir, version_dir)
    (version_dir / FP32_LITERT_FILE).unlink()
    if case == "older":
        metadata = json.loads((version_dir / METADATA_FILE).read_text())
        for variant in metadata["variants"].values():
            for field in ("measured_runtime", "litert_path", "litert_max_abs_diff"):
                del variant[field]
        (version_dir / METADATA_FILE).write_text(json.dumps(metadata))
    images = holdout.holdout_images[:50]
    with caplog.at_level(logging.INFO, logger="costserve.server.repository.store"):
        for _ in range(2):
            model = load_model(version_dir, max_batch_size=8)
            try:
                assert isinstance(model.runtimes[Precision.FP32], SavedModelRuntime)
                assert model.variant(Precision.FP32).path == "saved_model"
                np.testing.assert_allclose(
                    model.runtimes[Precision.FP32].predict(images),
                    loaded_model.runtimes[Precision.FP32].predict(images),
                    atol=FP32_LITERT_TOLERANCE,
                    rtol=0,
                )
            finally:
                model.close()
    fallbacks = [
        record.getMessage() for record in caplog.records if "fp32 is served by TensorFlow" in record.getMessage()
    ]
    assert len(fallbacks) == 1 and str(version_dir) in fallbacks[0]
    assert WITHOUT_FLOAT_FILE[case] in fallbacks[0]
