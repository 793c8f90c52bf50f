"""examples/custom_model/make_shapes.py runs and writes a model that classifies its held-out images.

The example is what docs/models.md imports; this keeps it from rotting: the script runs
(in a subprocess, as a user runs it), writes the Keras model, the held-out ImageFolder and
the labels, and the model loads and is right on more than 90% of the held-out images.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "examples" / "custom_model" / "make_shapes.py"
CLASSES = ["circle", "cross", "square", "triangle"]


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The script's output directory (it trains once for the whole module)."""
    out = tmp_path_factory.mktemp("shapes")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, f"make_shapes.py failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return out


def _holdout(shapes_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for index, name in enumerate(sorted(path.name for path in (shapes_dir / "holdout").iterdir())):
        for path in sorted((shapes_dir / "holdout" / name).glob("*.png")):
            with Image.open(path) as opened:
                images.append(np.asarray(opened.convert("RGB"), dtype=np.uint8))
            labels.append(index)
    return np.stack(images), np.asarray(labels)


@pytest.mark.slow
def test_writes_model_holdout_and_labels(shapes_dir: Path) -> None:
    assert (shapes_dir / "shapes.keras").is_file()
    assert (shapes_dir / "labels.txt").read_text().split() == CLASSES
    folders = sorted(path.name for path in (shapes_dir / "holdout").iterdir())
    assert folders == CLASSES, "the ImageFolder's sorted sub-folders are the labels, in order"
    for name in folders:
        pngs = list((shapes_dir / "holdout" / name).glob("*.png"))
        assert len(pngs) >= 40, f"holdout/{name} has {len(pngs)} images"
        with Image.open(pngs[0]) as opened:
            assert opened.size == (32, 32) and opened.mode == "RGB"


@pytest.mark.slow
def test_model_classifies_the_holdout(shapes_dir: Path) -> None:
    import tensorflow as tf

    model = tf.keras.models.load_model(shapes_dir / "shapes.keras")
    assert tuple(model.input_shape) == (None, 32, 32, 3)
    images, labels = _holdout(shapes_dir)
    probabilities = np.asarray(model(images.astype(np.float32) / 255.0))
    assert probabilities.shape == (len(labels), len(CLASSES))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)  # softmax: probabilities out
    accuracy = float((probabilities.argmax(axis=1) == labels).mean())
    assert accuracy > 0.9, f"held-out accuracy {accuracy:.3f}"
