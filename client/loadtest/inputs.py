"""The inputs: the server's held-out digits, their labelled variants, and which of them each request carries."""

from __future__ import annotations

import math

import numpy as np

from costserve.client import PRECISIONS, image_message
from costserve.loadtest.config import LoadtestConfig
from costserve.v1 import classifier_pb2 as pb

#: One-pixel shifts (dy, dx) that make variants of a held-out digit; no shift first.
SHIFTS = ((0, 0), (0, 1), (1, 0), (0, -1), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1))
#: Values XOR-ed into the top-left pixel (at most 31 grey levels) to make further variants.
CORNER_TAGS = 32
#: The held-out split of the server's default model (see costserve.server.training).
HOLDOUT_FRACTION = 0.2
SPLIT_SEED = 1234


def load_holdout_digits(height: int = 28, width: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """The server's held-out digits as uint8 (n, height, width) with their labels.

    The same images and split as ``costserve.server.training.load_sklearn_digits``
    (scikit-learn's bundled 8x8 digits scaled to 0..255, resized bilinearly, 20%
    held out stratified with seed 1234), without importing the server or TensorFlow.
    """
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    small = (digits.images / 16.0 * 255.0).round().astype(np.uint8)
    images = np.stack(
        [np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR)) for image in small]
    )
    _, holdout_images, _, holdout_labels = train_test_split(
        images, digits.target, test_size=HOLDOUT_FRACTION, random_state=SPLIT_SEED, stratify=digits.target
    )
    return holdout_images, holdout_labels.astype(np.int64)


def variant(images: np.ndarray, input_id: int) -> np.ndarray:
    """Input ``input_id``: held-out image ``input_id % n``, shifted by a pixel and corner-tagged by its variant.

    Ids below n are the held-out images themselves; the next 8n are one-pixel shifts;
    further ids also XOR the top-left pixel with 1..31, which keeps every input distinct
    and its label unchanged.
    """
    count = len(images)
    base = images[input_id % count]
    number = input_id // count
    (dy, dx), tag = SHIFTS[number % len(SHIFTS)], number // len(SHIFTS)
    shifted = np.zeros_like(base)
    height, width = base.shape
    shifted[max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = base[
        max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)
    ]
    shifted[0, 0] ^= tag
    return shifted


class InputPool:
    """Distinct labelled inputs, each serialized once (as a ``PredictRequest.images`` field) on first use."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = images
        self.labels = labels
        #: Number of distinct inputs; ids wrap around past it.
        self.size = len(images) * len(SHIFTS) * CORNER_TAGS
        self._fields: list[bytes | None] = [None] * self.size

    def label(self, input_id: int) -> int:
        """The known label of input ``input_id``."""
        return int(self.labels[input_id % len(self.labels)])

    def field(self, input_id: int) -> bytes:
        """The serialized ``images`` entry of input ``input_id``."""
        serialized = self._fields[input_id]
        if serialized is None:
            request = pb.PredictRequest(images=[image_message(variant(self.images, input_id))])
            serialized = self._fields[input_id] = request.SerializeToString()
        return serialized


class InputPicker:
    """Chooses each image of one process's requests: distinct, repeated by fraction, or Zipf-popular.

    Distinct inputs start at id ``seed * 360`` (so a new seed meets a cold cache) and are
    striped over processes (process i of n takes the i-th, (i+n)-th, ... of them), so
    processes never repeat one another's inputs by accident.
    """

    def __init__(self, pool: InputPool, config: LoadtestConfig, worker: int, workers: int) -> None:
        self.pool = pool
        self.repeat = config.repeat
        self.worker, self.workers = worker, workers
        self.rng = np.random.default_rng([config.seed, worker])
        self.tail = pb.PredictRequest(
            precision=PRECISIONS[config.precision], skip_cache=config.skip_cache
        ).SerializeToString()
        self.images_per_request = config.images_per_request
        #: True once every distinct input was used and ids wrapped around.
        self.wrapped = False
        self._first_id = config.seed * len(pool.images)
        self._next_distinct = 0
        self._picked = 0
        self._answered: list[int] = []
        self._zipf_seen: set[int] = set()
        self._zipf_cdf: np.ndarray | None = None
        if self.repeat.zipf_exponent is not None:
            ranks = np.arange(1, min(config.catalog, pool.size) + 1, dtype=np.float64)
            weights = ranks**-self.repeat.zipf_exponent
            self._zipf_cdf = np.cumsum(weights) / weights.sum()

    def request(self) -> tuple[bytes, list[int], list[int]]:
        """(serialized PredictRequest, the input ids it carries, those sent for the first time)."""
        ids: list[int] = []
        new: list[int] = []
        for _ in range(self.images_per_request):
            input_id, is_new = self._pick()
            ids.append(input_id)
            if is_new:
                new.append(input_id)
        return b"".join([self.pool.field(input_id) for input_id in ids] + [self.tail]), ids, new

    def answered(self, new_ids: list[int]) -> None:
        """Record that the inputs ``new_ids`` were answered (a fractional repeat re-sends only those)."""
        if self.repeat.fraction:
            self._answered.extend(new_ids)

    def _pick(self) -> tuple[int, bool]:
        if self._zipf_cdf is not None:
            rank = min(int(np.searchsorted(self._zipf_cdf, self.rng.random(), side="right")), len(self._zipf_cdf) - 1)
            input_id = (self._first_id + rank) % self.pool.size
            is_new = input_id not in self._zipf_seen
            self._zipf_seen.add(input_id)
            return input_id, is_new
        position, self._picked = self._picked, self._picked + 1
        # Position i repeats when floor((i + 1) F) > floor(i F): exactly F of the positions, spread evenly.
        is_repeat_slot = math.floor((position + 1) * self.repeat.fraction) > math.floor(position * self.repeat.fraction)
        if is_repeat_slot and self._answered:
            return self._answered[int(self.rng.integers(len(self._answered)))], False
        distinct = self.worker + self.workers * self._next_distinct
        self._next_distinct += 1
        if distinct >= self.pool.size:
            self.wrapped = True
        return (self._first_id + distinct) % self.pool.size, True
