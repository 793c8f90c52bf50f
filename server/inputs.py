"""Validate and decode request images into the model's input.

Every image, encoded or raw, ends as a float32 array of the model's input shape
``(height, width, channels)`` with values in [0, 1]; a PNG and the same raw pixels
decode to the same array (and so share a cache entry). Every rejection is an
:class:`~costserve.server.errors.InvalidInput` whose message names what was wrong
and what was expected.
"""

from __future__ import annotations

import asyncio
import io
import math
import os
import struct
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from costserve.server.cache import buffer_digest, pixels_digest
from costserve.server.domain import ImageInput, PixelType, RawPixels
from costserve.server.errors import DecodeQueueFull, InvalidInput
from costserve.server.runtimes import levels_to_floats

#: The automatic per-image pixel cap is this many times the model input's pixels...
AUTO_IMAGE_PIXELS_PER_INPUT_PIXEL = 1024
#: ... at least this (1 MP) ...
AUTO_IMAGE_PIXELS_FLOOR = 1 << 20
#: ... and at most this (16 MP), whatever the model.
AUTO_IMAGE_PIXELS_CEILING = 1 << 24
#: The automatic per-request pixel total is this many times the per-image cap.
AUTO_REQUEST_PIXELS_PER_IMAGE_CAP = 4
#: A request whose encoded images declare at most this many pixels together, in at most
#: INLINE_DECODE_BYTES, is decoded on the event loop (under ~0.3 ms); any larger goes to the
#: decode threads: handing it over costs less than it would stall everyone else.
INLINE_DECODE_PIXELS = 65_536
INLINE_DECODE_BYTES = 65_536
#: A JPEG at least twice the model's input each way is decoded by libjpeg at 1/2, 1/4 or 1/8
#: scale (draft mode), to no less than this many times the input each way.
JPEG_DRAFT_FACTOR = 2
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_ITEMSIZE = {PixelType.UINT8: 1, PixelType.FLOAT32: 4}
_NUMPY_DTYPE: dict[PixelType, np.dtype[Any]] = {PixelType.UINT8: np.dtype(np.uint8), PixelType.FLOAT32: np.dtype("<f4")}
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
        self._level_bytes: bytes | memoryview | None = None
        source = levels if levels is not None else pixels
        assert source is not None
        self._shape = source.shape
        self.digest = pixels_digest(source)

    @classmethod
    def of_level_bytes(cls, data: bytes | memoryview, shape: tuple[int, int, int]) -> DecodedImage:
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


@dataclass(frozen=True)
class ImageLimits:
    """What one request may ask of the decoder, checked before any image is decoded."""

    #: Most images in one request.
    max_images: int
    #: Largest image, in pixels (width x height), as its header or shape declares it.
    max_image_pixels: int = AUTO_IMAGE_PIXELS_CEILING
    #: Most pixels the images of one request may declare together.
    max_request_pixels: int = AUTO_REQUEST_PIXELS_PER_IMAGE_CAP * AUTO_IMAGE_PIXELS_CEILING

    @classmethod
    def for_model(
        cls, input_shape: tuple[int, int, int], max_images: int, max_image_pixels: int = 0, max_request_pixels: int = 0
    ) -> ImageLimits:
        """Limits for a model of ``input_shape``; a pixel limit of 0 is sized from the input (see the constants)."""
        input_pixels = input_shape[0] * input_shape[1]
        image_cap = max_image_pixels or min(
            max(AUTO_IMAGE_PIXELS_PER_INPUT_PIXEL * input_pixels, AUTO_IMAGE_PIXELS_FLOOR), AUTO_IMAGE_PIXELS_CEILING
        )
        return cls(max_images, image_cap, max_request_pixels or AUTO_REQUEST_PIXELS_PER_IMAGE_CAP * image_cap)

    def check_count(self, count: int) -> None:
        """Refuse a request of no images or of more than :attr:`max_images`."""
        if count == 0:
            raise InvalidInput(f"the request has no images; send 1 to {self.max_images}")
        if count > self.max_images:
            raise InvalidInput(
                f"the request has {count} images; at most {self.max_images} per request"
                " (split it, or use PredictStream)"
            )

    def check_pixels(self, images: Sequence[ImageInput]) -> bool:
        """Refuse images that declare too many pixels, from their headers; True when decoding them is heavy.

        Heavy: the encoded images declare more than INLINE_DECODE_PIXELS together, or
        take more than INLINE_DECODE_BYTES, so they are decoded off the event loop.
        """
        total = encoded_pixels = encoded_bytes = 0
        for index, image in enumerate(images):
            pixels = declared_pixels(image)
            if pixels > self.max_image_pixels:
                raise InvalidInput(
                    f"images[{index}] declares {pixels:,} pixels; at most {self.max_image_pixels:,} per image "
                    "(--max-image-pixels): scale it down before sending"
                )
            total += pixels
            if image.encoded is not None:
                encoded_pixels += pixels
                encoded_bytes += len(image.encoded)
        if total > self.max_request_pixels:
            raise InvalidInput(
                f"the request's images declare {total:,} pixels together; at most {self.max_request_pixels:,} "
                "per request (--max-request-pixels): split it or scale the images down"
            )
        return encoded_pixels > INLINE_DECODE_PIXELS or encoded_bytes > INLINE_DECODE_BYTES


