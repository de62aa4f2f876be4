"""The gaia command: prepare with its summary and failures file, usage errors, infos."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from factories import image_bytes, record, write_metadata
from hub_stub import HubStub, closed_port_endpoint, point_hub_at
from pytest_httpserver import HTTPServer

from gaia_builder.cli import main

FAST_FLAGS = [
    "--max-requests-per-second-per-host", "1000",
    "--rate-burst", "100",
    "--max-retries", "0",
    "--connect-timeout", "2",
    "--read-timeout", "2",
    "--attempt-timeout", "5",
]  # fmt: skip


def prepare_args(tmp_path: Path, metadata: Path) -> list[str]:
    return [
        "prepare",
        "--split", "validation",
        "--data-files", f"validation={metadata}",
        "--cache-dir", str(tmp_path / "datasets"),
        "--fetch-cache-dir", str(tmp_path / "fetch"),
        "--failures", str(tmp_path / "failures.jsonl"),
        *FAST_FLAGS,
    ]  # fmt: skip


def test_prepare_prints_summary(httpserver: HTTPServer, tmp_path: Path) -> None:
    """prepare builds the split, counts failures by class and host, and writes the failures file."""
    httpserver.expect_request("/ok.png").respond_with_data(image_bytes((600, 400)), content_type="image/png")
    httpserver.expect_request("/gone.png").respond_with_data("gone", status=404)
    records = [
        record(0, httpserver.url_for("/ok.png")),
        record(1, httpserver.url_for("/gone.png")),
        record(2, "mailto:someone@example.org"),
    ]
    metadata = write_metadata(tmp_path / "val.json", records, "records")

    result = CliRunner().invoke(main, prepare_args(tmp_path, metadata))

    assert result.exit_code == 0, result.output
    assert "validation: 3 rows, 1 ok, 2 failed" in result.output
    assert "http_404" in result.output
    assert "invalid_url" in result.output
    assert "0 read from the fetch cache, 2 requested" in result.output
    failures = [json.loads(line) for line in (tmp_path / "failures.jsonl").read_text().splitlines()]
    assert [failure["id"] for failure in failures] == [records[1]["id"], records[2]["id"]]
    assert failures[0]["url"] == records[1]["image_src"]
    assert failures[0]["error"].startswith("http_404: ")


def test_prepare_hides_url_credentials(httpserver: HTTPServer, tmp_path: Path) -> None:
    """Neither the failures file nor the summary shows the password of an image URL."""
    httpserver.expect_request("/gone.png").respond_with_data("gone", status=404)
    url = httpserver.url_for("/gone.png").replace("http://", "http://reader:s3cret@")
    metadata = write_metadata(tmp_path / "val.json", [record(0, url)], "records")

    result = CliRunner().invoke(main, prepare_args(tmp_path, metadata))

    assert result.exit_code == 0, result.output
    assert "s3cret" not in result.output
    failure = json.loads((tmp_path / "failures.jsonl").read_text())
    assert failure["url"] == url.replace("reader:s3cret@", "***@")
    assert "s3cret" not in failure["error"]


def test_prepare_again_uses_cache(httpserver: HTTPServer, tmp_path: Path) -> None:
    httpserver.expect_request("/ok.png").respond_with_data(image_bytes((600, 400)), content_type="image/png")
    metadata = write_metadata(tmp_path / "val.json", [record(0, httpserver.url_for("/ok.png"))], "records")
    CliRunner().invoke(main, prepare_args(tmp_path, metadata))

    args = [*prepare_args(tmp_path, metadata), "--image-size", "256"]  # a new Arrow build, same fetch cache
    result = CliRunner().invoke(main, args)

    assert result.exit_code == 0, result.output
    assert "1 read from the fetch cache, 0 requested" in result.output
    assert len(httpserver.log) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["prepare", "--split", "val"], "Invalid value for '--split'"),
        (["prepare", "--image-size", "0"], "invalid value for image_size: 0"),
        (["prepare", "--data-files", "val_data.json"], "is not SPLIT=PATH"),
        (["prepare", "--resize-mode", "stretch"], "invalid value for resize_mode"),
        (["prepare", "--no-such-flag"], "No such option"),
    ],
)
def test_usage_error_exits_2(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, args)

    assert result.exit_code == 2
    assert message in result.output


def test_infos_counts_splits(tmp_path: Path) -> None:
    for name, count in (("train_data.json", 3), ("val_data.json", 1), ("test_data.json", 2)):
        records = [record(number, f"https://a.test/{number}.png") for number in range(count)]
        write_metadata(tmp_path / name, records, "records")
    output = tmp_path / "dataset_infos.json"

    result = CliRunner().invoke(main, ["infos", "--data-dir", str(tmp_path), "--output", str(output)])

    assert result.exit_code == 0, result.output
    infos = json.loads(output.read_text())
    assert set(infos) == {"default", "original", "metadata"}
    assert infos["default"]["splits"]["train"]["num_examples"] == 3
    assert infos["metadata"]["splits"]["validation"]["num_examples"] == 1
    assert "image" not in infos["metadata"]["features"]


def test_prepare_from_hub_stub(
    httpserver: HTTPServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no data flags, prepare reads the metadata from the Hub (here a loopback stand-in)."""
    httpserver.expect_request("/ok.png").respond_with_data(image_bytes((500, 500)), content_type="image/png")
    httpserver.expect_request("/gone.png").respond_with_data("gone", status=404)
    files = {
        name: json.dumps(
            [record(0, httpserver.url_for("/ok.png")), record(1, httpserver.url_for("/gone.png"))]
        ).encode()
        for name in ("train_data.json", "val_data.json", "test_data.json")
    }
    monkeypatch.chdir(tmp_path)

    with HubStub("azavras/GAIA", files) as hub:
        hub.point_hub_at(monkeypatch)
        result = CliRunner().invoke(main, ["prepare", "--split", "validation", *FAST_FLAGS])

    assert result.exit_code == 0, result.output
    assert "validation: 2 rows, 1 ok, 1 failed" in result.output
    assert hub.requests_for("val_data.json")
    assert not hub.requests_for("train_data.json")
    failures = (tmp_path / "gaia-failures-default.jsonl").read_text().splitlines()
    assert len(failures) == 1
    assert json.loads(failures[0])["error"].startswith("http_404: ")


