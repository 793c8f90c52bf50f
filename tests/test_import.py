"""`costserve-server import`: real Keras files and SavedModels, real image folders and .npz files.

Two tiny classifiers are trained once per module on synthetic images: a gray 28x28 one
(Conv -> GlobalAvgPool -> Dense softmax; the class is the brightness) and an RGB 32x32
one with logits (the class is the dominant channel). Every expected value is computed
here, independently of the importer: pixels with PIL and numpy, outputs with Keras.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageOps

from costserve.server.cli import main
from costserve.server.domain import ImageInput, Precision
from costserve.server.inputs import decode
from costserve.server.preprocessing import Preprocessing
from costserve.server.repository.importer import (
    FP32_LITERT_TOLERANCE,
    ImportReport,
    check_fp32_litert,
    import_model,
    source_digest,
)
from costserve.server.repository.store import (
    FP32_LITERT_FILE,
    INT8_FILE,
    METADATA_FILE,
    SAVED_MODEL_DIR,
    load_model,
    read_metadata,
)
from costserve.server.runtimes import LiteRTRuntime, SavedModelRuntime

#: Class folders of the gray model, in class order (sorted): the brightness of the image.
GRAY_CLASSES = ["a_dark", "b_grey", "c_light"]
GRAY_LEVELS = (50, 128, 205)
#: Class folders of the RGB model: the dominant channel.
RGB_CLASSES = ["0_red", "1_green", "2_blue"]


def gray_images(count: int, seed: int, height: int = 28, width: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (count, height, width) around each class's level, and the classes."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 3
    levels = np.array(GRAY_LEVELS)[labels][:, None, None] + rng.normal(0, 25, (count, height, width))
    return np.clip(levels, 0, 255).astype(np.uint8), labels


def rgb_images(count: int, seed: int, height: int = 32, width: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (count, height, width, 3) with the class's channel brightest, and the classes."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 3
    images = rng.integers(0, 80, (count, height, width, 3))
    images[np.arange(count), :, :, labels] += 150
    return images.astype(np.uint8), labels


def softmax(logits: np.ndarray) -> np.ndarray:
    exponentials = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def write_folder(root: Path, classes: list[str], images: np.ndarray, labels: np.ndarray) -> Path:
    for class_name in classes:
        (root / class_name).mkdir(parents=True)
    for index, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image).save(root / classes[label] / f"{index:03d}.png")
    return root


def folder_files(root: Path) -> list[tuple[Path, int]]:
    """(file, class) of an image folder in the order the importer reads it."""
    classes = sorted(path.name for path in root.iterdir())
    return [(file, index) for index, name in enumerate(classes) for file in sorted((root / name).iterdir())]


def version_dirs(repository: Path) -> list[Path]:
    """Every version directory, published or staging, under a repository."""
    return [path for model in repository.iterdir() if model.is_dir() for path in model.iterdir() if path.is_dir()]


@pytest.fixture(scope="module")
def tf() -> Any:
    """TensorFlow, with the threads the server uses by default (set before any TensorFlow op)."""
    from costserve.server.runtimes import configure_tensorflow_threads

    configure_tensorflow_threads(1)
    import tensorflow

    return tensorflow


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("import")


@pytest.fixture(scope="module")
def gray_model(tf: Any, work: Path) -> tuple[Any, Path]:
    """The trained gray classifier and its .keras file."""
    layers = tf.keras.layers
    tf.keras.utils.set_random_seed(7)
    model = tf.keras.Sequential(
        [
            tf.keras.Input((28, 28, 1)),
            layers.Conv2D(4, 3, activation="relu"),
            layers.GlobalAveragePooling2D(),
            layers.Dense(3, activation="softmax"),
        ]
    )
    model.compile(optimizer=tf.keras.optimizers.Adam(0.05), loss="sparse_categorical_crossentropy")
    images, labels = gray_images(300, seed=1)
    model.fit(images[..., None] / 255.0, labels, epochs=8, batch_size=32, verbose=0)
    path = work / "gray.keras"
    model.save(path)
    return model, path


@pytest.fixture(scope="module")
def rgb_model(tf: Any, work: Path) -> tuple[Any, Path]:
    """The trained RGB classifier (logits out) and its .keras file."""
    layers = tf.keras.layers
    tf.keras.utils.set_random_seed(7)
    model = tf.keras.Sequential(
        [
            tf.keras.Input((32, 32, 3)),
            layers.Conv2D(4, 3, activation="relu"),
            layers.GlobalAveragePooling2D(),
            layers.Dense(3),
        ]
    )
    model.compile(
        optimizer=tf.keras.optimizers.Adam(0.05),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    images, labels = rgb_images(300, seed=1)
    model.fit(images / 255.0, labels, epochs=8, batch_size=32, verbose=0)
    path = work / "rgb.keras"
    model.save(path)
    return model, path


@pytest.fixture(scope="module")
def gray_holdout(work: Path) -> Path:
    """Held-out gray images as RGB PNGs of another size: decoding converts and resizes them."""
    images, labels = gray_images(45, seed=2, height=36, width=40)
    colour = np.stack([images, images, np.clip(images.astype(int) + 10, 0, 255).astype(np.uint8)], axis=-1)
    return write_folder(work / "gray_holdout", GRAY_CLASSES, colour, labels)


@pytest.fixture(scope="module")
def gray_import(gray_model: tuple[Any, Path], gray_holdout: Path, work: Path) -> ImportReport:
    """The gray .keras file imported with its held-out folder (fp32 and int8)."""
    return import_model(gray_model[1], "gray", work / "repository", holdout=gray_holdout)


@pytest.fixture(scope="module")
def dynamic_saved_model(tf: Any, gray_model: tuple[Any, Path], work: Path) -> Path:
    """The gray model behind a tf.Module signature of dynamic height and width."""
    model = gray_model[0]
    module = tf.Module()
    module.model = model
    module.serve = tf.function(
        lambda image: {"scores": model(image)},
        input_signature=[tf.TensorSpec((None, None, None, 1), tf.float32, name="image")],
    )
    path = work / "dynamic_saved_model"
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return path


# --- a Keras file with an image folder ---------------------------------------------------------------------------


def test_keras_import_publishes_both_variants_measured(gray_import: ImportReport, gray_model: tuple[Any, Path]) -> None:
    version_dir, metadata = gray_import.version_dir, gray_import.metadata
    assert version_dir.name == metadata.version == "1"
    assert read_metadata(version_dir) == metadata
    assert metadata.name == "gray" and metadata.input_shape == (28, 28, 1)
    assert metadata.labels == GRAY_CLASSES
    assert set(metadata.variants) == {"fp32", "int8"}
    assert (version_dir / SAVED_MODEL_DIR / "saved_model.pb").is_file()
    assert metadata.variants["int8"].size_bytes == (version_dir / INT8_FILE).stat().st_size
    assert metadata.variants["fp32"].size_bytes == sum(
        path.stat().st_size for path in (version_dir / SAVED_MODEL_DIR).rglob("*") if path.is_file()
    )
    for info in metadata.variants.values():
        assert info.accuracy is not None and info.accuracy >= 0.9
        assert info.latency_ms_batch_1 > 0 and info.latency_ms_per_image_max_batch > 0
        assert info.measured_runtime == "litert"  # fp32 too: through its float LiteRT model, which serves it
    fp32, int8 = metadata.variants["fp32"], metadata.variants["int8"]
    assert (version_dir / FP32_LITERT_FILE).is_file() and fp32.litert_path == FP32_LITERT_FILE
    assert fp32.litert_max_abs_diff is not None and 0 <= fp32.litert_max_abs_diff <= FP32_LITERT_TOLERANCE
    assert int8.litert_path is None and int8.litert_max_abs_diff is None
    on_disk = json.loads((version_dir / METADATA_FILE).read_text())["variants"]["fp32"]
    assert on_disk["litert_path"] == FP32_LITERT_FILE and on_disk["measured_runtime"] == "litert"
    assert metadata.int8_agreement is not None and metadata.int8_agreement >= 0.9
    assert metadata.holdout_examples == 45 and "gray_holdout" in metadata.provenance["holdout"]
    assert metadata.preprocessing == Preprocessing().to_dict()
    created = datetime.datetime.fromisoformat(metadata.created_at)
    assert created.utcoffset() == datetime.timedelta(0)
    provenance = metadata.provenance
    assert provenance["source"] == str(gray_model[1]) and provenance["command"] == "import"
    assert provenance["source_sha256"] == hashlib.sha256(gray_model[1].read_bytes()).hexdigest()
    assert {"tensorflow", "ai_edge_litert", "numpy", "costserve"} <= set(provenance)
    assert not gray_import.notes


def test_held_out_accuracy_is_the_models_on_the_decoded_files(
    gray_import: ImportReport, gray_model: tuple[Any, Path], gray_holdout: Path
) -> None:
    """Each file converted to gray and stretched by PIL, classified by Keras: the fp32 accuracy recorded."""
    files = folder_files(gray_holdout)
    pixels = np.stack(
        [np.asarray(Image.open(file).convert("L").resize((28, 28), Image.Resampling.BILINEAR)) for file, _ in files]
    )
    x = (pixels.astype(np.float32) / 255.0)[..., None]
    labels = np.array([label for _, label in files])
    expected = float((gray_model[0](x).numpy().argmax(axis=1) == labels).mean())
    assert gray_import.metadata.variants["fp32"].accuracy == pytest.approx(expected, abs=1e-9)

    for fp32_runtime in ("litert", "tensorflow"):
        loaded = load_model(gray_import.version_dir, max_batch_size=32, fp32_runtime=fp32_runtime)
        try:
            assert loaded.runtimes[Precision.FP32].engine == fp32_runtime
            np.testing.assert_allclose(loaded.runtimes[Precision.FP32].predict(x), gray_model[0](x).numpy(), atol=1e-4)
            assert loaded.accuracy()[Precision.INT8] == gray_import.metadata.variants["int8"].accuracy
        finally:
            loaded.close()


# --- a SavedModel with an .npz -----------------------------------------------------------------------------------


def test_saved_model_of_dynamic_size_imports_at_the_given_shape_with_npz_data(
    dynamic_saved_model: Path, gray_model: tuple[Any, Path], work: Path
) -> None:
    images, labels = gray_images(30, seed=3)
    data = work / "gray_holdout.npz"
    np.savez(data, x=images, y=labels)
    label_file = work / "gray_labels.txt"
    label_file.write_text("dark\ngrey\nlight\n")

    repository = work / "saved_model_repository"
    report = import_model(
        dynamic_saved_model, "gray", repository, holdout=data, labels=label_file, input_shape=(28, 28, 1)
    )

    metadata = report.metadata
    assert metadata.input_shape == (28, 28, 1) and metadata.labels == ["dark", "grey", "light"]
    assert set(metadata.variants) == {"fp32", "int8"} and metadata.holdout_examples == 30
    assert metadata.provenance["source_sha256"] == source_digest(dynamic_saved_model)
    assert len(metadata.provenance["source_sha256"]) == 64
    x = (images.astype(np.float32) / 255.0)[..., None]
    expected = float((gray_model[0](x).numpy().argmax(axis=1) == labels).mean())
    assert metadata.variants["fp32"].accuracy == pytest.approx(expected, abs=1e-9)
    loaded = load_model(report.version_dir, max_batch_size=32)
    try:
        np.testing.assert_allclose(loaded.runtimes[Precision.FP32].predict(x), gray_model[0](x).numpy(), atol=1e-4)
    finally:
        loaded.close()


# --- every preprocessing option: the served fp32 equals Keras on inputs made here ---------------------------------

#: (model, flags, expected model input from pixels in [0, 1], output is logits)
PREPROCESSING_CASES = {
    "grayscale-unit": ("gray", [], lambda p: p, False),
    "symmetric": ("gray", ["--scaling", "symmetric"], lambda p: p * 2 - 1, False),
    "levels": ("gray", ["--scaling", "levels"], lambda p: p * 255, False),
    "mean_std": (
        "gray",
        ["--scaling", "mean_std", "--mean", "0.5", "--std", "0.25"],
        lambda p: (p - 0.5) / 0.25,
        False,
    ),
    "rgb-logits": ("rgb", ["--output", "logits"], lambda p: p, True),
    "bgr-logits": ("rgb", ["--color-mode", "bgr", "--output", "logits"], lambda p: p[..., ::-1], True),
    "rgb-mean_std-per-channel": (
        "rgb",
        ["--color-mode", "rgb", "--scaling", "mean_std", "--mean", "0.4,0.5,0.6", "--std", "0.2,0.25,0.3"],
        lambda p: (p - np.array([0.4, 0.5, 0.6], np.float32)) / np.array([0.2, 0.25, 0.3], np.float32),
        False,
    ),
}


@pytest.mark.parametrize("case", PREPROCESSING_CASES)
def test_served_fp32_applies_each_preprocessing(
    case: str,
    gray_model: tuple[Any, Path],
    rgb_model: tuple[Any, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    kind, flags, model_input, logits = PREPROCESSING_CASES[case]
    model, source = gray_model if kind == "gray" else rgb_model
    repository = tmp_path / "repository"
    assert main(["import", str(source), "--name", kind, "--repository", str(repository), *flags]) == 0
    out = capsys.readouterr().out
    assert "accuracy  unknown" in out and "no calibration data" in out
    assert f"fp32 is served by LiteRT from {FP32_LITERT_FILE}" in out

    version_dir = repository / kind / "1"
    metadata = read_metadata(version_dir)
    assert set(metadata.variants) == {"fp32"} and metadata.variants["fp32"].accuracy is None
    # Without held-out images, checked against the SavedModel on random ones.
    assert metadata.variants["fp32"].litert_path == FP32_LITERT_FILE
    assert metadata.int8_agreement is None and metadata.holdout_examples == 0
    images = gray_images(6, seed=5)[0][..., None] if kind == "gray" else rgb_images(6, seed=5)[0]
    pixels = images.astype(np.float32) / np.float32(255.0)
    expected = model(model_input(pixels)).numpy()
    if logits:
        expected = softmax(expected)
    loaded = load_model(version_dir, max_batch_size=8)
    try:
        assert isinstance(loaded.runtimes[Precision.FP32], LiteRTRuntime)
        assert loaded.preprocessing == metadata.preprocessing_spec()
        np.testing.assert_allclose(loaded.runtimes[Precision.FP32].predict(pixels), expected, atol=1e-4)
        np.testing.assert_allclose(loaded.runtimes[Precision.FP32].predict_levels(images), expected, atol=1e-4)
    finally:
        loaded.close()


def test_crop_resize_fits_the_centre_for_holdout_and_requests(rgb_model: tuple[Any, Path], work: Path) -> None:
    """Wide images whose centre is one class and whose sides another: crop sees the centre's class."""
    model = rgb_model[0]
    centres, labels = rgb_images(18, seed=6)
    sides = rgb_images(18, seed=7)[0][:, :, :, [1, 2, 0]]  # dominant channel: the next class
    wide = np.concatenate([sides, centres, sides], axis=2)  # 32 x 96
    holdout = write_folder(work / "wide_holdout", RGB_CLASSES, wide, labels)

    report = import_model(
        rgb_model[1],
        "wide",
        work / "crop_repository",
        holdout=holdout,
        preprocessing=Preprocessing(color_mode="rgb", resize="crop", output="logits"),
    )

    files = folder_files(holdout)
    fitted = np.stack(
        [
            np.asarray(ImageOps.fit(Image.open(file).convert("RGB"), (32, 32), Image.Resampling.BILINEAR))
            for file, _ in files
        ]
    )
    x = fitted.astype(np.float32) / np.float32(255.0)
    truth = np.array([label for _, label in files])
    predicted = model(x).numpy().argmax(axis=1)
    assert report.metadata.variants["fp32"].accuracy == pytest.approx(float((predicted == truth).mean()), abs=1e-9)
    assert report.metadata.variants["fp32"].accuracy >= 0.9  # stretched, the sides' class would win
    assert report.metadata.preprocessing["resize"] == "crop"

    loaded = load_model(report.version_dir, max_batch_size=8)
    try:
        decoded = decode(
            ImageInput(encoded=files[0][0].read_bytes()), loaded.input_shape, resize=loaded.preprocessing.resize
        )
        np.testing.assert_array_equal(decoded.pixels, x[0])
        np.testing.assert_allclose(
            loaded.runtimes[Precision.FP32].predict(x[:4]), softmax(model(x[:4]).numpy()), atol=1e-4
        )
    finally:
        loaded.close()


