"""Tests of the Parquet and WebDataset exports, read back with datasets, pyarrow and webdataset."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml
from PIL import Image

from gaia_builder.errors import ExportError
from gaia_builder.export import (
    RECORD_NAME,
    _key_digits,
    _sample_key,
    export_parquet,
    export_webdataset,
)
from gaia_builder.features import METADATA_FIELDS, gaia_features

PYTHON = sys.executable
BUILD_OPTIONS = {"image_size": 512, "resize_mode": "keep_ratio", "encode_format": "png"}

# The img2dataset 1.47 order of <key>.json after the metadata fields.
IMG2DATASET_KEYS = (
    "caption",
    "url",
    "key",
    "status",
    "error_message",
    "width",
    "height",
    "original_width",
    "original_height",
    "exif",
    "sha256",
)


def noise_png(seed: int, side: int = 24) -> bytes:
    """Return a PNG of random pixels, which does not compress, so its size is predictable."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), (seed % 256, 20, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


def failed(index: int) -> bool:
    """Every fifth row, from row 3 on, lost its image."""
    return index % 5 == 3


def error_of(index: int) -> str:
    return "http_404: Not Found" if index % 2 else "decode_error: truncated PNG"


def gaia_rows(
    count: int,
    *,
    ids: list[str] | None = None,
    image: Callable[[int], bytes] = noise_png,
) -> dict[str, list[Any]]:
    """Return the columns of ``count`` GAIA rows; rows where failed() is true have no image."""
    columns: dict[str, list[Any]] = {name: [] for name in gaia_features(True)}
    for index in range(count):
        has_image = not failed(index)
        data = image(index) if has_image else None
        columns["id"].append(ids[index] if ids else f"storm-{index}-over-europe")
        columns["image_src"].append(f"https://images.example/{index}.jpg?itok=ab{index}")
        columns["image_alt"].append(f"Storm {index} seen from orbit" if index % 7 else "")
        columns["captions"].append([f"Caption {k} of image {index}, with clouds é." for k in range(5)])
        columns["credits"].append("ESA" if index % 2 else "")
        columns["location"].append("Lisbon, Portugal")
        columns["lat"].append(177.0 if index == 1 else 38.7 + index / 100)
        columns["lon"].append(-9.1)
        columns["tag"].append(["storm", "clouds", "europe"])
        columns["resolution"].append(None if index % 3 == 0 else "High")
        columns["satellite"].append(["Sentinel-3"])
        columns["sensor"].append(["OLCI", "SLSTR"])
        columns["modalities"].append(["Optical"])
        columns["image"].append({"bytes": data, "path": None} if data is not None else None)
        columns["error"].append(None if has_image else error_of(index))
        for name in ("width", "height", "original_width", "original_height"):
            columns[name].append(24 if has_image else None)
        columns["sha256"].append(hashlib.sha256(data).hexdigest() if data is not None else None)
        columns["final_url"].append(f"https://cdn.example/{index}.jpg" if has_image else None)
    return columns


def gaia_split(count: int, **kwargs: Any) -> datasets.Dataset:
    return datasets.Dataset.from_dict(gaia_rows(count, **kwargs), features=gaia_features(True))


def metadata_split(count: int) -> datasets.Dataset:
    columns = gaia_rows(count)
    features = gaia_features(False)
    return datasets.Dataset.from_dict({name: columns[name] for name in features}, features=features)


def comparable(row: dict[str, Any]) -> dict[str, Any]:
    """Return a row with its image replaced by the SHA-256 of the image bytes."""
    image = row.get("image")
    result = dict(row)
    if "image" in row:
        result["image"] = hashlib.sha256(image["bytes"]).hexdigest() if image else None
    return result


def source_rows(dataset: datasets.Dataset) -> list[dict[str, Any]]:
    if "image" in dataset.features:
        dataset = dataset.cast_column("image", datasets.Image(decode=False))
    return [comparable(row) for row in dataset.to_list()]


