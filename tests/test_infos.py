"""dataset_infos.json stays equal to what the builder declares."""

from __future__ import annotations

import json
from pathlib import Path

import datasets

from gaia_builder.builder import Gaia
from gaia_builder.infos import dataset_infos

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_dataset_infos_file_is_current() -> None:
    """The committed file equals a fresh generation; run `gaia infos` to refresh it."""
    committed = json.loads((REPO_ROOT / "dataset_infos.json").read_text())

    assert committed == dataset_infos()


def test_dataset_infos_features_match_builder(tmp_path: Path) -> None:
    committed = json.loads((REPO_ROOT / "dataset_infos.json").read_text())

    for config_name, record in committed.items():
        info = datasets.DatasetInfo.from_dict(record)
        builder = Gaia(config_name=config_name, cache_dir=str(tmp_path))
        assert info.features == builder.info.features, config_name
        assert info.citation == builder.info.citation
        assert info.license == builder.info.license
        assert info.homepage == builder.info.homepage
