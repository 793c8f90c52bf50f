"""Turn a Keras file or a SavedModel into a model version: ``costserve-server import``.

::

    from costserve.server.repository.importer import import_model

    report = import_model(Path("flowers.keras"), "flowers", Path("models"), holdout=Path("flowers/holdout"))
    print(report.version_dir, report.metadata.variants["fp32"].accuracy, report.notes)

One import writes ``<repository>/<name>/<next version>/`` (see :mod:`.store`):

* ``saved_model/``: the fp32 model with one input and one output in ``serving_default``,
  at a fixed height x width x channels;
* ``model_fp32.tflite``: the same model converted for LiteRT with no optimizations, which
  serves fp32 by default; kept only when it gives the SavedModel's top-1 class on every
  held-out image (without held-out data: on random images) and probabilities within
  :data:`FP32_LITERT_TOLERANCE` (:func:`check_fp32_litert`);
* ``model_int8.tflite``: post-training full-integer quantization (uint8 in and out),
  calibrated on images fed exactly as the server feeds them; dropped when its held-out
  accuracy falls more than ``max_int8_drop`` points below fp32's;
* ``metadata.json``: input shape, preprocessing, labels, each variant's held-out accuracy,
  size and latency (measured through the runtimes that serve it by default), fp32/int8
  agreement and provenance.

Held-out and calibration data are an image folder (one sub-folder per class, classes in
sorted name order, PNG/JPEG files) or an ``.npz`` with ``x`` (uint8 0..255 or floats in
[0, 1], ``(n, h, w)`` or ``(n, h, w, c)``) and ``y`` (class indices). Files are decoded by
:mod:`costserve.server.inputs`, as the server decodes requests.

Everything that can be refused is checked before anything is written, and the version
appears atomically (:func:`~costserve.server.repository.store.publish_version`): a refused
or failed import leaves the repository as it was. The model building and measuring
helpers here (:func:`write_fp32_litert`, :func:`quantize_int8`, :func:`measure_variants`,
:func:`provenance`) are shared with :mod:`costserve.server.training`.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import re
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from costserve import __version__
from costserve.server.domain import ImageInput, PixelType, Precision, RawPixels
from costserve.server.errors import InvalidInput
from costserve.server.inputs import ImageLimits, decode
from costserve.server.preprocessing import Preprocessing
from costserve.server.repository.store import (
    ARTIFACTS,
    FP32_LITERT_FILE,
    INT8_FILE,
    METADATA_FILE,
    SAVED_MODEL_DIR,
    ModelMetadata,
    VariantInfo,
    directory_bytes,
    open_runtime,
    publish_version,
    stray_entries,
)
from costserve.server.runtimes import Runtime, levels_to_floats

log = logging.getLogger(__name__)

#: Most images fed to the int8 converter to calibrate activation ranges (chosen at random beyond that).
CALIBRATION_EXAMPLES = 500
#: Seed of every random choice an import or a training makes.
SEED = 1234
#: Timed runs per latency figure (their median is kept), after one warm-up run.
LATENCY_RUNS = 5
#: Most any probability of the float LiteRT model may differ from the SavedModel's (absolute).
FP32_LITERT_TOLERANCE = 1e-5
#: Random images the float LiteRT model is checked on when no held-out images are given.
FP32_CHECK_EXAMPLES = 64
#: Files of an image folder that are read as images (case-insensitive).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
KERAS_SUFFIXES = (".keras", ".h5")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class ImportRefused(ValueError):
    """The import cannot go ahead; the message names the problem (the CLI exits 2 with it)."""


@dataclass(frozen=True)
class ImportReport:
    """What an import published."""

    version_dir: Path
    metadata: ModelMetadata
    #: Sentences for a person: why int8 was dropped, files skipped, and the like.
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ImageSet:
    """Labelled images in the server's canonical form, at a model's input shape."""

    #: ``(n, h, w, c)``: uint8 levels 0..255, or float32 pixels in [0, 1].
    images: np.ndarray
    #: int64 class indices, ``(n,)``.
    labels: np.ndarray
    #: What the images are, for ``metadata.json`` and messages.
    description: str
    #: The class folders' names in class-index order (image folders only).
    class_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def pixels(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """float32 pixels in [0, 1] of images ``start:stop``."""
        chunk = self.images[start:stop]
        return levels_to_floats(chunk) if chunk.dtype == np.uint8 else chunk.astype(np.float32, copy=False)


@dataclass(frozen=True)
class VariantMeasurements:
    """What :func:`measure_variants` found about a version's artifacts."""

    variants: dict[str, VariantInfo]
    #: Share of held-out images where fp32 and int8 agree on the top class; None without both.
    int8_agreement: float | None
    notes: list[str]


