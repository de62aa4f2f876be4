"""load_dataset("gaia") as users type it: the Hub default path, any working directory, datasets 3.6."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import pytest
from factories import image_bytes, record, write_metadata
from hub_stub import HubStub
from pytest_httpserver import HTTPServer

import gaia_builder
from gaia_builder import registry

REPO_ROOT = Path(__file__).resolve().parent.parent

LOAD_VALIDATION = textwrap.dedent(
    """
    import json, sys
    import datasets
    import gaia

    dataset = datasets.load_dataset("gaia", split="validation")
    print(json.dumps({
        "cache_files": [entry["filename"] for entry in dataset.cache_files],
        "ids": list(dataset["id"]),
        "errors": list(dataset["error"]),
    }))
    """
)


def run_python(code: str, cwd: Path, env: dict[str, str], python: str = sys.executable) -> dict:
    completed = subprocess.run(
        [python, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def serve_hub_files(httpserver: HTTPServer) -> dict[str, bytes]:
    """Return the three metadata files, whose image URLs point at ``httpserver``."""
    httpserver.expect_request("/ok.png").respond_with_data(image_bytes((700, 500)), content_type="image/png")
    httpserver.expect_request("/gone.png").respond_with_data("gone", status=404)
    files = {}
    for number, name in enumerate(("train_data.json", "val_data.json", "test_data.json")):
        records = [
            record(10 * number, httpserver.url_for("/ok.png")),
            record(10 * number + 1, httpserver.url_for("/gone.png")),
        ]
        files[name] = json.dumps(records).encode()
    return files


def test_hub_default_path_any_cwd(httpserver: HTTPServer, tmp_path: Path) -> None:
    """The default load works from an empty and from a cluttered cwd, with one cache and no refetch."""
    files = serve_hub_files(httpserver)
    empty = tmp_path / "empty"
    cluttered = tmp_path / "cluttered"
    empty.mkdir()
    cluttered.mkdir()
    (cluttered / "notes.csv").write_text("a,b\n1,2\n")
    (cluttered / "train.json").write_text('[{"x": 1}]')
    (cluttered / "gaia").mkdir()
    (cluttered / "gaia" / "data.txt").write_text("unrelated")

    with HubStub("azavras/GAIA", files) as hub:
        env = {**os.environ, **hub.environ()}
        first = run_python(LOAD_VALIDATION, empty, env)
        hub_requests = len(hub.requests)
        image_requests = len(httpserver.log)
        second = run_python(LOAD_VALIDATION, cluttered, env)

        assert len(hub.requests) == hub_requests
    assert len(httpserver.log) == image_requests
    assert first["cache_files"] == second["cache_files"]
    expected = json.loads(files["val_data.json"])
    assert first["ids"] == [source["id"] for source in expected]
    assert first["errors"][0] is None
    assert first["errors"][1].startswith("http_404: ")


def test_hub_unreachable_names_host(tmp_path: Path) -> None:
    from hub_stub import closed_port_endpoint

    endpoint = closed_port_endpoint()
    code = textwrap.dedent(
        """
        import datasets, gaia
        from gaia_builder.errors import MetadataSourceError
        try:
            datasets.load_dataset("gaia", split="validation")
        except MetadataSourceError as error:
            print(str(error))
        """
    )
    env = {**os.environ, "HF_ENDPOINT": endpoint}
    completed = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert completed.returncode == 0, completed.stderr[-3000:]
    assert endpoint.split("//")[1] in completed.stdout
    assert "data_files" in completed.stdout or "data_dir" in completed.stdout


def test_register_twice_wraps_once() -> None:
    first = datasets.load.dataset_module_factory
    gaia_builder.register()

    assert datasets.load.dataset_module_factory is first


def test_other_names_reach_datasets(tmp_path: Path) -> None:
    data = tmp_path / "rows.json"
    data.write_text('[{"x": 1}, {"x": 2}]')

    dataset = datasets.load_dataset(
        "json", data_files=str(data), split="train", cache_dir=str(tmp_path / "c")
    )

    assert dataset["x"] == [1, 2]


def test_revision_reaches_config(tmp_path: Path) -> None:
    builder = datasets.load_dataset_builder("gaia", revision="abc123", cache_dir=str(tmp_path))

    assert builder.config.revision == "abc123"


def test_unregister_restores_factory() -> None:
    wrapped = datasets.load.dataset_module_factory
    registry.unregister()
    try:
        assert datasets.load.dataset_module_factory is not wrapped
        assert not hasattr(datasets.load.dataset_module_factory, "_gaia_original")
    finally:
        registry.register()


SCRIPT_LOAD = textwrap.dedent(
    """
    import json, sys
    import datasets
    dataset = datasets.load_dataset(
        sys.argv[1], split="validation", data_files={"validation": sys.argv[2]}, trust_remote_code=True,
        max_requests_per_second_per_host=1000.0, rate_burst=100, max_retries=0,
    )
    print(json.dumps({
        "version": datasets.__version__,
        "ids": list(dataset["id"]),
        "errors": list(dataset["error"]),
        "sizes": [[row["width"], row["height"]] for row in dataset],
    }))
    """
)


def test_script_loads_on_datasets36(httpserver: HTTPServer, tmp_path: Path) -> None:
    """gaia.py loads as a dataset script with datasets 3.6 in its own environment."""
    python = os.environ.get("GAIA_DATASETS36_PYTHON")
    if not python:
        pytest.skip(
            "GAIA_DATASETS36_PYTHON is not set: it names a Python with datasets 3.6 and gaia installed"
        )
    httpserver.expect_request("/ok.png").respond_with_data(image_bytes((800, 400)), content_type="image/png")
    httpserver.expect_request("/gone.png").respond_with_data("gone", status=404)
    records = [record(0, httpserver.url_for("/ok.png")), record(1, httpserver.url_for("/gone.png"))]
    metadata = write_metadata(tmp_path / "val.json", records, "records")
    env = {**os.environ}

    completed = subprocess.run(
        [python, "-c", SCRIPT_LOAD, str(REPO_ROOT / "gaia.py"), str(metadata)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["version"].startswith("3.6")
    assert result["ids"] == [source["id"] for source in records]
    assert result["errors"][0] is None
    assert result["errors"][1].startswith("http_404: ")
    assert result["sizes"][0] == [1024, 512]