def test_keras_model_of_dynamic_size_imports_at_the_given_shape(tf: Any, work: Path, tmp_path: Path) -> None:
    tf.keras.utils.set_random_seed(3)
    inputs = tf.keras.Input((None, None, 3))
    outputs = tf.keras.layers.Dense(2, activation="softmax")(tf.keras.layers.GlobalAveragePooling2D()(inputs))
    model = tf.keras.Model(inputs, outputs)
    source = work / "dynamic.keras"
    model.save(source)

    report = import_model(source, "dynamic", tmp_path, input_shape=(24, 20, 3))

    assert report.metadata.input_shape == (24, 20, 3)
    pixels = rgb_images(3, seed=8, height=24, width=20)[0].astype(np.float32) / np.float32(255.0)
    loaded = load_model(report.version_dir, max_batch_size=4)
    try:
        np.testing.assert_allclose(loaded.runtimes[Precision.FP32].predict(pixels), model(pixels).numpy(), atol=1e-4)
    finally:
        loaded.close()


# --- int8 kept or dropped ----------------------------------------------------------------------------------------


def test_int8_is_calibrated_on_the_models_input(
    tf: Any, gray_model: tuple[Any, Path], gray_holdout: Path, gray_import: ImportReport, work: Path
) -> None:
    """A model taking levels 0..255: int8 calibrated on [0, 1] pixels would clip every input to its top."""
    levels_model = tf.keras.Sequential(
        [tf.keras.Input((28, 28, 1)), tf.keras.layers.Rescaling(1 / 255), *gray_model[0].layers]
    )
    source = work / "gray_levels.keras"
    levels_model.save(source)

    report = import_model(
        source,
        "levels",
        work / "levels_repository",
        holdout=gray_holdout,
        preprocessing=Preprocessing(scaling="levels"),
    )

    variants = report.metadata.variants
    assert set(variants) == {"fp32", "int8"}
    assert variants["fp32"].accuracy == pytest.approx(gray_import.metadata.variants["fp32"].accuracy, abs=1e-9)
    assert variants["int8"].accuracy is not None and variants["int8"].accuracy >= 0.9
    assert report.metadata.int8_agreement is not None and report.metadata.int8_agreement >= 0.9


