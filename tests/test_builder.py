"""End-to-end tests of the builder through datasets.load_dataset against a loopback image server."""

from __future__ import annotations

import hashlib
import io
import math
import re
import threading
from pathlib import Path
from typing import Any

import datasets
import pytest
from factories import LAYOUTS, image_bytes, record, write_metadata
from PIL import Image
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

import gaia  # noqa: F401  (registers "gaia" with datasets)
from gaia_builder.errors import ConfigError, RowError
from gaia_builder.features import FLOAT_FIELDS, METADATA_FIELDS

# Fast, still polite settings for a loopback server: no real waiting between retries.
FAST = {
    "max_requests_per_second_per_host": 1000.0,
    "rate_burst": 100,
    "max_retries": 1,
    "backoff_initial": 0.0,
    "backoff_max": 0.01,
    "connect_timeout": 2.0,
    "read_timeout": 2.0,
    "attempt_timeout": 5.0,
}


def fast_options(tmp_path: Path) -> dict[str, Any]:
    return {**FAST, "fetch_cache_dir": str(tmp_path / "fetch-cache"), "cache_dir": str(tmp_path / "datasets")}


def assert_values_equal(row: dict[str, Any], source: dict[str, Any]) -> None:
    for name in METADATA_FIELDS:
        expected = source.get(name)
        if name in FLOAT_FIELDS and expected is not None:
            assert math.isclose(row[name], float(expected)), name
        else:
            assert row[name] == expected, name


def serve_mixed_corpus(httpserver: HTTPServer) -> tuple[list[dict[str, Any]], dict[str, str | None]]:
    """Serve good, missing and fake images; return the records and each id's expected error class."""
    wide_png = image_bytes((1200, 800), "PNG", seed=1)
    small_jpeg = image_bytes((300, 200), "JPEG", seed=2)
    httpserver.expect_request("/images/wide.png").respond_with_data(wide_png, content_type="image/png")
    httpserver.expect_request("/images/small.jpg").respond_with_data(small_jpeg, content_type="image/jpeg")
    httpserver.expect_request("/images/gone.jpg").respond_with_data("not found", status=404)
    httpserver.expect_request("/images/page.jpg").respond_with_data(
        "<!doctype html><html><body>moved</body></html>", content_type="text/html"
    )
    records = [
        record(0, httpserver.url_for("/images/wide.png")),
        record(1, httpserver.url_for("/images/small.jpg") + "?itok=Ab12Cd34"),
        record(2, httpserver.url_for("/images/gone.jpg")),
        record(3, httpserver.url_for("/images/page.jpg")),
        record(4, "ftp://example.invalid/image.jpg"),
        record(5, None),
        record(6, httpserver.url_for("/images/wide.png"), lat=177, id="00123"),
    ]
    httpserver.expect_request("/images/small.jpg", query_string="itok=Ab12Cd34").respond_with_data(
        small_jpeg, content_type="image/jpeg"
    )
    expected = {
        records[0]["id"]: None,
        records[1]["id"]: None,
        records[2]["id"]: "http_404",
        records[3]["id"]: "not_an_image",
        records[4]["id"]: "invalid_url",
        records[5]["id"]: "invalid_metadata",
        records[6]["id"]: None,
    }
    return records, expected


@pytest.mark.parametrize("layout", LAYOUTS)
def test_load_dataset_each_layout(layout: str, httpserver: HTTPServer, tmp_path: Path) -> None:
    """Every row comes out once, with its values, its image or the right error class."""
    records, expected = serve_mixed_corpus(httpserver)
    metadata = write_metadata(tmp_path / "val_data.json", records, layout)

    dataset = datasets.load_dataset(
        "gaia", split="validation", data_files={"validation": str(metadata)}, **fast_options(tmp_path)
    )

    assert len(dataset) == len(records)
    assert [row["id"] for row in dataset] == [source["id"] for source in records]
    for row, source in zip(dataset, records, strict=True):
        assert_values_equal(row, source)
        expected_class = expected[source["id"]]
        if expected_class is None:
            assert row["error"] is None, row["error"]
            assert isinstance(row["image"], Image.Image)
            assert min(row["image"].size) == 512
            assert row["image"].size == (row["width"], row["height"])
            assert row["sha256"] is not None
        else:
            assert row["image"] is None
            assert RowError.parse(row["error"]).error_class == expected_class
            assert row["width"] is None


def test_load_dataset_provenance(httpserver: HTTPServer, tmp_path: Path) -> None:
    """Stored and original sizes, the SHA-256 of the fetched bytes and the final URL are recorded."""
    body = image_bytes((1000, 500), "PNG")
    httpserver.expect_request("/old.png").respond_with_data("", status=301, headers={"Location": "/new.png"})
    httpserver.expect_request("/new.png").respond_with_data(body, content_type="image/png")
    metadata = write_metadata(tmp_path / "val.json", [record(0, httpserver.url_for("/old.png"))], "records")

    row = datasets.load_dataset(
        "gaia", split="validation", data_files={"validation": str(metadata)}, **fast_options(tmp_path)
    )[0]

    assert row["error"] is None
    assert (row["original_width"], row["original_height"]) == (1000, 500)
    assert (row["width"], row["height"]) == (1024, 512)
    assert row["sha256"] == hashlib.sha256(body).hexdigest()
    assert row["final_url"] == httpserver.url_for("/new.png")