def declared_pixels(image: ImageInput) -> int:
    """Width x height an image declares, read without decoding it: raw pixels' shape, or the
    header of a PNG (fixed offsets) or JPEG (its frame header); 0 when there is none to read
    (the decoder then says what is wrong)."""
    if image.pixels is not None:
        shape = image.pixels.shape
        return shape[0] * shape[1] if len(shape) >= 2 else 0
    data = image.encoded or b""
    if data.startswith(_PNG_SIGNATURE) and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return width * height
    if data.startswith(b"\xff\xd8"):
        try:
            with Image.open(io.BytesIO(data), formats=("JPEG",)) as opened:
                return opened.width * opened.height
        except Exception:  # noqa: BLE001 - not a readable JPEG header: the decoder reports it
            return 0
    return 0


def decode_image(
    image: ImageInput, input_shape: tuple[int, int, int], index: int = 0, resize: str = "stretch"
) -> np.ndarray:
    """Decode one image to float32 ``input_shape`` in [0, 1]; ``index`` names it in errors."""
    return decode(image, input_shape, index, resize=resize).pixels


def decode(
    image: ImageInput,
    input_shape: tuple[int, int, int],
    index: int = 0,
    max_pixels: int = AUTO_IMAGE_PIXELS_CEILING,
    resize: str = "stretch",
) -> DecodedImage:
    """Validate one image and decode it as far as its digest; ``index`` names it in errors.

    ``max_pixels`` bounds an encoded image's width x height, checked from its header
    before anything is decompressed. ``resize`` is the model's (``Preprocessing.resize``):
    ``stretch`` to the input's height x width, or ``crop`` (shorter side to fit, centre cut out).
    """
    if (image.encoded is None) == (image.pixels is None):
        raise InvalidInput(f"images[{index}]: set exactly one of `encoded` (PNG/JPEG bytes) or `pixels`")
    if image.encoded is not None:
        return _decode_encoded(image.encoded, input_shape, index, max_pixels, resize)
    assert image.pixels is not None
    return _decode_pixels(image.pixels, input_shape, index)


def decode_all(
    images: Sequence[ImageInput], input_shape: tuple[int, int, int], max_pixels: int, resize: str = "stretch"
) -> list[DecodedImage]:
    """:func:`decode` every image of a request, in order."""
    return [decode(image, input_shape, index, max_pixels, resize) for index, image in enumerate(images)]


Result = TypeVar("Result")


#: Nice value of the decode threads: the scheduler runs the event loop and the inference
#: threads first, so a heavy request takes the CPU they leave and delays only itself.
DECODE_NICE = 10


