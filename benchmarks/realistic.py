"""The serving benchmark's realistic model: a MobileNetV2 at 96x96x3, imported into a model repository.

The digits model is so cheap that request handling dominates its figures; a
MobileNetV2-class model is where batching and int8 show what they buy. This module
makes that model and the requests sent to it; :mod:`benchmarks.serving` measures it.

- :func:`build_model_files` writes the model, untrained (random weights: nothing is
  downloaded), as ``mobilenet_v2.keras``, an ``.npz`` of random held-out images (``x``
  uint8 (n, 96, 96, 3), ``y`` class indices) and ``labels.txt``;
- :func:`prepare_repository` does that in a subprocess (``python -m benchmarks.realistic
  --out DIR``, so that the benchmark's own process never imports TensorFlow for it),
  then imports the model with the real ``costserve-server import`` (another subprocess)
  into a fresh repository;
- :func:`request_bytes` is the request every realistic run sends: one raw-pixel
  96x96x3 uint8 image naming the model, the cache bypassed.

Accuracy is meaningless here (random weights, random images), so the import keeps int8
whatever its accuracy (``--max-int8-drop 100``).

::

    python -m benchmarks.realistic --out DIR [--holdout N] [--alpha A]   # the model files only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from benchmarks.launch import REPO_ROOT, server_env
from costserve import image_message
from costserve.v1 import classifier_pb2 as pb

#: The model's name in the repository (and in every request).
MODEL_NAME = "mobilenet_v2"
INPUT_SHAPE = (96, 96, 3)
CLASSES = 10
#: MobileNetV2's width multiplier. 1.0, the full model: 5-7 ms per image in a batch of 32 on one core
#: (fp32), slow enough to show batching and int8, fast enough to saturate in seconds.
ALPHA = 1.0
KERAS_FILE = "mobilenet_v2.keras"
HOLDOUT_FILE = "holdout.npz"
LABELS_FILE = "labels.txt"
#: Seeds: the weights and held-out images, and the one image every request sends.
MODEL_SEED = 7
REQUEST_SEED = 96
#: Import flags besides the files: MobileNetV2 takes RGB in [-1, 1] and outputs softmax probabilities.
IMPORT_FLAGS = (
    "--color-mode", "rgb", "--scaling", "symmetric", "--output", "probabilities", "--max-int8-drop", "100",
)  # fmt: skip


@dataclass(frozen=True)
class ImportedModel:
    """A repository holding the realistic model, and what its import measured."""

    repository: Path
    version_dir: Path
    metadata: dict[str, Any]
    #: Seconds to build the Keras file and to import it.
    build_s: float
    import_s: float


def random_images(count: int, seed: int) -> np.ndarray:
    """``count`` random uint8 images at :data:`INPUT_SHAPE`."""
    return np.random.default_rng(seed).integers(0, 256, size=(count, *INPUT_SHAPE), dtype=np.uint8)


def write_holdout(path: Path, count: int, seed: int = MODEL_SEED) -> None:
    """An ``.npz`` of ``count`` random images (``x``) with random class indices (``y``), as the importer reads."""
    labels = np.random.default_rng(seed + 1).integers(0, CLASSES, size=count, dtype=np.int64)
    np.savez(path, x=random_images(count, seed), y=labels)


def build_keras_model(path: Path, alpha: float = ALPHA, seed: int = MODEL_SEED) -> None:
    """An untrained MobileNetV2 (:data:`INPUT_SHAPE` in, :data:`CLASSES` softmax out), saved as ``.keras``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.keras.utils.set_random_seed(seed)
    model = tf.keras.applications.MobileNetV2(
        input_shape=INPUT_SHAPE, alpha=alpha, weights=None, classes=CLASSES, classifier_activation="softmax"
    )
    # Freshly initialised batch norms (mean 0, variance 1) let the activations fade to nothing
    # through the depth, and every image gets exactly 1/10 per class. One training-mode pass
    # with momentum 0 sets each one's statistics to a batch's: the answers then vary by image.
    norms = [layer for layer in model.layers if isinstance(layer, tf.keras.layers.BatchNormalization)]
    momentums = [layer.momentum for layer in norms]
    for layer in norms:
        layer.momentum = 0.0
    model(random_images(32, seed).astype(np.float32) / 127.5 - 1.0, training=True)
    for layer, momentum in zip(norms, momentums):
        layer.momentum = momentum
    model.save(path)