@dataclass(frozen=True)
class LiteRTCheck:
    """How the float LiteRT model's probabilities compare with the SavedModel's on the same images."""

    images: int
    #: Largest absolute difference of any probability.
    max_abs_diff: float
    #: Images on which the two give different top-1 classes.
    label_mismatches: int

    @property
    def problem(self) -> str | None:
        """Why the LiteRT model cannot stand in for the SavedModel; None when it can."""
        if self.label_mismatches:
            return f"its top-1 class differs from the SavedModel's on {self.label_mismatches} of {self.images} images"
        if not self.max_abs_diff <= FP32_LITERT_TOLERANCE:  # written so that NaN fails too
            return (
                f"its probabilities differ from the SavedModel's by up to {self.max_abs_diff:.3g} "
                f"(at most {FP32_LITERT_TOLERANCE:g} allowed)"
            )
        return None


@dataclass(frozen=True)
class _Source:
    """A model as read from the source, checked and ready to be written as ``saved_model/``."""

    input_shape: tuple[int, int, int]
    num_classes: int
    #: Writes the fp32 SavedModel (one input, one output, fixed height x width) to a path.
    export: Callable[[Path], None]


def import_model(
    source: Path,
    name: str,
    repository: Path,
    *,
    holdout: Path | None = None,
    calibration: Path | None = None,
    labels: Path | None = None,
    preprocessing: Preprocessing | Callable[[int], Preprocessing] | None = None,
    input_shape: tuple[int, int, int] | None = None,
    max_int8_drop: float = 1.0,
    max_batch_size: int = 32,
) -> ImportReport:
    """Import ``source`` (a ``.keras``/``.h5`` file or a SavedModel directory) as the next version of ``name``.

    ``holdout`` measures each variant's accuracy (and, without ``calibration``, calibrates
    int8 with up to :data:`CALIBRATION_EXAMPLES` of its images); ``labels`` is a file of one
    label per line (default: the class folder names, else "0".."n-1"). ``preprocessing`` is
    the model's, or a function of the model's input channels that makes it (default:
    grayscale for 1 channel, rgb for 3, stretch, [0, 1], probabilities). ``input_shape``
    (height, width, channels) fixes a model whose height and width are dynamic. int8 is
    dropped when its held-out accuracy is more than ``max_int8_drop`` percentage points
    below fp32's. Latency is measured at batch 1 and at ``max_batch_size``.

    Raises :class:`ImportRefused` naming the problem; nothing is written then.
    """
    _check_name(name)
    if max_batch_size < 1:
        raise ImportRefused(f"max batch size {max_batch_size} must be at least 1")
    model_dir = repository / name
    stray = stray_entries(model_dir)
    if stray:
        raise ImportRefused(
            f"{model_dir} holds entries that are not versions: {', '.join(stray)}; move them away first "
            "(a model directory holds only numbered versions and model.toml)"
        )
    for path, what in (
        (source, "source"),
        (holdout, "--holdout"),
        (calibration, "--calibration"),
        (labels, "--labels"),
    ):
        if path is not None and not path.exists():
            raise ImportRefused(f"{what} {path} does not exist")
    label_names = _read_labels(labels) if labels is not None else None

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    model = _read_source(source, input_shape)
    if label_names is not None and len(label_names) != model.num_classes:
        raise ImportRefused(f"{labels} has {len(label_names)} labels; the model outputs {model.num_classes} classes")
    channels = model.input_shape[2]
    try:
        if preprocessing is None:
            preprocessing = Preprocessing(color_mode=default_color_mode(channels))
        elif not isinstance(preprocessing, Preprocessing):
            preprocessing = preprocessing(channels)
        preprocessing.check_channels(channels)
    except ValueError as error:
        raise ImportRefused(str(error)) from None

    notes: list[str] = []
    held_out = _read_data(holdout, model.input_shape, preprocessing.resize, notes) if holdout else None
    calibrating = (
        _read_data(calibration, model.input_shape, preprocessing.resize, notes, limit=CALIBRATION_EXAMPLES)
        if calibration
        else held_out
    )
    if held_out is not None:
        _check_classes(held_out, holdout, model.num_classes)
    label_names = label_names or _default_labels(held_out, calibrating, model.num_classes)

    with publish_version(model_dir) as (staging, version_name):
        log.info("writing %s version %s from %s", name, version_name, source)
        model.export(staging / SAVED_MODEL_DIR)
        notes.extend(write_fp32_litert(staging))
        if calibrating is None:
            notes.append("no int8 variant: no calibration data (give --holdout or --calibration)")
        else:
            try:
                int8 = quantize_int8(staging / SAVED_MODEL_DIR, calibrating.images, preprocessing)
            except Exception as error:
                # A model the converter cannot quantize is still worth serving in fp32.
                log.debug("int8 conversion failed", exc_info=True)
                notes.append(f"no int8 variant: the int8 conversion failed ({conversion_error(error)})")
            else:
                (staging / INT8_FILE).write_bytes(int8)
        measured = measure_variants(
            staging, preprocessing, held_out, max_batch_size=max_batch_size, max_int8_drop=max_int8_drop
        )
        notes.extend(measured.notes)
        quantization = (
            f"post-training full-integer (uint8 in and out), {min(len(calibrating), CALIBRATION_EXAMPLES)} "
            f"calibration images from {calibrating.description}"
            if calibrating is not None and INT8_FILE in {info.path for info in measured.variants.values()}
            else "none"
        )
        metadata = ModelMetadata(
            name=name,
            version=version_name,
            input_shape=model.input_shape,
            labels=label_names,
            variants=measured.variants,
            holdout_examples=len(held_out) if held_out is not None else 0,
            # What the model learnt from is the user's own business: the importer records what it was measured on.
            training_data=f"not recorded (imported from {source.name})",
            created_at=utc_now(),
            training={"quantization": quantization},
            preprocessing=preprocessing.to_dict(),
            int8_agreement=measured.int8_agreement,
            provenance=provenance(
                "import",
                str(source),
                source_digest(source),
                holdout=held_out.description if held_out is not None else "none given",
            ),
        )
        (staging / METADATA_FILE).write_text(metadata.to_json())
    return ImportReport(version_dir=model_dir / version_name, metadata=metadata, notes=notes)


