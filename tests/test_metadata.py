"""Tests of gaia_builder.metadata: the four file layouts, row checks, file lookup and Hub downloads."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hub_stub import HubStub, closed_port_endpoint, point_hub_at
from huggingface_hub import constants

from gaia_builder.errors import MetadataError, MetadataSourceError
from gaia_builder.features import METADATA_FIELDS
from gaia_builder.metadata import (
    HUB_FILES,
    MetadataRow,
    check_row,
    download_metadata,
    load_rows,
    local_metadata_files,
    read_records,
)

REPO_ID = "azavras/GAIA"
LAYOUTS = ("records", "column_lists", "column_dicts", "json_lines")

# Seconds within which a download from an unreachable Hub must fail.
FAIL_FAST_SECONDS = 5.0


def gaia_record(number: int) -> dict[str, Any]:
    """Return a complete GAIA record; its keys are not in METADATA_FIELDS order, as in the Hub files."""
    return {
        "captions": [f"Caption {number}.{i} of a river delta." for i in range(5)],
        "id": f"river-delta-{number}",
        "lat": 29.9792 + number,
        "lon": -31.1342,
        "image_src": f"https://www.copernicus.eu/sites/default/files/{number}.jpg?itok=Ab12Cd34",
        "image_alt": f"River delta {number}",
        "credits": "Contains modified Copernicus Sentinel data",
        "location": "Nile Delta, Egypt",
        "tag": ["river", "delta", "agriculture"],
        "resolution": "High",
        "satellite": ["Sentinel-2"],
        "sensor": ["MSI"],
        "modalities": ["Optical"],
    }


def write_layout(path: Path, records: list[dict[str, Any]], layout: str) -> Path:
    """Write ``records`` to ``path`` in one of the accepted layouts."""
    columns = list(records[0])
    if layout == "records":
        text = json.dumps(records, indent=1)
    elif layout == "column_lists":
        text = json.dumps({name: [record[name] for record in records] for name in columns})
    elif layout == "column_dicts":
        text = json.dumps(
            {name: {str(i): record[name] for i, record in enumerate(records)} for name in columns}
        )
    elif layout == "json_lines":
        # Blank lines between records, and one at the end, are allowed.
        text = "\n\n".join(json.dumps(record) for record in records) + "\n\n"
    else:
        raise ValueError(f"unknown layout {layout!r}")
    path.write_text(text, encoding="utf-8")
    return path


def row_for(record: dict[str, Any], index: int = 0) -> MetadataRow:
    return check_row(record, source="val_data.json", index=index)


# read_records: layouts.


@pytest.mark.parametrize("layout", LAYOUTS)
def test_read_records_layout(tmp_path: Path, layout: str) -> None:
    """Every layout gives back the written records, in order and with equal values."""
    records = [gaia_record(number) for number in range(3)]
    path = write_layout(tmp_path / "val_data.json", records, layout)

    assert read_records(path) == records


@pytest.mark.parametrize("layout", LAYOUTS)
def test_read_records_keeps_values_pandas_coerces(tmp_path: Path, layout: str) -> None:
    records = [gaia_record(0), gaia_record(1)]
    records[0].update(id="00123", location="2024-01-05", lat=0.1, views=2**70)
    records[1].update(id="1e5", location="2024-01-05T10:00:00Z", lat=177, views=-(2**65))
    path = write_layout(tmp_path / "val_data.json", records, layout)

    read = read_records(path)

    assert [record["id"] for record in read] == ["00123", "1e5"]
    assert [record["location"] for record in read] == ["2024-01-05", "2024-01-05T10:00:00Z"]
    assert [record["views"] for record in read] == [2**70, -(2**65)]
    assert type(read[1]["lat"]) is int
    assert read[0]["lat"] == 0.1


def test_read_records_row_key_order(tmp_path: Path) -> None:
    """Row keys "0".."10" are ordered as integers, so "10" comes after "9", whatever the file order."""
    keys = sorted(str(i) for i in range(11))  # "0", "1", "10", "2", ...
    columns = {"id": {key: f"row-{key}" for key in keys}, "lat": {key: float(key) for key in reversed(keys)}}
    path = tmp_path / "val_data.json"
    path.write_text(json.dumps(columns), encoding="utf-8")

    read = read_records(path)

    assert [record["id"] for record in read] == [f"row-{i}" for i in range(11)]
    assert [record["lat"] for record in read] == [float(i) for i in range(11)]


def test_read_records_pandas_to_json_default(tmp_path: Path) -> None:
    """A file written by pandas' DataFrame.to_json with default arguments reads back exactly."""
    pandas = pytest.importorskip("pandas")
    records = [gaia_record(number) for number in range(12)]
    records[3]["id"] = "00042"
    path = tmp_path / "val_data.json"
    pandas.DataFrame(records).to_json(path)

    read = read_records(path)

    assert [record["id"] for record in read] == [record["id"] for record in records]
    assert [record["captions"] for record in read] == [record["captions"] for record in records]