def test_int8_far_below_fp32_is_dropped(
    gray_model: tuple[Any, Path], gray_holdout: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # -100 points: any int8 accuracy counts as too low, so the fallback is certain.
    argv = ["import", str(gray_model[1]), "--name", "gray", "--repository", str(tmp_path), "--holdout"]
    assert main([*argv, str(gray_holdout), "--max-int8-drop", "-100"]) == 0
    out = capsys.readouterr().out
    assert "note: int8 dropped, fp32 only" in out and "at most -100 allowed" in out
    version_dir = tmp_path / "gray" / "1"
    metadata = read_metadata(version_dir)
    assert set(metadata.variants) == {"fp32"} and metadata.int8_agreement is None
    assert metadata.variants["fp32"].accuracy is not None
    assert not (version_dir / INT8_FILE).exists()
    assert json.loads((version_dir / METADATA_FILE).read_text())["variants"].keys() == {"fp32"}


def test_calibration_without_holdout_keeps_int8_of_unknown_accuracy(
    gray_model: tuple[Any, Path], work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images, labels = gray_images(24, seed=9)
    data = work / "gray_calibration.npz"
    np.savez(data, x=images[..., None].astype(np.float32) / 255.0, y=labels)
    argv = ["import", str(gray_model[1]), "--name", "gray", "--repository", str(tmp_path), "--calibration", str(data)]
    assert main(argv) == 0
    assert "fp32/int8 top-1 agreement: unknown" in capsys.readouterr().out
    metadata = read_metadata(tmp_path / "gray" / "1")
    assert set(metadata.variants) == {"fp32", "int8"}
    assert metadata.variants["fp32"].accuracy is None and metadata.variants["int8"].accuracy is None
    assert metadata.int8_agreement is None and metadata.holdout_examples == 0
    assert (tmp_path / "gray" / "1" / INT8_FILE).is_file()


# --- the float LiteRT model: kept only when it matches the SavedModel ---------------------------------------------


def test_a_model_the_converter_refuses_is_served_from_the_saved_model(tf: Any, work: Path, tmp_path: Path) -> None:
    """An op LiteRT's built-in kernels lack (Erf): no model_fp32.tflite, no int8, notes saying why; fp32 serves."""
    module = tf.Module()
    module.dense = tf.Variable(tf.random.stateless_normal((1, 3), seed=(1, 2)))
    module.serve = tf.function(
        lambda image: {"scores": tf.nn.softmax(tf.reduce_mean(tf.math.erf(image), axis=[1, 2]) @ module.dense)},
        input_signature=[tf.TensorSpec((None, 28, 28, 1), tf.float32, name="image")],
    )
    source = work / "erf_saved_model"
    tf.saved_model.save(module, str(source), signatures={"serving_default": module.serve})
    images, labels = gray_images(12, seed=11)
    holdout = tmp_path / "holdout.npz"
    np.savez(holdout, x=images, y=labels)

    report = import_model(source, "erf", tmp_path / "repository", holdout=holdout)

    notes = "\n".join(report.notes)
    assert "fp32 is served from the SavedModel (TensorFlow): the LiteRT conversion failed (ConverterError" in notes
    assert "TF Select ops: Erf" in notes and "no int8 variant: the int8 conversion failed" in notes
    assert sorted(path.name for path in report.version_dir.iterdir()) == [METADATA_FILE, SAVED_MODEL_DIR]
    fp32 = report.metadata.variants["fp32"]
    assert set(report.metadata.variants) == {"fp32"} and fp32.measured_runtime == "tensorflow"
    assert fp32.litert_path is None and fp32.litert_max_abs_diff is None and fp32.accuracy is not None
    loaded = load_model(report.version_dir, max_batch_size=4)
    try:
        assert isinstance(loaded.runtimes[Precision.FP32], SavedModelRuntime)
        x = (images[:4].astype(np.float32) / 255.0)[..., None]
        expected = module.serve(tf.constant(x))["scores"].numpy()
        np.testing.assert_allclose(loaded.runtimes[Precision.FP32].predict(x), expected, atol=1e-5)
    finally:
        loaded.close()


def test_litert_check_passes_equal_classes_within_the_tolerance() -> None:
    saved_model = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], dtype=np.float32)
    check = check_fp32_litert(saved_model, saved_model + np.float32(4e-6))
    assert check.problem is None and check.images == 2 and check.label_mismatches == 0
    assert check.max_abs_diff == pytest.approx(4e-6, rel=1e-3)


