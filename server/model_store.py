"""Model artifacts on disk, in TensorFlow Serving's layout.

::

    <model_dir>/
      1/
        saved_model/         fp32 SavedModel (serving_default signature)
        model_int8.tflite    int8, post-training full-integer quantization
        metadata.json        input shape, labels, per-variant accuracy and size, provenance
      2/ ...

Versions are positive integers; the highest complete one (it has ``metadata.json``)
is served. Trainers write a version into a temporary directory and rename it into
place, so a server never sees half a version.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from costserve.server.domain import Precision
from costserve.server.runtimes import LiteRTRuntime, Runtime, SavedModelRuntime

METADATA_FILE = "metadata.json"
SAVED_MODEL_DIR = "saved_model"
INT8_FILE = "model_int8.tflite"


@dataclass(frozen=True)
class VariantInfo:
    """One servable variant of a model version."""

    path: str
    format: str
    accuracy: float
    size_bytes: int


@dataclass(frozen=True)
class ModelMetadata:
    """What ``metadata.json`` holds about a model version."""

    name: str
    version: str
    input_shape: tuple[int, int, int]
    labels: list[str]
    variants: dict[str, VariantInfo]
    holdout_examples: int
    training_data: str
    created_at: str
    training: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """Serialize for ``metadata.json``."""
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ModelMetadata:
        """Parse ``metadata.json`` text."""
        raw = json.loads(text)
        raw["input_shape"] = tuple(raw["input_shape"])
        raw["variants"] = {name: VariantInfo(**info) for name, info in raw["variants"].items()}
        return cls(**raw)

    def variant(self, precision: Precision) -> VariantInfo:
        """The variant serving ``precision`` (fp32 or int8)."""
        return self.variants[precision.value]


def list_versions(model_dir: Path) -> list[Path]:
    """Complete version directories under ``model_dir``, oldest first."""
    if not model_dir.is_dir():
        return []
    versions = [
        path
        for path in model_dir.iterdir()
        if path.is_dir() and path.name.isdigit() and int(path.name) > 0 and (path / METADATA_FILE).is_file()
    ]
    return sorted(versions, key=lambda path: int(path.name))


def latest_version_dir(model_dir: Path) -> Path | None:
    """The highest complete version under ``model_dir``, or None when there is none."""
    versions = list_versions(model_dir)
    return versions[-1] if versions else None


def next_version(model_dir: Path) -> str:
    """The version number a new export should take."""
    taken = [int(path.name) for path in model_dir.iterdir() if path.name.isdigit()] if model_dir.is_dir() else []
    return str(max(taken, default=0) + 1)


def read_metadata(version_dir: Path) -> ModelMetadata:
    """Read a version's ``metadata.json``."""
    return ModelMetadata.from_json((version_dir / METADATA_FILE).read_text())


@dataclass
class LoadedModel:
    """A model version with both variants loaded and checked against its metadata."""

    metadata: ModelMetadata
    version_dir: Path
    runtimes: dict[Precision, Runtime]

    @property
    def version(self) -> str:
        """The version directory's name."""
        return self.metadata.version

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(height, width, channels), as read from the model files."""
        return self.runtimes[Precision.FP32].input_shape


def load_model(version_dir: Path, max_batch_size: int, threads: int = 1) -> LoadedModel:
    """Load the fp32 and int8 variants of ``version_dir``; the input shape comes from the files.

    ``threads`` is what each runtime may use within one call: 1 (the server's default
    ``--inference-threads``) keeps all of a call on its calling thread; 0 lets each choose.
    """
    metadata = read_metadata(version_dir)
    runtimes: dict[Precision, Runtime] = {
        Precision.FP32: SavedModelRuntime(version_dir / metadata.variant(Precision.FP32).path, threads=threads),
        Precision.INT8: LiteRTRuntime(
            version_dir / metadata.variant(Precision.INT8).path, max_batch_size=max_batch_size, threads=threads
        ),
    }
    for precision, runtime in runtimes.items():
        if runtime.input_shape != runtimes[Precision.FP32].input_shape:
            raise ValueError(
                f"{version_dir}: {precision.value} takes {runtime.input_shape}, fp32 takes "
                f"{runtimes[Precision.FP32].input_shape}"
            )
        if runtime.num_classes != len(metadata.labels):
            raise ValueError(
                f"{version_dir}: {precision.value} has {runtime.num_classes} outputs for {len(metadata.labels)} labels"
            )
    return LoadedModel(metadata=metadata, version_dir=version_dir, runtimes=runtimes)
