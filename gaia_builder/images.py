"""Decoding, resizing and encoding of fetched images, following img2dataset 1.47.

The GAIA authors built their images with img2dataset, setting ``resize_mode="keep_ratio"``,
``image_size=512`` and PNG at zlib level 9. :func:`process_image` reproduces its output sizes
exactly and its pixels closely (see ``benchmarks/fidelity.py``), with Pillow in place of OpenCV:

- Sizes follow img2dataset 1.47 with albumentations 1.4: the shorter side (``keep_ratio``,
  ``center_crop``) or the longer side (``keep_ratio_largest``, ``border``) is scaled to
  ``image_size`` and every side becomes ``max(1, round(side * scale))``, where ``round`` is
  Python's round-half-to-even. ``center_crop`` then keeps the middle square, offset
  ``(side - image_size) // 2``. ``border`` pads to a square with white, with
  ``(image_size - side) // 2`` pixels before the image and the rest after it.
- Images with an alpha channel (RGBA, LA, P with transparency) are composited on white and become
  RGB. Grayscale stays single-channel. Other colour modes become RGB.

gaia deliberately differs from img2dataset in four ways. It applies EXIF orientation. It scales
16-bit samples to 8 bits by their range, where img2dataset kept 16-bit grayscale as is. It
rejects float samples. It decodes large JPEGs at a reduced DCT scale (see DRAFT_MARGIN).

Decoding is strict: a truncated or corrupt file raises ImageError("decode_error"). Pillow (13)
releases the GIL while it decodes, resizes and encodes, so process_image can run in a thread
pool. It shares no mutable state and changes no Pillow global.
"""

from __future__ import annotations

import codecs
import io
import logging
import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps

from .config import ENCODE_FORMATS, RESIZE_MODES, ImageOptions
from .errors import ConfigError, ImageError

logger = logging.getLogger(__name__)

__all__ = ["DRAFT_MARGIN", "ProcessedImage", "process_image"]

# The raster formats gaia decodes. Pillow can open more, but formats without a signature (TGA)
# or made of text (XBM, XPM) could misread an error page as an image.
DECODED_FORMATS = ("JPEG", "PNG", "GIF", "TIFF", "WEBP", "BMP", "JPEG2000", "AVIF")

# Lowercase names for ProcessedImage.format where Pillow's name differs. MPO is a JPEG with extra frames.
_FORMAT_NAMES = {"MPO": "jpeg"}

# A JPEG that shrinks is decoded at the smallest DCT scale (1/2, 1/4 or 1/8) that keeps at least
# DRAFT_MARGIN times the output size. benchmarks/fidelity.py compared the result with
# img2dataset's full decode on JPEGs with a shorter side of 2048 px or more. Margin 1 gave a
# median PSNR of 43.1 dB (min 38.0), and margin 2 gave 49.4 dB (min 42.7) for about the same
# CPU time. A 21600x10800 mosaic still decodes at 1/8 scale.
DRAFT_MARGIN = 2

WHITE = (255, 255, 255)

# Resize modes whose output is an image_size square: center_crop cuts it, border pads to it.
_SQUARE_MODES = ("center_crop", "border")

# Pillow filters closest to OpenCV's INTER_AREA (img2dataset's filter for shrinking), by shrink
# factor (source pixels per output pixel), as (upper limit, filter). Pillow's BOX weights whole
# pixels by whether their centre is covered, not by covered area as INTER_AREA does, so BOX
# reaches only 31 dB PSNR at a factor of 1.1 and is closest only from 5 on. PSNR against
# cv2.resize(INTER_AREA) in each filter's range (benchmarks/fidelity.py --filters, OpenCV 4.14,
# Pillow 13): BILINEAR 48-56 dB, BICUBIC 43-47 dB, HAMMING 46-51 dB, BOX 50-56 dB.
_SHRINK_FILTERS: tuple[tuple[float, Image.Resampling], ...] = (
    (1.35, Image.Resampling.BILINEAR),
    (1.6, Image.Resampling.BICUBIC),
    (5.0, Image.Resampling.HAMMING),
    (math.inf, Image.Resampling.BOX),
)
# img2dataset enlarges with OpenCV's INTER_LANCZOS4 (8x8 taps). Pillow's LANCZOS (6x6 taps) is
# the closest Pillow filter: a median PSNR of 50.5 dB (min 46.6) on the enlarged images of the
# same benchmark.
_ENLARGE_FILTER = Image.Resampling.LANCZOS