def build_model_files(out: Path, holdout: int, alpha: float = ALPHA) -> None:
    """The Keras model, the held-out ``.npz`` and ``labels.txt`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    build_keras_model(out / KERAS_FILE, alpha)
    write_holdout(out / HOLDOUT_FILE, holdout)
    (out / LABELS_FILE).write_text("".join(f"class_{index}\n" for index in range(CLASSES)))


def import_command(files: Path, repository: Path) -> list[str]:
    """``costserve-server import`` of the model files under ``files`` into ``repository``."""
    return [
        sys.executable, "-m", "costserve.server.cli", "import", str(files / KERAS_FILE),
        "--name", MODEL_NAME, "--repository", str(repository),
        "--holdout", str(files / HOLDOUT_FILE), "--labels", str(files / LABELS_FILE), *IMPORT_FLAGS,
    ]  # fmt: skip


def prepare_repository(workdir: Path, holdout: int, alpha: float = ALPHA, timeout_s: float = 1200) -> ImportedModel:
    """Build the model files and import them into ``workdir/repository``, each step in a subprocess.

    Raises RuntimeError with the step's output when one fails.
    """
    files, repository = workdir / "realistic-model", workdir / "repository"
    repository.mkdir(parents=True, exist_ok=True)
    steps = {
        "build": [
            sys.executable, "-m", "benchmarks.realistic", "--out", str(files), "--holdout", str(holdout),
            "--alpha", str(alpha),
        ],
        "import": import_command(files, repository),
    }  # fmt: skip
    seconds = {}
    for step, command in steps.items():
        started = time.monotonic()
        done = subprocess.run(
            command, cwd=REPO_ROOT, env=server_env(), capture_output=True, text=True, timeout=timeout_s
        )
        seconds[step] = time.monotonic() - started
        if done.returncode != 0:
            raise RuntimeError(
                f"realistic model, {step} step failed ({done.returncode}): {' '.join(command)}\n"
                f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
    version_dir = max(
        (path.parent for path in (repository / MODEL_NAME).glob("*/metadata.json") if path.parent.name.isdigit()),
        key=lambda path: int(path.name),
    )
    metadata = json.loads((version_dir / "metadata.json").read_text())
    return ImportedModel(repository, version_dir, metadata, seconds["build"], seconds["import"])


def request_bytes(precision: int, skip_cache: bool = True) -> bytes:
    """A serialized PredictRequest: one raw-pixel 96x96x3 uint8 image for :data:`MODEL_NAME`."""
    image = random_images(1, REQUEST_SEED)[0]
    return pb.PredictRequest(
        images=[image_message(image)],
        precision=cast(pb.Precision, precision),  # an enum's values are ints at run time
        skip_cache=skip_cache,
        model_name=MODEL_NAME,
    ).SerializeToString()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.realistic``: write the model files."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.realistic",
        description="Write an untrained MobileNetV2 (96x96x3, 10 classes) as .keras, random held-out images, labels.",
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for the files")
    parser.add_argument("--holdout", type=int, default=100, help="random held-out images (default 100)")
    parser.add_argument("--alpha", type=float, default=ALPHA, help=f"MobileNetV2 width multiplier (default {ALPHA})")
    args = parser.parse_args(argv)
    build_model_files(args.out, args.holdout, args.alpha)
    print(f"wrote {args.out / KERAS_FILE}, {args.out / HOLDOUT_FILE} ({args.holdout} images), {args.out / LABELS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
