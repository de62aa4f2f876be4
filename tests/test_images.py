"""Tests of gaia_builder.images: img2dataset's sizes, pixel modes, formats, limits and memory.

Every image is generated here with Pillow and NumPy, except those of the shared_images fixture.
"""

from __future__ import annotations

import io
import json
import math
import struct
import subprocess
import sys
import textwrap
import tracemalloc
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageCms, features

from gaia_builder import images
from gaia_builder.config import ImageOptions
from gaia_builder.errors import ImageError, RowError
from gaia_builder.images import ProcessedImage, process_image

# ---------------------------------------------------------------------------------------------
# Helpers


def encode(image: Image.Image, image_format: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **params)
    return buffer.getvalue()


def process(data: bytes, **options: Any) -> ProcessedImage:
    return process_image(data, ImageOptions(**options), source="https://example.test/image")


def decode(result: ProcessedImage) -> Image.Image:
    image = Image.open(io.BytesIO(result.data))
    image.load()
    return image


def row_error(data: bytes, **options: Any) -> RowError:
    with pytest.raises(ImageError) as caught:
        process(data, **options)
    return caught.value.row_error


def noisy_gray(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Return a photo-like grayscale array: smooth waves, a sharp-edged block and noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    pixels = 128 + 70 * np.sin(2 * np.pi * 2.3 * x / width) * np.cos(2 * np.pi * 1.7 * y / height)
    pixels[height // 4 : height // 2, width // 3 : width // 2] = 230
    pixels += rng.normal(0, 12, pixels.shape)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def psnr(actual: np.ndarray, expected: np.ndarray) -> float:
    error = np.mean((actual.astype(np.float64) - expected.astype(np.float64)) ** 2)
    return math.inf if error == 0 else 10 * math.log10(255**2 / error)


def area_average(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Shrink a grayscale array by exact area averaging, the operation of OpenCV's INTER_AREA."""

    def weights(source: int, target: int) -> np.ndarray:
        scale = source / target
        starts = np.arange(target)[:, None] * scale
        first = np.arange(source)[None, :]
        covered = np.minimum(starts + scale, first + 1) - np.maximum(starts, first)
        return np.clip(covered, 0, None) / scale

    rows = weights(pixels.shape[0], height)
    columns = weights(pixels.shape[1], width)
    return np.rint(rows @ pixels.astype(np.float64) @ columns.T)


def rgb_at(image: Image.Image, x: int, y: int) -> tuple[int, ...]:
    pixel = image.getpixel((x, y))
    assert isinstance(pixel, tuple), f"expected an RGB pixel, got {pixel!r}"
    return pixel


def flat(size: tuple[int, int], color: int | tuple[int, ...] = 90, mode: str = "L") -> Image.Image:
    return Image.new(mode, size, color)


# ---------------------------------------------------------------------------------------------
# Sizes: img2dataset 1.47 with albumentations 1.4 scales the shorter (keep_ratio, center_crop) or
# longer (keep_ratio_largest, border) side to image_size and rounds every side half to even, at
# least 1. Each expected size below was worked out by hand from that rule.

SIZE_TABLE = [
    # resize_mode, source size, expected output size, and the arithmetic for the rounded side
    ("keep_ratio", (1024, 768), (683, 512)),  # 1024 * 512 / 768 = 682.67
    ("keep_ratio", (768, 1024), (512, 683)),
    ("keep_ratio", (1025, 1024), (512, 512)),  # 512.5 rounds to even 512
    ("keep_ratio", (1027, 1024), (514, 512)),  # 513.5 rounds to even 514
    ("keep_ratio", (3081, 3072), (514, 512)),  # 3081 / 6 = 513.5 rounds to even 514
    ("keep_ratio", (3075, 3072), (512, 512)),  # 3075 / 6 = 512.5 rounds to even 512
    ("keep_ratio", (512, 700), (512, 700)),  # shorter side already 512: untouched
    ("keep_ratio", (512, 256), (1024, 512)),  # enlarged
    ("keep_ratio", (79, 71), (570, 512)),  # 79 * 512 / 71 = 569.69
    ("keep_ratio_largest", (1024, 1021), (512, 510)),  # 510.5 rounds to even 510
    ("keep_ratio_largest", (1024, 1023), (512, 512)),  # 511.5 rounds to even 512
    ("keep_ratio_largest", (300, 200), (512, 341)),  # 200 * 512 / 300 = 341.33
    ("keep_ratio_largest", (5000, 4), (512, 1)),  # 0.41 rounds to 0, raised to 1
    ("center_crop", (1027, 1024), (512, 512)),  # 514x512, then cropped
    ("center_crop", (300, 200), (512, 512)),  # 768x512, then cropped
    ("border", (1000, 299), (512, 512)),  # 512x153, then padded
    ("border", (1024, 1021), (512, 512)),  # 512x510, then padded
    ("no", (1027, 1024), (1027, 1024)),
]


@pytest.mark.parametrize(("resize_mode", "source_size", "expected_size"), SIZE_TABLE)
def test_resize_size_table(
    resize_mode: str, source_size: tuple[int, int], expected_size: tuple[int, int]
) -> None:
    result = process(encode(flat(source_size), "PNG"), resize_mode=resize_mode)

    assert (result.width, result.height) == expected_size
    assert decode(result).size == expected_size
    assert (result.original_width, result.original_height) == source_size


def test_resize_other_image_size() -> None:
    """250x150 with image_size 100: 250 * 100 / 150 = 166.67 rounds to 167."""
    result = process(encode(flat((250, 150)), "PNG"), image_size=100)

    assert (result.width, result.height) == (167, 100)


@pytest.mark.parametrize(
    ("resize_mode", "source_size", "expected_size"),
    [
        ("keep_ratio", (300, 200), (300, 200)),
        ("center_crop", (300, 200), (300, 200)),  # no crop either
        ("border", (300, 200), (300, 200)),  # no padding either
        ("keep_ratio", (1024, 768), (683, 512)),  # bigger images still shrink
        ("border", (1000, 299), (512, 512)),
    ],
)
def test_resize_only_if_bigger(
    resize_mode: str, source_size: tuple[int, int], expected_size: tuple[int, int]
) -> None:
    data = encode(flat(source_size), "PNG")

    result = process(data, resize_mode=resize_mode, resize_only_if_bigger=True)

    assert (result.width, result.height) == expected_size


def test_center_crop_keeps_middle() -> None:
    """A 1024x512 image, black left and white right, keeps columns 256-767."""
    pixels = np.zeros((512, 1024), np.uint8)
    pixels[:, 512:] = 255

    result = decode(process(encode(Image.fromarray(pixels), "PNG"), resize_mode="center_crop"))
    output = np.asarray(result)

    assert result.size == (512, 512)
    assert output[:, 255].max() == 0
    assert output[:, 256].min() == 255


def test_border_pads_white_around_middle() -> None:
    """1000x299 becomes 512x153, then 179 white rows above and 180 below."""
    result = decode(process(encode(flat((1000, 299), 0), "PNG"), resize_mode="border"))
    output = np.asarray(result)

    assert result.size == (512, 512)
    assert output[178].min() == 255
    assert output[179].max() == 0
    assert output[331].max() == 0
    assert output[332].min() == 255


def test_border_pads_rgb_white() -> None:
    result = decode(process(encode(flat((600, 200), (0, 0, 0), "RGB"), "PNG"), resize_mode="border"))

    assert result.getpixel((0, 0)) == (255, 255, 255)
    assert result.getpixel((256, 256)) == (0, 0, 0)


# ---------------------------------------------------------------------------------------------
# Filters: img2dataset shrinks with OpenCV's INTER_AREA. The reference here is exact area
# averaging written in NumPy; benchmarks/fidelity.py compares with OpenCV itself.


@pytest.mark.parametrize("source_side", [522, 768, 1024, 1280, 2600])
def test_shrink_close_to_area_average(source_side: int) -> None:
    pixels = noisy_gray(source_side, source_side)
    expected = area_average(pixels, 512, 512)

    result = decode(process(encode(Image.fromarray(pixels), "PNG")))

    assert psnr(np.asarray(result), expected) >= 40.0


def test_enlarge_keeps_flat_color() -> None:
    result = decode(process(encode(flat((100, 80), (10, 120, 240), "RGB"), "PNG")))

    assert result.size == (640, 512)
    assert result.getextrema() == ((10, 10), (120, 120), (240, 240))


# ---------------------------------------------------------------------------------------------
# Pixel modes


def test_rgba_composited_on_white() -> None:
    """Colour c at alpha a becomes round(c * a / 255 + 255 - a), as img2dataset computes it."""
    image = Image.new("RGBA", (2, 1))
    image.putpixel((0, 0), (0, 0, 0, 0))
    image.putpixel((1, 0), (100, 40, 200, 128))

    result = decode(process(encode(image, "PNG"), resize_mode="no"))

    assert result.mode == "RGB"
    assert result.getpixel((0, 0)) == (255, 255, 255)
    assert result.getpixel((1, 0)) == (177, 147, 227)


def test_alpha_matting_all_pairs() -> None:
    """Every (colour, alpha) pair gives img2dataset's NumPy result exactly."""
    color, alpha = np.meshgrid(np.arange(256), np.arange(256))
    rgba = np.stack([color, 255 - color, color // 2, alpha], axis=-1).astype(np.uint8)
    pixels = rgba[..., :3].astype(np.float64)
    expected = np.rint(np.clip(alpha[..., None] / 255 * pixels + 255 - alpha[..., None], 0, 255))

    result = decode(process(encode(Image.fromarray(rgba, "RGBA"), "PNG"), resize_mode="no"))

    assert np.array_equal(np.asarray(result), expected.astype(np.uint8))


def test_la_composited_on_white() -> None:
    image = Image.merge("LA", [flat((4, 4), 0), flat((4, 4), 0)])
    image.putpixel((3, 3), (0, 255))

    result = decode(process(encode(image, "PNG"), resize_mode="no"))

    assert result.mode == "RGB"
    assert result.getpixel((0, 0)) == (255, 255, 255)
    assert result.getpixel((3, 3)) == (0, 0, 0)


def test_palette_transparency_composited_on_white() -> None:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    image.putpixel((0, 0), 0)

    result = decode(process(encode(image, "PNG", transparency=0), resize_mode="no"))

    assert result.mode == "RGB"
    assert result.getpixel((0, 0)) == (255, 255, 255)
    assert result.getpixel((1, 1)) == (200, 30, 30)


def test_palette_becomes_rgb() -> None:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)

    result = decode(process(encode(image, "PNG"), resize_mode="no"))

    assert result.mode == "RGB"
    assert result.getpixel((2, 2)) == (200, 30, 30)


def test_grayscale_stays_single_channel() -> None:
    result = decode(process(encode(Image.fromarray(noisy_gray(700, 600)), "PNG")))

    assert result.mode == "L"


def test_one_bit_becomes_grayscale() -> None:
    image = Image.new("1", (8, 8), 0)
    image.putpixel((7, 7), 1)

    result = decode(process(encode(image, "PNG"), resize_mode="no"))

    assert result.mode == "L"
    assert result.getpixel((0, 0)) == 0
    assert result.getpixel((7, 7)) == 255


def sixteen_bit_gradient() -> np.ndarray:
    return np.linspace(0, 65535, 300 * 200).reshape(200, 300).astype(np.uint16)


def test_sixteen_bit_png_scaled_by_range() -> None:
    """A 16-bit gradient keeps its mean / 257 instead of clipping at 255."""
    values = sixteen_bit_gradient()
    image = Image.frombytes("I;16", (300, 200), values.astype("<u2").tobytes())

    result = decode(process(encode(image, "PNG"), resize_mode="no"))
    output = np.asarray(result)

    assert result.mode == "L"
    assert abs(output.mean() - values.mean() / 257) <= 2
    assert output.min() == 0
    assert output.max() == 255


def test_sixteen_bit_big_endian_tiff() -> None:
    values = sixteen_bit_gradient()
    image = Image.frombytes("I;16B", (300, 200), values.astype(">u2").tobytes())

    output = np.asarray(decode(process(encode(image, "TIFF"), resize_mode="no")))

    assert abs(output.mean() - values.mean() / 257) <= 2


def test_thirty_two_bit_tiff_scaled_by_range() -> None:
    """Signed 32-bit samples map from [-2**31, 2**31 - 1] to [0, 255]."""
    values = np.array([[-(2**31), 0, 2**31 - 1]], np.int32)

    result = decode(process(encode(Image.fromarray(values), "TIFF"), resize_mode="no"))

    assert list(np.asarray(result)[0]) == [0, 128, 255]


def test_float_tiff_rejected() -> None:
    values = np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4)

    error = row_error(encode(Image.fromarray(values), "TIFF"))

    assert error.error_class == "unsupported_format"
    assert "mode F" in error.detail


def test_cmyk_jpeg_matches_rgb() -> None:
    reference = (200, 100, 50)
    data = encode(flat((64, 64), reference, "RGB").convert("CMYK"), "JPEG", quality=95)

    result = decode(process(data, resize_mode="no"))
    mean = np.asarray(result).reshape(-1, 3).mean(axis=0)

    assert result.mode == "RGB"
    assert np.abs(mean - np.array(reference)).max() <= 6


def rotated_jpeg(orientation: int) -> bytes:
    """Return a 400x300 JPEG, red in its stored top-left corner, tagged with ``orientation``."""
    image = flat((400, 300), (0, 0, 255), "RGB")
    image.paste((255, 0, 0), (0, 0, 100, 100))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


def test_exif_rotated_jpeg_upright() -> None:
    """Orientation 6 turns the stored image a quarter clockwise: top-left moves to top-right."""
    result = process(rotated_jpeg(6), resize_mode="no")
    output = decode(result)

    assert (result.width, result.height) == (300, 400)
    assert (result.original_width, result.original_height) == (300, 400)
    assert rgb_at(output, 250, 50)[0] > 200  # red, top right
    assert rgb_at(output, 50, 50)[2] > 200  # blue, top left


def test_exif_rotated_jpeg_resized_upright() -> None:
    result = process(rotated_jpeg(6))

    assert (result.width, result.height) == (512, 683)


def test_exif_rotation_applied_once() -> None:
    """The output carries no orientation tag, so no viewer rotates it again."""
    output = decode(process(rotated_jpeg(6), resize_mode="no", encode_format="jpeg", encode_quality=90))

    assert 0x0112 not in output.getexif()
    assert output.size == (300, 400)


def test_exif_orientation_one_unchanged() -> None:
    result = process(rotated_jpeg(1), resize_mode="no")

    assert (result.width, result.height) == (400, 300)


COLORS = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]


def frames() -> list[Image.Image]:
    return [flat((32, 32), color, "RGB") for color in COLORS]


@pytest.mark.parametrize(
    ("image_format", "params"),
    [("GIF", {}), ("PNG", {}), ("WEBP", {"lossless": True}), ("TIFF", {})],
    ids=["animated-gif", "apng", "animated-webp", "multipage-tiff"],
)
def test_first_frame_decoded(image_format: str, params: dict[str, Any]) -> None:
    first, *others = frames()
    data = encode(first, image_format, save_all=True, append_images=others, duration=100, **params)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3  # the source has three frames

    result = decode(process(data, resize_mode="no"))

    assert result.getpixel((16, 16)) == COLORS[0]


@pytest.mark.parametrize(
    ("image_format", "name"),
    [
        ("JPEG", "jpeg"),
        ("PNG", "png"),
        ("GIF", "gif"),
        ("TIFF", "tiff"),
        ("WEBP", "webp"),
        ("BMP", "bmp"),
        ("JPEG2000", "jpeg2000"),
        ("AVIF", "avif"),
    ],
)
def test_source_formats_decode(image_format: str, name: str) -> None:
    if image_format == "AVIF" and not features.check("avif"):
        pytest.skip("this Pillow build has no AVIF codec")
    data = encode(flat((640, 600), (40, 80, 120), "RGB"), image_format)

    resized = process(data)
    original = process(data, mode="original")

    assert (resized.width, resized.height) == (546, 512)
    assert original.format == name


# ---------------------------------------------------------------------------------------------
# Rejected inputs


@pytest.mark.parametrize(
    ("data", "error_class"),
    [
        (b"", "not_an_image"),
        (b"<!DOCTYPE html><html><body>Page moved</body></html>", "not_an_image"),
        (b"Not Found\n", "not_an_image"),
        (b'{"error": "not found"}', "not_an_image"),
        (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', "unsupported_format"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "unsupported_format"),
        (b"\x00\x00\x00\x1cftypmif1\x00\x00\x00\x00mif1heic", "unsupported_format"),
        (bytes(range(256)), "unsupported_format"),
    ],
    ids=["empty", "html", "text", "json", "svg", "heic", "heif-mif1", "binary"],
)
def test_not_decodable(data: bytes, error_class: str) -> None:
    assert row_error(data).error_class == error_class
    assert row_error(data, mode="original").error_class == error_class


def test_error_names_source() -> None:
    error = row_error(b"<html></html>")

    assert "https://example.test/image" in error.detail


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "GIF", "WEBP"])
def test_truncated_decode_error(image_format: str) -> None:
    data = encode(Image.fromarray(noisy_gray(600, 600)).convert("RGB"), image_format)

    assert row_error(data[: len(data) * 2 // 3]).error_class == "decode_error"
    assert row_error(data[: len(data) * 2 // 3], mode="original").error_class == "decode_error"


def test_truncated_drafted_jpeg_decode_error() -> None:
    """A JPEG decoded at reduced DCT scale still reads, and misses, every byte."""
    data = encode(Image.fromarray(noisy_gray(2048, 2048)), "JPEG")

    assert row_error(data[: len(data) * 9 // 10]).error_class == "decode_error"


def test_too_many_pixels() -> None:
    data = encode(flat((1000, 1000)), "PNG")

    error = row_error(data, max_pixels=999_999)

    assert error.error_class == "too_many_pixels"
    assert "1000x1000" in error.detail


def test_gif_frame_over_pillow_limit() -> None:
    """A 1x1 GIF whose frame claims 20000x10000 px trips Pillow's own limit while opening."""
    screen = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0, 0, 0)
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 20_000, 10_000, 0x80) + bytes(6)
    pixels = b"\x02\x02\x4c\x01\x00"  # LZW minimum code size, then one sub-block
    data = screen + frame + pixels + b"\x3b"

    error = row_error(data)

    assert error.error_class == "too_many_pixels"
    assert "MAX_IMAGE_PIXELS" in error.detail


def test_max_pixels_counts_drafted_jpeg_pixels() -> None:
    """A 4096x4096 JPEG shrunk to 512 decodes at 1/4 scale, 1 Mpx, within a 2 Mpx cap."""
    data = encode(flat((4096, 4096), (10, 20, 30), "RGB"), "JPEG")

    result = process(data, max_pixels=2_000_000)

    assert (result.width, result.height) == (512, 512)


UPSCALE_LIMITS = [
    # resize_mode, source size, image_size, max_pixels, the oversized image named in the detail
    ("keep_ratio", (1, 1000), 64, 10_000, "64x64000 = 4,096,000 pixels"),
    ("keep_ratio_largest", (1000, 1), 5000, 10_000, "5000x5 = 25,000 pixels"),
    ("center_crop", (1, 1000), 64, 10_000, "64x64000 = 4,096,000 pixels before the centre crop"),
    ("border", (1000, 1), 300, 50_000, "a 300x300 square of 90,000 pixels after padding"),
]


@pytest.mark.parametrize(
    ("resize_mode", "size", "image_size", "max_pixels", "expected"),
    UPSCALE_LIMITS,
    ids=[case[0] for case in UPSCALE_LIMITS],
)
def test_max_pixels_caps_resized_image(
    resize_mode: str, size: tuple[int, int], image_size: int, max_pixels: int, expected: str
) -> None:
    """A small image whose resized, cropped or padded form exceeds max_pixels is rejected."""
    data = encode(flat(size), "PNG")

    error = row_error(data, resize_mode=resize_mode, image_size=image_size, max_pixels=max_pixels)

    assert error.error_class == "too_many_pixels"
    assert expected in error.detail
    assert f"max_pixels {max_pixels:,}" in error.detail


def test_max_pixels_allows_resized_image_at_limit() -> None:
    result = process(encode(flat((10, 15)), "PNG"), image_size=64, max_pixels=64 * 96)

    assert (result.width, result.height) == (64, 96)


def test_max_pixels_checked_before_decoding() -> None:
    """A PNG with damaged pixels that would upscale past max_pixels fails before its pixels are read."""
    data = bytearray(encode(Image.fromarray(noisy_gray(4, 40)), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 4 : idat + 12] = bytes(8)  # the zlib header and the first compressed bytes

    # 4x40 upscales to 512x5120 = 2,621,440 pixels.
    assert row_error(bytes(data), max_pixels=3_000_000).error_class == "decode_error"
    assert row_error(bytes(data), max_pixels=2_000_000).error_class == "too_many_pixels"


def test_output_pillow_cannot_open_rejected() -> None:
    """A 1x900 strip scaled to 512 px wide is 512x460800, more than Image.open accepts by default."""
    assert Image.MAX_IMAGE_PIXELS is not None
    assert 2 * Image.MAX_IMAGE_PIXELS < 512 * 460_800  # under the default max_pixels, 250 million

    error = row_error(encode(flat((1, 900)), "PNG"))

    assert error.error_class == "too_many_pixels"
    assert "512x460800 = 235,929,600 pixels" in error.detail
    assert "MAX_IMAGE_PIXELS" in error.detail
    assert "center_crop" in error.detail
    assert "original config" in error.detail  # the 1x900 source itself opens


def test_output_square_modes_pass_extreme_ratio() -> None:
    data = encode(flat((1, 900)), "PNG")

    for resize_mode in ("center_crop", "border"):
        result = process(data, resize_mode=resize_mode)
        assert (result.width, result.height) == (512, 512)


def test_output_limit_follows_pillow_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """The limit is read from Image.MAX_IMAGE_PIXELS at each call, unresized images included."""
    data = encode(flat((600, 400)), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)

    unresized = row_error(data, resize_mode="no")
    assert unresized.error_class == "too_many_pixels"
    assert "such as keep_ratio" in unresized.detail
    assert "original config" not in unresized.detail  # the source itself is over the limit
    assert row_error(data).error_class == "too_many_pixels"  # 768x512 after keep_ratio

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert process(data, resize_mode="no").width == 600


def png_with_bad_header_checksum() -> bytes:
    data = bytearray(encode(flat((8, 8)), "PNG"))
    data[16] ^= 0xFF  # the first byte of the IHDR width, so the chunk's CRC no longer matches
    return bytes(data)


def jpeg_with_precision(bits: int) -> bytes:
    """Return a JPEG whose SOF0 marker claims samples of ``bits`` bits."""
    data = bytearray(encode(flat((8, 8)), "JPEG"))
    data[data.index(b"\xff\xc0") + 4] = bits
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "error_class"),
    [
        (png_with_bad_header_checksum(), "decode_error"),
        (encode(flat((8, 8)), "PNG")[:12], "decode_error"),
        (encode(flat((8, 8)), "GIF")[:8], "decode_error"),
        (b"\xff\xd8\xff" + bytes(64), "decode_error"),
        (encode(flat((8, 8)), "BMP")[:16], "decode_error"),  # cut inside the info header size
        (jpeg_with_precision(12), "unsupported_format"),
    ],
    ids=[
        "png-checksum",
        "png-cut-header",
        "gif-cut-header",
        "jpeg-no-marker",
        "bmp-cut-header",
        "jpeg-12-bit",
    ],
)
def test_damaged_header(data: bytes, error_class: str) -> None:
    """A decoded format's signature that fails to open is decode_error, unless Pillow names the layout."""
    assert row_error(data).error_class == error_class
    assert row_error(data, mode="original").error_class == error_class


def test_invalid_option_raises() -> None:
    with pytest.raises(ValueError, match="resize_mode"):
        process(encode(flat((8, 8)), "PNG"), resize_mode="stretch")


# ---------------------------------------------------------------------------------------------
# Encoding and mode "original"


def test_png_level_changes_size_not_pixels() -> None:
    data = encode(Image.fromarray(noisy_gray(700, 700)), "PNG")

    fast = process(data, encode_quality=0)
    small = process(data, encode_quality=9)

    assert len(small.data) < len(fast.data)
    assert np.array_equal(np.asarray(decode(fast)), np.asarray(decode(small)))


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """Split a PNG into (type, payload) pairs, checking each chunk's CRC on the way."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, offset = [], 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        payload = data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert crc == zlib.crc32(kind + payload), f"bad CRC in {kind!r} chunk"
        chunks.append((kind, payload))
        offset += 12 + length
    return chunks


def png_filter_types(data: bytes) -> list[int]:
    """Return the filter type byte of every row of an 8-bit L or RGB PNG."""
    chunks = png_chunks(data)
    width, height, _, colour_type = struct.unpack(">IIBB", chunks[0][1][:10])
    stride = width * (3 if colour_type == 2 else 1) + 1
    raw = zlib.decompress(b"".join(payload for kind, payload in chunks if kind == b"IDAT"))
    assert len(raw) == stride * height
    return list(raw[::stride])


def noise_over_stripes(mode: str, size: tuple[int, int]) -> Image.Image:
    """Return random pixels in the top half and rows of one colour each below."""
    width, height = size
    rng = np.random.default_rng(7)
    channels = 3 if mode == "RGB" else 1
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    stripes = (np.arange(height)[:, None] * np.array([[3, 5, 7][:channels]])) % 256
    pixels[height // 2 :] = stripes[height // 2 :, None, :]
    return Image.fromarray(pixels if mode == "RGB" else pixels[:, :, 0], mode)


@pytest.mark.parametrize(
    ("mode", "size", "block_bytes"),
    [
        ("RGB", (513, 700), None),
        ("L", (700, 513), None),
        ("RGB", (1, 1), None),
        ("L", (3, 1), None),
        ("RGB", (97, 300), 97 * 3 * 16),
        ("L", (97, 257), 97 * 16 + 1),
        ("RGB", (2000, 9), 100),
    ],
    ids=["rgb", "gray", "one-pixel", "one-row", "rgb-blocks", "gray-blocks", "rows-wider-than-block"],
)
def test_fast_png_is_lossless_and_well_formed(
    mode: str, size: tuple[int, int], block_bytes: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At level 1 gaia writes the PNG itself, block by block, and the pixels come back unchanged."""
    if block_bytes is not None:
        monkeypatch.setattr(images, "_PNG_BLOCK_BYTES", block_bytes)
    image = noise_over_stripes(mode, size)

    result = process(encode(image, "PNG"), resize_mode="no", encode_quality=1)

    chunks = png_chunks(result.data)
    kinds = [kind for kind, _ in chunks]
    assert kinds[0] == b"IHDR"
    assert kinds[-1] == b"IEND"
    assert set(kinds[1:-1]) == {b"IDAT"}
    width, height, depth, colour_type = struct.unpack(">IIBB", chunks[0][1][:10])
    assert (width, height, depth, colour_type) == (*size, 8, 2 if mode == "RGB" else 0)
    assert set(png_filter_types(result.data)) <= {1, 2}  # Sub or Up
    output = decode(result)
    assert output.mode == mode
    assert np.array_equal(np.asarray(output), np.asarray(image))


def test_fast_png_one_colour_rows_use_sub() -> None:
    """A row of one colour is all zeros after Sub but not after Up when the row above differs."""
    image = noise_over_stripes("RGB", (300, 200))

    filters = png_filter_types(process(encode(image, "PNG"), resize_mode="no").data)

    assert filters[100:] == [1] * 100


def test_fast_png_repeated_rows_use_up() -> None:
    """A row equal to the one above is all zeros after Up."""
    rng = np.random.default_rng(3)
    image = Image.fromarray(np.repeat(rng.integers(0, 256, (1, 300, 3), dtype=np.uint8), 200, axis=0))

    filters = png_filter_types(process(encode(image, "PNG"), resize_mode="no").data)

    assert filters[1:] == [2] * 199


def test_fast_png_memory_is_bounded_by_its_block() -> None:
    """Encoding a 36 MB image allocates a few blocks, not a copy of the image."""
    rows = (np.arange(3000)[:, None] * np.array([[3, 5, 7]]) % 256).astype(np.uint8)
    data = encode(Image.fromarray(np.repeat(rows[:, None, :], 4000, axis=1)), "PNG", compress_level=1)

    tracemalloc.start()
    try:
        result = process(data, resize_mode="no", encode_quality=1, max_pixels=4000 * 3000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert (result.width, result.height) == (4000, 3000)
    raw_bytes = 4000 * 3000 * 3
    assert len(result.data) < raw_bytes // 10
    assert peak < 8 * images._PNG_BLOCK_BYTES < raw_bytes


def test_fast_png_matches_pillow_pixels_after_resizing() -> None:
    """The same resized pixels come out of gaia's level-1 writer and Pillow's level-9 encoder."""
    data = encode(Image.fromarray(noisy_gray(900, 700)).convert("RGB"), "JPEG", quality=90)

    fast = process(data, encode_quality=1)
    pillow = process(data, encode_quality=9)

    assert {kind for kind, _ in png_chunks(fast.data)} == {b"IHDR", b"IDAT", b"IEND"}
    assert np.array_equal(np.asarray(decode(fast)), np.asarray(decode(pillow)))


@pytest.mark.parametrize("encode_format", ["jpeg", "webp"])
def test_lossy_quality_changes_size(encode_format: str) -> None:
    data = encode(Image.fromarray(noisy_gray(700, 700)).convert("RGB"), "PNG")

    low = process(data, encode_format=encode_format, encode_quality=10)
    high = process(data, encode_format=encode_format, encode_quality=95)

    assert low.format == encode_format
    assert (decode(low).format or "").lower() == encode_format
    assert len(low.data) < len(high.data)


def test_output_has_no_source_metadata() -> None:
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x010F] = "camera maker"
    data = encode(flat((600, 600), (1, 2, 3), "RGB"), "JPEG", icc_profile=icc, exif=exif.tobytes())

    output = decode(process(data))

    assert "icc_profile" not in output.info
    assert len(output.getexif()) == 0


def test_original_keeps_bytes() -> None:
    data = encode(flat((900, 700), (5, 6, 7), "RGB"), "JPEG")

    result = process(data, mode="original")

    assert result.data == data
    assert (result.format, result.width, result.height) == ("jpeg", 900, 700)


def test_original_reports_upright_size() -> None:
    result = process(rotated_jpeg(8), mode="original")

    assert (result.width, result.height) == (300, 400)
    assert (result.original_width, result.original_height) == (300, 400)


def test_threads_give_same_results() -> None:
    sources = [encode(Image.fromarray(noisy_gray(500 + 97 * i, 600, seed=i)), "PNG") for i in range(8)]
    serial = [process(data).data for data in sources]

    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(lambda data: process(data).data, sources))

    assert parallel == serial


# ---------------------------------------------------------------------------------------------
# Memory: each measurement runs in a fresh interpreter. Linux resets the peak resident set size
# (VmHWM) when "5" is written to /proc/self/clear_refs, so peak minus the resident size before
# the call is the call's own peak use.

MEASURE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from PIL import Image
    from gaia_builder.config import ImageOptions
    from gaia_builder.errors import ImageError
    from gaia_builder.images import process_image

    def status(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB to MiB

    data = Path(sys.argv[1]).read_bytes()
    action, options = sys.argv[2], json.loads(sys.argv[3])
    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS")
    outcome = None
    try:
        if action == "process":
            result = process_image(data, ImageOptions(**options))
            outcome = [result.width, result.height]
            Path(sys.argv[4]).write_bytes(result.data)
        else:
            Image.open(sys.argv[1]).load()
    except ImageError as err:
        outcome = err.row_error.error_class
    print(json.dumps({"outcome": outcome, "peak_mib": status("VmHWM") - before}))
    """
)


def measure(path: Path, action: str, options: dict[str, Any], output: Path | None = None) -> dict[str, Any]:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak memory is measured through Linux's /proc/self/clear_refs")
    command = [sys.executable, "-c", MEASURE, str(path), action, json.dumps(options), str(output or "")]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


def png_of_zeros(width: int, height: int) -> bytes:
    """Build a valid grayscale PNG row by row, without holding its pixels in memory."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    compressor = zlib.compressobj(1)
    row = bytes(width + 1)  # filter byte 0, then the samples
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_huge_png_rejected_before_decoding(tmp_path: Path) -> None:
    """A 20000x10000 PNG (200 Mpx) over max_pixels costs under 50 MiB: only its header is read.

    It is also over Pillow's own 179 Mpx decompression-bomb limit, so the error must come from
    gaia's max_pixels check, not from Pillow.
    """
    path = tmp_path / "huge.png"
    path.write_bytes(png_of_zeros(20_000, 10_000))

    measured = measure(path, "process", {"max_pixels": 100_000_000})

    assert measured["outcome"] == "too_many_pixels"
    assert measured["peak_mib"] < 50


def test_huge_jpeg_decoded_through_draft(tmp_path: Path) -> None:
    """An 8192x5460 JPEG shrunk to 768x512 decodes at 1/4 scale: a fraction of a full decode's memory."""
    gradient = Image.linear_gradient("L").resize((8192, 5460), Image.Resampling.BILINEAR)
    image = Image.merge("RGB", [gradient, gradient.transpose(Image.Transpose.FLIP_LEFT_RIGHT), gradient])
    path = tmp_path / "huge.jpg"
    image.save(path, "JPEG", quality=90)
    expected = np.asarray(image.resize((768, 512), Image.Resampling.BOX))
    del image, gradient
    output = tmp_path / "out.png"

    drafted = measure(path, "process", {}, output)
    full = measure(path, "decode", {})

    assert drafted["outcome"] == [768, 512]
    assert psnr(np.asarray(Image.open(output)), expected) >= 35
    assert full["peak_mib"] > 100
    assert drafted["peak_mib"] < full["peak_mib"] / 4


# ---------------------------------------------------------------------------------------------
# Real satellite images; the expected sizes are those img2dataset 1.47 produced from these files
# with the GAIA settings.

SHARED_RESULTS = {
    "389225main_sw_1965_1024.jpg": ((683, 512), "RGB"),
    "RGB.byte.tif": ((564, 512), "RGB"),
    "RGBA.byte.tif": ((564, 512), "RGB"),
    "alpha.tif": ((512, 512), "RGB"),
    "goes.tif": ((512, 512), "RGB"),
    "rgb-byte-tenth.tif": ((570, 512), "RGB"),
    "shade.tif": ((512, 512), "L"),
    "world.byte.tif": ((1229, 512), "L"),
    "world.rgb.tif": ((1024, 512), "RGB"),
}
SHARED_ERRORS = {
    "RGBA.uint16.tif": "unsupported_format",
    "float32.tif": "unsupported_format",
    "corrupt.tif": "decode_error",
}


@pytest.mark.parametrize("name", sorted(SHARED_RESULTS))
def test_shared_image_decodes(shared_images: Path, name: str) -> None:
    size, mode = SHARED_RESULTS[name]

    result = process((shared_images / name).read_bytes(), encode_quality=9)

    assert (result.width, result.height) == size
    assert decode(result).mode == mode


@pytest.mark.parametrize("name", sorted(SHARED_ERRORS))
def test_shared_image_rejected(shared_images: Path, name: str) -> None:
    data = (shared_images / name).read_bytes()

    assert row_error(data).error_class == SHARED_ERRORS[name]


def test_shared_float_tiff_kept_as_original(shared_images: Path) -> None:
    """Mode "original" stores float samples as published: only converting them is refused."""
    data = (shared_images / "float32.tif").read_bytes()

    result = process(data, mode="original")

    assert (result.format, result.width, result.height) == ("tiff", 3, 2)


@pytest.mark.parametrize("name", ["RGBA.uint16.tif", "corrupt.tif"])
def test_shared_image_rejected_as_original(shared_images: Path, name: str) -> None:
    data = (shared_images / name).read_bytes()

    assert row_error(data, mode="original").error_class == SHARED_ERRORS[name]