def files_under(root: Path) -> set[str]:
    return {path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file()}


def read_card(folder: Path) -> tuple[dict[str, Any], str]:
    text = (folder / "README.md").read_text(encoding="utf-8")
    _, front_matter, body = text.split("---\n", 2)
    return yaml.safe_load(front_matter), body


def row_groups(folder: Path) -> list[tuple[str, int, int]]:
    """Return (file, rows, total_byte_size) for every row group under folder/data."""
    groups = []
    for path in sorted((folder / "data").glob("*.parquet")):
        metadata = pq.ParquetFile(path).metadata
        for index in range(metadata.num_row_groups):
            group = metadata.row_group(index)
            groups.append((path.name, group.num_rows, group.total_byte_size))
    return groups


def run_python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter, offline; the loopback guard comes with PYTHONPATH."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [PYTHON, "-c", textwrap.dedent(code), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def read_webdataset(folder: Path) -> list[tuple[Image.Image, str, dict[str, Any]]]:
    """Read shards the way GAIA notebooks read img2dataset output."""
    urls = [str(path) for path in sorted(folder.glob("*.tar"))]
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("png", "txt", "json")
    return list(dataset)


# --------------------------------------------------------------------------------------------
# Parquet
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_parquet_loads_in_fresh_process(tmp_path: Path) -> None:
    """load_dataset on the exported folder returns the input rows, with an Image feature."""
    validation = gaia_split(23)
    export_parquet(
        {"train": gaia_split(9), "validation": validation},
        tmp_path / "hub",
        config_name="default",
        build_options=BUILD_OPTIONS,
        max_row_group_bytes=8_000,
        max_file_bytes=60_000,
    )
    output = tmp_path / "loaded.json"

    result = run_python(
        """
        import hashlib, json, sys
        import datasets

        folder, output = sys.argv[1:]
        dataset = datasets.load_dataset(folder, split="validation")
        feature_types = {name: type(feature).__name__ for name, feature in dataset.features.items()}
        dataset = dataset.cast_column("image", datasets.Image(decode=False))
        rows = []
        for row in dataset:
            image = row["image"]
            row["image"] = hashlib.sha256(image["bytes"]).hexdigest() if image else None
            rows.append(row)
        with open(output, "w") as file:
            json.dump({"features": feature_types, "rows": rows}, file)
        """,
        str(tmp_path / "hub"),
        str(output),
    )

    assert result.returncode == 0, result.stderr
    loaded = json.loads(output.read_text())
    assert loaded["features"]["image"] == "Image"
    assert loaded["rows"] == source_rows(validation)


def test_parquet_row_groups_within_limit(tmp_path: Path) -> None:
    limit = 6_000
    export_parquet(
        {"validation": gaia_split(40)},
        tmp_path,
        config_name="default",
        build_options=BUILD_OPTIONS,
        max_row_group_bytes=limit,
        max_file_bytes=40_000,
    )

    groups = row_groups(tmp_path)
    assert max(size for _, _, size in groups) <= limit
    assert sum(rows for _, rows, _ in groups) == 40
    assert len(groups) > 4


def test_parquet_files_within_limit(tmp_path: Path) -> None:
    limit = 40_000
    export_parquet(
        {"validation": gaia_split(40)},
        tmp_path,
        config_name="default",
        build_options=BUILD_OPTIONS,
        max_row_group_bytes=6_000,
        max_file_bytes=limit,
    )

    paths = sorted((tmp_path / "data").glob("validation-*.parquet"))
    assert len(paths) > 1
    assert max(path.stat().st_size for path in paths) <= limit
    assert [path.name for path in paths][-1] == f"validation-{len(paths) - 1:05d}-of-{len(paths):05d}.parquet"