def default_color_mode(channels: int) -> str:
    """The colour mode a model of ``channels`` input channels gets unless told: grayscale (1) or rgb (3)."""
    return "grayscale" if channels == 1 else "rgb"


def write_fp32_litert(version_dir: Path) -> list[str]:
    """Convert ``saved_model/`` of a version being built into ``model_fp32.tflite`` beside it.

    Returns notes for a person: when the converter refuses the model, no file is written
    and a note says why (fp32 is then served from the SavedModel). :func:`measure_variants`
    checks the file against the SavedModel before it is kept.
    """
    import tensorflow as tf

    try:
        # No optimizations: the float model as it is, float32 in and out.
        converted = tf.lite.TFLiteConverter.from_saved_model(str(version_dir / SAVED_MODEL_DIR)).convert()
    except Exception as error:
        log.debug("fp32 LiteRT conversion failed", exc_info=True)
        return [
            f"fp32 is served from the SavedModel (TensorFlow): the LiteRT conversion failed ({conversion_error(error)})"
        ]
    (version_dir / FP32_LITERT_FILE).write_bytes(bytes(converted))
    return []


def check_fp32_litert(saved_model: np.ndarray, litert: np.ndarray) -> LiteRTCheck:
    """Compare the probabilities of the SavedModel and of the float LiteRT model, ``(images, classes)`` each.

    The LiteRT model may serve fp32 when :attr:`LiteRTCheck.problem` is None: the same top-1
    class on every image, and every probability within :data:`FP32_LITERT_TOLERANCE`.
    """
    if saved_model.shape != litert.shape:
        raise ValueError(f"cannot compare probabilities of shapes {saved_model.shape} and {litert.shape}")
    difference = np.abs(saved_model.astype(np.float64) - litert.astype(np.float64))
    return LiteRTCheck(
        images=len(saved_model),
        max_abs_diff=float(difference.max()) if difference.size else 0.0,
        label_mismatches=int((saved_model.argmax(axis=1) != litert.argmax(axis=1)).sum()),
    )


