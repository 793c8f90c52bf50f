"""How an image becomes a model's input, stored with each model version.

The server's canonical pixels are float32 in [0, 1] (or uint8 levels 0..255) at the
model's height, width and channels, made by :mod:`costserve.server.inputs` (which
applies :attr:`Preprocessing.resize` to encoded images). A runtime then applies the
rest of the model's preprocessing to a whole batch: the per-channel scaling and the
channel order (:meth:`Preprocessing.scale`, or one table lookup for levels,
:meth:`Preprocessing.scale_levels`), and turns logits into probabilities
(:meth:`Preprocessing.probabilities`). Every scaling is affine per channel,
``x * a + b`` on x in [0, 1], so levels and floats give the same input exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

COLOR_MODES = ("grayscale", "rgb", "bgr")
RESIZE_MODES = ("stretch", "crop")
#: unit: [0, 1]; symmetric: [-1, 1]; levels: [0, 255]; mean_std: (x - mean) / std with x in [0, 1].
SCALINGS = ("unit", "symmetric", "levels", "mean_std")
OUTPUTS = ("probabilities", "logits")

#: The [0, 1] value of each 8-bit level: ``LEVEL_FLOATS[v] == np.float32(v) / np.float32(255)``.
LEVEL_FLOATS = np.arange(256, dtype=np.float32) / np.float32(255.0)


@dataclass(frozen=True)
class Preprocessing:
    """A model version's preprocessing; the defaults are the digits model's (gray, stretch, [0, 1], probabilities)."""

    #: Channel order the model takes: grayscale (1 channel), rgb or bgr (3 channels).
    color_mode: str = "grayscale"
    #: Encoded images: ``stretch`` to height x width, or ``crop`` (shorter side to fit, centre cut out).
    resize: str = "stretch"
    #: Value range the model takes (see :data:`SCALINGS`).
    scaling: str = "unit"
    #: Mean and standard deviation of ``mean_std`` on [0, 1] values: one value, or one per channel in the
    #: model's channel order.
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    #: What the model outputs: probabilities, or logits the server turns into probabilities.
    output: str = "probabilities"

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("color_mode", self.color_mode, COLOR_MODES),
            ("resize", self.resize, RESIZE_MODES),
            ("scaling", self.scaling, SCALINGS),
            ("output", self.output, OUTPUTS),
        ):
            if value not in allowed:
                raise ValueError(f"preprocessing {name} {value!r} is not one of {', '.join(allowed)}")
        if self.scaling == "mean_std":
            if not self.mean or not self.std or len(self.mean) != len(self.std):
                raise ValueError("mean_std scaling needs --mean and --std, one value or one per channel each")
            if any(value <= 0 for value in self.std):
                raise ValueError(f"std {list(self.std)} must be above 0")
        elif self.mean or self.std:
            raise ValueError(f"mean and std apply to mean_std scaling only, not {self.scaling}")
        # Frozen: the derived arrays are set through object.__setattr__ once.
        object.__setattr__(self, "_affine", None)

    @property
    def channels(self) -> int:
        """Channels the model takes: 1 for grayscale, 3 otherwise."""
        return 1 if self.color_mode == "grayscale" else 3

    def check_channels(self, channels: int) -> None:
        """Refuse a colour mode that does not fit a model input of ``channels``."""
        if channels != self.channels:
            raise ValueError(
                f"colour mode {self.color_mode} takes {self.channels} channel(s); the model's input has {channels}"
            )
        if self.scaling == "mean_std" and len(self.mean) not in (1, channels):
            raise ValueError(f"mean/std have {len(self.mean)} values; the model's input has {channels} channels")

    def _coefficients(self) -> tuple[np.ndarray, np.ndarray]:
        """(a, b) of ``x * a + b`` per channel, float32."""
        affine = getattr(self, "_affine", None)
        if affine is None:
            if self.scaling == "unit":
                a, b = np.ones(1), np.zeros(1)
            elif self.scaling == "symmetric":
                a, b = np.full(1, 2.0), np.full(1, -1.0)
            elif self.scaling == "levels":
                a, b = np.full(1, 255.0), np.zeros(1)
            else:
                std, mean = np.asarray(self.std, dtype=np.float64), np.asarray(self.mean, dtype=np.float64)
                a, b = 1.0 / std, -mean / std
            affine = (a.astype(np.float32), b.astype(np.float32))
            object.__setattr__(self, "_affine", affine)
        return affine

    def scale(self, pixels: np.ndarray) -> np.ndarray:
        """The model's float32 input for canonical pixels in [0, 1], shape ``(..., channels)``, RGB order."""
        pixels = np.asarray(pixels, dtype=np.float32)
        if self.color_mode == "bgr":
            pixels = pixels[..., ::-1]
        if self.scaling != "unit":
            a, b = self._coefficients()
            pixels = pixels * a + b
        return np.ascontiguousarray(pixels, dtype=np.float32)

    def unscale(self, model_input: np.ndarray) -> np.ndarray:
        """Canonical pixels (float32, [0, 1] when the input is in the model's range, RGB order) of a model
        input: the inverse of :meth:`scale`."""
        values = np.asarray(model_input, dtype=np.float32)
        if self.scaling != "unit":
            a, b = self._coefficients()
            values = (values - b) / a
        if self.color_mode == "bgr":
            values = values[..., ::-1]
        return np.ascontiguousarray(values, dtype=np.float32)

    def input_range(self) -> tuple[float, float]:
        """The lowest and highest model input (of any channel), those of pixels 0 and 1."""
        ends = self.scale(np.array([[0.0], [1.0]], dtype=np.float32).repeat(self.channels, axis=1))
        return float(ends.min()), float(ends.max())

    def level_table(self, channels: int) -> np.ndarray:
        """float32 ``(256, channels)``: the model input of each level in each of the model's channels."""
        values = np.repeat(LEVEL_FLOATS[:, None], channels, axis=1)
        if self.scaling != "unit":
            a, b = self._coefficients()
            values = values * a + b
        return np.ascontiguousarray(values, dtype=np.float32)

    def scale_levels(self, levels: np.ndarray, table: np.ndarray) -> np.ndarray:
        """:meth:`scale` of ``levels / 255`` by lookups in ``table`` (from :meth:`level_table`, or a quantized copy)."""
        if table.shape[1] == 1:
            return np.take(table[:, 0], levels)
        if self.color_mode == "bgr":
            levels = levels[..., ::-1]
        return table[levels, np.arange(table.shape[1])]

    def probabilities(self, outputs: np.ndarray) -> np.ndarray:
        """Class probabilities of the model's outputs: softmax of logits, or the outputs as they are."""
        outputs = np.asarray(outputs, dtype=np.float32)
        if self.output == "probabilities":
            return outputs
        shifted = outputs - outputs.max(axis=-1, keepdims=True)
        exponentials = np.exp(shifted)
        return (exponentials / exponentials.sum(axis=-1, keepdims=True)).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        """For ``metadata.json``."""
        raw = asdict(self)
        raw["mean"], raw["std"] = list(self.mean), list(self.std)
        return raw

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None, channels: int) -> Preprocessing:
        """Parse ``metadata.json``'s ``preprocessing``; absent (older versions): [0, 1] pixels, probabilities."""
        if not raw:
            return cls(color_mode="grayscale" if channels == 1 else "rgb")
        known = {key: raw[key] for key in ("color_mode", "resize", "scaling", "output") if key in raw}
        return cls(**known, mean=tuple(raw.get("mean") or ()), std=tuple(raw.get("std") or ()))