def test_parquet_oversized_row_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A row larger than the row-group limit gets a row group of its own and a warning."""
    export_parquet(
        {"validation": gaia_split(6, image=lambda seed: noise_png(seed, side=64))},
        tmp_path,
        config_name="default",
        build_options=BUILD_OPTIONS,
        max_row_group_bytes=1_000,
    )

    assert [rows for _, rows, _ in row_groups(tmp_path)] == [1, 1, 1, 1, 1, 1]
    assert "more than max_row_group_bytes=1000" in caplog.text


def test_parquet_schema_carries_features(tmp_path: Path) -> None:
    export_parquet({"validation": gaia_split(5)}, tmp_path, config_name="default", build_options={})

    schema = pq.read_schema(next((tmp_path / "data").glob("*.parquet")))
    stored = json.loads(schema.metadata[b"huggingface"])
    assert datasets.Features.from_dict(stored["info"]["features"]) == gaia_features(True)


def test_parquet_card_front_matter(tmp_path: Path) -> None:
    export_parquet(
        {"train": gaia_split(12), "validation": gaia_split(8)},
        tmp_path,
        config_name="default",
        build_options=BUILD_OPTIONS,
    )

    front_matter, _ = read_card(tmp_path)
    assert front_matter["configs"] == [
        {
            "config_name": "default",
            "data_files": [
                {"split": "train", "path": "data/train-*"},
                {"split": "validation", "path": "data/validation-*"},
            ],
        }
    ]
    assert {split["name"]: split["num_examples"] for split in front_matter["dataset_info"]["splits"]} == {
        "train": 12,
        "validation": 8,
    }
    assert {"name": "image", "dtype": "image"} in front_matter["dataset_info"]["features"]
    assert front_matter["license"] == "mit"
    assert "remote-sensing" in front_matter["tags"]
    assert "image-to-text" in front_matter["task_categories"]


def test_parquet_card_body(tmp_path: Path) -> None:
    """The card body states the counts per split and error class, the options and the citation."""
    export_parquet(
        {"validation": gaia_split(20)}, tmp_path, config_name="default", build_options=BUILD_OPTIONS
    )

    _, body = read_card(tmp_path)
    assert "| validation | 20 | 16 | 4 |" in body
    assert "| validation | `http_404` | 2 |" in body
    assert "| validation | `decode_error` | 2 |" in body
    assert '"resize_mode": "keep_ratio"' in body
    assert "arXiv:2502.09598" in body
    assert "`credits`" in body


def test_parquet_metadata_config(tmp_path: Path) -> None:
    """A metadata-only build exports without image columns and loads back unchanged."""
    split = metadata_split(7)
    summary = export_parquet({"test": split}, tmp_path, config_name="metadata", build_options={})

    loaded = datasets.load_dataset(str(tmp_path), split="test")
    front_matter, _ = read_card(tmp_path)
    assert loaded.to_list() == split.to_list()
    assert front_matter["configs"][0]["config_name"] == "metadata"
    assert summary.rows_with_image == {"test": 0}


@pytest.mark.parametrize("export", ["parquet", "webdataset"])
def test_empty_split_rejected(tmp_path: Path, export: str) -> None:
    with pytest.raises(ExportError, match="split 'test' has no rows"):
        run_export(export, tmp_path, gaia_split(0), splits=("test",))


def test_parquet_summary(tmp_path: Path) -> None:
    summary = export_parquet(
        {"validation": gaia_split(10)}, tmp_path, config_name="default", build_options={}
    )

    assert summary.rows == {"validation": 10}
    assert summary.rows_with_image == {"validation": 8}
    assert {path.relative_to(tmp_path).as_posix() for path in summary.files} == files_under(tmp_path) - {
        RECORD_NAME
    }
    assert summary.num_bytes == sum(path.stat().st_size for path in summary.files)


def path_only_split(tmp_path: Path, count: int) -> datasets.Dataset:
    """Return a split whose images are stored as paths to local PNG files, without bytes."""
    columns = gaia_rows(count)
    for index, image in enumerate(columns["image"]):
        if image is not None:
            path = tmp_path / f"image-{index}.png"
            path.write_bytes(image["bytes"])
            columns["image"][index] = {"bytes": None, "path": str(path)}
    return datasets.Dataset.from_dict(columns, features=gaia_features(True))


def test_parquet_embeds_path_images(tmp_path: Path) -> None:
    """Images stored as local paths are embedded as bytes, as push_to_hub embeds them."""
    (tmp_path / "images").mkdir()
    split = path_only_split(tmp_path / "images", 6)

    export_parquet({"validation": split}, tmp_path / "hub", config_name="default", build_options={})

    table = pq.read_table(next((tmp_path / "hub" / "data").glob("*.parquet")))
    stored = [image["bytes"] if image else None for image in table.column("image").to_pylist()]
    expected = [Path(image["path"]).read_bytes() if image else None for image in gaia_images(split)]
    assert stored == expected


def test_parquet_rejects_missing_image_file(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    split = path_only_split(tmp_path / "images", 3)
    (tmp_path / "images" / "image-1.png").unlink()

    with pytest.raises(ExportError, match=r"row 1 of split 'validation'.*is not a local file"):
        export_parquet({"validation": split}, tmp_path / "hub", config_name="default", build_options={})


def test_webdataset_reads_path_images(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    split = path_only_split(tmp_path / "images", 6)

    export_webdataset({"validation": split}, tmp_path / "shards")

    assert len(read_webdataset(tmp_path / "shards" / "validation")) == 5


def gaia_images(split: datasets.Dataset) -> list[dict[str, Any] | None]:
    return split.cast_column("image", datasets.Image(decode=False))["image"]


@pytest.mark.parametrize("name", ["../x", "a.b", "train-extra", ""])
def test_parquet_rejects_split_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(ExportError, match="invalid split name"):
        export_parquet({name: gaia_split(2)}, tmp_path / "out", config_name="default", build_options={})


def test_parquet_rejects_mixed_features(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="other features"):
        export_parquet(
            {"train": gaia_split(2), "test": metadata_split(2)},
            tmp_path,
            config_name="default",
            build_options={},
        )


@pytest.mark.slow
def test_parquet_killed_no_partial_file(tmp_path: Path) -> None:
    """An export killed in the middle of a Parquet file leaves no file under a final name."""
    folder = tmp_path / "hub"
    signal_file = tmp_path / "first-row-group-written"
    process = subprocess.Popen(
        [
            PYTHON,
            "-c",
            textwrap.dedent(
                """
                import sys, threading
                import pyarrow.parquet as pq
                sys.path.insert(0, sys.argv[3])
                from test_export import gaia_split
                from gaia_builder.export import export_parquet

                original = pq.ParquetWriter.write_table

                def write_then_stall(self, *args, **kwargs):
                    original(self, *args, **kwargs)
                    open(sys.argv[2], "w").close()
                    threading.Event().wait(60)  # the test kills the process here

                pq.ParquetWriter.write_table = write_then_stall
                export_parquet({"validation": gaia_split(30)}, sys.argv[1],
                               config_name="default", build_options={}, max_row_group_bytes=4_000)
                """
            ),
            str(folder),
            str(signal_file),
            str(Path(__file__).parent),
        ],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not signal_file.exists():
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, "the export never wrote its first row group"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        if process.stderr:
            process.stderr.close()

    left = files_under(folder)
    assert not [name for name in left if name.endswith(".parquet")]
    assert "README.md" not in left
    assert [name for name in left if name.endswith(".gaia-tmp")]

    summary = export_parquet(
        {"validation": gaia_split(4)}, folder, config_name="default", build_options={}, overwrite=True
    )
    assert files_under(folder) == {path.relative_to(folder).as_posix() for path in summary.files} | {
        RECORD_NAME
    }


# --------------------------------------------------------------------------------------------
# WebDataset
# --------------------------------------------------------------------------------------------


def test_webdataset_reads_as_notebooks_do(tmp_path: Path) -> None:
    """Every row with an image is read back once, with its image, caption and captions."""
    split = gaia_split(37)
    export_webdataset({"validation": split}, tmp_path, samples_per_shard=16)

    samples = read_webdataset(tmp_path / "validation")
    by_id = {meta["id"]: (image, text, meta) for image, text, meta in samples}
    expected = [row for row in split.to_list() if row["image"] is not None]
    assert len(samples) == len(expected)
    assert set(by_id) == {row["id"] for row in expected}
    for row in expected:
        image, text, meta = by_id[row["id"]]
        assert meta["captions"] == row["captions"]
        assert text == row["image_alt"]
        assert image.size == (24, 24)


def test_webdataset_json_like_img2dataset(tmp_path: Path) -> None:
    """<key>.json contains the metadata fields, then img2dataset's keys in its order."""
    split = gaia_split(5)
    export_webdataset({"validation": split}, tmp_path, samples_per_shard=512)

    with tarfile.open(tmp_path / "validation" / "00000.tar") as tar:
        meta = json.loads(tar.extractfile("00000002.json").read())  # type: ignore[union-attr]
    source = split[2]
    assert tuple(meta) == (*METADATA_FIELDS, *IMG2DATASET_KEYS)
    assert meta["caption"] == source["image_alt"]
    assert meta["url"] == source["image_src"]
    assert meta["key"] == "00000002"
    assert meta["status"] == "success"
    assert meta["error_message"] is None
    assert meta["sha256"] == source["sha256"]
    assert meta["exif"] is None
    assert (meta["width"], meta["original_height"]) == (24, 24)


