"""Compare gaia's images with img2dataset's on a generated corpus: sizes, PSNR and PNG cost.

img2dataset is run through its own resizer with the GAIA paper's settings (image_size 512,
resize_mode keep_ratio, PNG at encode_quality 9), and gaia's process_image with the same
settings, on the same bytes. The script prints:

- the share of images whose output width and height are identical, and whose mode is;
- the PSNR of gaia's pixels against img2dataset's: median, 5th percentile and minimum, overall
  and per source format;
- CPU milliseconds and output bytes per image for gaia at PNG levels 1, 3, 6 and 9;
- with --filters, the PSNR of each Pillow filter against OpenCV's INTER_AREA by shrink factor,
  which is how gaia's filter table was chosen.

It exits with status 1 when a target is missed: 100 % identical sizes, median PSNR >= 45 dB and
5th percentile >= 35 dB.

Needs img2dataset 1.47.0, which brings OpenCV and albumentations: ``pip install -e ".[bench]"``.
Run: ``python benchmarks/fidelity.py [--images 80] [--seed 0] [--draft-margin 2] [--filters]``.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

# albumentations, imported by img2dataset, sends a request to PyPI for its latest version at
# import unless this variable is set.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import cv2
import numpy as np
from img2dataset.resizer import Resizer
from PIL import Image

from gaia_builder import images
from gaia_builder.config import ImageOptions

IMAGE_SIZE = 512
PAPER_PNG_LEVEL = 9
PNG_LEVELS = (1, 3, 6, 9)
TARGET_MEDIAN_DB = 45.0
TARGET_P5_DB = 35.0

# Source kinds, cycled through in this order. Most GAIA images are JPEG photographs.
KINDS = ("jpeg", "png", "jpeg", "tiff", "jpeg", "gif", "jpeg", "png-rgba", "jpeg-gray", "png-gray")


@dataclass(frozen=True)
class Sample:
    kind: str
    width: int
    height: int
    data: bytes


@dataclass(frozen=True)
class Comparison:
    kind: str
    same_size: bool
    same_mode: bool
    psnr: float
    short_side: int

    @property
    def shrinking(self) -> bool:
        return self.short_side > IMAGE_SIZE


# ---------------------------------------------------------------------------------------------
# Corpus


def photo(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Return an RGB array that looks like a photograph: smooth gradients, edges and noise."""
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    pixels = np.empty((height, width, 3), np.float32)
    for channel in range(3):
        fx, fy, phase = rng.uniform(0.5, 4), rng.uniform(0.5, 4), rng.uniform(0, 6.3)
        pixels[..., channel] = 128 + 90 * np.sin(2 * np.pi * fx * x + phase) * np.cos(2 * np.pi * fy * y)

    for _ in range(12):  # sharp-edged blocks, as fields, roads and coastlines give
        top, left = int(rng.integers(0, height)), int(rng.integers(0, width))
        bottom, right = (
            top + int(rng.integers(2, height // 4 + 3)),
            left + int(rng.integers(2, width // 4 + 3)),
        )
        pixels[top:bottom, left:right] = rng.uniform(0, 255, 3)

    pixels += rng.normal(0, rng.uniform(2, 20), pixels.shape).astype(np.float32)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def random_size(index: int, rng: np.random.Generator) -> tuple[int, int]:
    """Return a random size with sides of at most 5400 px.

    The shorter side is usually 300 to 3600 px. For every eighth image it is 60 to 500 px, which
    keep_ratio enlarges.
    """
    if index % 8 == 3:
        short = int(rng.integers(60, 500))
    else:
        short = int(math.exp(rng.uniform(math.log(300), math.log(3600))))
    long = min(5400, int(short * rng.uniform(1.0, 2.0)))
    return (long, short) if rng.random() < 0.7 else (short, long)


def encode_sample(kind: str, pixels: np.ndarray, rng: np.random.Generator) -> bytes:
    image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    if kind == "jpeg":
        image.save(buffer, "JPEG", quality=int(rng.integers(80, 96)))
    elif kind == "jpeg-gray":
        image.convert("L").save(buffer, "JPEG", quality=90)
    elif kind == "png":
        image.save(buffer, "PNG", compress_level=1)
    elif kind == "png-gray":
        image.convert("L").save(buffer, "PNG", compress_level=1)
    elif kind == "png-rgba":
        rgba = image.copy()
        rgba.putalpha(Image.linear_gradient("L").resize(image.size))
        rgba.save(buffer, "PNG", compress_level=1)
    elif kind == "gif":
        image.quantize(256).save(buffer, "GIF")
    elif kind == "tiff":
        image.save(buffer, "TIFF", compression="tiff_lzw")
    return buffer.getvalue()


def build_corpus(count: int, seed: int) -> list[Sample]:
    rng = np.random.default_rng(seed)
    corpus = []
    for index in range(count):
        kind = KINDS[index % len(KINDS)]
        width, height = random_size(index, rng)
        if kind == "gif":  # GIF sources are small animations and maps, and quantising is slow
            width, height = min(width, 1600), min(height, 1600)
        data = encode_sample(kind, photo(width, height, rng), rng)
        corpus.append(Sample(kind, width, height, data))
    return corpus


# ---------------------------------------------------------------------------------------------
# Comparison


def psnr(actual: np.ndarray, expected: np.ndarray) -> float:
    error = np.mean((actual.astype(np.float64) - expected.astype(np.float64)) ** 2)
    return math.inf if error == 0 else 10 * math.log10(255**2 / error)


def paper_options(level: int = PAPER_PNG_LEVEL) -> ImageOptions:
    return ImageOptions(
        image_size=IMAGE_SIZE, resize_mode="keep_ratio", encode_format="png", encode_quality=level
    )


def compare(sample: Sample, resizer: Resizer) -> Comparison:
    reference_bytes, width, height, _, _, error = resizer(io.BytesIO(sample.data))
    if error is not None:
        raise RuntimeError(f"img2dataset failed on a {sample.kind} sample: {error}")
    ours = images.process_image(sample.data, paper_options())

    reference = Image.open(io.BytesIO(reference_bytes))
    produced = Image.open(io.BytesIO(ours.data))
    same_size = (ours.width, ours.height) == (width, height)
    same_mode = reference.mode == produced.mode
    value = math.nan
    if same_size:
        value = psnr(np.asarray(produced.convert("RGB")), np.asarray(reference.convert("RGB")))
    return Comparison(sample.kind, same_size, same_mode, value, min(sample.width, sample.height))


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def summarize(label: str, results: list[Comparison]) -> tuple[float, float]:
    values = [r.psnr for r in results if r.same_size]
    capped = [min(v, 99.0) for v in values]  # identical images count as 99 dB
    if not capped:
        print(f"  {label:<12} n={len(results):3d}  no image of identical size")
        return math.nan, math.nan
    median, p5 = statistics.median(capped), percentile(capped, 0.05)
    lowest = min(capped)
    print(
        f"  {label:<12} n={len(results):3d}  median {median:5.1f} dB  p5 {p5:5.1f} dB  min {lowest:5.1f} dB"
    )
    return median, p5


def report_fidelity(results: list[Comparison]) -> bool:
    same_size = sum(r.same_size for r in results) / len(results)
    same_mode = sum(r.same_mode for r in results) / len(results)
    print(f"identical width and height: {same_size:.1%} of {len(results)} images")
    print(f"identical mode (L, RGB):    {same_mode:.1%}")
    print("PSNR of gaia against img2dataset:")
    median, p5 = summarize("all", results)

    by_kind: dict[str, list[Comparison]] = defaultdict(list)
    for result in results:
        by_kind[result.kind].append(result)
    for kind in sorted(by_kind):
        summarize(kind, by_kind[kind])
    summarize("shrunk", [r for r in results if r.shrinking])
    large_jpegs = [r for r in results if r.kind.startswith("jpeg") and r.short_side >= 4 * IMAGE_SIZE]
    summarize("jpeg >=2048", large_jpegs)  # decoded at reduced DCT scale with a draft margin of 2
    summarize("enlarged", [r for r in results if not r.shrinking])

    return same_size == 1.0 and median >= TARGET_MEDIAN_DB and p5 >= TARGET_P5_DB


# ---------------------------------------------------------------------------------------------
# Cost


def report_cost(corpus: list[Sample], resizer: Resizer) -> None:
    print("CPU time and output size per image (one thread):")
    for level in PNG_LEVELS:
        options = paper_options(level)
        started = time.process_time()
        sizes = [len(images.process_image(sample.data, options).data) for sample in corpus]
        elapsed = time.process_time() - started
        print(
            f"  gaia png level {level}:       {1000 * elapsed / len(corpus):6.1f} ms  "
            f"{statistics.mean(sizes) / 1024:7.1f} KiB"
        )

    started = time.process_time()
    sizes = [len(resizer(io.BytesIO(sample.data))[0]) for sample in corpus]
    elapsed = time.process_time() - started
    milliseconds = 1000 * elapsed / len(corpus)
    print(f"  img2dataset png level 9: {milliseconds:6.1f} ms  {statistics.mean(sizes) / 1024:7.1f} KiB")


# ---------------------------------------------------------------------------------------------
# Filter table


FILTER_FACTORS = (1.02, 1.1, 1.2, 1.35, 1.5, 1.7, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0)
FILTER_SAMPLES = 3
PILLOW_FILTERS = ("BOX", "BILINEAR", "HAMMING", "BICUBIC", "LANCZOS")


def report_filters(seed: int) -> None:
    """Print the PSNR of each Pillow filter against OpenCV's INTER_AREA, by shrink factor.

    Sources are one pixel taller than a whole factor, as real sizes are. Each cell is the mean
    over FILTER_SAMPLES generated photographs.
    """
    rng = np.random.default_rng(seed)
    print(f"PSNR of Pillow filters against cv2.resize INTER_AREA, mean of {FILTER_SAMPLES} images:")
    print("  factor " + "".join(f"{name:>10}" for name in PILLOW_FILTERS))
    for factor in FILTER_FACTORS:
        totals = dict.fromkeys(PILLOW_FILTERS, 0.0)
        for _ in range(FILTER_SAMPLES):
            height = int(IMAGE_SIZE * factor) + 1
            pixels = photo(int(height * 1.37), height, rng)
            target = (round(pixels.shape[1] * IMAGE_SIZE / height), IMAGE_SIZE)
            reference = cv2.resize(pixels, target, interpolation=cv2.INTER_AREA)
            source = Image.fromarray(pixels)
            for name in PILLOW_FILTERS:
                resized = np.asarray(source.resize(target, Image.Resampling[name]))
                totals[name] += psnr(resized, reference) / FILTER_SAMPLES
        print(f"  {factor:6.2f} " + "".join(f"{totals[name]:10.1f}" for name in PILLOW_FILTERS))


# ---------------------------------------------------------------------------------------------


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=80, help="number of generated images (default 80)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated corpus (default 0)")
    parser.add_argument(
        "--draft-margin",
        type=int,
        default=images.DRAFT_MARGIN,
        help=f"JPEG draft margin to measure, a multiple of the output size (default {images.DRAFT_MARGIN})",
    )
    parser.add_argument("--filters", action="store_true", help="also print the Pillow filter table")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    images.DRAFT_MARGIN = arguments.draft_margin  # process_image reads it at each call
    cv2.setNumThreads(1)  # as img2dataset does, so the CPU times compare

    corpus = build_corpus(arguments.images, arguments.seed)
    resizer = Resizer(
        image_size=IMAGE_SIZE,
        resize_mode="keep_ratio",
        resize_only_if_bigger=False,
        encode_format="png",
        encode_quality=PAPER_PNG_LEVEL,
    )
    print(
        f"{len(corpus)} generated images, seed {arguments.seed}, JPEG draft margin {arguments.draft_margin}"
    )

    met = report_fidelity([compare(sample, resizer) for sample in corpus])
    report_cost(corpus, resizer)
    if arguments.filters:
        report_filters(arguments.seed)

    print("targets met" if met else "TARGETS MISSED: 100 % identical sizes, median >= 45 dB, p5 >= 35 dB")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
