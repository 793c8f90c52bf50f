"""Train the default digit classifier and export both variants.

The seed's CNN (Conv2D 32 3x3 relu -> MaxPool 2 -> Conv2D 64 3x3 relu -> MaxPool 2
-> Flatten -> Dense 128 relu -> Dense 10 softmax, Adam) is trained on
scikit-learn's bundled handwritten digits (8x8, resized to 28x28) or on a local
Keras-layout ``mnist.npz``. A stratified held-out split is never trained on; both
exported variants are scored on it through the same runtimes that serve them, and the
float LiteRT model that serves fp32 is checked against the SavedModel on it.
Nothing is downloaded.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import numpy as np

from costserve.server.preprocessing import Preprocessing
from costserve.server.repository.importer import (
    CALIBRATION_EXAMPLES,
    ImageSet,
    measure_variants,
    predict_all,
    provenance,
    quantize_int8,
    source_digest,
    utc_now,
    write_fp32_litert,
)
from costserve.server.repository.store import INT8_FILE, METADATA_FILE, SAVED_MODEL_DIR, ModelMetadata, publish_version
from costserve.server.runtimes import Runtime

log = logging.getLogger(__name__)

#: Side of the square images the default model takes, in pixels.
IMAGE_SIDE = 28
#: Share of the data kept out of training to measure accuracy.
HOLDOUT_FRACTION = 0.2
#: Share of the training data used to pick the epoch (early stopping).
VALIDATION_FRACTION = 0.1
#: Seed for the split, weight initialization and shuffling.
SEED = 1234
#: Batch size of the accuracy measurement and of the largest-batch latency (the server's default largest batch).
MEASURE_BATCH_SIZE = 32


@dataclass(frozen=True)
class Dataset:
    """Images as float32 (n, h, w, 1) in [0, 1] with integer labels, split for training and held out."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    holdout_images: np.ndarray
    holdout_labels: np.ndarray
    labels: list[str]


