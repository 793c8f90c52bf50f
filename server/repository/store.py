"""Model versions on disk, in TensorFlow Serving's layout.

::

    <repository>/
      digits/                  one model: its name is the directory's name
        model.toml             optional: the version policy (see ModelConfig)
        1/
          saved_model/         fp32 SavedModel (serving_default signature)
          model_fp32.tflite    fp32 converted for LiteRT, checked against the SavedModel (absent: fp32 on TensorFlow)
          model_int8.tflite    int8, post-training full-integer quantization (absent: fp32 only)
          metadata.json        input shape, preprocessing, labels, variants, provenance
        2/ ...
      shapes/ ...

Versions are positive integers; a version is complete once it has ``metadata.json``.
Writers build a version in a hidden staging directory beside it and rename it into
place (:func:`publish_version`), so a server never sees half a version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from costserve.server.domain import Precision
from costserve.server.preprocessing import Preprocessing
from costserve.server.profile import CostProfile
from costserve.server.runtimes import LiteRTRuntime, Runtime, SavedModelRuntime

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

log = logging.getLogger(__name__)

METADATA_FILE = "metadata.json"
SAVED_MODEL_DIR = "saved_model"
#: The fp32 model converted for LiteRT (float, no optimizations), beside the SavedModel it was made from.
FP32_LITERT_FILE = "model_fp32.tflite"
INT8_FILE = "model_int8.tflite"
#: A model's optional version policy file.
CONFIG_FILE = "model.toml"
VERSION_POLICIES = ("latest", "specific", "all")
#: What serves fp32 when a version has its float LiteRT model (``--fp32-runtime``).
Fp32Runtime = Literal["litert", "tensorflow"]


@dataclass(frozen=True)
class VariantInfo:
    """One servable variant of a model version."""

    path: str
    format: str
    #: Top-1 accuracy on held-out data (0..1); None when no held-out data was given.
    accuracy: float | None
    size_bytes: int
    #: Measured at import, milliseconds per image: one image alone, and in a batch of the largest size.
    latency_ms_batch_1: float = 0.0
    latency_ms_per_image_max_batch: float = 0.0
    #: The runtime ``accuracy`` and the latencies were measured through, the one that serves the variant by
    #: default: "litert" or "tensorflow" ("" in versions made before it was recorded: fp32 on TensorFlow).
    measured_runtime: str = ""
    #: fp32 only: the float LiteRT model (relative to the version directory) that serves the variant by default;
    #: None when the version has none (made before costserve wrote one, or its conversion or check failed).
    litert_path: str | None = None
    #: fp32 only: the largest absolute difference between the LiteRT model's probabilities and the SavedModel's
    #: over the images it was checked on (at most 1e-5, with the same top-1 class on every image).
    litert_max_abs_diff: float | None = None


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
    #: ``Preprocessing.to_dict()``; empty in versions written before preprocessing was stored.
    preprocessing: dict[str, Any] = field(default_factory=dict)
    #: Share of held-out images where fp32 and int8 agree on the top-1 class; None when not measured.
    int8_agreement: float | None = None
    #: Where the version came from: source file and digest, library versions, command.
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """Serialize for ``metadata.json``."""
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ModelMetadata:
        """Parse ``metadata.json`` text; raises ValueError naming what is wrong."""
        try:
            raw = json.loads(text)
            # Fields a newer costserve adds are skipped, so an older server still serves its versions.
            raw = {key: value for key, value in raw.items() if key in _METADATA_FIELDS}
            raw["input_shape"] = tuple(int(dim) for dim in raw["input_shape"])
            raw["variants"] = {
                name: VariantInfo(**{key: value for key, value in info.items() if key in _VARIANT_FIELDS})
                for name, info in raw["variants"].items()
            }
            metadata = cls(**raw)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{METADATA_FILE} is not valid: {type(error).__name__}: {error}") from None
        if len(metadata.input_shape) != 3 or not metadata.variants:
            raise ValueError(f"{METADATA_FILE} needs a 3-dimensional input_shape and at least one variant")
        unknown = set(metadata.variants) - {Precision.FP32.value, Precision.INT8.value}
        if unknown:
            raise ValueError(f"{METADATA_FILE} names unknown variants {sorted(unknown)}; expected fp32 and/or int8")
        return metadata

    @property
    def precisions(self) -> list[Precision]:
        """The variants this version has, fp32 first."""
        return [precision for precision in (Precision.FP32, Precision.INT8) if precision.value in self.variants]

    def variant(self, precision: Precision) -> VariantInfo:
        """The variant serving ``precision`` (fp32 or int8)."""
        return self.variants[precision.value]

    def preprocessing_spec(self) -> Preprocessing:
        """The stored preprocessing (older versions: [0, 1] pixels in, probabilities out)."""
        return Preprocessing.from_dict(self.preprocessing, self.input_shape[2])


_METADATA_FIELDS = frozenset(field.name for field in dataclasses.fields(ModelMetadata))
_VARIANT_FIELDS = frozenset(field.name for field in dataclasses.fields(VariantInfo))


@dataclass(frozen=True)
class ModelConfig:
    """A model's version policy, read from ``<model>/model.toml`` (like TensorFlow Serving's).

    ::

        version_policy = "latest"   # latest (the newest `latest` versions), specific, or all
        latest = 1
        versions = [3, 4]           # with "specific"
    """

    version_policy: str = "latest"
    latest: int = 1
    versions: tuple[int, ...] = ()

    @classmethod
    def read(cls, model_dir: Path) -> ModelConfig:
        """The model's config, or the default (the newest version) without a file; ValueError when it is bad."""
        path = model_dir / CONFIG_FILE
        if not path.is_file():
            return cls()
        try:
            raw = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: not valid TOML ({error})") from None
        unknown = set(raw) - {"version_policy", "latest", "versions"}
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; expected version_policy, latest, versions")
        config = cls(
            version_policy=raw.get("version_policy", "latest"),
            latest=raw.get("latest", 1),
            versions=tuple(raw.get("versions", ())),
        )
        if config.version_policy not in VERSION_POLICIES:
            raise ValueError(f"{path}: version_policy {config.version_policy!r} is not one of latest, specific, all")
        if not isinstance(config.latest, int) or config.latest < 1:
            raise ValueError(f"{path}: latest must be a whole number of versions, 1 or more")
        if config.version_policy == "specific" and (
            not config.versions or not all(isinstance(v, int) and v > 0 for v in config.versions)
        ):
            raise ValueError(f"{path}: version_policy specific needs versions = [N, ...] of positive integers")
        return config

    def select(self, versions: list[int]) -> list[int]:
        """Which of the complete ``versions`` (sorted ascending) to serve."""
        if self.version_policy == "all":
            return list(versions)
        if self.version_policy == "specific":
            return [version for version in versions if version in self.versions]
        return versions[-self.latest :]