# EXIF orientations that swap width and height (transpose, 90 and 270 degree rotations).
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})

# Modes whose alpha channel is composited on white.
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})

# Exceptions that Pillow's plugins raise on malformed data, besides OSError for truncated files.
_DECODE_EXCEPTIONS: tuple[type[Exception], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    TypeError,
    KeyError,
    ZeroDivisionError,
    struct.error,
)

# Exceptions that Pillow's plugin constructors raise for data in another format, but also for a
# damaged header or a layout they cannot decode. Image.open skips to the next plugin on these too.
_NOT_THIS_FORMAT: tuple[type[Exception], ...] = (SyntaxError, IndexError, TypeError, struct.error)

# Plugins are registered once, here, so that concurrent calls only read Image.OPEN.
Image.init()


@dataclass(frozen=True)
class ProcessedImage:
    """The image to store for one row, with its size before and after processing."""

    data: bytes
    format: str  # lowercase format of data: "png", "jpeg", "webp", or the original's in mode "original"
    width: int
    height: int
    original_width: int  # of the source as published, after EXIF orientation
    original_height: int


def process_image(data: bytes, options: ImageOptions, *, source: str = "") -> ProcessedImage:
    """Decode ``data`` and return the image to store, resized and encoded as set by ``options``.

    In mode "resized", the first frame is decoded, turned upright by its EXIF orientation,
    converted to 8-bit RGB or grayscale, resized and encoded. In mode "original", ``data`` is
    returned untouched. It is still decoded (a JPEG at 1/8 scale, which still reads every byte)
    so that a truncated or corrupt file becomes a row error here, not an exception in the user's
    training loop.

    ``max_pixels`` caps the pixels decoded, which bounds memory: for a JPEG that cap applies after
    the DCT-scale reduction. It also caps the resized image (before center_crop cuts it) and the
    square that border pads it to, so that upscaling a thin sliver cannot exhaust memory.

    Raises:
        ImageError: with class not_an_image, unsupported_format, decode_error or
            too_many_pixels. The detail names ``source``, normally the image URL.
        ConfigError: an option has a value that ImageOptions does not allow.
    """
    _check_options(options)
    image = _open(data, source)
    format_name = _FORMAT_NAMES.get(image.format or "", (image.format or "").lower())

    if options.mode == "original":
        width, height = _verify(image, options, source)
        return ProcessedImage(data, format_name, width, height, width, height)

    # Checked before any pixel is decoded, from the stored size: an EXIF quarter turn swaps the
    # sides of the output but keeps its pixel count.
    _check_output_pixels(image.size, options, source)
    decoded, original_size = _decode(image, options, source)
    pixels = _to_8bit(decoded, source)
    result = _resize(pixels, original_size, options)
    return ProcessedImage(
        data=_encode(result, options),
        format=options.encode_format,
        width=result.width,
        height=result.height,
        original_width=original_size[0],
        original_height=original_size[1],
    )


def _check_options(options: ImageOptions) -> None:
    choices = {
        "mode": ("resized", "original"),
        "resize_mode": RESIZE_MODES,
        "encode_format": ENCODE_FORMATS,
    }
    for name, allowed in choices.items():
        value = getattr(options, name)
        if value not in allowed:
            raise ConfigError(f"invalid value for {name}: {value!r}; expected one of {list(allowed)}")

    low, high = (0, 9) if options.encode_format == "png" else (1, 100)
    if not low <= options.encode_quality <= high:
        raise ConfigError(
            f"invalid value for encode_quality for {options.encode_format}: {options.encode_quality}; "
            f"expected a whole number from {low} to {high}"
        )
    for name in ("image_size", "max_pixels"):
        if getattr(options, name) < 1:
            raise ConfigError(f"invalid value for {name}: {getattr(options, name)}; expected at least 1")