def lower_thread_priority() -> None:
    """Give the calling thread the nice value DECODE_NICE (on Linux, nice is per thread)."""
    if sys.platform == "linux":
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DECODE_NICE)
        except OSError:  # not permitted here: decoding still works, at normal priority
            pass


class DecodePool:
    """Threads that decode heavy images off the event loop, with a bounded wait for them.

    Pillow releases the GIL while it decompresses and resizes, so the loop keeps serving.
    Past ``threads + max_waiting`` requests in the pool, :meth:`run` refuses with
    :class:`DecodeQueueFull` rather than queue without bound.
    """

    def __init__(self, threads: int, max_waiting: int) -> None:
        self.threads = threads
        self.max_waiting = max_waiting
        #: Requests decoding or waiting for a decode thread.
        self.pending = 0
        self._executor = ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="decode", initializer=lower_thread_priority
        )

    async def run(self, work: Callable[..., Result], *args: object) -> Result:
        """Run ``work(*args)`` on a decode thread, or raise :class:`DecodeQueueFull`."""
        if self.pending >= self.threads + self.max_waiting:
            raise DecodeQueueFull(
                f"{self.pending} requests are decoding or waiting to decode large images "
                f"(--decode-threads {self.threads}, --max-decode-queue {self.max_waiting}); retry with backoff, "
                "or send images nearer the model's input size"
            )
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, work, *args)
        finally:
            self.pending -= 1

    def close(self) -> None:
        """Drop waiting work and let the threads end once their current image is done."""
        self._executor.shutdown(wait=False, cancel_futures=True)


def _decode_encoded(
    data: bytes, input_shape: tuple[int, int, int], index: int, max_pixels: int, resize: str = "stretch"
) -> DecodedImage:
    height, width, channels = input_shape
    if not data:
        raise InvalidInput(f"images[{index}].encoded is empty; expected the bytes of a PNG or JPEG file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=("PNG", "JPEG")) as opened:
                if opened.width * opened.height > max_pixels:
                    raise InvalidInput(
                        f"images[{index}] is {opened.width}x{opened.height} pixels; "
                        f"at most {max_pixels:,} pixels are accepted (--max-image-pixels)"
                    )
                if opened.format == "JPEG":
                    # Decode at 1/2..1/8 scale when the file is far larger than the input.
                    opened.draft(
                        "L" if channels == 1 else "RGB", (JPEG_DRAFT_FACTOR * width, JPEG_DRAFT_FACTOR * height)
                    )
                opened.load()
                picture = _to_mode(opened, channels, (width, height))
    except InvalidInput:
        raise
    except UnidentifiedImageError:
        raise InvalidInput(f"images[{index}].encoded ({len(data)} bytes) is not a PNG or JPEG file") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise InvalidInput(
            f"images[{index}].encoded could not be decoded as PNG/JPEG ({exc}); the file may be truncated or corrupt"
        ) from None
    if picture.size != (width, height):
        if resize == "crop":
            picture = ImageOps.fit(picture, (width, height), Image.Resampling.BILINEAR)
        else:
            picture = picture.resize((width, height), Image.Resampling.BILINEAR)
    return DecodedImage(levels=np.asarray(picture, dtype=np.uint8).reshape(input_shape))


def _to_mode(picture: Image.Image, channels: int, size: tuple[int, int]) -> Image.Image:
    if picture.mode in ("RGBA", "LA", "PA") or (picture.mode == "P" and "transparency" in picture.info):
        # Transparent pixels take black, the background the digit models were trained on.
        rgba = picture.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        picture = Image.alpha_composite(background, rgba)
    if picture.mode in ("I;16", "I;16B", "I;16L", "I"):
        if picture.size != size:  # resized first: the scaling below makes a float64 array of every pixel
            picture = picture.convert("I").resize(size, Image.Resampling.BILINEAR)
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
