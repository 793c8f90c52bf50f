"""Tensors in, images out, and back: what the standard protocols' front ends share.

The Open Inference Protocol v2 and TensorFlow Serving's API send a batch of images as
one tensor (``[N, H, W, C]`` and its variants, or ``[N]`` encoded files) where
costserve.v1 sends a list of images. :func:`images_from_tensor` splits such a tensor
into the core's :class:`ImageInput` values without copying its bytes (each image's
pixels are a view of the message's buffer); each front end names its own fields in
the errors it raises. :func:`top_classes` orders an answer's classes for every front
end's ``top_k``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from costserve.protocols import wire
from costserve.server.domain import ImageInput, PixelType, RawPixels
from costserve.server.errors import InvalidInput
from costserve.server.inputs import ImageLimits

#: Bytes per element of each pixel type.
ITEM_BYTES = {PixelType.UINT8: 1, PixelType.FLOAT32: 4}


def expected_shapes(input_shape: tuple[int, int, int]) -> str:
    """The shapes a model's image tensor may take, in words, for error messages."""
    height, width, channels = input_shape
    shapes = [f"[N, {height}, {width}, {channels}]"]
    if channels == 1:
        shapes.append(f"[N, {height}, {width}]")
    shapes.append(f"[{height}, {width}, {channels}]")
    return ", ".join(shapes[:-1]) + " or " + shapes[-1]


def images_from_tensor(
    data: bytes | memoryview,
    pixel_type: PixelType,
    shape: Sequence[int],
    input_shape: tuple[int, int, int],
    limits: ImageLimits,
    tensor: str,
) -> list[ImageInput]:
    """Split a tensor of raw pixels into one image per entry of its batch dimension.

    ``shape`` is ``[N, H, W, C]``, ``[N, H, W]`` (one channel) or ``[H, W, C]`` (one
    image); ``data`` holds its elements row-major, little-endian. ``tensor`` names the
    tensor in errors ("input 'images'"). The count of images is checked against
    ``limits`` before any image is made; the images' own checks (size, values) are the
    decoder's, as for every protocol.
    """
    dims = tuple(shape)
    height, width, channels = input_shape
    if dims and min(dims) <= 0:
        raise InvalidInput(f"{tensor} has shape {list(dims)} with a dimension below 1")
    image_shape: tuple[int, ...]
    # [N, H, W] when the last two dimensions are the model's height and width; else [H, W, C].
    if len(dims) == 4 or (len(dims) == 3 and dims[1:] == (height, width) and dims[2] != channels):
        count, image_shape = dims[0], dims[1:]
    elif len(dims) == 3:
        count, image_shape = 1, dims
    else:
        count, image_shape = 0, ()
    if not count or image_shape[:2] != (height, width) or (len(image_shape) == 3 and image_shape[2] not in (1, 3, 4)):
        raise InvalidInput(
            f"{tensor} has shape {list(dims)}; expected {expected_shapes(input_shape)} (N images of the model's "
            f"height {height} and width {width}; 1, 3 or 4 channels)"
        )
    limits.check_count(count)
    item = ITEM_BYTES[pixel_type]
    expected = math.prod(dims) * item
    if len(data) != expected:
        raise InvalidInput(
            f"{tensor} holds {len(data)} bytes; its shape {list(dims)} of {pixel_type.name} needs "
            f"{expected} ({math.prod(dims)} x {item})"
        )
    view = memoryview(data)
    size = expected // count
    return [
        ImageInput(pixels=RawPixels(shape=image_shape, dtype=pixel_type, data=view[start : start + size]))
        for start in range(0, expected, size)
    ]


def split_length_prefixed(data: bytes, tensor: str, max_elements: int) -> list[bytes]:
    """The elements of a raw BYTES tensor (:func:`costserve.protocols.wire.split_length_prefixed`), at most
    ``max_elements``; bad bytes are InvalidInput naming ``tensor``."""
    try:
        return wire.split_length_prefixed(data, max_elements)
    except ValueError as error:
        raise InvalidInput(f"{tensor} {error}") from None


def encoded_images(
    elements: Sequence[bytes], shape: Sequence[int], limits: ImageLimits, tensor: str
) -> list[ImageInput]:
    """Images from the elements of a BYTES tensor of shape ``[N]`` or ``[N, 1]``, each a PNG or JPEG file."""
    dims = [int(dim) for dim in shape]
    if not (len(dims) == 1 or (len(dims) == 2 and dims[1] == 1)):
        raise InvalidInput(f"{tensor} has shape {dims}; a tensor of encoded images takes [N] or [N, 1]")
    limits.check_count(dims[0])
    if dims[0] != len(elements):
        raise InvalidInput(f"{tensor} has shape {dims} but holds {len(elements)} elements")
    return [ImageInput(encoded=bytes(element)) for element in elements]


def top_classes(probabilities: np.ndarray, k: int) -> np.ndarray:
    """The indices of the ``k`` most probable classes, most probable first (ties: lower index first)."""
    if k < len(probabilities):
        # argpartition then a sort of k: a 1,000-class answer needs no full sort.
        best = np.argpartition(-probabilities, k - 1)[:k]
        return best[np.argsort(-probabilities[best], kind="stable")]
    return np.argsort(-probabilities, kind="stable")