def _error(error_class: str, message: str, source: str) -> ImageError:
    return ImageError(error_class, f"{message} ({source})" if source else message)


# ---------------------------------------------------------------------------------------------
# Opening


def _open(data: bytes, source: str) -> ImageFile.ImageFile:
    """Identify ``data`` and open it lazily, reading only the header.

    This repeats what Image.open does for the formats in DECODED_FORMATS, minus one step:
    Image.open compares the size with the process-wide Image.MAX_IMAGE_PIXELS and raises
    DecompressionBombError above twice that (179 Mpx by default, less than one 21600x10800
    mosaic). Changing that global for one call would race with other threads, so gaia applies
    options.max_pixels instead, to the size actually decoded.
    """
    prefix = data[:16]
    rejected: list[tuple[str, Exception]] = []  # plugins that accepted the prefix, then failed
    for format_id in DECODED_FORMATS:
        if format_id not in Image.OPEN:
            continue  # this Pillow version has no such plugin (AVIF in older versions)
        factory, accept = Image.OPEN[format_id]
        accepted = accept(prefix) if accept is not None else True
        if isinstance(accepted, str) or not accepted:
            continue  # a string is the reason the plugin cannot open it, such as a missing codec
        try:
            return factory(io.BytesIO(data), "")
        except _NOT_THIS_FORMAT as not_opened:
            rejected.append((format_id, not_opened))
            continue
        except Image.DecompressionBombError as err:
            raise _pillow_limit_error(err, source) from err
        except _DECODE_EXCEPTIONS as err:
            raise _error("decode_error", f"invalid {format_id} header: {err}", source) from err

    for format_id, failure in rejected:
        if _has_signature(data, format_id):
            raise _header_error(format_id, failure, source) from failure

    error_class, description = _classify_unidentified(data)
    if error_class == "not_an_image":
        raise _error(error_class, f"the body is {description}, not an image", source)
    decoded = ", ".join(DECODED_FORMATS)
    raise _error(error_class, f"unsupported image format: {description}; gaia decodes {decoded}", source)


# Messages of Pillow 13's JPEG and TIFF plugins for files that are valid but laid out in a way
# they cannot decode (12-bit JPEG, 16-bit RGBA TIFF). Pillow raises SyntaxError for these as for
# damage, so only the message distinguishes them.
# NOTE: these are Pillow 13.0's messages; if a later Pillow words them otherwise, such files
# become decode_error.
_UNSUPPORTED_LAYOUT_MESSAGES = ("cannot handle", "unknown pixel mode", "unknown data organization")

# Sizes of the BMP info header after the 14-byte file header, BITMAPCOREHEADER to BITMAPV5HEADER.
_BMP_INFO_SIZES = frozenset({12, 40, 52, 56, 64, 108, 124})


def _has_signature(data: bytes, format_id: str) -> bool:
    """Tell whether ``data``, which the plugin of ``format_id`` accepted, has that format's full signature.

    Every plugin's accept() checks the full signature, except two that accept more. BMP's takes
    any body that starts with "BM", as plain text can. AVIF's also takes the HEIF brands mif1
    and msf1, which HEIC files carry too.
    """
    if format_id == "BMP":
        return int.from_bytes(data[14:18], "little") in _BMP_INFO_SIZES
    if format_id == "AVIF":
        return data[8:12] in (b"avif", b"avis")
    return True


def _header_error(format_id: str, err: Exception, source: str) -> ImageError:
    """Return the error for a file that carries the signature of a decoded format but fails to open."""
    if str(err).startswith(_UNSUPPORTED_LAYOUT_MESSAGES):
        return _error(
            "unsupported_format",
            f"unsupported {format_id} file: Pillow cannot decode its layout ({err})",
            source,
        )
    return _error("decode_error", f"invalid {format_id} header: {err}", source)