def is_version_name(name: str) -> bool:
    """A version directory's name: a positive integer."""
    return name.isdigit() and int(name) > 0


def list_versions(model_dir: Path) -> list[Path]:
    """Complete version directories under ``model_dir``, oldest first."""
    if not model_dir.is_dir():
        return []
    versions = [
        path
        for path in model_dir.iterdir()
        if path.is_dir() and is_version_name(path.name) and (path / METADATA_FILE).is_file()
    ]
    return sorted(versions, key=lambda path: int(path.name))


def stray_entries(model_dir: Path) -> list[str]:
    """Entries of a model directory that are neither versions, nor its config, nor hidden staging."""
    if not model_dir.is_dir():
        return []
    return sorted(
        entry.name
        for entry in model_dir.iterdir()
        if not entry.name.startswith(".")
        and entry.name != CONFIG_FILE
        and not (entry.is_dir() and is_version_name(entry.name))
    )


def latest_version_dir(model_dir: Path) -> Path | None:
    """The highest complete version under ``model_dir``, or None when there is none."""
    versions = list_versions(model_dir)
    return versions[-1] if versions else None


def list_models(repository: Path) -> list[Path]:
    """Model directories of a repository (visible sub-directories), by name."""
    if not repository.is_dir():
        return []
    return sorted(path for path in repository.iterdir() if path.is_dir() and not path.name.startswith("."))


