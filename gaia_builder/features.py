"""The columns of a GAIA dataset and their ``datasets`` types."""

from __future__ import annotations

import datasets

# The 13 metadata fields of GAIA's JSON files, in the order of the dataset's README.
METADATA_FIELDS = (
    "id",
    "image_src",
    "image_alt",
    "captions",
    "credits",
    "location",
    "lat",
    "lon",
    "tag",
    "resolution",
    "satellite",
    "sensor",
    "modalities",
)
STRING_FIELDS = ("id", "image_src", "image_alt", "credits", "location", "resolution")
FLOAT_FIELDS = ("lat", "lon")
LIST_FIELDS = ("captions", "tag", "satellite", "sensor", "modalities")

# Provenance of the stored image; None where the row has no image.
PROVENANCE_FIELDS = ("width", "height", "original_width", "original_height", "sha256", "final_url")


def _string_list() -> datasets.features.FeatureType:
    # datasets 3.6 has no datasets.List; on 4.x and 5.x Sequence(Value) returns a List.
    return datasets.Sequence(datasets.Value("string"))


def metadata_features() -> dict[str, datasets.features.FeatureType]:
    """Return the types of the 13 metadata fields; every one of them may be null."""
    types: dict[str, datasets.features.FeatureType] = {}
    for name in METADATA_FIELDS:
        if name in FLOAT_FIELDS:
            types[name] = datasets.Value("float64")
        elif name in LIST_FIELDS:
            types[name] = _string_list()
        else:
            types[name] = datasets.Value("string")
    return types


def gaia_features(with_images: bool) -> datasets.Features:
    """Return the features of a config: metadata, then image, error and provenance columns."""
    columns = metadata_features()
    if with_images:
        columns["image"] = datasets.Image()
    columns["error"] = datasets.Value("string")
    if with_images:
        for name in ("width", "height", "original_width", "original_height"):
            columns[name] = datasets.Value("int32")
        columns["sha256"] = datasets.Value("string")
        columns["final_url"] = datasets.Value("string")
    return datasets.Features(columns)
