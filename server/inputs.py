"""Validate and decode request images into the model's input.

Every image, encoded or raw, ends as a float32 array of the model's input shape
``(height, width, channels)`` with values in [0, 1]; a PNG and the same raw pixels
decode to the same array (and so share a cache entry). Every rejection is an
:class:`~costserve.server.errors.InvalidInput` whose message names what was wrong
and what was expected.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from costserve.server.cache import buffer_digest, pixels_digest
from costserve.server.domain import ImageInput, PixelType, RawPixels
from costserve.server.errors import InvalidInput
from costserve.server.runtimes import levels_to_floats

#: Largest decoded image accepted, in pixels (width x height); larger files are
#: refused before they are decompressed (decompression-bomb guard).
MAX_ENCODED_PIXELS = 40_000_000

_ITEMSIZE = {PixelType.UINT8: 1, PixelType.FLOAT32: 4}
_NUMPY_DTYPE = {PixelType.UINT8: np.dtype(np.uint8), PixelType.FLOAT32: np.dtype("<f4")}
# ITU-R 601-2 luma, the weights PIL uses for mode "L", so raw RGB and PNG RGB agree.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class DecodedImage:
    """A validated image: its digest (the cache's key) at once, the model's input when asked.

    Images that arrive as 8 bits per channel at the model's size (raw UINT8 pixels, or
    a PNG/JPEG once converted) keep those bytes: their digest is taken over them and
    the float input is made only on a cache miss. A PNG and the same raw pixels have
    the same bytes, so they share a digest.
    """

    __slots__ = ("digest", "_levels", "_pixels", "_level_bytes", "_shape")

    def __init__(self, levels: np.ndarray | None = None, pixels: np.ndarray | None = None) -> None:
        self._levels = levels
        self._pixels = pixels
        self._level_bytes: bytes | None = None
        source = levels if levels is not None else pixels
        assert source is not None
        self._shape = source.shape
        self.digest = pixels_digest(source)

    @classmethod
    def of_level_bytes(cls, data: bytes, shape: tuple[int, int, int]) -> "DecodedImage":
        """An image of 8-bit levels already checked to be ``shape``: no array is made until one is needed."""
        image = cls.__new__(cls)
        image._levels = image._pixels = None
        image._level_bytes = data
        image._shape = shape
        image.digest = buffer_digest(data, "|u1", shape)
        return image

    @property
    def levels(self) -> np.ndarray | None:
        """uint8 ``(height, width, channels)`` in 0..255, or None for an image that arrived as floats."""
        if self._levels is None and self._level_bytes is not None:
            self._levels = np.frombuffer(self._level_bytes, dtype=np.uint8).reshape(self._shape)
        return self._levels

    @property
    def model_input(self) -> np.ndarray:
        """What the batcher takes: the uint8 levels when the image has them, else the float pixels.

        The batcher converts levels to floats a whole batch at a time, on its inference thread.
        """
        levels = self.levels
        return levels if levels is not None else self.pixels

    @property
    def pixels(self) -> np.ndarray:
        """float32 ``(height, width, channels)`` in [0, 1], the model's input."""
        if self._pixels is None:
            levels = self.levels
            assert levels is not None
            self._pixels = levels_to_floats(levels)
        return self._pixels


def decode_image(image: ImageInput, input_shape: tuple[int, int, int], index: int = 0) -> np.ndarray:
    """Decode one image to float32 ``input_shape`` in [0, 1]; ``index`` names it in errors."""
    return decode(image, input_shape, index).pixels


def decode(image: ImageInput, input_shape: tuple[int, int, int], index: int = 0) -> DecodedImage:
    """Validate one image and decode it as far as its digest; ``index`` names it in errors."""
    if (image.encoded is None) == (image.pixels is None):
        raise InvalidInput(f"images[{index}]: set exactly one of `encoded` (PNG/JPEG bytes) or `pixels`")
    if image.encoded is not None:
        return _decode_encoded(image.encoded, input_shape, index)
    assert image.pixels is not None
    return _decode_pixels(image.pixels, input_shape, index)