def conversion_error(error: Exception) -> str:
    """A converter's error in one line: its type, and the ops it could not convert (else its first line)."""
    text = str(error)
    # The TFLite converter's message runs to pages of MLIR; these lines name the ops it lacks.
    ops = re.findall(r"^\s*((?:TF Select|Custom) ops: .*\S)", text, flags=re.MULTILINE)
    summary = "; ".join(ops) if ops else next(iter(text.splitlines()), "")
    if len(summary) > 300:
        summary = summary[:297] + "..."
    return f"{type(error).__name__}: {summary}"


def quantize_int8(saved_model: Path, images: np.ndarray, preprocessing: Preprocessing, seed: int = SEED) -> bytes:
    """Post-training full-integer quantization (uint8 in and out) of a SavedModel's ``serving_default``.

    ``images`` are canonical pixels (float32 in [0, 1], or uint8 levels); up to
    :data:`CALIBRATION_EXAMPLES` of them, chosen at random by ``seed``, calibrate the
    activation ranges, each fed as the model's input (``preprocessing.scale``).
    """
    import tensorflow as tf

    chosen = np.random.default_rng(seed).choice(len(images), size=min(CALIBRATION_EXAMPLES, len(images)), replace=False)

    def representative_dataset() -> Iterator[list[np.ndarray]]:
        for index in chosen:
            image = images[index : index + 1]
            yield [preprocessing.scale(levels_to_floats(image) if image.dtype == np.uint8 else image)]

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative_dataset
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.uint8
    return bytes(converter.convert())