def next_version(model_dir: Path) -> str:
    """The version number a new export should take."""
    taken = [int(path.name) for path in model_dir.iterdir() if path.name.isdigit()] if model_dir.is_dir() else []
    return str(max(taken, default=0) + 1)


def read_metadata(version_dir: Path) -> ModelMetadata:
    """Read a version's ``metadata.json``."""
    return ModelMetadata.from_json((version_dir / METADATA_FILE).read_text())


@contextlib.contextmanager
def publish_version(model_dir: Path) -> Iterator[tuple[Path, str]]:
    """Build the next version of ``model_dir`` in a hidden staging directory; rename it into place on success.

    Yields (staging directory, version). On an error the staging directory is removed
    and nothing is published; a server only ever sees complete versions.
    """
    model_dir.mkdir(parents=True, exist_ok=True)
    version = next_version(model_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=model_dir))
    try:
        yield staging, version
        if not (staging / METADATA_FILE).is_file():
            raise RuntimeError(f"{staging} was not given a {METADATA_FILE}")
        os.chmod(staging, 0o755)  # mkdtemp makes it private; a server running as another user reads it
        staging.rename(model_dir / version)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def directory_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (or of ``path`` itself)."""
    if path.is_file():
        return path.stat().st_size
    return sum(entry.stat().st_size for entry in path.rglob("*") if entry.is_file())


@dataclass
class LoadedModel:
    """A model version with its variants loaded and checked against its metadata."""

    metadata: ModelMetadata
    version_dir: Path
    runtimes: dict[Precision, Runtime]
    #: Variants served from another artifact than their own ``path`` (fp32 on LiteRT): that artifact's
    #: path, format and size.
    served: dict[Precision, VariantInfo] = field(default_factory=dict)
    #: What an image costs each variant on this host, by batch size: measured when the version is
    #: switched in, then kept current by live batches (None until then).
    profile: CostProfile | None = None

    @property
    def name(self) -> str:
        """The model's name: its directory's name in the repository."""
        return self.version_dir.parent.name

    @property
    def version(self) -> str:
        """The version directory's name."""
        return self.metadata.version

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(height, width, channels), as read from the model files."""
        return next(iter(self.runtimes.values())).input_shape

    @property
    def preprocessing(self) -> Preprocessing:
        """How images become this version's input."""
        return next(iter(self.runtimes.values())).preprocessing

    @property
    def signature_keys(self) -> tuple[str, str]:
        """The names of the model's input and output: its SavedModel signature's (kept by the LiteRT models)."""
        runtime = self.runtimes.get(Precision.FP32) or next(iter(self.runtimes.values()))
        return runtime.signature_keys

    def variant(self, precision: Precision) -> VariantInfo:
        """The variant as served: its metadata, with the path, format and size of the artifact that serves it."""
        return self.served.get(precision) or self.metadata.variant(precision)

    def accuracy(self) -> dict[Precision, float | None]:
        """Held-out accuracy of each loaded variant (None: unknown)."""
        return {precision: self.metadata.variant(precision).accuracy for precision in self.runtimes}

    def close(self) -> None:
        """Release every runtime."""
        for runtime in self.runtimes.values():
            runtime.close()


#: Each variant's artifact in a version directory, and its ``format`` in ``metadata.json``.
ARTIFACTS = {Precision.FP32: (SAVED_MODEL_DIR, "saved_model"), Precision.INT8: (INT8_FILE, "tflite")}