def test_original_config_keeps_bytes(httpserver: HTTPServer, tmp_path: Path) -> None:
    body = image_bytes((640, 480), "JPEG")
    httpserver.expect_request("/a.jpg").respond_with_data(body, content_type="image/jpeg")
    metadata = write_metadata(tmp_path / "val.json", [record(0, httpserver.url_for("/a.jpg"))], "records")

    dataset = datasets.load_dataset(
        "gaia",
        "original",
        split="validation",
        data_files={"validation": str(metadata)},
        **fast_options(tmp_path),
    )
    stored = dataset.cast_column("image", datasets.Image(decode=False))[0]

    assert stored["image"]["bytes"] == body
    assert (dataset[0]["width"], dataset[0]["height"]) == (640, 480)


def test_metadata_config_sends_no_request(httpserver: HTTPServer, tmp_path: Path) -> None:
    records = [record(number, httpserver.url_for(f"/{number}.png")) for number in range(3)]
    metadata = write_metadata(tmp_path / "val.json", records, "columns")

    dataset = datasets.load_dataset(
        "gaia",
        "metadata",
        split="validation",
        data_files={"validation": str(metadata)},
        **fast_options(tmp_path),
    )

    assert "image" not in dataset.column_names
    assert len(dataset) == 3
    assert len(httpserver.log) == 0
    for row, source in zip(dataset, records, strict=True):
        assert_values_equal(row, source)


def test_real_images_from_loopback(shared_images: Path, httpserver: HTTPServer, tmp_path: Path) -> None:
    """Real satellite images decode, and the ones Pillow cannot read become row errors."""
    names = sorted(path.name for path in shared_images.iterdir() if path.suffix in {".tif", ".jpg"})
    for name in names:
        content_type = "image/jpeg" if name.endswith(".jpg") else "image/tiff"
        httpserver.expect_request(f"/{name}").respond_with_data(
            (shared_images / name).read_bytes(), content_type=content_type
        )
    records = [record(number, httpserver.url_for(f"/{name}"), id=name) for number, name in enumerate(names)]
    metadata = write_metadata(tmp_path / "val.json", records, "records")

    dataset = datasets.load_dataset(
        "gaia", split="validation", data_files={"validation": str(metadata)}, **fast_options(tmp_path)
    )
    rows = {row["id"]: row for row in dataset}

    assert len(rows) == len(names)
    assert RowError.parse(rows["RGBA.uint16.tif"]["error"]).error_class == "unsupported_format"
    assert RowError.parse(rows["corrupt.tif"]["error"]).error_class == "decode_error"
    for name in ("RGB.byte.tif", "RGBA.byte.tif", "goes.tif", "world.rgb.tif", "389225main_sw_1965_1024.jpg"):
        assert rows[name]["error"] is None, rows[name]["error"]
        assert rows[name]["image"].mode == "RGB", name
        assert min(rows[name]["image"].size) == 512, name
    assert rows["shade.tif"]["image"].mode == "L"
    assert (rows["world.rgb.tif"]["width"], rows["world.rgb.tif"]["height"]) == (1024, 512)


def test_second_load_sends_no_request(httpserver: HTTPServer, tmp_path: Path) -> None:
    httpserver.expect_request("/a.png").respond_with_data(image_bytes((600, 600)), content_type="image/png")
    metadata = write_metadata(tmp_path / "val.json", [record(0, httpserver.url_for("/a.png"))], "records")
    options = fast_options(tmp_path)

    first = datasets.load_dataset(
        "gaia", split="validation", data_files={"validation": str(metadata)}, **options
    )
    requests_after_first = len(httpserver.log)
    second = datasets.load_dataset(
        "gaia", split="validation", data_files={"validation": str(metadata)}, **options
    )

    assert requests_after_first == 1
    assert len(httpserver.log) == 1
    assert second.cache_files == first.cache_files


def test_streaming_rows_equal_prepared(httpserver: HTTPServer, tmp_path: Path) -> None:
    records, _ = serve_mixed_corpus(httpserver)
    metadata = write_metadata(tmp_path / "val.json", records, "records")
    options = fast_options(tmp_path)

    prepared = datasets.load_dataset(
        "gaia", split="validation", data_files={"validation": str(metadata)}, **options
    )
    streamed = datasets.load_dataset(
        "gaia", split="validation", data_files={"validation": str(metadata)}, streaming=True, **options
    )

    streamed_rows = list(streamed)
    assert len(streamed_rows) == len(prepared)
    for stream_row, prepared_row in zip(streamed_rows, prepared, strict=True):
        for name in (*METADATA_FIELDS, "error", "width", "height", "sha256", "final_url"):
            assert stream_row[name] == prepared_row[name], name
        if prepared_row["image"] is not None:
            assert stream_row["image"].tobytes() == prepared_row["image"].tobytes()