def test_litert_check_fails_on_a_different_class() -> None:
    saved_model = np.array([[0.5, 0.49, 0.01], [0.1, 0.3, 0.6], [0.2, 0.7, 0.1]], dtype=np.float32)
    litert = saved_model.copy()
    litert[0] = [0.49, 0.5, 0.01]
    check = check_fp32_litert(saved_model, litert)
    assert check.label_mismatches == 1
    assert check.problem == "its top-1 class differs from the SavedModel's on 1 of 3 images"


def test_litert_check_fails_beyond_the_tolerance_and_on_nan() -> None:
    saved_model = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], dtype=np.float32)
    litert = saved_model.copy()
    litert[1, 0] += 3e-5
    check = check_fp32_litert(saved_model, litert)
    assert check.label_mismatches == 0 and check.problem is not None
    assert "differ from the SavedModel's by up to 3e-05 (at most 1e-05 allowed)" in check.problem
    litert[1, 0] = np.nan
    assert check_fp32_litert(saved_model, litert).problem is not None
    with pytest.raises(ValueError, match="shapes"):
        check_fp32_litert(saved_model, saved_model[:1])


def test_a_second_import_is_the_next_version(
    gray_model: tuple[Any, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for expected in ("1", "2"):
        assert main(["import", str(gray_model[1]), "--name", "gray", "--repository", str(tmp_path)]) == 0
        assert f"imported {tmp_path / 'gray' / expected}" in capsys.readouterr().out
    assert sorted(path.name for path in (tmp_path / "gray").iterdir()) == ["1", "2"]


# --- refused: exit 2, a message naming the problem, nothing published ---------------------------------------------


@pytest.fixture(scope="module")
def bad_sources(tf: Any, work: Path) -> Path:
    """A directory of sources that cannot be imported, named by what is wrong with them."""
    root = work / "bad"
    root.mkdir()
    (root / "two_labels.txt").write_text("yes\nno\n")
    (root / "text.keras").write_text("not a model\n")
    (root / "empty_dir").mkdir()

    left, right = tf.keras.Input((8, 8, 1)), tf.keras.Input((8, 8, 1))
    joined = tf.keras.layers.Concatenate()([left, right])
    two_inputs = tf.keras.Model(
        [left, right], tf.keras.layers.Dense(2)(tf.keras.layers.GlobalAveragePooling2D()(joined))
    )
    two_inputs.save(root / "two_inputs.keras")

    flat = tf.keras.Sequential([tf.keras.Input((784,)), tf.keras.layers.Dense(2)])
    flat.save(root / "flat.keras")

    dense = tf.keras.Sequential(
        [tf.keras.Input((None, None, 1)), tf.keras.layers.GlobalAveragePooling2D(), tf.keras.layers.Dense(3)]
    )
    dense.save(root / "dynamic.keras")

    module = tf.Module()
    module.serve = tf.function(
        lambda image: {"a": tf.reduce_mean(image, axis=[1, 2]), "b": tf.reduce_max(image, axis=[1, 2])},
        input_signature=[tf.TensorSpec((None, 8, 8, 3), tf.float32)],
    )
    tf.saved_model.save(module, str(root / "two_outputs"), signatures={"serving_default": module.serve})
    return root


@pytest.fixture(scope="module")
def broken_holdout(work: Path) -> Path:
    images, labels = gray_images(6, seed=10)
    root = write_folder(work / "broken_holdout", GRAY_CLASSES, images, labels)
    (root / "b_grey" / "truncated.png").write_bytes((root / "b_grey" / "001.png").read_bytes()[:40])
    return root


#: The arguments after "import" ({bad}: the bad sources, {gray}: the gray .keras file, {broken}: a held-out
#: folder holding a truncated PNG, {work}: the module's directory), and what the message must say.
REFUSALS = {
    "not-a-model-file": (["{bad}/text.keras"], "is not a readable Keras model"),
    "not-a-model-directory": (["{bad}/empty_dir"], "without saved_model.pb"),
    "not-a-model-suffix": (["{broken}/a_dark/000.png"], "is not a model"),
    "several-inputs": (["{bad}/two_inputs.keras"], "has 2 inputs"),
    "several-outputs": (["{bad}/two_outputs"], "has 2 outputs (a, b)"),
    "not-an-image-input": (["{bad}/flat.keras"], "expected (batch, height, width, channels)"),
    "dynamic-size": (["{bad}/dynamic.keras"], "--input-shape H,W,1"),
    "labels-mismatch": (["{gray}", "--labels", "{bad}/two_labels.txt"], "has 2 labels; the model outputs 3 classes"),
    "unreadable-image": (["{gray}", "--holdout", "{broken}"], "/b_grey/truncated.png"),
    "colour-mode": (["{gray}", "--color-mode", "rgb"], "colour mode rgb takes 3 channel(s)"),
    "bad-name": (["{gray}", "--name", "../escape"], "not a plain directory name"),
    "missing-holdout": (["{gray}", "--holdout", "{work}/nowhere"], "does not exist"),
    "missing-source": (["{work}/nowhere.keras"], "does not exist"),
    "mean-without-mean_std": (["{gray}", "--mean", "0.5"], "mean and std apply to mean_std"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refused_imports_exit_2_naming_the_problem(
    case: str,
    bad_sources: Path,
    gray_model: tuple[Any, Path],
    broken_holdout: Path,
    work: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    arguments, expected = REFUSALS[case]
    paths = {"bad": bad_sources, "gray": gray_model[1], "broken": broken_holdout, "work": work}
    argv = ["import", "--name", "model", "--repository", str(tmp_path)]
    assert main([*argv, *(argument.format(**paths) for argument in arguments)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("costserve-server import: ") and expected in err, err
    assert version_dirs(tmp_path) == []


def test_stray_repository_entries_are_refused_by_name(
    gray_model: tuple[Any, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "gray").mkdir()
    (tmp_path / "gray" / "notes.txt").write_text("left here by hand\n")
    (tmp_path / "gray" / "old").mkdir()
    assert main(["import", str(gray_model[1]), "--name", "gray", "--repository", str(tmp_path)]) == 2
    assert "notes.txt, old" in capsys.readouterr().err
    assert sorted(path.name for path in (tmp_path / "gray").iterdir()) == ["notes.txt", "old"]