def test_read_records_json_lines_line_endings(tmp_path: Path) -> None:
    """CRLF line ends, whitespace-only lines and U+2028 inside a string do not split records."""
    records = [gaia_record(0), gaia_record(1)]
    records[0]["image_alt"] = "first line\u2028second line"
    lines = [json.dumps(record, ensure_ascii=False) for record in records]
    path = tmp_path / "val_data.jsonl"
    path.write_bytes(f"{lines[0]}\r\n   \r\n{lines[1]}\r\n".encode())

    assert read_records(path) == records


def test_read_records_json_lines_single_record(tmp_path: Path) -> None:
    path = tmp_path / "val_data.jsonl"
    path.write_text(json.dumps(gaia_record(0)) + "\n", encoding="utf-8")

    assert read_records(path) == [gaia_record(0)]


def test_read_records_one_line_columns(tmp_path: Path) -> None:
    """A one-line object whose fields are all columns is read as columns, not as one record."""
    path = tmp_path / "val_data.json"
    path.write_text('{"id": ["a", "b"], "image_src": ["http://127.0.0.1/a.png", "http://127.0.0.1/b.png"]}')

    assert read_records(path) == [
        {"id": "a", "image_src": "http://127.0.0.1/a.png"},
        {"id": "b", "image_src": "http://127.0.0.1/b.png"},
    ]


def test_read_records_one_line_record_of_lists(tmp_path: Path) -> None:
    """A one-line record whose id is a string stays one record, although its captions are a list."""
    record = {"id": "x", "captions": ["a", "b", "c", "d", "e"], "tag": ["1", "2", "3"]}
    path = tmp_path / "val_data.jsonl"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")

    assert read_records(path) == [record]


def test_read_records_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "val_data.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([gaia_record(0)]).encode())

    assert read_records(path) == [gaia_record(0)]


def test_read_records_nan_literal(tmp_path: Path) -> None:
    """Python's json accepts the NaN literal; it is kept as float("nan")."""
    path = tmp_path / "val_data.json"
    path.write_text('[{"id": "a", "lat": NaN, "lon": -Infinity}]', encoding="utf-8")

    record = read_records(path)[0]

    assert math.isnan(record["lat"])
    assert record["lon"] == -math.inf


# read_records: errors.