# Signatures of image formats that gaia does not decode, or that failed to open above, used only
# to name them in the error. Hand-written because a dozen signatures do not justify a dependency.
_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\xff\xd8\xff", "a JPEG file that Pillow cannot read"),
    (0, b"\x89PNG\r\n\x1a\n", "a PNG file that Pillow cannot read"),
    (0, b"GIF8", "a GIF file that Pillow cannot read"),
    (0, b"II*\x00", "a TIFF file that Pillow cannot read (for example 16-bit RGBA)"),
    (0, b"MM\x00*", "a TIFF file that Pillow cannot read (for example 16-bit RGBA)"),
    (0, b"II+\x00", "a BigTIFF file"),
    (0, b"MM\x00+", "a BigTIFF file"),
    (0, b"\xff\x0a", "a JPEG XL file"),
    (4, b"JXL ", "a JPEG XL file"),
    (0, b"8BPS", "a Photoshop file"),
    (0, b"\x00\x00\x01\x00", "an ICO file"),
    (0, b"BM", "a BMP file that Pillow cannot read"),
)
_HEIF_BRANDS = frozenset(
    {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"}
)


def _classify_unidentified(data: bytes) -> tuple[str, str]:
    """Return the row error class and a description of bytes that no decoder accepted."""
    if not data:
        return "not_an_image", "empty"
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        if brand in _HEIF_BRANDS:
            return "unsupported_format", f"a HEIF/HEIC image (brand {brand.decode('latin-1')!r})"
        return "unsupported_format", f"an ISO media file (brand {brand.decode('latin-1')!r})"
    for offset, signature, description in _SIGNATURES:
        if data[offset : offset + len(signature)] == signature:
            return "unsupported_format", description

    text = _as_text(data[:2048])
    if text is None:
        return "unsupported_format", f"an unknown binary format (first bytes {data[:8].hex()})"
    lowered = text.lower()
    if "<svg" in lowered:
        return "unsupported_format", "an SVG image (vector graphics are not rasterised)"
    if data.startswith(b"%PDF"):
        return "not_an_image", "a PDF document"
    if "<html" in lowered or "<!doctype html" in lowered:
        return "not_an_image", "an HTML page"
    return "not_an_image", f"text starting with {text[:40]!r}"


def _as_text(prefix: bytes) -> str | None:
    """Decode ``prefix`` as UTF-8 text, or return None if it has binary content."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    try:
        text = decoder.decode(prefix, final=False)  # the prefix may end inside a character
    except UnicodeDecodeError:
        return None
    if any(ord(char) < 32 and char not in "\t\n\r\f" for char in text):
        return None
    return text


# ---------------------------------------------------------------------------------------------
# Decoding


def _verify(image: ImageFile.ImageFile, options: ImageOptions, source: str) -> tuple[int, int]:
    """Decode ``image`` as cheaply as possible and return its size after EXIF orientation."""
    stored_size = image.size
    if image.format in ("JPEG", "MPO"):
        image.draft(None, (1, 1))  # the smallest DCT scale still decodes every entropy-coded byte
    _check_pixels(image, options, source)
    _load(image, source)
    return _oriented(stored_size, _orientation(image))


def _decode(
    image: ImageFile.ImageFile, options: ImageOptions, source: str
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode the first frame, upright, and return it with the original size after orientation."""
    stored_size = image.size
    if image.format in ("JPEG", "MPO"):
        # JPEG keeps EXIF in its header, so reading the orientation here decodes no pixel.
        _draft(image, _orientation(image), options)
    _check_pixels(image, options, source)
    _load(image, source)

    # Read after the load: a PNG may keep its eXIf chunk after the pixels.
    orientation = _orientation(image)
    if orientation != 1:
        ImageOps.exif_transpose(image, in_place=True)
    return image, _oriented(stored_size, orientation)


def _draft(image: ImageFile.ImageFile, orientation: int, options: ImageOptions) -> None:
    """Ask the JPEG decoder for a reduced DCT scale when the output is much smaller."""
    target, shrinking = _resize_target(*_oriented(image.size, orientation), options)
    if target is None or not shrinking:
        return

    # The target is upright; the stored pixels may be rotated by a quarter turn.
    width, height = _oriented(target, orientation)
    full_size = image.size
    image.draft(None, (width * DRAFT_MARGIN, height * DRAFT_MARGIN))
    if image.size != full_size:
        logger.debug("decoding a %dx%d JPEG at %dx%d", *full_size, *image.size)


def _check_pixels(image: Image.Image, options: ImageOptions, source: str) -> None:
    pixels = image.width * image.height
    if pixels > options.max_pixels:
        message = (
            f"{image.width}x{image.height} = {pixels:,} pixels to decode exceeds max_pixels "
            f"{options.max_pixels:,}; raise max_pixels to accept images this large"
        )
        raise _error("too_many_pixels", message, source)


def _check_output_pixels(size: tuple[int, int], options: ImageOptions, source: str) -> None:
    target, _ = _resize_target(*size, options)
    if target is not None:
        _check_resized_pixels(size, target, options, source)

    # The stored image must open with Image.open, which datasets' Image feature calls, and which
    # raises DecompressionBombError above twice Image.MAX_IMAGE_PIXELS (179 Mpx by default). An
    # extreme aspect ratio scaled to 512 px on its shorter side can go past that.
    limit = Image.MAX_IMAGE_PIXELS
    width, height = _stored_size(size, target, options)
    if limit is None or width * height <= 2 * limit:
        return
    if target is None:
        fixes = ["a resize_mode that shrinks it, such as keep_ratio"]
    else:
        fixes = ["resize_mode center_crop or border, which bound the output to a square"]
    if size[0] * size[1] <= 2 * limit:
        fixes.append("the original config, which stores the source as published")
    message = (
        f"the stored image would be {width}x{height} = {width * height:,} pixels, more than the "
        f"{2 * limit:,} that Pillow opens (twice PIL.Image.MAX_IMAGE_PIXELS), so it could not be "
        f"decoded when read; use {', or '.join(fixes)}"
    )
    raise _error("too_many_pixels", message, source)


def _stored_size(
    size: tuple[int, int], target: tuple[int, int] | None, options: ImageOptions
) -> tuple[int, int]:
    if target is None:
        return size
    if options.resize_mode in _SQUARE_MODES:
        return options.image_size, options.image_size
    return target


def _check_resized_pixels(
    size: tuple[int, int], target: tuple[int, int], options: ImageOptions, source: str
) -> None:
    # center_crop cuts the resized image down to the square, and border pads it up to the square.
    resized = target[0] * target[1]
    square = options.image_size**2 if options.resize_mode in _SQUARE_MODES else 0
    if max(resized, square) <= options.max_pixels:
        return

    if square > resized:
        result = f"a {options.image_size}x{options.image_size} square of {square:,} pixels after padding"
    else:
        result = f"{target[0]}x{target[1]} = {resized:,} pixels"
        if options.resize_mode == "center_crop":
            result += " before the centre crop"
    message = (
        f"resizing {size[0]}x{size[1]} with resize_mode={options.resize_mode} and "
        f"image_size={options.image_size} gives {result}, more than max_pixels {options.max_pixels:,}; "
        "raise max_pixels to accept it"
    )
    raise _error("too_many_pixels", message, source)


def _load(image: ImageFile.ImageFile, source: str) -> None:
    """Decode the pixels of the current frame, raising decode_error on any damage.

    Strict only while ImageFile.LOAD_TRUNCATED_IMAGES is False, its default. gaia never sets it,
    but another library in the same process could.
    """
    try:
        image.load()
    except Image.DecompressionBombError as err:
        raise _pillow_limit_error(err, source) from err
    except _DECODE_EXCEPTIONS as err:
        raise _error("decode_error", f"{image.format} image is truncated or corrupt: {err}", source) from err


def _pillow_limit_error(err: Image.DecompressionBombError, source: str) -> ImageError:
    # Pillow's GIF, TIFF and MPO plugins check Image.MAX_IMAGE_PIXELS themselves, for frames
    # larger than the declared size and while loading.
    message = f"{err} Pillow's process-wide limit Image.MAX_IMAGE_PIXELS is lower than max_pixels; raise it"
    return _error("too_many_pixels", message, source)


def _orientation(image: Image.Image) -> int:
    """Return the EXIF orientation (1-8), or 1 when it is missing, invalid or unreadable."""
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except _DECODE_EXCEPTIONS as err:
        logger.debug("ignoring unreadable EXIF data: %s", err)
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _oriented(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    width, height = size
    return (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)


# ---------------------------------------------------------------------------------------------
# Pixel formats


def _to_8bit(image: Image.Image, source: str) -> Image.Image:
    """Convert ``image`` to mode L or RGB, compositing any alpha channel on white."""
    mode = image.mode
    if mode in ("L", "RGB"):
        return image
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        return _composite_on_white(image.convert("RGBA"))
    if mode == "1":
        return image.convert("L")
    if mode in ("P", "CMYK", "YCbCr", "RGBX"):
        # CMYK uses Pillow's formula without colour management, as OpenCV did for img2dataset.
        return image.convert("RGB")
    if mode == "I" or mode.startswith("I;16"):
        return _scale_integer_samples(image)
    if mode == "F":
        # Rejected rather than stretched, because float samples are physical values (reflectance,
        # temperature) with no standard mapping to display levels. img2dataset's output for them
        # was near-black.
        message = (
            "32-bit floating-point samples (Pillow mode F) have no standard mapping to 8-bit pixels; "
            "use the 'original' config to keep the file as published"
        )
        raise _error("unsupported_format", message, source)
    raise _error("unsupported_format", f"pixel mode {mode} cannot be converted to RGB or grayscale", source)


def _composite_on_white(image: Image.Image) -> Image.Image:
    # paste() with a mask gives round(c * a / 255 + 255 - a), img2dataset's alpha matting, for
    # all 65,536 (colour, alpha) pairs, as tests/test_images.py checks.
    background = Image.new("RGB", image.size, WHITE)
    background.paste(image.convert("RGB"), mask=image.getchannel("A"))
    return background


def _scale_integer_samples(image: Image.Image) -> Image.Image:
    """Map 16- and 32-bit integer samples linearly from their type's range to 0-255.

    Pillow's own conversion to L clips at 255 instead, which turns most 16-bit images white.
    """
    low, high = _sample_range(image)
    scale = 255 / (high - low)
    offset = 0.5 - low * scale  # +0.5 rounds, because Pillow truncates the result to an integer
    if image.mode != "I;16":
        image = image.convert("I")  # Pillow's point() takes I;16 and I but not I;16B
    scaled = image.point(lambda value: value * scale + offset)
    return scaled.convert("L")


def _sample_range(image: Image.Image) -> tuple[int, int]:
    """Return the lowest and highest value that the source's integer sample type can hold."""
    if image.mode.startswith("I;16"):
        return (-(2**15), 2**15 - 1) if image.mode.endswith("S") else (0, 2**16 - 1)

    # Mode I stores 32 bits, but the file may hold fewer (a 16-bit signed TIFF opens as I).
    bits, signed = 32, True
    if image.format == "PNG":
        bits, signed = 16, False
    elif image.format == "TIFF":
        tags = getattr(image, "tag_v2", {})
        bits = _first(tags.get(258), default=32)  # BitsPerSample
        signed = _first(tags.get(339), default=1) == 2  # SampleFormat: 1 unsigned, 2 signed
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _first(value: object, *, default: int) -> int:
    if isinstance(value, tuple) and value:
        value = value[0]
    return value if isinstance(value, int) else default


# ---------------------------------------------------------------------------------------------
# Geometry


def _resize_target(width: int, height: int, options: ImageOptions) -> tuple[tuple[int, int] | None, bool]:
    """Return img2dataset's resize size for a ``width`` x ``height`` image and whether it shrinks.

    The size is None where img2dataset leaves the image alone: resize_mode "no", or
    resize_only_if_bigger with an image that is not bigger. Crop and padding are skipped then.
    """
    if options.resize_mode == "no":
        return None, False

    by_shorter_side = options.resize_mode in ("keep_ratio", "center_crop")
    side = min(width, height) if by_shorter_side else max(width, height)
    shrinking = side > options.image_size
    if options.resize_only_if_bigger and not shrinking:
        return None, False

    # Float arithmetic and round-half-to-even, as albumentations' SmallestMaxSize/LongestMaxSize.
    scale = options.image_size / side
    return (max(1, round(width * scale)), max(1, round(height * scale))), shrinking


def _resize(image: Image.Image, original_size: tuple[int, int], options: ImageOptions) -> Image.Image:
    """Resize, then crop or pad, as img2dataset does for options.resize_mode.

    The size comes from the original dimensions, so a JPEG decoded at reduced scale ends at
    the same size as a full decode.
    """
    target, shrinking = _resize_target(*original_size, options)
    if target is None:
        return image

    if image.size != target:
        image = image.resize(target, _choose_filter(image.size, target, shrinking))
    if options.resize_mode == "center_crop":
        image = _center_crop(image, options.image_size)
    elif options.resize_mode == "border":
        image = _pad_to_square(image, options.image_size)
    return image


def _choose_filter(
    source_size: tuple[int, int], target: tuple[int, int], shrinking: bool
) -> Image.Resampling:
    if not shrinking:
        return _ENLARGE_FILTER
    if source_size[0] % target[0] == 0 and source_size[1] % target[1] == 0:
        # Whole factors (a 1024x1024 tile to 512x512): BOX and INTER_AREA both average k x k blocks.
        return Image.Resampling.BOX
    factor = max(source_size[0] / target[0], source_size[1] / target[1])
    return next(resample for limit, resample in _SHRINK_FILTERS if factor < limit)


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    left = (image.width - size) // 2
    top = (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def _pad_to_square(image: Image.Image, size: int) -> Image.Image:
    if image.size == (size, size):
        return image
    fill: int | tuple[int, int, int] = 255 if image.mode == "L" else WHITE
    square = Image.new(image.mode, (size, size), fill)
    square.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return square


# ---------------------------------------------------------------------------------------------
# Encoding


# At zlib level 1, gaia's default, the PNG is written here rather than by Pillow. Pillow's
# encoder scores four of the five PNG row filters on every row (all five with optimize=True)
# to keep the best, one row at a time, and has no option to narrow the choice. gaia scores only
# Sub and Up, with the same minimum-sum rule, on whole blocks of rows in numpy, and compresses
# with the zlib module's run-length strategy. Measured on the 128 outputs of the corpus of
# benchmarks/compare_img2dataset.py, one thread, zlib 1.2.13 for gaia and Pillow 13 with zlib-ng:
# - gaia: 12.4 ms and 676 KiB per image;
# - Pillow at level 1: 35.8 ms and 734 KiB; at level 9: 174 ms and 669 KiB.
# Up alone was 1.5 ms faster, but a vertical colour gradient then took 288 KiB instead of 3 KiB.
# Run-length matching misses patterns a few pixels long: a one-pixel checkerboard took 217 KiB
# against Pillow's 6 KiB. zlib stores a block as is when compressing would enlarge it, so the
# worst case stays within a fraction of a percent of the raw pixel size.
# Other levels keep Pillow's encoder, whose search costs little next to slower compression.
_FAST_PNG_LEVEL = 1
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOUR_TYPES = {"L": 0, "RGB": 2}  # 8 bits per sample
_PNG_FILTER_SUB = 1
_PNG_FILTER_UP = 2
# Pixel bytes filtered at a time. The writer's own memory is a few times this, whatever the size.
_PNG_BLOCK_BYTES = 2 * 1024 * 1024


def _save_png(image: Image.Image, buffer: io.BytesIO, level: int) -> None:
    if level == _FAST_PNG_LEVEL and image.mode in _PNG_COLOUR_TYPES:
        _write_png_fast(image, buffer, level)
    else:
        image.save(buffer, "PNG", compress_level=level)


def _write_png_fast(image: Image.Image, buffer: io.BytesIO, level: int) -> None:
    """Write ``image`` (mode L or RGB) as a PNG whose rows each use the Sub or the Up filter."""
    channels = len(image.getbands())
    row_bytes = image.width * channels
    header = struct.pack(">IIBBBBB", image.width, image.height, 8, _PNG_COLOUR_TYPES[image.mode], 0, 0, 0)
    buffer.write(_PNG_SIGNATURE)
    _write_png_chunk(buffer, b"IHDR", header)

    compressor = zlib.compressobj(level, zlib.DEFLATED, zlib.MAX_WBITS, 8, zlib.Z_RLE)
    previous = np.zeros(row_bytes, dtype=np.uint8)  # the Up filter treats the row above row 0 as zeros
    rows_per_block = max(1, _PNG_BLOCK_BYTES // row_bytes)
    for top in range(0, image.height, rows_per_block):
        bottom = min(top + rows_per_block, image.height)
        # crop copies only this block, so the whole image is never copied at once.
        block = np.asarray(image.crop((0, top, image.width, bottom))).reshape(bottom - top, row_bytes)
        compressed = compressor.compress(_filter_rows(block, previous, channels).data)
        if compressed:
            _write_png_chunk(buffer, b"IDAT", compressed)
        previous = block[-1]
    _write_png_chunk(buffer, b"IDAT", compressor.flush())
    _write_png_chunk(buffer, b"IEND", b"")


def _filter_rows(block: np.ndarray, previous: np.ndarray, channels: int) -> np.ndarray:
    """Return ``block`` filtered for PNG: each row prefixed by its filter type, Sub or Up.

    ``previous`` is the row above the block. Each row takes the filter with the smaller sum of
    its bytes read as signed values, libpng's minimum-sum rule. uint8 subtraction wraps modulo
    256, which is what the filters specify.
    """
    up = np.empty_like(block)
    np.subtract(block[0], previous, out=up[0])
    np.subtract(block[1:], block[:-1], out=up[1:])
    sub = np.empty_like(block)
    sub[:, :channels] = block[:, :channels]  # the first pixel has no left neighbour
    np.subtract(block[:, channels:], block[:, :-channels], out=sub[:, channels:])

    use_sub = _signed_sums(sub) < _signed_sums(up)
    filtered = np.empty((block.shape[0], block.shape[1] + 1), dtype=np.uint8)
    filtered[:, 0] = np.where(use_sub, _PNG_FILTER_SUB, _PNG_FILTER_UP)
    filtered[:, 1:] = np.where(use_sub[:, None], sub, up)
    return filtered


def _signed_sums(rows: np.ndarray) -> np.ndarray:
    # min(v, 256 - v) is |v| for the byte v read as a signed value. Negation wraps in uint8.
    return np.minimum(rows, np.negative(rows)).sum(axis=1, dtype=np.uint64)


def _write_png_chunk(buffer: io.BytesIO, kind: bytes, payload: bytes) -> None:
    buffer.write(struct.pack(">I", len(payload)))
    buffer.write(kind)
    buffer.write(payload)
    buffer.write(struct.pack(">I", zlib.crc32(payload, zlib.crc32(kind))))


_ENCODERS: dict[str, Callable[[Image.Image, io.BytesIO, int], None]] = {
    "png": _save_png,
    "jpeg": lambda image, buffer, quality: image.save(buffer, "JPEG", quality=quality),
    "webp": lambda image, buffer, quality: image.save(buffer, "WEBP", quality=quality),
}


def _encode(image: Image.Image, options: ImageOptions) -> bytes:
    """Encode ``image`` without the source's metadata.

    EXIF would re-rotate the upright pixels in viewers, and an ICC profile or tRNS colour key
    would describe the source, not the converted pixels. img2dataset wrote none of them either.
    """
    image.info = {}
    buffer = io.BytesIO()
    _ENCODERS[options.encode_format](image, buffer, options.encode_quality)
    return buffer.getvalue()