def predict_all(runtime: Runtime, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """The runtime's probabilities for ``images`` (uint8 levels or float32 pixels), ``batch_size`` at a time."""
    run = runtime.predict_levels if images.dtype == np.uint8 else runtime.predict
    return np.concatenate([run(images[start : start + batch_size]) for start in range(0, len(images), batch_size)])


def measure_latency(runtime: Runtime, sample: np.ndarray, batch_size: int, runs: int = LATENCY_RUNS) -> float:
    """Median milliseconds per image of ``runs`` calls on a batch of ``batch_size`` images cycled from ``sample``."""
    batch = sample[np.arange(batch_size) % len(sample)]
    runtime.predict(batch)  # warm-up: the first call may build what later calls reuse
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        runtime.predict(batch)
        timings.append(time.perf_counter() - started)
    return statistics.median(timings) * 1000.0 / batch_size


def measure_variants(
    version_dir: Path,
    preprocessing: Preprocessing,
    holdout: ImageSet | None,
    *,
    max_batch_size: int = 32,
    max_int8_drop: float | None = None,
) -> VariantMeasurements:
    """Measure ``saved_model/``, and ``model_fp32.tflite`` and ``model_int8.tflite`` when present, of a new version.

    ``model_fp32.tflite`` is first checked against the SavedModel (:func:`check_fp32_litert`)
    on the held-out images, or without them on :data:`FP32_CHECK_EXAMPLES` random images;
    when the check fails, or LiteRT cannot run the file, it is deleted and a note says why.
    Each variant then runs in the runtime that serves it by default (fp32: LiteRT when the
    float file is kept, else TensorFlow), built with ``preprocessing`` and one thread (the
    server's default): held-out accuracy (None without ``holdout``), size, and milliseconds
    per image at batch 1 and at ``max_batch_size``. When int8's accuracy is more than
    ``max_int8_drop`` percentage points below fp32's (None: no limit), the int8 file is
    deleted, the variant left out, and a note says why.
    """
    notes: list[str] = []
    int8_file = version_dir / INT8_FILE
    litert_file = version_dir / FP32_LITERT_FILE
    opened: list[Runtime] = []

    def open_artifact(precision: Precision, artifact: Path) -> Runtime:
        runtime = open_runtime(precision, artifact, preprocessing, max_batch_size, 1)
        opened.append(runtime)
        return runtime

    try:
        saved_model = open_artifact(Precision.FP32, version_dir / SAVED_MODEL_DIR)
        runtimes: dict[Precision, Runtime] = {Precision.FP32: saved_model}
        held_out = holdout if holdout is not None and len(holdout) else None
        random_images = np.random.default_rng(SEED).random(
            (max(max_batch_size, FP32_CHECK_EXAMPLES), *saved_model.input_shape), dtype=np.float32
        )
        sample = held_out.pixels(0, max_batch_size) if held_out is not None else random_images[:max_batch_size]
        check: LiteRTCheck | None = None
        if litert_file.exists():
            images = held_out.images if held_out is not None else random_images[:FP32_CHECK_EXAMPLES]
            try:
                litert = open_artifact(Precision.FP32, litert_file)
                check = check_fp32_litert(
                    predict_all(saved_model, images, max_batch_size), predict_all(litert, images, max_batch_size)
                )
                problem = check.problem
            except Exception as error:  # whatever LiteRT raises, the file cannot serve
                log.debug("the fp32 LiteRT model does not run", exc_info=True)
                problem = f"LiteRT cannot run it ({type(error).__name__}: {error})"
            if problem is None:
                runtimes[Precision.FP32] = litert
            else:
                notes.append(f"fp32 is served from the SavedModel (TensorFlow): {FP32_LITERT_FILE} left out, {problem}")
                litert_file.unlink()
                check = None
        if int8_file.exists():
            runtimes[Precision.INT8] = open_artifact(Precision.INT8, int8_file)
        predicted: dict[Precision, np.ndarray] = {}
        variants: dict[str, VariantInfo] = {}
        for precision, runtime in runtimes.items():
            accuracy = None
            if held_out is not None:
                predicted[precision] = predict_all(runtime, held_out.images, max_batch_size).argmax(axis=1)
                accuracy = float((predicted[precision] == held_out.labels).mean())
            file_name, artifact_format = ARTIFACTS[precision]
            litert_check = check if precision is Precision.FP32 else None
            variants[precision.value] = VariantInfo(
                path=file_name,
                format=artifact_format,
                accuracy=accuracy,
                size_bytes=directory_bytes(version_dir / file_name),
                latency_ms_batch_1=measure_latency(runtime, sample, 1),
                latency_ms_per_image_max_batch=measure_latency(runtime, sample, max_batch_size),
                measured_runtime=runtime.engine,
                litert_path=FP32_LITERT_FILE if litert_check is not None else None,
                litert_max_abs_diff=litert_check.max_abs_diff if litert_check is not None else None,
            )
    finally:
        for runtime in opened:
            runtime.close()

    agreement = None
    if len(predicted) == 2:
        agreement = float((predicted[Precision.FP32] == predicted[Precision.INT8]).mean())
    fp32_accuracy = variants[Precision.FP32.value].accuracy
    int8_info = variants.get(Precision.INT8.value)
    if (
        max_int8_drop is not None
        and int8_info is not None
        and int8_info.accuracy is not None
        and fp32_accuracy is not None
        # A hair of slack: accuracies are ratios of counts, the limit a decimal number of points.
        and (fp32_accuracy - int8_info.accuracy) * 100.0 > max_int8_drop + 1e-9
    ):
        drop = (fp32_accuracy - int8_info.accuracy) * 100.0
        notes.append(
            f"int8 dropped, fp32 only: int8's held-out accuracy {int8_info.accuracy:.2%} is {drop:.2f} points "
            f"below fp32's {fp32_accuracy:.2%} (at most {max_int8_drop:g} allowed; fp32/int8 agreement "
            f"{agreement:.2%})"
        )
        int8_file.unlink()
        del variants[Precision.INT8.value]
        agreement = None
    return VariantMeasurements(variants=variants, int8_agreement=agreement, notes=notes)


def provenance(command: str, source: str, source_sha256: str | None, **extra: str) -> dict[str, Any]:
    """Where a version came from: the source and its digest, the library versions, the command that made it."""
    import tensorflow as tf

    try:
        litert = version("ai-edge-litert")
    except PackageNotFoundError:
        litert = "unknown"
    return {
        "source": source,
        "source_sha256": source_sha256,
        "tensorflow": tf.__version__,
        "ai_edge_litert": litert,
        "numpy": np.__version__,
        "costserve": __version__,
        "command": command,
        **extra,
    }


def source_digest(path: Path) -> str:
    """sha256 of a file; of a directory: of each file's relative path and bytes, in sorted path order."""
    digest = hashlib.sha256()
    if path.is_file():
        files = [path]
    else:
        files = sorted((entry for entry in path.rglob("*") if entry.is_file()), key=lambda entry: entry.as_posix())
    for entry in files:
        if entry != path:
            digest.update(entry.relative_to(path).as_posix().encode() + b"\0")
        with entry.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def utc_now() -> str:
    """The current time as RFC 3339 in UTC, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _read_data(
    path: Path,
    input_shape: tuple[int, int, int],
    resize: str,
    notes: list[str],
    *,
    limit: int | None = None,
    seed: int = SEED,
) -> ImageSet:
    if path.is_dir():
        return _read_folder(path, input_shape, resize, notes, limit, seed)
    if path.suffix.lower() == ".npz":
        return _read_npz(path, input_shape, limit, seed)
    raise ImportRefused(f"{path} is neither an image folder (one sub-folder per class) nor an .npz file")


def _subset(count: int, limit: int | None, seed: int) -> np.ndarray:
    """Indices of the images to read: all, or ``limit`` of them at random, in order."""
    if limit is None or count <= limit:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=limit, replace=False))


def _read_folder(
    path: Path, input_shape: tuple[int, int, int], resize: str, notes: list[str], limit: int | None, seed: int
) -> ImageSet:
    classes = sorted(entry.name for entry in path.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise ImportRefused(f"{path} has no class sub-folders; expected one sub-folder of images per class")
    files: list[tuple[Path, int]] = []
    skipped = 0
    for index, class_name in enumerate(classes):
        for entry in sorted((path / class_name).rglob("*")):
            if not entry.is_file() or any(part.startswith(".") for part in entry.relative_to(path).parts):
                continue
            if entry.suffix.lower() in IMAGE_SUFFIXES:
                files.append((entry, index))
            else:
                skipped += 1
    if not files:
        raise ImportRefused(f"{path} has no .png/.jpg/.jpeg files in its class sub-folders")
    if skipped:
        notes.append(f"{path}: skipped {skipped} file(s) that are not .png, .jpg or .jpeg")
    max_pixels = ImageLimits.for_model(input_shape, max_images=1).max_image_pixels
    chosen = [files[index] for index in _subset(len(files), limit, seed)]
    images = []
    for file, _ in chosen:
        try:
            decoded = decode(ImageInput(encoded=file.read_bytes()), input_shape, 0, max_pixels, resize=resize)
        except InvalidInput as error:
            message = str(error).replace("images[0].encoded", str(file)).replace("images[0]", str(file))
            raise ImportRefused(f"cannot read an image: {message}") from None
        images.append(decoded.model_input)
    return ImageSet(
        images=_stack(images),
        labels=np.array([label for _, label in chosen], dtype=np.int64),
        description=f"image folder {path} ({len(chosen)} images, {len(classes)} classes)",
        class_names=classes,
    )


def _read_npz(path: Path, input_shape: tuple[int, int, int], limit: int | None, seed: int) -> ImageSet:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in ("x", "y") if key in data.files}
    except (OSError, ValueError) as error:
        raise ImportRefused(f"{path} is not a readable .npz file ({error})") from None
    if set(arrays) != {"x", "y"}:
        raise ImportRefused(
            f"{path} lacks {sorted({'x', 'y'} - set(arrays))}; expected arrays x (images) and y (labels)"
        )
    x, y = arrays["x"], arrays["y"]
    height, width, _ = input_shape
    if x.ndim not in (3, 4) or tuple(x.shape[1:3]) != (height, width):
        raise ImportRefused(
            f"{path}: x has shape {x.shape}; expected (n, {height}, {width}) or (n, {height}, {width}, channels) "
            "(use an image folder to have images resized)"
        )
    if not len(x):
        raise ImportRefused(f"{path}: x holds no images")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise ImportRefused(f"{path}: y has shape {y.shape} and dtype {y.dtype}; expected {len(x)} class indices")
    if x.dtype == np.uint8:
        pixel_type = PixelType.UINT8
    elif np.issubdtype(x.dtype, np.floating):
        pixel_type, x = PixelType.FLOAT32, x.astype("<f4")
    else:
        raise ImportRefused(f"{path}: x has dtype {x.dtype}; expected uint8 (0..255) or floats in [0, 1]")
    chosen = _subset(len(x), limit, seed)
    images = []
    for index in chosen:
        image = np.ascontiguousarray(x[index])
        raw = RawPixels(shape=image.shape, dtype=pixel_type, data=image.tobytes())
        try:
            images.append(decode(ImageInput(pixels=raw), input_shape).model_input)
        except InvalidInput as error:
            raise ImportRefused(str(error).replace("images[0].pixels", f"{path}: x[{index}]")) from None
    return ImageSet(
        images=_stack(images),
        labels=y[chosen].astype(np.int64),
        description=f"npz {path} ({len(chosen)} images)",
    )


def _stack(images: list[np.ndarray]) -> np.ndarray:
    """uint8 levels when every image has them, else float32 pixels."""
    if all(image.dtype == np.uint8 for image in images):
        return np.stack(images)
    return np.stack([levels_to_floats(image) if image.dtype == np.uint8 else image for image in images])


def _check_classes(data: ImageSet, path: Path | None, num_classes: int) -> None:
    """Refuse held-out classes that cannot be the model's (with --labels, folder i is label i whatever its name)."""
    if data.class_names is not None and len(data.class_names) != num_classes:
        raise ImportRefused(
            f"{path} has {len(data.class_names)} class folders ({', '.join(data.class_names)}); "
            f"the model outputs {num_classes} classes"
        )
    low, high = int(data.labels.min()), int(data.labels.max())
    if low < 0 or high >= num_classes:
        raise ImportRefused(f"{path}: class indices run {low}..{high}; the model outputs classes 0..{num_classes - 1}")


def _default_labels(held_out: ImageSet | None, calibrating: ImageSet | None, num_classes: int) -> list[str]:
    for data in (held_out, calibrating):
        if data is not None and data.class_names is not None and len(data.class_names) == num_classes:
            return data.class_names
    return [str(index) for index in range(num_classes)]


def _read_labels(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ImportRefused(f"cannot read the labels file {path} ({error})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    labels = [line.strip() for line in lines]
    empty = [str(number) for number, label in enumerate(labels, start=1) if not label]
    if empty:
        raise ImportRefused(f"{path}: line(s) {', '.join(empty)} are empty; expected one label per line")
    return labels


def _check_name(name: str) -> None:
    if not _PLAIN_NAME.fullmatch(name) or name.isdigit():
        raise ImportRefused(
            f"model name {name!r} is not a plain directory name: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, and not only digits"
        )


def _read_source(source: Path, input_shape: tuple[int, int, int] | None) -> _Source:
    """Load and check the source model; ImportRefused says why it cannot be served."""
    if source.is_dir():
        return _read_saved_model(source, input_shape)
    if source.suffix.lower() in KERAS_SUFFIXES:
        return _read_keras(source, input_shape)
    raise ImportRefused(
        f"{source} is not a model: expected a Keras file ({', '.join(KERAS_SUFFIXES)}) or a SavedModel directory"
    )


def _read_keras(source: Path, input_shape: tuple[int, int, int] | None) -> _Source:
    import tensorflow as tf

    try:
        model = tf.keras.models.load_model(str(source), compile=False)
        inputs, outputs = list(model.inputs), list(model.outputs)
    except Exception as error:  # noqa: BLE001 - whatever Keras raises, the file is not a model we can read
        raise ImportRefused(f"{source} is not a readable Keras model ({type(error).__name__}: {error})") from None
    _check_count(source, "inputs", [tensor.name for tensor in inputs])
    _check_count(source, "outputs", [tensor.name for tensor in outputs])
    fixed = _fixed_input_shape(
        source, tuple(inputs[0].shape), str(inputs[0].dtype), input_shape, batch_may_be_fixed=True
    )
    num_classes = _num_classes(source, tuple(outputs[0].shape))

    def export(path: Path) -> None:
        # The signature names the fixed shape, so a model of dynamic height and width is served at it.
        signature = [tf.TensorSpec((None, *fixed), tf.float32)]
        model.export(str(path), format="tf_saved_model", verbose=False, input_signature=signature)

    return _Source(input_shape=fixed, num_classes=num_classes, export=export)


def _read_saved_model(source: Path, input_shape: tuple[int, int, int] | None) -> _Source:
    if not (source / "saved_model.pb").is_file() and not (source / "saved_model.pbtxt").is_file():
        raise ImportRefused(f"{source} is not a model: a directory without saved_model.pb is not a SavedModel")
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(str(source))
    except Exception as error:  # noqa: BLE001 - whatever TensorFlow raises, the directory is not readable
        raise ImportRefused(f"{source} is not a readable SavedModel ({type(error).__name__}: {error})") from None
    signature = loaded.signatures.get("serving_default")
    if signature is None:
        raise ImportRefused(
            f"{source} has no serving_default signature (it has: {', '.join(sorted(loaded.signatures)) or 'none'})"
        )
    args, kwargs = signature.structured_input_signature
    input_specs = dict(kwargs) if kwargs else {f"input_{index}": spec for index, spec in enumerate(args)}
    output_specs = signature.structured_outputs
    if not isinstance(output_specs, dict):
        output_specs = {"output_0": output_specs}
    _check_count(source, "inputs", sorted(input_specs))
    _check_count(source, "outputs", sorted(output_specs))
    ((input_name, input_spec),) = input_specs.items()
    ((output_name, output_spec),) = output_specs.items()
    given = tuple(input_spec.shape.as_list()) if input_spec.shape.rank is not None else ()
    fixed = _fixed_input_shape(source, given, input_spec.dtype.name, input_shape, batch_may_be_fixed=False)
    num_classes = _num_classes(source, tuple(output_spec.shape.as_list()))

    def export(path: Path) -> None:
        if given[1:] == fixed:
            shutil.copytree(source, path)  # already what the runtime takes: served as it is
            return
        # A fresh SavedModel whose one signature takes the fixed shape; the module keeps the variables.
        module = tf.Module()
        module.source = loaded

        @tf.function(input_signature=[tf.TensorSpec((None, *fixed), tf.float32, name=input_name)])
        def serve(image: Any) -> dict[str, Any]:
            return {output_name: signature(**{input_name: image})[output_name]}

        tf.saved_model.save(module, str(path), signatures={"serving_default": serve})

    return _Source(input_shape=fixed, num_classes=num_classes, export=export)


def _check_count(source: Path, what: str, names: list[str]) -> None:
    if len(names) != 1:
        raise ImportRefused(
            f"{source} has {len(names)} {what} ({', '.join(names) or 'none'}); costserve serves models with "
            "one image input and one output of class scores"
        )


def _fixed_input_shape(
    source: Path,
    shape: tuple[int | None, ...],
    dtype: str,
    input_shape: tuple[int, int, int] | None,
    *,
    batch_may_be_fixed: bool,
) -> tuple[int, int, int]:
    """The (height, width, channels) to serve the model at, or ImportRefused saying why it cannot be served."""
    shown = "(" + ", ".join("None" if dim is None else str(dim) for dim in shape) + ")"
    if len(shape) != 4:
        raise ImportRefused(f"{source}: the input has shape {shown}; expected (batch, height, width, channels)")
    if dtype != "float32":
        raise ImportRefused(f"{source}: the input takes {dtype}; costserve feeds float32")
    if shape[0] is not None and not batch_may_be_fixed:
        raise ImportRefused(f"{source}: the input's batch size is fixed at {shape[0]}; it must be dynamic (None)")
    channels = shape[3]
    if channels not in (1, 3):
        hint = " (it looks channels-first; costserve takes NHWC)" if shape[1] in (1, 3) else ""
        raise ImportRefused(f"{source}: the input has shape {shown}, {channels} channels; expected 1 or 3{hint}")
    if input_shape is not None:
        if len(input_shape) != 3 or any(dim < 1 for dim in input_shape):
            raise ImportRefused(f"input shape {input_shape} is not (height, width, channels) of positive sizes")
        if any(model_dim is not None and model_dim != given for model_dim, given in zip(shape[1:], input_shape)):
            raise ImportRefused(
                f"--input-shape {','.join(map(str, input_shape))} does not fit the model's input {shown}"
            )
        return (int(input_shape[0]), int(input_shape[1]), int(input_shape[2]))
    if shape[1] is None or shape[2] is None:
        raise ImportRefused(
            f"{source}: the input's height and width are dynamic {shown}; give the size to serve it at with "
            f"--input-shape H,W,{channels}"
        )
    return (int(shape[1]), int(shape[2]), int(channels))


def _num_classes(source: Path, shape: tuple[int | None, ...]) -> int:
    if len(shape) != 2 or shape[1] is None or shape[1] < 1:
        shown = "(" + ", ".join("None" if dim is None else str(dim) for dim in shape) + ")"
        raise ImportRefused(f"{source}: the output has shape {shown}; expected (batch, classes)")
    return int(shape[1])