ERROR_CASES = {
    "invalid_json": ('[{"id": "a"},\n {"id": "b"\n]', ["invalid JSON", "line 3, column 1"]),
    "invalid_json_lines": ('{"id": "a"}\n{"id": "b"}\n\n{"id": \n', ["invalid JSON", "JSON Lines", "line 4"]),
    "top_level_string": ('"just a string"', ["unknown layout", "a string", "a list of records"]),
    "top_level_number": ("42", ["unknown layout", "a number", "JSON Lines"]),
    "mixed_object": ('{\n "id": ["a", "b"],\n "version": 2\n}', ["unknown layout", "'version' is a number"]),
    "one_line_mixed_columns": (
        '{"id": ["a"], "image_src": {"0": "x"}}',
        ["unknown layout", "'id' is a list", "'image_src' is an object", "all be lists"],
    ),
    "one_line_columns_and_number": (
        '{"id": {"0": "a"}, "image_src": {"0": "x"}, "version": 2}',
        ["unknown layout", "'version' is a number"],
    ),
    "json_lines_huge_integer": (
        '{"id": "a"}\n{"id": "b", "lat": ' + "9" * 5000 + "}\n",
        ["invalid number", "JSON Lines", "line 2", "more than 4300 digits"],
    ),
    "json_lines_deep_nesting": ('{"id": "a"}\n' + "[" * 100_000 + "]" * 100_000 + "\n", ["line 2", "nests"]),
    "unequal_lists": (
        '{"id": ["a", "b", "c"], "lat": [1.0, 2.0]}',
        ["unequal length", "'id' has 3", "'lat' has 2"],
    ),
    "unequal_dicts": (
        '{"id": {"0": "a", "1": "b"}, "lat": {"0": 1.0}}',
        ["unequal length", "'id' has 2", "'lat' has 1"],
    ),
    "different_row_keys": (
        '{"id": {"0": "a", "1": "b"}, "lat": {"0": 1.0, "7": 2.0}}',
        ["different row numbers", "'lat'", "[7]"],
    ),
    "non_integer_key": ('{"id": {"0": "a", "first": "b"}}', ["column 'id'", "non-integer key 'first'"]),
    "repeated_row_key": ('{"id": {"1": "a", "01": "b"}}', ["column 'id'", "two keys for row 1"]),
    "index_orient": (
        '{"0": {"id": "a", "lat": 1.0}, "1": {"id": "b", "lat": 2.0}}',
        ["non-integer key 'id'", "orient='index'"],
    ),
    "record_not_object": ('[{"id": "a"}, ["b"], {"id": "c"}]', ["row 1", "not a JSON object", "a list"]),
    "line_not_object": ('{"id": "a"}\n[1, 2]\n', ["line 2", "not a JSON object"]),
    "empty_file": ("", ["is empty"]),
    "whitespace_only": ("  \n\n ", ["is empty"]),
    "empty_list": ("[]", ["contains no records"]),
    "empty_object": ("{}", ["contains no records"]),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_read_records_error(tmp_path: Path, case: str) -> None:
    """Each malformed file raises MetadataError naming the file and the problem."""
    text, expected_parts = ERROR_CASES[case]
    path = tmp_path / f"{case}.json"
    path.write_text(text, encoding="utf-8")

    with pytest.raises(MetadataError) as raised:
        read_records(path)

    message = str(raised.value)
    assert str(path) in message
    for part in expected_parts:
        assert part in message


def test_read_records_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"

    with pytest.raises(MetadataError, match="failed to read metadata file") as raised:
        read_records(path)

    assert str(path) in str(raised.value)


def test_read_records_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"location": "Bogotá"}]'.encode("latin-1"))

    with pytest.raises(MetadataError, match="not UTF-8") as raised:
        read_records(path)

    assert str(path) in str(raised.value)


# check_row.


def test_check_row_valid() -> None:
    record = gaia_record(7)
    record["unknown_key"] = "ignored"

    row = check_row(record, source="/data/val_data.json", index=7)

    assert row.error is None
    assert list(row.values) == list(METADATA_FIELDS)
    assert row.values == {name: gaia_record(7)[name] for name in METADATA_FIELDS}
    assert row.source == "/data/val_data.json"
    assert row.index == 7


def test_check_row_missing_fields_are_none() -> None:
    """Every field but image_src may be absent or null without an error."""
    record = {"image_src": "https://example.org/a.png", "captions": None}

    row = row_for(record)

    assert row.error is None
    assert row.values["image_src"] == "https://example.org/a.png"
    assert [row.values[name] for name in METADATA_FIELDS if name != "image_src"] == [None] * 12


def test_check_row_integer_coordinates() -> None:
    record = gaia_record(0) | {"lat": 177, "lon": -3}

    row = row_for(record)

    assert row.error is None
    assert row.values["lat"] == 177.0
    assert type(row.values["lat"]) is float
    assert row.values["lon"] == -3.0


