"""The inputs: the server's held-out digits and their labelled variants, or the image files of a folder
(``--inputs DIR``), and which of them each request carries.

Both kinds of pool (:class:`InputPool`, :class:`FileInputPool`) give each input as an image
(levels, or a file's bytes) and serialized once as a ``PredictRequest.images`` field, and say
whether an answer to it is correct (:class:`Inputs`); each protocol's codec
(:mod:`costserve.loadtest.protocols`) writes the requests from them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from costserve.client import image_message
from costserve.loadtest.config import LoadtestConfig
from costserve.loadtest.protocols import Codec, Labelled, V1Codec
from costserve.v1 import classifier_pb2 as pb

#: One-pixel shifts (dy, dx) that make variants of a held-out digit; no shift first.
SHIFTS = ((0, 0), (0, 1), (1, 0), (0, -1), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1))
#: Values XOR-ed into the top-left pixel (at most 31 grey levels) to make further variants.
CORNER_TAGS = 32
#: The held-out split of the server's default model (see costserve.server.training).
HOLDOUT_FRACTION = 0.2
SPLIT_SEED = 1234
#: File name endings (any case) of the images ``--inputs`` sends: the formats the server decodes.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class Inputs(Protocol):
    """What the load generator needs of a pool of inputs; ids run from 0 to ``size - 1``."""

    #: Number of distinct inputs; ids wrap around past it.
    size: int

    def field(self, input_id: int) -> bytes:
        """The serialized ``PredictRequest.images`` entry of input ``input_id``."""
        ...

    def image(self, input_id: int) -> np.ndarray | bytes:
        """Input ``input_id``: uint8 levels (height, width), or an encoded image file."""
        ...

    def first_id(self, seed: int) -> int:
        """The id distinct inputs start from under ``--seed seed``."""
        ...

    def correct(self, input_id: int, prediction: Labelled) -> bool | None:
        """Whether ``prediction`` is the known answer for input ``input_id``; None when its label is unknown."""
        ...

    def describe(self) -> str:
        """Where the inputs come from, for the report."""
        ...


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

    def first_id(self, seed: int) -> int:
        """Distinct inputs start at ``seed`` x the number of held-out images, so a new seed meets a cold cache."""
        return seed * len(self.images)

    def correct(self, input_id: int, prediction: Labelled) -> bool:
        """Whether ``prediction`` names the known class index of input ``input_id``."""
        return prediction.label == self.label(input_id)

    def describe(self) -> str:
        """``held-out digits``."""
        return "held-out digits"

    def image(self, input_id: int) -> np.ndarray:
        """The levels (height, width) of input ``input_id``."""
        return variant(self.images, input_id)

    def field(self, input_id: int) -> bytes:
        """The serialized ``images`` entry of input ``input_id``."""
        serialized = self._fields[input_id]
        if serialized is None:
            request = pb.PredictRequest(images=[image_message(self.image(input_id))])
            serialized = self._fields[input_id] = request.SerializeToString()
        return serialized


@dataclass(frozen=True)
class ImageFiles:
    """The images of an ``--inputs`` folder, and the class of each one when the folder has classes."""

    root: Path
    paths: tuple[Path, ...]
    #: The class name (sub-folder) of each file, or None for a flat folder.
    classes: tuple[str, ...] | None

    @property
    def class_names(self) -> list[str]:
        """The classes with at least one image, sorted (empty for a flat folder)."""
        return sorted(set(self.classes or ()))


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def find_images(root: str | Path) -> ImageFiles:
    """The PNG and JPEG files of ``root``, in either layout; raises ValueError when it has none.

    * ImageFolder (as torchvision's): one sub-folder per class, its name the class name; the
      images may sit at any depth below it.
    * Flat: the images directly in ``root``; their classes are unknown.

    Files are recognised by their ending (.png, .jpg, .jpeg, any case); other files and hidden
    files and folders are ignored. A folder with both class folders and images of its own is
    refused, since it is not clear which layout is meant.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"--inputs {root}: not a directory")
    own = sorted(path for path in root.iterdir() if _is_image(path))
    folders = sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith("."))
    paths: list[Path] = []
    classes: list[str] = []
    for folder in folders:
        found = sorted(
            path
            for path in folder.rglob("*")
            if _is_image(path) and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        )
        paths += found
        classes += [folder.name] * len(found)
    if paths and own:
        raise ValueError(
            f"--inputs {root}: holds both images ({own[0].name}, ...) and class folders with images "
            f"({classes[0]}, ...); use one sub-folder per class, or a flat folder of images"
        )
    if paths:
        return ImageFiles(root, tuple(paths), tuple(classes))
    if own:
        return ImageFiles(root, tuple(own), None)
    raise ValueError(f"--inputs {root}: no PNG or JPEG files ({', '.join(IMAGE_SUFFIXES)}) in it or its sub-folders")


