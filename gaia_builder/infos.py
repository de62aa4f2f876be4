"""Generate ``dataset_infos.json``: features, description, citation and split sizes per config.

Split sizes go in only when counted from real metadata files (``gaia infos --data-dir``), because
datasets compares them with what a build produced and fails on a mismatch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .builder import Gaia
from .config import CONFIG_IMAGE_MODES
from .metadata import read_records


def _legacy_sequences(node: Any) -> Any:
    # datasets 4.0 writes lists as {"_type": "List"}, which datasets 3.6 cannot read; both read
    # the older {"_type": "Sequence"} form, so the file is written in that form.
    if isinstance(node, dict):
        converted = {key: _legacy_sequences(value) for key, value in node.items()}
        if converted.get("_type") == "List":
            converted["_type"] = "Sequence"
        return converted
    if isinstance(node, list):
        return [_legacy_sequences(item) for item in node]
    return node


def count_rows(metadata_files: Mapping[str, str | os.PathLike[str]]) -> dict[str, int]:
    """Count the rows of each split's metadata file."""
    return {split: len(read_records(path)) for split, path in metadata_files.items()}


def dataset_infos(split_sizes: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Return the content of dataset_infos.json for every config."""
    infos: dict[str, Any] = {}
    for config_name in CONFIG_IMAGE_MODES:
        builder = Gaia(config_name=config_name)
        record = _info_dict(builder.info, config_name)
        if split_sizes:
            record["splits"] = {
                split: {"name": split, "num_examples": count, "dataset_name": "gaia"}
                for split, count in split_sizes.items()
            }
        infos[config_name] = _legacy_sequences(record)
    return infos


def _info_dict(info: Any, config_name: str) -> dict[str, Any]:
    return {
        "description": info.description,
        "citation": info.citation,
        "homepage": info.homepage,
        "license": info.license,
        "features": info.features.to_dict(),
        "builder_name": "gaia",
        "dataset_name": "gaia",
        "config_name": config_name,
        "version": {
            "version_str": str(Gaia.VERSION),
            "major": Gaia.VERSION.major,
            "minor": Gaia.VERSION.minor,
            "patch": Gaia.VERSION.patch,
        },
    }


def write_dataset_infos(path: str | os.PathLike[str], split_sizes: Mapping[str, int] | None = None) -> Path:
    """Write dataset_infos.json atomically and return its path."""
    target = Path(path)
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_text(json.dumps(dataset_infos(split_sizes), indent=2, ensure_ascii=False) + "\n")
    os.replace(temporary, target)
    return target