def test_check_row_keeps_out_of_range_latitude() -> None:
    row = row_for(gaia_record(0) | {"lat": 177.0})

    assert row.error is None
    assert row.values["lat"] == 177.0


def test_check_row_keeps_nan() -> None:
    row = row_for(gaia_record(0) | {"lat": math.nan})

    assert row.error is None
    assert math.isnan(row.values["lat"])


WRONG_TYPES = {
    "lat_bool": ("lat", True, "expected a number, got a boolean True"),
    "lat_string": ("lat", "12.5", "expected a number, got a string '12.5'"),
    "lat_huge_int": ("lat", 2**53 + 1, "expected a number that fits float64"),
    "lon_list": ("lon", [1.0], "expected a number, got a list"),
    "id_number": ("id", 123, "expected a string, got a number 123"),
    "resolution_list": ("resolution", ["High"], "expected a string, got a list"),
    "credits_bool": ("credits", False, "expected a string, got a boolean"),
    "tag_string": ("tag", "river", "expected a list of strings, got a string 'river'"),
    "captions_number_item": (
        "captions",
        ["a", 5, "c"],
        "expected a list of strings, got a number 5 at position 1",
    ),
    "satellite_null_item": (
        "satellite",
        ["Sentinel-2", None],
        "expected a list of strings, got null at position 1",
    ),
    "modalities_object": ("modalities", {"0": "Optical"}, "expected a list of strings, got an object"),
    "image_alt_lone_surrogate": (
        "image_alt",
        "broken \ud800 text",
        "not encodable as UTF-8: 'broken \\ud800 text' has an unpaired surrogate U+D800 at character 7",
    ),
    "tag_lone_surrogate": (
        "tag",
        ["river", "\udc00"],
        "not encodable as UTF-8: '\\udc00' at position 1 has an unpaired surrogate U+DC00 at character 0",
    ),
}


@pytest.mark.parametrize("case", sorted(WRONG_TYPES))
def test_check_row_wrong_type(case: str) -> None:
    """A value of the wrong type becomes None and the row gets invalid_metadata naming it."""
    field, value, expected = WRONG_TYPES[case]
    record = gaia_record(3) | {field: value}

    row = check_row(record, source="/data/val_data.json", index=3)

    assert row.values[field] is None
    assert row.error is not None
    assert row.error.error_class == "invalid_metadata"
    assert f"val_data.json row 3 (id {record['id']!r})" in row.error.detail
    assert f"{field}: {expected}" in row.error.detail


def test_check_row_truncates_long_values() -> None:
    row = row_for(gaia_record(0) | {"tag": "x" * 5000})

    assert row.error is not None
    assert len(row.error.detail) < 300


def test_check_row_truncates_long_numbers() -> None:
    row = row_for(gaia_record(0) | {"lat": 10**400})

    assert row.error is not None
    assert "expected a number that fits float64" in row.error.detail
    assert len(row.error.detail) < 200


def test_check_row_lone_surrogate_id() -> None:
    """An id with an unpaired surrogate becomes None, and the error detail is valid UTF-8."""
    row = row_for(gaia_record(0) | {"id": "delta-\ud800"})

    assert row.values["id"] is None
    assert row.error is not None
    assert row.error.error_class == "invalid_metadata"
    assert "(id 'delta-\\ud800')" in row.error.detail
    assert str(row.error).encode("utf-8")


def test_check_row_other_fields_kept_on_error() -> None:
    row = row_for(gaia_record(0) | {"tag": "river"})

    assert row.values["id"] == "river-delta-0"
    assert row.values["captions"] == gaia_record(0)["captions"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, "image_src: null"), ("", "image_src: empty"), (42, "image_src: expected a string")],
)
def test_check_row_unusable_image_src(value: Any, expected: str) -> None:
    row = row_for(gaia_record(0) | {"image_src": value})

    assert row.error is not None
    assert row.error.error_class == "invalid_metadata"
    assert expected in row.error.detail