def test_unknown_option_suggests_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'image_size'"):
        datasets.load_dataset_builder("gaia", image_sise=256, cache_dir=str(tmp_path))


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("image_size", 0, "invalid value for image_size: 0"),
        ("resize_mode", "stretch", "invalid value for resize_mode: 'stretch'"),
        ("encode_quality", 12, "invalid value for encode_quality for png: 12"),
        ("max_requests_per_second_per_host", -1.0, "invalid value for max_requests_per_second_per_host"),
        ("splits", ["val"], "invalid value for splits: 'val'"),
    ],
)
def test_invalid_option_names_value(option: str, value: Any, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        datasets.load_dataset_builder("gaia", cache_dir=str(tmp_path), **{option: value})


def test_unknown_config_lists_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected one of"):
        datasets.load_dataset_builder("gaia", "thumbnails", cache_dir=str(tmp_path))


def test_image_bytes_decode_as_png(httpserver: HTTPServer, tmp_path: Path) -> None:
    httpserver.expect_request("/a.jpg").respond_with_data(
        image_bytes((900, 600), "JPEG"), content_type="image/jpeg"
    )
    metadata = write_metadata(tmp_path / "val.json", [record(0, httpserver.url_for("/a.jpg"))], "records")

    dataset = datasets.load_dataset(
        "gaia", split="validation", data_files={"validation": str(metadata)}, **fast_options(tmp_path)
    )
    stored = dataset.cast_column("image", datasets.Image(decode=False))[0]["image"]["bytes"]

    assert Image.open(io.BytesIO(stored)).format == "PNG"


def cache_dir_of(tmp_path: Path, *args: Any, **options: Any) -> str:
    return datasets.load_dataset_builder("gaia", *args, cache_dir=str(tmp_path), **options).cache_dir


def test_cache_dir_ignores_politeness_options(tmp_path: Path) -> None:
    """Rate, retry and deadline options change how rows are fetched, not the prepared split."""
    default = cache_dir_of(tmp_path)

    assert cache_dir_of(tmp_path, max_connections_per_host=1, max_retries=9, prefetch=8) == default
    assert cache_dir_of(tmp_path, image_size=512, resize_mode="keep_ratio") == default
    assert cache_dir_of(tmp_path, image_size=256) != default
    assert cache_dir_of(tmp_path, "original") != default


def test_cache_dir_canonical_splits(tmp_path: Path) -> None:
    as_list = cache_dir_of(tmp_path, splits=["validation"])

    assert cache_dir_of(tmp_path, splits=("validation",)) == as_list
    assert cache_dir_of(tmp_path, splits="validation") == as_list
    assert as_list != cache_dir_of(tmp_path)


def test_direct_builder_shares_cache(tmp_path: Path) -> None:
    """The CLI builds Gaia directly; it must land in the cache load_dataset reads."""
    from gaia_builder.builder import Gaia

    direct = Gaia(config_name="default", cache_dir=str(tmp_path), splits=("validation",))

    assert direct.cache_dir == cache_dir_of(tmp_path, splits=["validation"])


class ConcurrencyProbe:
    """A request handler that delays each response briefly and records the peak concurrency."""

    def __init__(self, body: bytes, hold: float) -> None:
        self.body = body
        self.hold = hold
        self.active = 0
        self.peak = 0
        self.lock = threading.Lock()
        self.never_set = threading.Event()

    def __call__(self, request: Request) -> Response:
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            self.never_set.wait(self.hold)  # server-side latency, so that requests overlap
            return Response(self.body, content_type="image/png")
        finally:
            with self.lock:
                self.active -= 1


def test_num_proc_keeps_host_cap(tmp_path: Path) -> None:
    """Two worker processes together never hold more than max_connections_per_host requests."""
    probe = ConcurrencyProbe(image_bytes((300, 300)), hold=0.05)
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.expect_request(re.compile("/img/.*")).respond_with_handler(probe)
    server.start()
    try:
        records = [record(number, server.url_for(f"/img/{number}.png")) for number in range(24)]
        metadata = write_metadata(tmp_path / "val.json", records, "records")
        options = {**fast_options(tmp_path), "max_connections_per_host": 2, "num_shards": 4}

        dataset = datasets.load_dataset(
            "gaia", split="validation", data_files={"validation": str(metadata)}, num_proc=2, **options
        )
    finally:
        server.stop()

    assert [row["id"] for row in dataset] == [source["id"] for source in records]
    assert all(error is None for error in dataset["error"])
    assert 1 <= probe.peak <= 2