@pytest.mark.parametrize(
    ("samples_per_shard", "digits"),
    [(1, 0), (2, 1), (10, 1), (11, 2), (512, 3), (1000, 3), (1001, 4), (10_000, 4)],
)
def test_key_digits(samples_per_shard: int, digits: int) -> None:
    """The digits equal img2dataset's ceil(log10(number_sample_per_shard))."""
    assert _key_digits(samples_per_shard) == digits


def test_sample_key_img2dataset_example() -> None:
    assert _sample_key(1, 5, _key_digits(512)) == "00001005"


def test_webdataset_keys_across_shards(tmp_path: Path) -> None:
    """Failed rows consume a key; shard 1's sixth row is 00001005, as img2dataset names it."""
    split = gaia_split(520, image=lambda seed: noise_png(seed, side=2))
    export_webdataset({"train": split}, tmp_path, samples_per_shard=512)

    with tarfile.open(tmp_path / "train" / "00001.tar") as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("00001005.json").read())  # type: ignore[union-attr]
    assert names[:3] == ["00001000.json", "00001000.png", "00001000.txt"]
    assert "00001001.png" not in names  # row 513 failed
    assert meta["id"] == split[517]["id"]


def test_webdataset_shard_parquet(tmp_path: Path) -> None:
    """NNNNN.parquet contains every row of the shard, failed ones with status and error."""
    split = gaia_split(20)
    export_webdataset({"validation": split}, tmp_path, samples_per_shard=16)

    records = pq.read_table(tmp_path / "validation" / "00000.parquet").to_pylist()
    assert [record["id"] for record in records] == split["id"][:16]
    assert records[3]["status"] == "failed_to_download"
    assert records[3]["error_message"] == "http_404: Not Found"
    assert records[8]["status"] == "failed_to_resize"
    assert records[8]["error_message"] == "decode_error: truncated PNG"
    assert records[0]["status"] == "success"
    assert tuple(records[0]) == (*METADATA_FIELDS, *IMG2DATASET_KEYS)


