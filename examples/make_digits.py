"""Write examples/digits/digit_<label>.png: a typical held-out image of each class.

The images come from the default model's held-out split (never trained on), as
28x28 grayscale PNGs, light digit on dark background like the training data. For
each class the held-out image nearest the class's mean training image is taken,
so the examples are typical writing rather than the split's first draw.

    .venv/bin/python examples/make_digits.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from costserve.server.training import load_sklearn_digits

OUTPUT_DIR = Path(__file__).resolve().parent / "digits"


def main() -> None:
    """Write one PNG per class."""
    dataset = load_sklearn_digits()
    OUTPUT_DIR.mkdir(exist_ok=True)
    for label in range(len(dataset.labels)):
        centroid = dataset.train_images[dataset.train_labels == label].mean(axis=0)
        candidates = np.flatnonzero(dataset.holdout_labels == label)
        distances = ((dataset.holdout_images[candidates] - centroid) ** 2).sum(axis=(1, 2, 3))
        index = int(candidates[np.argmin(distances)])
        pixels = (dataset.holdout_images[index, :, :, 0] * 255.0).round().astype(np.uint8)
        path = OUTPUT_DIR / f"digit_{label}.png"
        Image.fromarray(pixels, mode="L").save(path, optimize=True)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
