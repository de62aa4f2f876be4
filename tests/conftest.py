"""Shared fixtures: the loopback guard, isolated caches and the real test images."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from loopback_guard import install

install()

TESTS_DIR = Path(__file__).parent
GUARD_DIR = TESTS_DIR / "guard"
REPO_ROOT = TESTS_DIR.parent
SHARED_IMAGES = TESTS_DIR.parent.parent / "shared" / "data" / "images"


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point every Hugging Face cache at a fresh folder for each test."""
    root = tmp_path_factory.mktemp("hf-home")
    monkeypatch.setenv("HF_HOME", str(root))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(root / "datasets"))
    monkeypatch.setenv("HF_HUB_CACHE", str(root / "hub"))
    monkeypatch.setenv("HF_UPDATE_DOWNLOAD_COUNTS", "0")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    # Subprocesses started by a test inherit the guard through sitecustomize, and import gaia
    # from this checkout: an editable install's import hook comes after a folder named "gaia"
    # in the working directory, which a test creates on purpose.
    pythonpath = os.environ.get("PYTHONPATH", "")
    entries = (str(GUARD_DIR), str(REPO_ROOT), pythonpath)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(entry for entry in entries if entry))

    # Both libraries read these variables once, at import.
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", root / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root / "hub"))
    return root


@pytest.fixture
def shared_images() -> Path:
    """The folder of real satellite images; skip the test where it is absent."""
    if not SHARED_IMAGES.is_dir():
        pytest.skip(f"real test images not found at {SHARED_IMAGES}")
    return SHARED_IMAGES