def test_webdataset_stats(tmp_path: Path) -> None:
    export_webdataset({"validation": gaia_split(20)}, tmp_path, samples_per_shard=16)

    stats = json.loads((tmp_path / "validation" / "00000_stats.json").read_text())
    assert stats["count"] == 16
    assert stats["successes"] == 13
    assert stats["failed_to_download"] == 2
    assert stats["failed_to_resize"] == 1
    assert stats["status_dict"] == {"success": 13, "http_404: Not Found": 2, "decode_error: truncated PNG": 1}
    assert stats["duration"] >= 0


def test_webdataset_layout(tmp_path: Path) -> None:
    summary = export_webdataset(
        {"train": gaia_split(20), "test": gaia_split(3)}, tmp_path, samples_per_shard=16
    )

    assert files_under(tmp_path) == {
        RECORD_NAME,
        *(f"train/0000{shard}{suffix}" for shard in (0, 1) for suffix in (".tar", ".parquet", "_stats.json")),
        *(f"test/00000{suffix}" for suffix in (".tar", ".parquet", "_stats.json")),
    }
    assert summary.rows == {"train": 20, "test": 3}
    assert summary.rows_with_image == {"train": 16, "test": 3}


def test_webdataset_tar_reproducible(tmp_path: Path) -> None:
    """The same rows give byte-identical tars: members carry a fixed mtime, owner and mode."""
    split = gaia_split(6)
    export_webdataset({"test": split}, tmp_path / "first")
    export_webdataset({"test": split}, tmp_path / "second")

    first = (tmp_path / "first" / "test" / "00000.tar").read_bytes()
    second = (tmp_path / "second" / "test" / "00000.tar").read_bytes()
    with tarfile.open(tmp_path / "first" / "test" / "00000.tar") as tar:
        member = tar.getmembers()[0]
    assert first == second
    assert (member.mtime, member.uid, member.gid, member.mode) == (0, 0, 0, 0o444)


