"""Unit tests for image validation and decoding (costserve.server.inputs)."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from costserve.server.domain import ImageInput, PixelType, RawPixels
from costserve.server.errors import InvalidInput
from costserve.server.inputs import decode_image

SHAPE = (28, 28, 1)


def _gray(seed: int = 0, height: int = 28, width: int = 28) -> np.ndarray:
    """A deterministic uint8 grayscale image using the full 0..255 range."""
    return np.random.default_rng(seed).integers(0, 256, size=(height, width), dtype=np.uint8)


def _rgb(seed: int = 1, height: int = 28, width: int = 28) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _encode(picture: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png(array: np.ndarray) -> bytes:
    return _encode(Image.fromarray(array), "PNG")


def _raw(array: np.ndarray, dtype: PixelType) -> ImageInput:
    numpy_dtype = np.uint8 if dtype is PixelType.UINT8 else np.dtype("<f4")
    data = np.ascontiguousarray(array, dtype=numpy_dtype).tobytes()
    return ImageInput(pixels=RawPixels(shape=tuple(array.shape), dtype=dtype, data=data))


def _decode(image: ImageInput, index: int = 0) -> np.ndarray:
    return decode_image(image, SHAPE, index=index)


def _rejects(image: ImageInput, *fragments: str, index: int = 0) -> str:
    """Assert decoding raises InvalidInput whose message holds every fragment (case-insensitive)."""
    with pytest.raises(InvalidInput) as caught:
        _decode(image, index=index)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment.lower() in message.lower(), f"{fragment!r} not in {message!r}"
    return message


def _assert_model_input(array: np.ndarray) -> None:
    assert array.shape == SHAPE
    assert array.dtype == np.float32
    assert np.isfinite(array).all()
    assert array.min() >= 0.0 and array.max() <= 1.0


# --- successful decoding ----------------------------------------------------------------


def test_grayscale_png_and_same_raw_uint8_pixels_decode_identically() -> None:
    gray = _gray()
    from_png = _decode(ImageInput(encoded=_png(gray)))
    from_raw_2d = _decode(_raw(gray, PixelType.UINT8))
    from_raw_3d = _decode(_raw(gray[:, :, None], PixelType.UINT8))
    _assert_model_input(from_png)
    assert np.array_equal(from_png, from_raw_2d)
    assert np.array_equal(from_png, from_raw_3d)
    assert np.array_equal(from_png[:, :, 0], gray.astype(np.float32) / 255.0)


def test_uint8_and_float32_raw_pixels_agree() -> None:
    gray = _gray(seed=2)
    from_uint8 = _decode(_raw(gray, PixelType.UINT8))
    from_float32 = _decode(_raw(gray.astype(np.float32) / 255.0, PixelType.FLOAT32))
    _assert_model_input(from_float32)
    np.testing.assert_allclose(from_uint8, from_float32, rtol=0, atol=1e-7)


def test_float32_boundaries_zero_and_one_are_accepted() -> None:
    values = np.zeros((28, 28), dtype=np.float32)
    values[0, 0] = 1.0
    decoded = _decode(_raw(values, PixelType.FLOAT32))
    assert decoded[0, 0, 0] == 1.0
    assert decoded[1:, :, 0].max() == 0.0


def test_rgb_png_and_rgb_raw_pixels_agree_within_one_level() -> None:
    rgb = _rgb()
    from_png = _decode(ImageInput(encoded=_png(rgb)))
    from_raw = _decode(_raw(rgb, PixelType.UINT8))
    _assert_model_input(from_png)
    _assert_model_input(from_raw)
    np.testing.assert_allclose(from_png, from_raw, rtol=0, atol=1 / 255 + 1e-6)
    expected_luma = (rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])) / 255.0
    np.testing.assert_allclose(from_raw[:, :, 0], expected_luma, rtol=0, atol=1e-5)


def test_pure_colour_channels_use_luma_weights() -> None:
    for channel, weight in enumerate((0.299, 0.587, 0.114)):
        rgb = np.zeros((28, 28, 3), dtype=np.uint8)
        rgb[:, :, channel] = 255
        decoded = _decode(_raw(rgb, PixelType.UINT8))
        np.testing.assert_allclose(decoded, weight, rtol=0, atol=1e-6)


def test_rgb_image_decodes_to_three_channels_when_the_model_wants_them() -> None:
    rgb = _rgb(seed=5)
    from_png = decode_image(ImageInput(encoded=_png(rgb)), (28, 28, 3))
    from_raw = decode_image(_raw(rgb, PixelType.UINT8), (28, 28, 3))
    assert from_png.shape == from_raw.shape == (28, 28, 3)
    assert np.array_equal(from_png, from_raw)
    assert np.array_equal(from_raw, rgb.astype(np.float32) / 255.0)


def test_rgba_raw_with_zero_alpha_becomes_black() -> None:
    rgba = np.full((28, 28, 4), 255, dtype=np.uint8)
    rgba[:, :14, 3] = 0  # left half transparent white, right half opaque white
    decoded = _decode(_raw(rgba, PixelType.UINT8))
    _assert_model_input(decoded)
    assert np.all(decoded[:, :14] == 0.0)
    np.testing.assert_allclose(decoded[:, 14:], 1.0, atol=1e-6)


def test_rgba_png_and_rgba_raw_agree_within_one_level() -> None:
    rgba = np.random.default_rng(3).integers(0, 256, size=(28, 28, 4), dtype=np.uint8)
    rgba[:4, :, 3] = 0
    from_png = _decode(ImageInput(encoded=_encode(Image.fromarray(rgba, "RGBA"), "PNG")))
    from_raw = _decode(_raw(rgba, PixelType.UINT8))
    assert np.all(from_png[:4] == 0.0)
    assert np.all(from_raw[:4] == 0.0)
    np.testing.assert_allclose(from_png, from_raw, rtol=0, atol=2 / 255)


def test_jpeg_decodes_close_to_its_source() -> None:
    # A smooth gradient survives JPEG compression with small per-pixel error.
    gradient = np.tile(np.linspace(0, 255, 28).astype(np.uint8), (28, 1))
    jpeg = _encode(Image.fromarray(gradient), "JPEG", quality=95)
    assert jpeg[:2] == b"\xff\xd8"
    decoded = _decode(ImageInput(encoded=jpeg))
    _assert_model_input(decoded)
    np.testing.assert_allclose(decoded[:, :, 0], gradient / 255.0, rtol=0, atol=0.05)


@pytest.mark.parametrize("size", [(56, 56), (100, 40), (14, 14)])
def test_png_of_another_size_is_resized_to_the_model_shape(size: tuple[int, int]) -> None:
    width, height = size
    # Left half black, right half white: resizing must keep that layout.
    array = np.zeros((height, width), dtype=np.uint8)
    array[:, width // 2 :] = 255
    decoded = _decode(ImageInput(encoded=_png(array)))
    _assert_model_input(decoded)
    assert decoded[:, :10].max() == 0.0
    assert decoded[:, 18:].min() == 1.0


def test_uniform_large_png_resizes_to_the_same_value() -> None:
    decoded = _decode(ImageInput(encoded=_png(np.full((56, 56), 128, dtype=np.uint8))))
    np.testing.assert_allclose(decoded, 128 / 255, atol=1e-6)


def test_sixteen_bit_png_decodes_scaled_to_unit_range() -> None:
    gray = _gray(seed=4)
    wide = gray.astype(np.uint16) * 257  # 0..65535, exactly 257x each 8-bit level
    picture = Image.fromarray(wide)
    assert picture.mode == "I;16"
    decoded = _decode(ImageInput(encoded=_encode(picture, "PNG")))
    _assert_model_input(decoded)
    assert np.array_equal(decoded, _decode(_raw(gray, PixelType.UINT8)))


def test_palette_png_decodes_to_its_colours() -> None:
    gray = _gray(seed=6)
    palette = Image.fromarray(gray).convert("P")
    assert palette.mode == "P"
    decoded = _decode(ImageInput(encoded=_encode(palette, "PNG")))
    _assert_model_input(decoded)
    expected = np.asarray(palette.convert("L"), dtype=np.float32) / 255.0
    assert np.array_equal(decoded[:, :, 0], expected)


def test_palette_png_with_transparency_becomes_black_where_transparent() -> None:
    palette = Image.new("P", (28, 28), 1)
    palette.putpalette([0, 0, 0, 255, 255, 255] + [0, 0, 0] * 254)
    for x in range(14):
        for y in range(28):
            palette.putpixel((x, y), 0)
    decoded_opaque = _decode(ImageInput(encoded=_encode(palette, "PNG")))
    assert decoded_opaque[:, 14:].min() == 1.0
    # Now make the white entry (index 1) transparent: everything should turn black.
    decoded = _decode(ImageInput(encoded=_encode(palette, "PNG", transparency=1)))
    assert decoded.max() == 0.0


def test_grayscale_with_alpha_png_composites_on_black() -> None:
    la = np.zeros((28, 28, 2), dtype=np.uint8)
    la[:, :, 0] = 255
    la[:, 14:, 1] = 255
    decoded = _decode(ImageInput(encoded=_encode(Image.fromarray(la, "LA"), "PNG")))
    assert decoded[:, :14].max() == 0.0
    assert decoded[:, 14:].min() == 1.0


def test_result_is_independent_of_the_request_bytes() -> None:
    gray = _gray(seed=7)
    data = bytearray(gray.tobytes())
    decoded = _decode(ImageInput(pixels=RawPixels((28, 28), PixelType.UINT8, bytes(data))))
    before = decoded.copy()
    data[:] = b"\x00" * len(data)
    assert np.array_equal(decoded, before)


# --- rejected requests ------------------------------------------------------------------


def test_both_encoded_and_pixels_set_is_rejected() -> None:
    gray = _gray()
    both = ImageInput(encoded=_png(gray), pixels=_raw(gray, PixelType.UINT8).pixels)
    _rejects(both, "exactly one", "encoded", "pixels")


def test_neither_encoded_nor_pixels_set_is_rejected() -> None:
    _rejects(ImageInput(), "exactly one", "encoded", "pixels")


def test_empty_encoded_bytes_are_rejected() -> None:
    _rejects(ImageInput(encoded=b""), "empty", "PNG or JPEG")


def test_random_bytes_are_rejected_as_not_an_image() -> None:
    noise = np.random.default_rng(8).integers(0, 256, size=500, dtype=np.uint8).tobytes()
    _rejects(ImageInput(encoded=noise), "500 bytes", "not a PNG or JPEG")


def test_truncated_png_is_rejected() -> None:
    # Noise does not compress, so the first half cuts through the image data.
    full = _png(_gray(seed=9, height=64, width=64))
    _rejects(ImageInput(encoded=full[: len(full) // 2]), "PNG", "truncated")


def test_png_with_only_its_signature_is_rejected() -> None:
    _rejects(ImageInput(encoded=_png(_gray())[:8]), "PNG")


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_image_formats_are_rejected(fmt: str) -> None:
    data = _encode(Image.fromarray(_gray()), fmt)
    Image.open(io.BytesIO(data)).load()  # a valid file that PIL itself can read
    _rejects(ImageInput(encoded=data), f"{len(data)} bytes", "not a PNG or JPEG")


@pytest.mark.parametrize(
    ("shape", "dtype", "length"),
    [
        ((28, 28), PixelType.UINT8, 28 * 28 - 1),
        ((28, 28), PixelType.UINT8, 28 * 28 + 1),
        ((28, 28, 3), PixelType.UINT8, 28 * 28),
        ((28, 28), PixelType.FLOAT32, 28 * 28),
        ((28, 28, 1), PixelType.FLOAT32, 0),
    ],
)
def test_data_length_must_match_shape_and_itemsize(shape: tuple[int, ...], dtype: PixelType, length: int) -> None:
    itemsize = 1 if dtype is PixelType.UINT8 else 4
    expected = int(np.prod(shape)) * itemsize
    image = ImageInput(pixels=RawPixels(shape, dtype, b"\x00" * length))
    message = _rejects(image, f"{length} bytes", f"needs {expected}")
    assert dtype.value in message


@pytest.mark.parametrize("shape", [(784,), (1, 28, 28, 1), ()])
def test_rank_other_than_two_or_three_is_rejected(shape: tuple[int, ...]) -> None:
    data = b"\x00" * int(np.prod(shape))
    _rejects(ImageInput(pixels=RawPixels(shape, PixelType.UINT8, data)), f"rank {len(shape)}", "28, 28")


@pytest.mark.parametrize("shape", [(27, 28), (28, 27), (28, 29, 1), (56, 56)])
def test_wrong_height_or_width_is_rejected(shape: tuple[int, ...]) -> None:
    data = b"\x00" * int(np.prod(shape))
    _rejects(ImageInput(pixels=RawPixels(shape, PixelType.UINT8, data)), "28 x 28", str(list(shape)))


def test_two_channels_are_rejected() -> None:
    image = ImageInput(pixels=RawPixels((28, 28, 2), PixelType.UINT8, b"\x00" * (28 * 28 * 2)))
    _rejects(image, "2 channels", "1, 3 or 4")


@pytest.mark.parametrize("shape", [(0, 28), (28, 0), (28, 28, 0), (-28, 28), (28, -28, 1), (28, 28, -1)])
def test_zero_or_negative_dimensions_are_rejected(shape: tuple[int, ...]) -> None:
    _rejects(ImageInput(pixels=RawPixels(shape, PixelType.UINT8, b"")), "below 1", str(list(shape)))


@pytest.mark.parametrize(
    ("bad_value", "fragments"),
    [
        (float("nan"), ("NaN", "[0, 1]")),
        (float("inf"), ("infinite", "[0, 1]")),
        (float("-inf"), ("infinite", "[0, 1]")),
        (-0.5, ("-0.5", "[0, 1]")),
        (1.5, ("1.5", "[0, 1]")),
        (255.0, ("255", "UINT8")),
    ],
)
def test_float32_values_must_be_finite_and_in_unit_range(bad_value: float, fragments: tuple[str, ...]) -> None:
    values = np.full((28, 28), 0.5, dtype=np.float32)
    values[13, 7] = bad_value
    _rejects(_raw(values, PixelType.FLOAT32), *fragments)


@pytest.mark.parametrize(
    "image",
    [
        ImageInput(),
        ImageInput(encoded=b""),
        ImageInput(encoded=b"not an image at all"),
        ImageInput(pixels=RawPixels((28, 28), PixelType.UINT8, b"\x00")),
        ImageInput(pixels=RawPixels((784,), PixelType.UINT8, b"\x00" * 784)),
        ImageInput(pixels=RawPixels((27, 28), PixelType.UINT8, b"\x00" * 27 * 28)),
        ImageInput(pixels=RawPixels((28, 28, 2), PixelType.UINT8, b"\x00" * 28 * 28 * 2)),
        ImageInput(pixels=RawPixels((0, 28), PixelType.UINT8, b"")),
        ImageInput(pixels=RawPixels((28, 28), PixelType.FLOAT32, np.full(784, np.nan, "<f4").tobytes())),
    ],
)
def test_errors_name_the_image_by_index(image: ImageInput) -> None:
    with pytest.raises(InvalidInput) as caught:
        _decode(image, index=3)
    assert re.search(r"\bimages\[3\]", str(caught.value)), str(caught.value)
    assert "images[0]" not in str(caught.value)


def test_invalid_input_maps_to_invalid_argument() -> None:
    import grpc

    with pytest.raises(InvalidInput) as caught:
        _decode(ImageInput())
    assert caught.value.status is grpc.StatusCode.INVALID_ARGUMENT