def test_check_row_missing_image_src() -> None:
    record = gaia_record(0)
    del record["image_src"]

    row = row_for(record)

    assert row.error is not None
    assert row.error.error_class == "invalid_metadata"
    assert "image_src: missing" in row.error.detail


INVALID_URLS = {
    "relative": ("/sites/default/files/a.jpg", "no scheme"),
    "no_scheme": ("www.esa.int/a.jpg", "no scheme"),
    "ftp": ("ftp://ftp.example.org/a.jpg", "scheme 'ftp'"),
    "data": ("data:image/png;base64,AAAA", "scheme 'data'"),
    "no_host": ("http:///a.jpg", "no valid host"),
    "scheme_only": ("https://", "no valid host"),
    "space_in_host": ("http://www esa int/a.jpg", "no valid host"),
    "bad_port": ("http://example.org:99999/a.jpg", "not a valid URL"),
    "trailing_space": ("https://example.org/a.jpg ", "whitespace"),
    "leading_newline": ("\nhttps://example.org/a.jpg", "whitespace"),
}


@pytest.mark.parametrize("case", sorted(INVALID_URLS))
def test_check_row_invalid_url(case: str) -> None:
    """A string image_src that is not an absolute http(s) URL with a host gives invalid_url."""
    url, expected = INVALID_URLS[case]

    row = row_for(gaia_record(0) | {"image_src": url})

    assert row.error is not None
    assert row.error.error_class == "invalid_url"
    assert expected in row.error.detail
    assert row.values["image_src"] == url


@pytest.mark.parametrize(
    "url",
    [
        "https://www.copernicus.eu/sites/default/files/2024-01/a.jpg?itok=Ab12Cd34",
        "HTTP://EOIMAGES.GSFC.NASA.GOV/images/imagerecords/151000/151261/a_lrg.jpg",
        "http://127.0.0.1:8080/a.png",
        "https://www-cdn.eumetsat.int/files/styles/a.jpg?h=1&itok=2",
    ],
)
def test_check_row_valid_url(url: str) -> None:
    row = row_for(gaia_record(0) | {"image_src": url})

    assert row.error is None
    assert row.values["image_src"] == url


def test_check_row_type_before_url() -> None:
    row = row_for(gaia_record(0) | {"image_src": "ftp://example.org/a.jpg", "lat": "north"})

    assert row.error is not None
    assert row.error.error_class == "invalid_metadata"
    assert "lat: expected a number" in row.error.detail
    assert "scheme 'ftp'" in row.error.detail


# load_rows.


def test_load_rows_several_files(tmp_path: Path) -> None:
    first = write_layout(tmp_path / "a.json", [gaia_record(0), gaia_record(1)], "records")
    second = write_layout(tmp_path / "b.jsonl", [gaia_record(2)], "json_lines")

    rows = load_rows([first, str(second)])

    assert [row.values["id"] for row in rows] == ["river-delta-0", "river-delta-1", "river-delta-2"]
    assert [row.index for row in rows] == [0, 1, 0]
    assert [row.source for row in rows] == [str(first), str(first), str(second)]