def test_webdataset_jpeg_extension(tmp_path: Path) -> None:
    """With image_extension=None, JPEG images become <key>.jpg members."""
    export_webdataset({"test": gaia_split(3, image=jpeg)}, tmp_path)

    with tarfile.open(tmp_path / "test" / "00000.tar") as tar:
        names = tar.getnames()
    assert "00000000.jpg" in names


def test_webdataset_rejects_other_format(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="the image is JPEG, not png"):
        export_webdataset({"test": gaia_split(3, image=jpeg)}, tmp_path, image_extension="png")


def test_webdataset_rejects_metadata_config(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no image column"):
        export_webdataset({"test": metadata_split(3)}, tmp_path)


@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_webdataset_rejects_samples_per_shard(tmp_path: Path, value: Any) -> None:
    with pytest.raises(ExportError, match="samples_per_shard"):
        export_webdataset({"test": gaia_split(1)}, tmp_path, samples_per_shard=value)


def test_webdataset_corrupt_image_no_partial_file(tmp_path: Path) -> None:
    """A corrupt image in shard 1 stops the export; shard 0 stays whole, shard 1 leaves nothing."""
    columns = gaia_rows(20)
    columns["image"][18] = {"bytes": b"<html>moved</html>", "path": None}
    split = datasets.Dataset.from_dict(columns, features=gaia_features(True))

    with pytest.raises(ExportError, match=r"row 18 \(id 'storm-18-over-europe'\)"):
        export_webdataset({"validation": split}, tmp_path, samples_per_shard=16)

    assert files_under(tmp_path / "validation") == {"00000.tar", "00000.parquet", "00000_stats.json"}
    assert len(read_webdataset(tmp_path / "validation")) == 13


# --------------------------------------------------------------------------------------------
# Hostile ids, non-empty folders and overwrite
# --------------------------------------------------------------------------------------------

HOSTILE_IDS = ["../../x", "a.b.c", "x/y", "/etc/passwd", "..", "k.png", "with space"]


def test_hostile_ids_webdataset(tmp_path: Path) -> None:
    """Ids never become file names: every sample groups correctly and nothing leaves the folder."""
    folder = tmp_path / "nested" / "out"
    columns = gaia_rows(len(HOSTILE_IDS), ids=HOSTILE_IDS)
    columns["image"] = [{"bytes": noise_png(seed), "path": None} for seed in range(len(HOSTILE_IDS))]
    columns["error"] = [None] * len(HOSTILE_IDS)
    split = datasets.Dataset.from_dict(columns, features=gaia_features(True))

    export_webdataset({"validation": split}, folder)

    samples = read_webdataset(folder / "validation")
    assert sorted(meta["id"] for _, _, meta in samples) == sorted(HOSTILE_IDS)
    assert files_under(tmp_path) == {f"nested/out/{name}" for name in files_under(folder)}


def test_hostile_ids_parquet(tmp_path: Path) -> None:
    folder = tmp_path / "nested" / "out"
    split = gaia_split(len(HOSTILE_IDS), ids=HOSTILE_IDS)

    export_parquet({"validation": split}, folder, config_name="default", build_options={})

    loaded = datasets.load_dataset(str(folder), split="validation")
    assert loaded["id"] == HOSTILE_IDS
    assert files_under(tmp_path) == {f"nested/out/{name}" for name in files_under(folder)}


@pytest.mark.parametrize("export", ["parquet", "webdataset"])
def test_nonempty_folder_rejected(tmp_path: Path, export: str) -> None:
    (tmp_path / "notes.txt").write_text("mine")

    with pytest.raises(ExportError, match="is not empty"):
        run_export(export, tmp_path, gaia_split(3))

    assert files_under(tmp_path) == {"notes.txt"}


@pytest.mark.parametrize("export", ["parquet", "webdataset"])
def test_overwrite_keeps_foreign_files(tmp_path: Path, export: str) -> None:
    """overwrite=True deletes nothing when the folder contains a file no export wrote."""
    run_export(export, tmp_path, gaia_split(3))
    (tmp_path / "notes.txt").write_text("mine")
    before = files_under(tmp_path)

    with pytest.raises(ExportError, match=r"no gaia export wrote \(notes.txt\)"):
        run_export(export, tmp_path, gaia_split(3), overwrite=True)

    assert files_under(tmp_path) == before


def test_overwrite_without_record_rejected(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train-00000-of-00001.parquet").write_bytes(b"not ours")

    with pytest.raises(ExportError, match="contains no record of a previous gaia export"):
        run_export("parquet", tmp_path, gaia_split(3), overwrite=True)


def test_overwrite_record_escape_rejected(tmp_path: Path) -> None:
    """A record naming a path outside the folder deletes nothing."""
    folder = tmp_path / "out"
    run_export("webdataset", folder, gaia_split(3))
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    record = json.loads((folder / RECORD_NAME).read_text())
    record["files"].append("../victim.txt")
    (folder / RECORD_NAME).write_text(json.dumps(record))

    with pytest.raises(ExportError, match="outside the folder"):
        run_export("webdataset", folder, gaia_split(3), overwrite=True)

    assert victim.read_text() == "keep"


@pytest.mark.parametrize("export", ["parquet", "webdataset"])
def test_overwrite_replaces_previous_export(tmp_path: Path, export: str) -> None:
    run_export(export, tmp_path, gaia_split(40), splits=("train", "test"))

    summary = run_export(export, tmp_path, gaia_split(5), overwrite=True)

    assert files_under(tmp_path) == {path.relative_to(tmp_path).as_posix() for path in summary.files} | {
        RECORD_NAME
    }
    assert summary.rows == {"validation": 5}


def test_rejects_file_as_folder(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")

    with pytest.raises(ExportError, match="is a file, not a folder"):
        run_export("webdataset", target, gaia_split(1))


def run_export(
    export: str,
    folder: Path,
    split: datasets.Dataset,
    *,
    overwrite: bool = False,
    splits: tuple[str, ...] = ("validation",),
) -> Any:
    """Run one of the two exports on ``split`` under each name in ``splits``."""
    named = dict.fromkeys(splits, split)
    if export == "parquet":
        return export_parquet(
            named,
            folder,
            config_name="default",
            build_options={},
            overwrite=overwrite,
            max_row_group_bytes=4_000,
        )
    return export_webdataset(named, folder, samples_per_shard=16, overwrite=overwrite)