def load_sklearn_digits(side: int = IMAGE_SIDE, seed: int = SEED) -> Dataset:
    """scikit-learn's 1,797 bundled 8x8 digits, resized to ``side`` x ``side``, split stratified."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    small = (digits.images / 16.0 * 255.0).round().astype(np.uint8)
    images = np.stack(
        [np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BILINEAR)) for image in small]
    )
    # Stored as uint8 levels, as a PNG of it would be, so that held-out files decode to the same input.
    images = (images.astype(np.float32) / 255.0)[..., None]
    train_x, holdout_x, train_y, holdout_y = train_test_split(
        images, digits.target, test_size=HOLDOUT_FRACTION, random_state=seed, stratify=digits.target
    )
    return Dataset(
        name=f"sklearn-digits ({len(images)} 8x8 images resized to {side}x{side})",
        train_images=train_x,
        train_labels=train_y,
        holdout_images=holdout_x,
        holdout_labels=holdout_y,
        labels=[str(label) for label in range(10)],
    )


def load_mnist_npz(path: Path) -> Dataset:
    """A local Keras-layout ``mnist.npz`` (x_train, y_train, x_test, y_test; uint8 28x28)."""
    with np.load(path) as data:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(data.files)
        if missing:
            raise ValueError(f"{path} lacks {sorted(missing)}; expected the Keras mnist.npz layout")
        train_x, train_y = data["x_train"], data["y_train"]
        test_x, test_y = data["x_test"], data["y_test"]
    to_float = lambda images: (images.astype(np.float32) / 255.0)[..., None]  # noqa: E731
    return Dataset(
        name=f"mnist.npz ({len(train_x)} training, {len(test_x)} test images)",
        train_images=to_float(train_x),
        train_labels=train_y.astype(np.int64),
        holdout_images=to_float(test_x),
        holdout_labels=test_y.astype(np.int64),
        labels=[str(label) for label in range(10)],
    )


def build_model(input_shape: tuple[int, int, int], num_classes: int) -> Any:  # a keras.Model: TensorFlow has no types
    """The seed's CNN, compiled with Adam and sparse categorical cross-entropy."""
    import tensorflow as tf

    layers = tf.keras.layers
    model = tf.keras.Sequential(
        [
            tf.keras.Input(shape=input_shape, name="image"),
            layers.Conv2D(32, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(64, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dense(128, activation="relu"),
            layers.Dense(num_classes, activation="softmax"),
        ],
        name="digits_cnn",
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def accuracy(runtime: Runtime, images: np.ndarray, labels: np.ndarray, batch_size: int = 32) -> float:
    """Share of ``images`` the runtime labels correctly."""
    return float((predict_all(runtime, images, batch_size).argmax(axis=1) == labels).mean())


def train_and_export(
    model_dir: Path,
    data_path: Path | None = None,
    epochs: int | None = None,
    seed: int = SEED,
    name: str = "digits",
) -> Path:
    """Train, export fp32 and int8 as the next version under ``model_dir``, return its directory.

    fp32 is exported as a SavedModel and as a float LiteRT model (``model_fp32.tflite``, left
    out with a warning in the log when its conversion or its check against the SavedModel fails).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    dataset = load_mnist_npz(data_path) if data_path else load_sklearn_digits(seed=seed)
    epochs = epochs if epochs is not None else (6 if data_path else 40)
    log.info("training on %s for up to %d epochs", dataset.name, epochs)
    tf.keras.utils.set_random_seed(seed)
    input_shape = tuple(dataset.train_images.shape[1:])
    model = build_model(input_shape, len(dataset.labels))
    model.fit(
        dataset.train_images,
        dataset.train_labels,
        epochs=epochs,
        batch_size=32,
        verbose=2,
        # Model selection uses a slice of the training data; the held-out split stays unseen.
        validation_split=VALIDATION_FRACTION,
        callbacks=[tf.keras.callbacks.EarlyStopping(monitor="val_loss", patience=5, restore_best_weights=True)],
    )

    preprocessing = Preprocessing()  # the digits' pixels as they are: gray, [0, 1], probabilities out
    holdout = ImageSet(images=dataset.holdout_images, labels=dataset.holdout_labels, description=dataset.name)
    with publish_version(model_dir) as (staging, version):
        saved_model = staging / SAVED_MODEL_DIR
        model.export(str(saved_model), verbose=False)
        notes = write_fp32_litert(staging)
        # Calibrated on training images: the held-out split stays unseen until it is measured.
        (staging / INT8_FILE).write_bytes(quantize_int8(saved_model, dataset.train_images, preprocessing, seed))
        measured = measure_variants(staging, preprocessing, holdout, max_batch_size=MEASURE_BATCH_SIZE)
        notes.extend(measured.notes)
        metadata = ModelMetadata(
            name=name,
            version=version,
            input_shape=input_shape,
            labels=dataset.labels,
            variants=measured.variants,
            holdout_examples=len(dataset.holdout_labels),
            training_data=dataset.name,
            created_at=utc_now(),
            training={
                "architecture": "Conv2D32-MaxPool-Conv2D64-MaxPool-Dense128-Dense10",
                "optimizer": "adam",
                "max_epochs": epochs,
                "early_stopping": "val_loss, patience 5, best weights restored",
                "seed": seed,
                "tensorflow": tf.__version__,
                "quantization": f"post-training full-integer, {CALIBRATION_EXAMPLES} calibration images",
            },
            preprocessing=preprocessing.to_dict(),
            int8_agreement=measured.int8_agreement,
            provenance=(
                provenance("train", str(data_path), source_digest(data_path))
                if data_path
                else provenance(
                    "train", "sklearn.datasets.load_digits", None, scikit_learn=package_metadata.version("scikit-learn")
                )
            ),
        )
        (staging / METADATA_FILE).write_text(metadata.to_json())
    for precision, info in measured.variants.items():
        log.info(
            "version %s %s: held-out accuracy %.4f, %d bytes, measured on %s",
            version,
            precision,
            info.accuracy,
            info.size_bytes,
            info.measured_runtime,
        )
    for note in notes:
        log.warning("version %s: %s", version, note)
    return model_dir / version
