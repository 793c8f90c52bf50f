"""Test doubles that wrap a real runtime to inject what cannot be produced on demand: a stall or a failure."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from costserve.server.domain import Precision
from costserve.server.profile import CostProfile, SizeCost, VariantProfile
from costserve.server.runtimes import Runtime


class SpyRuntime(Runtime):
    """Delegates to a real runtime; records each batch, can hold batches and fail poisoned ones."""

    def __init__(self, inner: Runtime, poison_value: float | None = None) -> None:
        self.inner = inner
        self.precision = inner.precision
        self.input_shape = inner.input_shape
        self.num_classes = inner.num_classes
        self.poison_value = poison_value
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    @property
    def images_computed(self) -> int:
        return sum(self.batches)

    def time_batch(self, images: Sequence[np.ndarray]) -> tuple[float, float]:
        return self.inner.time_batch(images)  # measured at load without counting or holding

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self.entered.set()
        assert self.gate.wait(timeout=60), "test never opened the gate"
        self.batches.append(len(batch))
        if self.poison_value is not None and np.any(np.all(batch == self.poison_value, axis=(1, 2, 3))):
            raise RuntimeError("poisoned batch")
        return self.inner.predict(batch)


class CostedRuntime(SpyRuntime):
    """A real runtime that also burns the CPU a test states per image at each batch size, so that both
    its warm-up measurement and its live batches see those costs."""

    def __init__(self, inner: Runtime, cpu_per_image: Callable[[int], float]) -> None:
        super().__init__(inner)
        self.cpu_per_image = cpu_per_image

    def time_batch(self, images: Sequence[np.ndarray]) -> tuple[float, float]:
        return Runtime.time_batch(self, images)  # measured through predict, costs and all

    def predict(self, batch: np.ndarray) -> np.ndarray:
        answer = super().predict(batch)
        until = time.thread_time() + self.cpu_per_image(len(batch)) * len(batch)
        while time.thread_time() < until:
            pass
        return answer


def sample_sum(registry: Any, name: str, labels: dict[str, str] | None = None) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (every model, say, when ``model`` is not given)."""
    wanted = (labels or {}).items()
    return sum(
        sample.value
        for family in registry.collect()
        for sample in family.samples
        if sample.name == name and wanted <= sample.labels.items()
    )


def run_quick_benchmark(module: str, model_dir: Path, output: Path, figures: Path, *args: str) -> str:
    """Run ``python -m <module> --quick [args]`` from the repository root; return the report it wrote."""
    repo_root = Path(__file__).resolve().parent.parent
    command = [
        sys.executable, "-m", module, "--quick",
        "--output", str(output), "--json", str(figures), "--model-dir", str(model_dir), *args,
    ]  # fmt: skip
    done = subprocess.run(command, cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"benchmark failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return output.read_text()


def report_table(report: str, header_start: str) -> dict[str, list[str]]:
    """The rows of the Markdown table whose header line starts with ``header_start``: first cell -> the others."""
    lines = report.splitlines()
    header = next(index for index, line in enumerate(lines) if line.startswith(header_start))
    table = {}
    for line in lines[header + 2 :]:
        if not line.startswith("|"):
            break  # the table ends at its first non-row line
        cells = [cell.strip() for cell in line.split("|")[1:-1]]
        table[cells[0]] = cells[1:]
    return table


class FakeClock:
    """A monotonic clock the test moves by hand (seconds), for the core's load signals and policy."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def report_rows(report: str, header_start: str, rows: tuple[str, ...]) -> dict[str, list[str]]:
    """The cells after the first of each of ``rows`` (named by the start of their first cell) in that table.

    Fails, showing the report, when a row is missing.
    """
    table = report_table(report, header_start)
    found = {}
    for row in rows:
        matches = [cells for name, cells in table.items() if name.startswith(row)]
        assert matches, f"row {row!r} missing from the report:\n{report}"
        found[row] = matches[0]
    return found


def png(pixels: np.ndarray) -> bytes:
    """uint8 pixels (height, width), (height, width, 1) or (height, width, 3) as a PNG file."""
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def flat_profile(
    cpu_per_image: dict[Precision, float], batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32)
) -> CostProfile:
    """A cost profile the test states: each variant costs the same per image at every batch size."""
    return CostProfile(
        VariantProfile(precision, {size: SizeCost(cost, cost) for size in batch_sizes})
        for precision, cost in cpu_per_image.items()
    )


#: The host the first benchmarks ran on (AVX-512): int8 costs about half what fp32 does per image.
INT8_CHEAPER = {Precision.FP32: 2e-4, Precision.INT8: 1e-4}
#: An AVX2-only host: int8 costs about twice what fp32 does per image.
INT8_SLOWER = {Precision.FP32: 1e-4, Precision.INT8: 2e-4}


def state_costs(server: Any, cpu_per_image: dict[Precision, float]) -> CostProfile:
    """Replace the measured profile of ``server``'s default version with one the test states.

    What int8 costs against fp32 depends on the host's CPU, so a test of a decision that
    depends on it says which host it means.
    """
    served = server.core.default
    profile = flat_profile(cpu_per_image, sorted(next(iter(served.model.profile.variants.values())).sizes))
    served.model.profile = served.policy.profile = profile
    for precision, batcher in served.batchers.items():
        batcher.profile = profile.variants[precision]
    return profile