def open_runtime(
    precision: Precision, artifact: Path, preprocessing: Preprocessing, max_batch_size: int, threads: int
) -> Runtime:
    """The runtime serving ``precision`` from ``artifact``: LiteRT for a ``.tflite``, TensorFlow for a SavedModel."""
    if artifact.suffix == ".tflite":
        return LiteRTRuntime(
            artifact, max_batch_size=max_batch_size, threads=threads, preprocessing=preprocessing, precision=precision
        )
    if precision is not Precision.FP32:
        raise ValueError(f"{artifact}: a SavedModel serves fp32, not {precision.value}")
    return SavedModelRuntime(artifact, threads=threads, preprocessing=preprocessing)


#: Version directories whose fp32 fallback to TensorFlow was logged: once each per process.
_fallbacks_logged: set[Path] = set()


def serving_artifact(
    version_dir: Path, metadata: ModelMetadata, precision: Precision, fp32_runtime: Fp32Runtime
) -> Path:
    """The artifact ``precision`` is served from: fp32's float LiteRT model when the version has it and
    ``fp32_runtime`` is "litert", else the variant's own (the SavedModel for fp32; the fallback is logged once)."""
    info = metadata.variant(precision)
    if precision is Precision.FP32 and fp32_runtime == "litert":
        if info.litert_path is not None and (version_dir / info.litert_path).is_file():
            return version_dir / info.litert_path
        if version_dir not in _fallbacks_logged:
            _fallbacks_logged.add(version_dir)
            if info.litert_path is not None:
                log.warning(
                    "%s: fp32 is served by TensorFlow from its SavedModel: %s names %s, which is missing",
                    version_dir,
                    METADATA_FILE,
                    info.litert_path,
                )
            else:
                log.info(
                    "%s: fp32 is served by TensorFlow from its SavedModel: the version has no %s (made before "
                    "costserve wrote one, or its conversion or check failed)",
                    version_dir,
                    FP32_LITERT_FILE,
                )
    return version_dir / info.path


def load_model(
    version_dir: Path, max_batch_size: int, threads: int = 1, fp32_runtime: Fp32Runtime = "litert"
) -> LoadedModel:
    """Load every variant of ``version_dir`` and check them against its metadata; ValueError says what is wrong.

    ``threads`` is what each runtime may use within one call: 1 (the server's default
    ``--inference-threads``) keeps all of a call on its calling thread; 0 lets each choose.
    ``fp32_runtime`` (``--fp32-runtime``): "litert" serves fp32 from the version's float
    LiteRT model when it has one (see :func:`serving_artifact`), "tensorflow" from its SavedModel.
    """
    metadata = read_metadata(version_dir)
    if metadata.version != version_dir.name:
        raise ValueError(f"{version_dir}: {METADATA_FILE} says version {metadata.version}")
    preprocessing = metadata.preprocessing_spec()
    preprocessing.check_channels(metadata.input_shape[2])
    runtimes: dict[Precision, Runtime] = {}
    served: dict[Precision, VariantInfo] = {}
    try:
        for precision in metadata.precisions:
            info = metadata.variant(precision)
            artifact = serving_artifact(version_dir, metadata, precision, fp32_runtime)
            if not artifact.exists():
                raise ValueError(f"{version_dir}: the {precision.value} artifact {artifact.name} is missing")
            runtimes[precision] = open_runtime(precision, artifact, preprocessing, max_batch_size, threads)
            if artifact.name != info.path:
                served[precision] = dataclasses.replace(
                    info, path=artifact.name, format="tflite", size_bytes=directory_bytes(artifact)
                )
        for precision, runtime in runtimes.items():
            if runtime.input_shape != metadata.input_shape:
                raise ValueError(
                    f"{version_dir}: {precision.value} takes {runtime.input_shape}, {METADATA_FILE} says "
                    f"{metadata.input_shape}"
                )
            if runtime.num_classes != len(metadata.labels):
                raise ValueError(
                    f"{version_dir}: {precision.value} has {runtime.num_classes} outputs for "
                    f"{len(metadata.labels)} labels"
                )
    except BaseException:
        for runtime in runtimes.values():
            runtime.close()
        raise
    return LoadedModel(metadata=metadata, version_dir=version_dir, runtimes=runtimes, served=served)
