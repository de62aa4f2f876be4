"""Builders of test inputs: GAIA metadata records, metadata files in each layout, image bytes."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from gaia_builder.features import METADATA_FIELDS

LAYOUTS = ("records", "columns", "index", "jsonl")


def record(number: int, image_src: str | None, **overrides: Any) -> dict[str, Any]:
    """Return one GAIA metadata record with plausible values; keys in the file's own order."""
    values: dict[str, Any] = {
        "id": f"storm-{number:03d}-reaches-western-europe",
        "location": f"Landmark {number}, City, Country",
        "lat": 40.5 + number / 7,
        "lon": -3.25 - number / 11,
        "captions": [f"Caption {index} of image {number}." for index in range(5)],
        "image_src": image_src,
        "image_alt": f"Alt text {number}" if number % 3 else "",
        "credits": "ESA/Copernicus Sentinel-2" if number % 2 else "",
        "tag": ["storm", "clouds", f"tag{number}"],
        "resolution": ("Low", "Moderate", "High", "Very High", None)[number % 5],
        "satellite": ["Sentinel-2", "NASA Terra"][: 1 + number % 2],
        "sensor": ["MSI"],
        "modalities": ["Optical"] if number % 4 else ["Optical", "Thermal"],
    }
    values.update(overrides)
    return values


def write_metadata(path: Path, records: Sequence[dict[str, Any]], layout: str) -> Path:
    """Write ``records`` to ``path`` in one of the four layouts GAIA's files may have."""
    if layout == "records":
        text = json.dumps(list(records))
    elif layout == "columns":
        text = json.dumps({name: [row.get(name) for row in records] for name in METADATA_FIELDS})
    elif layout == "index":
        text = json.dumps(
            {
                name: {str(index): row.get(name) for index, row in enumerate(records)}
                for name in METADATA_FIELDS
            }
        )
    elif layout == "jsonl":
        text = "\n".join(json.dumps(row) for row in records) + "\n"
    else:
        raise ValueError(f"unknown layout {layout!r}")
    path.write_text(text, encoding="utf-8")
    return path


def image_bytes(size: tuple[int, int], image_format: str = "PNG", seed: int = 0) -> bytes:
    """Return an RGB image of two crossed gradients and a flat channel, encoded in ``image_format``."""
    red = Image.linear_gradient("L").resize(size)
    green = Image.linear_gradient("L").rotate(90).resize(size)
    blue = Image.new("L", size, (seed * 37) % 256)
    buffer = io.BytesIO()
    Image.merge("RGB", (red, green, blue)).save(buffer, format=image_format)
    return buffer.getvalue()