def test_prepare_without_hub_exits_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the Hub unreachable, prepare fails fast and explains how to use local metadata."""
    endpoint = closed_port_endpoint()
    point_hub_at(monkeypatch, endpoint)

    result = CliRunner().invoke(main, ["prepare", "--split", "validation", "--cache-dir", str(tmp_path)])

    assert result.exit_code == 1
    assert endpoint.removeprefix("http://") in result.output
    assert "--data-dir" in result.output


@pytest.mark.parametrize("export_format", ["parquet", "webdataset"])
def test_export_writes_folder(export_format: str, httpserver: HTTPServer, tmp_path: Path) -> None:
    httpserver.expect_request("/ok.png").respond_with_data(image_bytes((600, 400)), content_type="image/png")
    httpserver.expect_request("/gone.png").respond_with_data("gone", status=404)
    records = [record(0, httpserver.url_for("/ok.png")), record(1, httpserver.url_for("/gone.png"))]
    metadata = write_metadata(tmp_path / "val.json", records, "records")
    args = prepare_args(tmp_path, metadata)
    failures_at = args.index("--failures")
    del args[failures_at : failures_at + 2]
    args[0] = "export"
    output = tmp_path / "out"

    result = CliRunner().invoke(main, [*args, "--format", export_format, "--output", str(output)])

    assert result.exit_code == 0, result.output
    assert "validation: 2 rows, 1 with an image" in result.output
    if export_format == "parquet":
        assert (output / "README.md").is_file()
        assert list((output / "data").glob("validation-*.parquet"))
    else:
        assert (output / "validation" / "00000.tar").is_file()


def test_export_rejects_non_empty_folder(httpserver: HTTPServer, tmp_path: Path) -> None:
    metadata = write_metadata(tmp_path / "val.json", [record(0, "ftp://a.test/x.png")], "records")
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    args = [
        "export",
        "--config",
        "metadata",
        "--split",
        "validation",
        "--data-files",
        f"validation={metadata}",
    ]

    result = CliRunner().invoke(main, [*args, "--cache-dir", str(tmp_path / "c"), "--format", "parquet",
                                       "--output", str(output)])  # fmt: skip

    assert result.exit_code == 1
    assert "notes.txt" in result.output or "not empty" in result.output
    assert (output / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("data_files", "split", "message"),
    [
        ("val=VAL", "all", "'val' is not a GAIA split"),
        ("validation=MISSING", "validation", "file not found for split 'validation'"),
        ("test=VAL", "validation", "--split validation has no file"),
    ],
)
def test_data_files_checked_first(data_files: str, split: str, message: str, tmp_path: Path) -> None:
    """Bad --data-files values are usage errors before any request or build."""
    metadata = write_metadata(tmp_path / "val.json", [record(0, "https://a.test/x.png")], "records")
    value = data_files.replace("VAL", str(metadata)).replace("MISSING", str(tmp_path / "missing.json"))

    result = CliRunner().invoke(main, ["prepare", "--split", split, "--data-files", value])

    assert result.exit_code == 2
    assert message in result.output


def test_metadata_config_summary_counts_fresh_build(tmp_path: Path) -> None:
    metadata = write_metadata(tmp_path / "val.json", [record(0, "https://a.test/x.png")], "records")
    args = [
        "prepare",
        "--config",
        "metadata",
        "--split",
        "validation",
        "--data-files",
        f"validation={metadata}",
    ]

    result = CliRunner().invoke(main, [*args, "--cache-dir", str(tmp_path / "c")])

    assert result.exit_code == 0, result.output
    assert "Reused the prepared Arrow cache" not in result.output
    assert "validation: 1 rows, 1 ok, 0 failed" in result.output