def test_load_rows_duplicate_ids(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Duplicate ids are logged once with their rows, and every row is kept."""
    records = [gaia_record(0), gaia_record(1), gaia_record(0), gaia_record(2)]
    first = write_layout(tmp_path / "a.json", records, "records")
    second = write_layout(tmp_path / "b.json", [gaia_record(1)], "records")

    with caplog.at_level(logging.WARNING, logger="gaia_builder.metadata"):
        rows = load_rows([first, second])

    assert len(rows) == 5
    warnings = [
        record.getMessage() for record in caplog.records if "more than one row" in record.getMessage()
    ]
    assert len(warnings) == 1
    assert "ids that appear in more than one row: 2" in warnings[0]
    assert "'river-delta-0' at a.json row 0, a.json row 2" in warnings[0]
    assert "'river-delta-1' at a.json row 1, b.json row 0" in warnings[0]


def test_load_rows_unique_ids_no_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_layout(tmp_path / "a.json", [gaia_record(0), gaia_record(1)], "records")

    with caplog.at_level(logging.WARNING, logger="gaia_builder.metadata"):
        load_rows([path])

    assert caplog.records == []


def test_load_rows_logs_extra_keys_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    records = [gaia_record(number) | {"views": number} for number in range(4)]
    records[0]["url"] = "https://example.org/a.jpg"
    path = write_layout(tmp_path / "a.jsonl", records, "json_lines")

    with caplog.at_level(logging.INFO, logger="gaia_builder.metadata"):
        load_rows([path])

    messages = [
        record.getMessage() for record in caplog.records if "not GAIA metadata fields" in record.getMessage()
    ]
    assert len(messages) == 1
    assert "'views' (in 4 of 4 rows)" in messages[0]
    assert "'url' (in 1 of 4 rows)" in messages[0]


def test_load_rows_logs_row_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    records = [gaia_record(0), gaia_record(1) | {"image_src": "ftp://a/b.jpg"}, gaia_record(2) | {"tag": "x"}]
    path = write_layout(tmp_path / "a.json", records, "records")

    with caplog.at_level(logging.WARNING, logger="gaia_builder.metadata"):
        rows = load_rows([path])

    assert [row.error.error_class if row.error else None for row in rows] == [
        None,
        "invalid_url",
        "invalid_metadata",
    ]
    warnings = [record.getMessage() for record in caplog.records if record.name == "gaia_builder.metadata"]
    assert len(warnings) == 1
    assert "2 of them with invalid metadata" in warnings[0]


def test_load_rows_invalid_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("[{", encoding="utf-8")

    with pytest.raises(MetadataError, match=r"broken\.json"):
        load_rows([path])


# local_metadata_files.


def touch(directory: Path, *names: str) -> None:
    for name in names:
        (directory / name).write_text("[]", encoding="utf-8")


def test_local_files_hub_names(tmp_path: Path) -> None:
    touch(tmp_path, *HUB_FILES.values())

    found = local_metadata_files(tmp_path, ["train", "validation", "test"])

    assert found == {split: str(tmp_path / name) for split, name in HUB_FILES.items()}


def test_local_files_other_names(tmp_path: Path) -> None:
    touch(tmp_path, "train_data.jsonl", "validation_data.json", "test.jsonl")

    found = local_metadata_files(tmp_path, ["train", "validation", "test"])

    assert found == {
        "train": str(tmp_path / "train_data.jsonl"),
        "validation": str(tmp_path / "validation_data.json"),
        "test": str(tmp_path / "test.jsonl"),
    }


def test_local_files_hub_name_wins(tmp_path: Path) -> None:
    touch(tmp_path, "val_data.json", "val.json", "validation_data.jsonl")

    assert local_metadata_files(tmp_path, ["validation"]) == {"validation": str(tmp_path / "val_data.json")}


def test_local_files_ambiguous(tmp_path: Path) -> None:
    touch(tmp_path, "val.json", "validation_data.jsonl")

    with pytest.raises(MetadataError) as raised:
        local_metadata_files(tmp_path, ["validation"])

    message = str(raised.value)
    assert str(tmp_path) in message
    assert "several files for split 'validation'" in message
    assert "'val.json'" in message
    assert "'validation_data.jsonl'" in message


def test_local_files_missing_split(tmp_path: Path) -> None:
    touch(tmp_path, "train_data.json")

    with pytest.raises(MetadataError) as raised:
        local_metadata_files(tmp_path, ["train", "test"])

    message = str(raised.value)
    assert str(tmp_path) in message
    assert "split 'test'" in message
    assert "'test_data.json'" in message
    assert "'test.jsonl'" in message


def test_local_files_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(MetadataError, match="does not exist"):
        local_metadata_files(tmp_path / "absent", ["train"])


def test_local_files_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(MetadataError, match="unknown split 'dev'"):
        local_metadata_files(tmp_path, ["dev"])


# download_metadata.


def hub_files() -> dict[str, bytes]:
    return {
        name: json.dumps([gaia_record(number)]).encode() for number, name in enumerate(HUB_FILES.values())
    }


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubStub]:
    """A Hub stand-in serving the three metadata files, with huggingface_hub pointed at it."""
    with HubStub(REPO_ID, hub_files()) as stub:
        stub.point_hub_at(monkeypatch)
        yield stub


def test_download_metadata_files(hub: HubStub, tmp_path: Path) -> None:
    paths = download_metadata(REPO_ID, ["train", "validation", "test"], cache_dir=str(tmp_path / "hub"))

    assert list(paths) == ["train", "validation", "test"]
    for split, path in paths.items():
        assert Path(path).read_bytes() == hub_files()[HUB_FILES[split]]
        assert Path(path).name == HUB_FILES[split]
    assert len(hub.requests_for("val_data.json", "GET")) == 1


def test_download_metadata_uses_cache(hub: HubStub, tmp_path: Path) -> None:
    """A second download of an unchanged file sends HEAD requests only."""
    cache_dir = str(tmp_path / "hub")
    first = download_metadata(REPO_ID, ["validation"], cache_dir=cache_dir)

    second = download_metadata(REPO_ID, ["validation"], cache_dir=cache_dir)

    assert second == first
    assert len(hub.requests_for("val_data.json", "GET")) == 1


def test_download_metadata_new_commit(hub: HubStub, tmp_path: Path) -> None:
    cache_dir = str(tmp_path / "hub")
    download_metadata(REPO_ID, ["validation"], cache_dir=cache_dir)
    hub.set_files({"val_data.json": b'[{"id": "changed"}]'})

    paths = download_metadata(REPO_ID, ["validation"], cache_dir=cache_dir)

    assert Path(paths["validation"]).read_bytes() == b'[{"id": "changed"}]'


def test_download_metadata_sends_token(hub: HubStub, tmp_path: Path) -> None:
    download_metadata(REPO_ID, ["test"], cache_dir=str(tmp_path / "hub"), token="hf_testtoken")

    heads = hub.requests_for("test_data.json", "HEAD")
    assert heads
    assert {request.headers.get("Authorization") for request in heads} == {"Bearer hf_testtoken"}


def test_download_metadata_revision(hub: HubStub, tmp_path: Path) -> None:
    paths = download_metadata(REPO_ID, ["test"], revision=hub.commit, cache_dir=str(tmp_path / "hub"))

    assert Path(paths["test"]).read_bytes() == hub_files()["test_data.json"]
    assert all(f"/resolve/{hub.commit}/" in request.path for request in hub.requests_for("test_data.json"))


@pytest.mark.parametrize(
    ("repo_id", "revision", "files", "expected"),
    [
        ("someone/absent", None, hub_files(), "has no dataset 'someone/absent'"),
        (REPO_ID, "v9", hub_files(), "has no revision 'v9'"),
        (REPO_ID, None, {"train_data.json": b"[]"}, "has no file 'val_data.json'"),
    ],
    ids=["repository", "revision", "file"],
)
def test_download_metadata_not_found(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    repo_id: str,
    revision: str | None,
    files: dict[str, bytes],
    expected: str,
) -> None:
    with HubStub(REPO_ID, files) as stub:
        stub.point_hub_at(monkeypatch)
        with pytest.raises(MetadataSourceError) as raised:
            download_metadata(repo_id, ["validation"], revision=revision, cache_dir=str(tmp_path / "hub"))

    message = str(raised.value)
    assert expected in message
    assert stub.endpoint in message
    assert "val_data.json" in message
    assert "data_dir=" in message


def test_download_metadata_closed_port(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With nothing listening at the endpoint, the download fails within seconds and names the host."""
    endpoint = closed_port_endpoint()
    point_hub_at(monkeypatch, endpoint)

    started = time.monotonic()
    with pytest.raises(MetadataSourceError) as raised:
        download_metadata(REPO_ID, ["train", "validation"], cache_dir=str(tmp_path / "hub"))
    elapsed = time.monotonic() - started

    message = str(raised.value)
    assert elapsed < FAIL_FAST_SECONDS
    assert f"cannot reach {endpoint}" in message
    assert REPO_ID in message
    assert "train_data.json" in message
    assert "data_dir=" in message
    assert "gaia prepare --data-dir" in message


def test_download_metadata_server_error(hub: HubStub, tmp_path: Path) -> None:
    """A Hub responding with 503 fails within seconds, where huggingface_hub alone retries for about 23 s."""
    hub.fail_with(503)

    started = time.monotonic()
    with pytest.raises(MetadataSourceError) as raised:
        download_metadata(REPO_ID, ["validation"], cache_dir=str(tmp_path / "hub"))
    elapsed = time.monotonic() - started

    assert elapsed < FAIL_FAST_SECONDS
    assert f"cannot reach {hub.endpoint}" in str(raised.value)
    assert "503" in str(raised.value)


def test_download_metadata_unreachable_uses_cache(
    hub: HubStub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache_dir = str(tmp_path / "hub")
    first = download_metadata(REPO_ID, ["validation", "test"], cache_dir=cache_dir)
    point_hub_at(monkeypatch, closed_port_endpoint())

    with caplog.at_level(logging.WARNING, logger="gaia_builder.metadata"):
        second = download_metadata(REPO_ID, ["validation", "test"], cache_dir=cache_dir)

    warnings = [record.getMessage() for record in caplog.records if record.name == "gaia_builder.metadata"]
    assert second == first
    assert len(warnings) == 2
    assert "using the cached copy of val_data.json" in warnings[0]


def test_download_metadata_offline_cached(
    hub: HubStub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cache_dir = str(tmp_path / "hub")
    first = download_metadata(REPO_ID, ["validation"], cache_dir=cache_dir)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    request_count = len(hub.requests)

    second = download_metadata(REPO_ID, ["validation"], cache_dir=cache_dir)

    assert second == first
    assert len(hub.requests) == request_count


def test_download_metadata_offline_not_cached(
    hub: HubStub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    with pytest.raises(MetadataSourceError) as raised:
        download_metadata(REPO_ID, ["validation"], cache_dir=str(tmp_path / "hub"))

    assert "HF_HUB_OFFLINE is set" in str(raised.value)
    assert "val_data.json" in str(raised.value)
    assert hub.requests == []


def test_download_metadata_unknown_split(hub: HubStub, tmp_path: Path) -> None:
    with pytest.raises(MetadataError, match="unknown split 'dev'"):
        download_metadata(REPO_ID, ["dev"], cache_dir=str(tmp_path / "hub"))


def test_download_metadata_subprocess_hf_endpoint(hub: HubStub, tmp_path: Path) -> None:
    """A subprocess that only has HF_ENDPOINT set downloads from the stand-in too."""
    script = (
        "import sys\n"
        "from gaia_builder.metadata import download_metadata\n"
        "print(download_metadata(sys.argv[1], ['test'], cache_dir=sys.argv[2])['test'])\n"
    )
    environment = os.environ | hub.environ()

    completed = subprocess.run(
        [sys.executable, "-c", script, REPO_ID, str(tmp_path / "hub")],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert completed.returncode == 0, completed.stderr
    assert Path(completed.stdout.strip()).read_bytes() == hub_files()["test_data.json"]
    assert len(hub.requests_for("test_data.json", "GET")) == 1


def test_invalid_url_hides_credentials() -> None:
    """The invalid_url detail shows *** in place of a user name and password; image_src keeps them."""
    url = "ftp://reader:s3cret@127.0.0.1/x.jpg"

    row = row_for(gaia_record(0) | {"image_src": url})

    assert row.error is not None
    assert row.error.error_class == "invalid_url"
    assert "s3cret" not in row.error.detail
    assert "ftp://***@127.0.0.1/x.jpg" in row.error.detail
    assert row.values["image_src"] == url