class FileInputPool:
    """The images of an ``--inputs`` folder as inputs: each file is one input, sent as its encoded bytes.

    The server decodes and preprocesses them as it would any client's files. Every file is read
    once, here, so that no disk read falls inside a measured request; their order is shuffled by
    ``seed`` so that any prefix of a run mixes the classes. With classes, an answer is correct when
    its ``label_name`` is the file's class (folder) name.
    """

    def __init__(self, files: ImageFiles, seed: int = 0) -> None:
        order = np.random.default_rng(seed).permutation(len(files.paths))
        self.files = files
        self.paths = [files.paths[index] for index in order]
        #: The class name of each input, or None for a flat folder.
        self.classes = [files.classes[index] for index in order] if files.classes is not None else None
        self.size = len(self.paths)
        self._files = [path.read_bytes() for path in self.paths]
        self._fields: list[bytes | None] = [None] * self.size

    def class_name(self, input_id: int) -> str | None:
        """The class (folder) name of input ``input_id``, or None for a flat folder."""
        return self.classes[input_id % self.size] if self.classes is not None else None

    def image(self, input_id: int) -> bytes:
        """The bytes of input ``input_id``'s file."""
        return self._files[input_id % self.size]

    def field(self, input_id: int) -> bytes:
        """The serialized ``images`` entry of input ``input_id``: the file's bytes as ``Image.encoded``."""
        index = input_id % self.size
        serialized = self._fields[index]
        if serialized is None:
            request = pb.PredictRequest(images=[pb.Image(encoded=self._files[index])])
            serialized = self._fields[index] = request.SerializeToString()
        return serialized

    def first_id(self, seed: int) -> int:
        """0: every seed uses the same files (``seed`` shuffled their order)."""
        return 0

    def correct(self, input_id: int, prediction: Labelled) -> bool | None:
        """Whether the answer's ``label_name`` is the file's class name; None for a flat folder."""
        expected = self.class_name(input_id)
        return None if expected is None else prediction.label_name == expected

    def describe(self) -> str:
        """``DIR (N files, K classes)`` or ``DIR (N files, no labels)``."""
        kinds = f"{len(self.files.class_names)} classes" if self.classes is not None else "no labels"
        return f"{self.files.root} ({self.size:,} files, {kinds})"


def input_pool(config: LoadtestConfig, height: int, width: int) -> InputPool | FileInputPool:
    """The inputs of a run: ``config.inputs``'s files, or else the held-out digits at the model's input size."""
    if config.inputs is not None:
        return FileInputPool(find_images(config.inputs), seed=config.seed)
    return InputPool(*load_holdout_digits(height, width))


class InputPicker:
    """Chooses each image of one process's requests: distinct, repeated by fraction, or Zipf-popular.

    Distinct inputs start at id ``pool.first_id(seed)`` (``seed * 360`` for the digits, so a new
    seed meets a cold cache) and are striped over processes (process i of n takes the i-th, (i+n)-th, ... of them), so
    processes never repeat one another's inputs by accident. ``codec`` writes the requests (default: costserve.v1).
    """

    def __init__(
        self, pool: Inputs, config: LoadtestConfig, worker: int, workers: int, codec: Codec | None = None
    ) -> None:
        self.pool = pool
        self.repeat = config.repeat
        self.worker, self.workers = worker, workers
        self.rng = np.random.default_rng([config.seed, worker])
        self.codec = codec or V1Codec(config, pool)
        self.images_per_request = config.images_per_request
        #: True once every distinct input was used and ids wrapped around.
        self.wrapped = False
        self._first_id = pool.first_id(config.seed)
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
        """(the serialized request, the input ids it carries, those sent for the first time)."""
        ids: list[int] = []
        new: list[int] = []
        for _ in range(self.images_per_request):
            input_id, is_new = self._pick()
            ids.append(input_id)
            if is_new:
                new.append(input_id)
        return self.codec.request(ids), ids, new

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