def _decode_encoded(data: bytes, input_shape: tuple[int, int, int], index: int) -> DecodedImage:
    height, width, channels = input_shape
    if not data:
        raise InvalidInput(f"images[{index}].encoded is empty; expected the bytes of a PNG or JPEG file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=("PNG", "JPEG")) as opened:
                if opened.width * opened.height > MAX_ENCODED_PIXELS:
                    raise InvalidInput(
                        f"images[{index}] is {opened.width}x{opened.height} pixels; "
                        f"at most {MAX_ENCODED_PIXELS} pixels are accepted"
                    )
                opened.load()
                picture = _to_mode(opened, channels)
    except InvalidInput:
        raise
    except UnidentifiedImageError:
        raise InvalidInput(
            f"images[{index}].encoded ({len(data)} bytes) is not a PNG or JPEG file"
        ) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise InvalidInput(
            f"images[{index}].encoded could not be decoded as PNG/JPEG ({exc}); the file may be truncated or corrupt"
        ) from None
    if picture.size != (width, height):
        picture = picture.resize((width, height), Image.Resampling.BILINEAR)
    return DecodedImage(levels=np.asarray(picture, dtype=np.uint8).reshape(input_shape))


def _to_mode(picture: Image.Image, channels: int) -> Image.Image:
    if picture.mode in ("RGBA", "LA", "PA") or (picture.mode == "P" and "transparency" in picture.info):
        # Transparent pixels take black, the background the digit models were trained on.
        rgba = picture.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        picture = Image.alpha_composite(background, rgba)
    if picture.mode in ("I;16", "I;16B", "I;16L", "I"):
        picture = Image.fromarray((np.asarray(picture, dtype=np.float64) / 257.0).round().astype(np.uint8))
    return picture.convert("L" if channels == 1 else "RGB")


def _decode_pixels(pixels: RawPixels, input_shape: tuple[int, int, int], index: int) -> DecodedImage:
    height, width, channels = input_shape
    shape = pixels.shape
    if (
        pixels.dtype is PixelType.UINT8
        and (shape == input_shape or (channels == 1 and shape == input_shape[:2]))
        and len(pixels.data) == height * width * channels
    ):
        return DecodedImage.of_level_bytes(pixels.data, input_shape)  # the common case, checked in one step
    where = f"images[{index}].pixels"
    if len(shape) not in (2, 3):
        raise InvalidInput(
            f"{where}.shape {list(shape)} has rank {len(shape)}; expected [{height}, {width}] "
            f"or [{height}, {width}, channels] with channels 1, 3 or 4"
        )
    if any(dim <= 0 for dim in shape):
        raise InvalidInput(f"{where}.shape {list(shape)} has a dimension below 1")
    if tuple(shape[:2]) != (height, width):
        raise InvalidInput(
            f"{where}.shape {list(shape)} does not fit the model: expected height x width "
            f"{height} x {width} (send an encoded PNG/JPEG to have it resized)"
        )
    given_channels = shape[2] if len(shape) == 3 else 1
    if given_channels not in (1, 3, 4):
        raise InvalidInput(f"{where}.shape {list(shape)} has {given_channels} channels; expected 1, 3 or 4")
    expected_bytes = math.prod(shape) * _ITEMSIZE[pixels.dtype]
    if len(pixels.data) != expected_bytes:
        raise InvalidInput(
            f"{where}.data has {len(pixels.data)} bytes; shape {list(shape)} of {pixels.dtype.value} "
            f"needs {expected_bytes}"
        )
    array = np.frombuffer(pixels.data, dtype=_NUMPY_DTYPE[pixels.dtype]).reshape(height, width, given_channels)
    if pixels.dtype is PixelType.UINT8:
        if given_channels == channels:
            return DecodedImage(levels=array)
        array = levels_to_floats(array)
    else:
        if not np.isfinite(array).all():
            raise InvalidInput(f"{where}.data holds NaN or infinite values; expected floats in [0, 1]")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise InvalidInput(
                f"{where}.data holds values in [{low:g}, {high:g}]; FLOAT32 pixels must lie in [0, 1] "
                "(send UINT8 for 0..255)"
            )
        array = array.astype(np.float32)
    return DecodedImage(pixels=_match_channels(array, channels))


def _match_channels(array: np.ndarray, channels: int) -> np.ndarray:
    given = array.shape[2]
    if given == 4:
        # Composite on black, as an encoded RGBA image is (see _to_mode).
        array, given = array[:, :, :3] * array[:, :, 3:], 3
    if given == channels:
        return np.ascontiguousarray(array)
    if channels == 1:
        return np.ascontiguousarray((array @ _LUMA)[:, :, None])
    return np.ascontiguousarray(np.repeat(array, channels, axis=2))
