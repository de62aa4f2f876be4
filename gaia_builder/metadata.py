"""Read GAIA's metadata files into type-checked rows, with every value exactly as in the file.

GAIA publishes one JSON file per split in the Hugging Face dataset repository ``azavras/GAIA``
(:data:`HUB_FILES`). Their top-level layout has not been verified, so :func:`read_records`
accepts the four layouts that tools write for such tables:

- a list of records: ``[{"id": ..., ...}, ...]``;
- an object of columns, each a list: ``{"id": [...], "lat": [...], ...}``;
- an object of columns, each an object keyed by row number, which is the default of pandas'
  ``DataFrame.to_json``: ``{"id": {"0": ..., "1": ...}, ...}``. Rows are ordered by the
  integer value of the key, so "10" comes after "9";
- JSON Lines: one record per line, blank lines allowed.

The files are parsed with the :mod:`json` module and never with pandas, whose type inference
turns numeric-looking ids into integers and date-like strings into timestamps. Integers and
floats stay as parsed, and the non-standard ``NaN`` literal that Python's json accepts becomes
``float("nan")``.

:func:`check_row` checks each record against the types in :mod:`gaia_builder.features`. A value
of the wrong type does not stop the build: it becomes None and the row carries a
:class:`~gaia_builder.errors.RowError`.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import reprlib
import sys
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.utils import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from yarl import URL

from . import __version__
from .errors import MetadataError, MetadataSourceError, RowError, redact_credentials
from .features import FLOAT_FIELDS, LIST_FIELDS, METADATA_FIELDS, STRING_FIELDS

logger = logging.getLogger(__name__)

# The metadata file of each split in the Hub repository.
HUB_FILES: dict[str, str] = {
    "train": "train_data.json",
    "validation": "val_data.json",
    "test": "test_data.json",
}

# Other names that local_metadata_files accepts when the Hub name is absent, in .json or .jsonl.
LOCAL_FILE_STEMS: dict[str, tuple[str, ...]] = {
    "train": ("train_data", "train"),
    "validation": ("val_data", "validation_data", "val", "validation"),
    "test": ("test_data", "test"),
}

ACCEPTED_LAYOUTS = (
    "a list of records, an object of column -> list, an object of column -> {row number: value} "
    "(pandas' to_json default), or JSON Lines (one record per line)"
)

LOCAL_METADATA_HINT = (
    "To use metadata files you already have, pass data_dir=DIR (a folder holding "
    f"{', '.join(HUB_FILES.values())}) or data_files={{'train': PATH, ...}} to "
    "load_dataset('gaia', ...), or run `gaia prepare --data-dir DIR`."
)

# How many duplicate ids and rows with errors a log message lists before it stops.
MAX_LOGGED_EXAMPLES = 5

_FIELD_SET = frozenset(METADATA_FIELDS)
_ROW_KEY = re.compile(r"-?[0-9]+")

# Values in row error details and log messages are cut to about this size.
_value_repr = reprlib.Repr()
_value_repr.maxstring = 80
_value_repr.maxother = 80
_value_repr.maxlist = 5
_value_repr.maxdict = 4
_value_repr.maxlevel = 2


@dataclass(frozen=True)
class MetadataRow:
    """One record of a metadata file after type checks.

    ``values`` contains exactly the fields of METADATA_FIELDS, in that order. A field that is
    missing from the record, or whose value has the wrong type, is None. ``error`` is None
    unless a value had the wrong type (``invalid_metadata``, which also covers a missing or
    empty image_src) or image_src is not an absolute http(s) URL with a host (``invalid_url``).
    """

    source: str
    index: int
    values: dict[str, Any]
    error: RowError | None


# Reading files.


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Parse a metadata file in any accepted layout into a list of records.

    Raises MetadataError naming the file when it is missing, empty, not UTF-8 or not valid JSON.
    Integers too long for Python and nesting too deep count as invalid JSON. It also raises for
    an unknown layout, columns of unequal length and records that are not objects.
    """
    path = Path(path)
    text = _read_text(path)
    if not text.strip():
        raise MetadataError(f"metadata file {path} is empty; expected {ACCEPTED_LAYOUTS}")

    try:
        document = _parse_json(path, text)
    except json.JSONDecodeError as error:
        # A second top-level value after the first one: JSON Lines.
        if error.msg == "Extra data":
            return _records_from_json_lines(path, text)
        raise MetadataError(
            f"invalid JSON in metadata file {path}: {error.msg} at line {error.lineno}, column {error.colno}"
        ) from None

    records = _records_from_document(path, document, text)
    if not records:
        raise MetadataError(f"metadata file {path} contains no records")
    return records


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise MetadataError(f"failed to read metadata file {path}: {error.strerror or error}") from error

    try:
        # utf-8-sig drops a byte order mark, which json.loads would reject.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise MetadataError(
            f"metadata file {path} is not UTF-8 text: invalid byte at offset {error.start}; "
            "re-encode it as UTF-8"
        ) from None


def _parse_json(path: Path, text: str, where: str = "") -> Any:
    """Parse ``text`` with json.loads, raising MetadataError for valid JSON that Python cannot hold.

    That is an integer over Python's digit limit or nesting past its recursion limit.
    json.JSONDecodeError passes through for the caller to place. ``where`` names the line of a
    JSON Lines file.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise MetadataError(
            f"metadata file {path}{where} nests lists or objects deeper than Python's json module can "
            "parse; GAIA metadata nests at most three levels"
        ) from None
    except ValueError:
        # The one ValueError of json.loads that is not a JSONDecodeError: since Python 3.11 and
        # 3.10.7, int() rejects more digits than sys.get_int_max_str_digits().
        raise MetadataError(
            f"invalid number in metadata file {path}{where}: an integer has more than "
            f"{sys.get_int_max_str_digits()} digits, Python's limit for converting it. No GAIA field "
            "holds such a number; fix or remove that value"
        ) from None


def _records_from_json_lines(path: Path, text: str) -> list[dict[str, Any]]:
    records = []
    # Split on "\n" only: str.splitlines would also split on U+2028 and U+2029, which
    # json.dumps(ensure_ascii=False) leaves unescaped inside strings.
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = _parse_json(path, line, f" (read as JSON Lines) at line {line_number}")
        except json.JSONDecodeError as error:
            raise MetadataError(
                f"invalid JSON in metadata file {path} (read as JSON Lines): {error.msg} "
                f"at line {line_number}, column {error.colno}"
            ) from None
        if not isinstance(record, dict):
            raise MetadataError(
                f"line {line_number} of metadata file {path} (read as JSON Lines) is not a JSON object "
                f"but {_json_type(record)}: {_value_repr.repr(record)}"
            )
        records.append(record)
    return records


def _records_from_document(path: Path, document: Any, text: str) -> list[dict[str, Any]]:
    if isinstance(document, list):
        return _records_from_list(path, document)
    if not isinstance(document, dict):
        raise MetadataError(
            f"unknown layout of metadata file {path}: the top-level value is {_json_type(document)}; "
            f"expected {ACCEPTED_LAYOUTS}"
        )
    if not document:
        return []

    # Columns when every GAIA field (every key, if none is a GAIA field) is a list or an object.
    # A single record, by contrast, has a string or a number in id, image_src or another field.
    fields = [value for name, value in document.items() if name in _FIELD_SET] or list(document.values())
    is_columns = all(isinstance(value, (list, dict)) for value in fields)
    values = list(document.values())
    if is_columns and all(isinstance(value, list) for value in values):
        return _records_from_column_lists(path, document)
    if is_columns and all(isinstance(value, dict) for value in values):
        return _records_from_column_dicts(path, document)
    if not is_columns and "\n" not in text.strip():
        # A JSON Lines file with a single record.
        return [document]

    kinds = ", ".join(
        f"{_value_repr.repr(name)} is {_json_type(value)}" for name, value in list(document.items())[:6]
    )
    raise MetadataError(
        f"unknown layout of metadata file {path}: the top-level object is neither columns of one kind "
        f"nor a record on one line ({kinds}). Columns must all be lists or all be objects keyed by row "
        f"number; expected {ACCEPTED_LAYOUTS}"
    )


def _records_from_list(path: Path, items: list[Any]) -> list[dict[str, Any]]:
    for row_number, item in enumerate(items):
        if not isinstance(item, dict):
            raise MetadataError(
                f"row {row_number} of metadata file {path} is not a JSON object but "
                f"{_json_type(item)}: {_value_repr.repr(item)}; expected a list of records"
            )
    return items


def _records_from_column_lists(path: Path, columns: dict[str, list[Any]]) -> list[dict[str, Any]]:
    lengths = {name: len(column) for name, column in columns.items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{_value_repr.repr(name)} has {length}" for name, length in lengths.items())
        raise MetadataError(f"columns of unequal length in metadata file {path}: {listed} values")

    row_count = next(iter(lengths.values()))
    return [{name: column[i] for name, column in columns.items()} for i in range(row_count)]


def _records_from_column_dicts(path: Path, columns: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    by_row_number = {name: _column_by_row_number(path, name, column) for name, column in columns.items()}

    lengths = {name: len(column) for name, column in by_row_number.items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{_value_repr.repr(name)} has {length}" for name, length in lengths.items())
        raise MetadataError(f"columns of unequal length in metadata file {path}: {listed} values")

    first_name, first_column = next(iter(by_row_number.items()))
    row_numbers = sorted(first_column)
    for name, column in by_row_number.items():
        if column.keys() != first_column.keys():
            only_here = sorted(column.keys() - first_column.keys())[:MAX_LOGGED_EXAMPLES]
            raise MetadataError(
                f"columns with different row numbers in metadata file {path}: "
                f"{_value_repr.repr(name)} has rows {_value_repr.repr(only_here)} "
                f"that {_value_repr.repr(first_name)} lacks"
            )

    return [{name: column[row] for name, column in by_row_number.items()} for row in row_numbers]


def _column_by_row_number(path: Path, name: str, column: dict[str, Any]) -> dict[int, Any]:
    by_row_number: dict[int, Any] = {}
    for key, value in column.items():
        if not _ROW_KEY.fullmatch(key):
            raise MetadataError(_non_integer_key_message(path, name, key, column))
        row = int(key)
        if row in by_row_number:
            raise MetadataError(
                f"column {_value_repr.repr(name)} of metadata file {path} has two keys for row {row} "
                f"(one is {_value_repr.repr(key)})"
            )
        by_row_number[row] = value
    return by_row_number


def _non_integer_key_message(path: Path, name: str, key: str, column: dict[str, Any]) -> str:
    message = (
        f"column {_value_repr.repr(name)} of metadata file {path} is an object with the non-integer key "
        f"{_value_repr.repr(key)}; an object of columns must map row numbers to values. "
        f"Expected {ACCEPTED_LAYOUTS}"
    )
    if _ROW_KEY.fullmatch(name) and _FIELD_SET & column.keys():
        message += (
            ". The file looks like pandas' to_json(orient='index'); "
            "write it with orient='records' or orient='columns'"
        )
    return message


def _describe_value(value: Any) -> str:
    if value is None:
        return "null"
    return f"{_json_type(value)} {_value_repr.repr(value)}"


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    if type(value) in names:
        return names[type(value)]
    if isinstance(value, (int, float)):
        return "a number"
    return type(value).__name__


# Checking rows.


def check_row(record: Mapping[str, Any], *, source: str, index: int) -> MetadataRow:
    """Type-check one record and return its row; keys that are not GAIA fields are ignored.

    Integers in lat and lon become floats of the same value. A boolean is never a number or a
    string, and a string is never a list of strings.
    """
    values: dict[str, Any] = {}
    problems: list[str] = []
    for name in METADATA_FIELDS:
        value, problem = _check_value(name, record.get(name))
        values[name] = value
        if problem is not None:
            problems.append(f"{name}: {problem}")

    error = _row_error(record, values["image_src"], problems, source=source, index=index)
    return MetadataRow(source=source, index=index, values=values, error=error)


def _check_value(name: str, value: Any) -> tuple[Any, str | None]:
    if value is None:
        return None, None
    if name in STRING_FIELDS:
        return _check_string(value)
    if name in FLOAT_FIELDS:
        return _check_float(value)
    if name in LIST_FIELDS:
        return _check_string_list(value)
    raise AssertionError(f"field {name!r} has no type in gaia_builder.features")


def _check_string(value: Any) -> tuple[str | None, str | None]:
    if not isinstance(value, str):
        return None, f"expected a string, got {_describe_value(value)}"
    problem = _utf8_problem(value)
    if problem is not None:
        return None, f"not encodable as UTF-8: {_value_repr.repr(value)} {problem}"
    return value, None


def _utf8_problem(text: str) -> str | None:
    """Describe why ``text`` cannot be stored as UTF-8, or return None when it can.

    A JSON escape of half a UTF-16 surrogate pair, such as "\\ud800" alone, gives a str that
    Python can represent but that no UTF-8 writer, Arrow's included, accepts.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"has an unpaired surrogate U+{ord(text[error.start]):04X} at character {error.start}"
    return None


def _check_float(value: Any) -> tuple[float | None, str | None]:
    if isinstance(value, float):
        return value, None
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            converted = float(value)
        except OverflowError:
            converted = None
        # The column is float64, so an integer that float64 cannot hold exactly is rejected.
        if converted is not None and converted == value:
            return converted, None
        return None, f"expected a number that fits float64, got {_value_repr.repr(value)}"
    return None, f"expected a number, got {_describe_value(value)}"


def _check_string_list(value: Any) -> tuple[list[str] | None, str | None]:
    if not isinstance(value, list):
        return None, f"expected a list of strings, got {_describe_value(value)}"
    for position, item in enumerate(value):
        if not isinstance(item, str):
            return None, (f"expected a list of strings, got {_describe_value(item)} at position {position}")
        problem = _utf8_problem(item)
        if problem is not None:
            return None, f"not encodable as UTF-8: {_value_repr.repr(item)} at position {position} {problem}"
    return value, None


def _row_error(
    record: Mapping[str, Any], image_src: str | None, problems: list[str], *, source: str, index: int
) -> RowError | None:
    if image_src is None and "image_src" not in record:
        problems.append("image_src: missing")
    elif image_src is None and record["image_src"] is None:
        problems.append("image_src: null")
    elif image_src == "":
        problems.append("image_src: empty")

    url_problem = _url_problem(image_src) if image_src else None
    if url_problem is not None:
        problems.append(f"image_src: {url_problem}")

    if not problems:
        return None
    # A wrong type anywhere outranks an unusable URL: the row needs its metadata fixed first.
    error_class = "invalid_url" if url_problem is not None and len(problems) == 1 else "invalid_metadata"
    return RowError(error_class, f"{_row_label(record, source, index)}: {'; '.join(problems)}")


def _url_problem(url: str) -> str | None:
    """Describe why ``url`` cannot be fetched, or return None when it is an absolute http(s) URL."""
    quoted = _value_repr.repr(redact_credentials(url))
    if url != url.strip():
        return f"{quoted} starts or ends with whitespace"
    try:
        parsed = URL(url)
    except ValueError as error:
        return f"{quoted} is not a valid URL ({error})"

    if parsed.scheme not in ("http", "https"):
        scheme = f"scheme {_value_repr.repr(parsed.scheme)}" if parsed.scheme else "no scheme"
        return f"{quoted} has {scheme}; expected an absolute http or https URL"
    # yarl accepts a host with spaces in it, and no server can be found under such a name.
    if not parsed.host or any(character.isspace() for character in parsed.host):
        return f"{quoted} has no valid host"
    return None


def _row_label(record: Mapping[str, Any], source: str, index: int) -> str:
    label = f"{os.path.basename(source)} row {index}"
    row_id = record.get("id")
    if row_id is not None:
        label += f" (id {_value_repr.repr(row_id)})"
    return label


# Loading a split.


def load_rows(paths: Sequence[str | os.PathLike[str]]) -> list[MetadataRow]:
    """Read and check every row of the metadata files of one split, in file order.

    Logs once per file the keys that are not GAIA fields and the rows with errors, and once
    per call the ids that appear more than once. Every row is returned, duplicates included.
    """
    rows: list[MetadataRow] = []
    for path in paths:
        source = os.fspath(path)
        records = read_records(path)
        file_rows = [check_row(record, source=source, index=index) for index, record in enumerate(records)]
        _log_extra_keys(source, records)
        _log_file_summary(source, file_rows)
        rows.extend(file_rows)

    _log_duplicate_ids(rows)
    return rows


def _log_extra_keys(source: str, records: list[dict[str, Any]]) -> None:
    extra_keys: Counter[str] = Counter()
    for record in records:
        extra_keys.update(record.keys() - _FIELD_SET)
    if extra_keys:
        listed = ", ".join(
            f"{_value_repr.repr(key)} (in {count} of {len(records)} rows)"
            for key, count in extra_keys.most_common()
        )
        logger.info("%s: ignoring keys that are not GAIA metadata fields: %s", source, listed)


def _log_file_summary(source: str, rows: list[MetadataRow]) -> None:
    failed = [row for row in rows if row.error is not None]
    if not failed:
        logger.info("%s: read %d rows", source, len(rows))
        return

    classes = Counter(row.error.error_class for row in failed if row.error is not None)
    examples = "; ".join(str(row.error) for row in failed[:MAX_LOGGED_EXAMPLES])
    logger.warning(
        "%s: read %d rows, %d of them with invalid metadata (%s); every row is kept. First: %s",
        source,
        len(rows),
        len(failed),
        ", ".join(f"{name}: {count}" for name, count in classes.most_common()),
        examples,
    )


def _log_duplicate_ids(rows: list[MetadataRow]) -> None:
    rows_by_id: defaultdict[str, list[MetadataRow]] = defaultdict(list)
    for row in rows:
        row_id = row.values["id"]
        if row_id is not None:
            rows_by_id[row_id].append(row)

    duplicates = {row_id: found for row_id, found in rows_by_id.items() if len(found) > 1}
    if not duplicates:
        return

    examples = "; ".join(
        f"{_value_repr.repr(row_id)} at "
        + ", ".join(f"{os.path.basename(row.source)} row {row.index}" for row in found[:MAX_LOGGED_EXAMPLES])
        for row_id, found in list(duplicates.items())[:MAX_LOGGED_EXAMPLES]
    )
    more = (
        f" and {len(duplicates) - MAX_LOGGED_EXAMPLES} more" if len(duplicates) > MAX_LOGGED_EXAMPLES else ""
    )
    logger.warning(
        "ids that appear in more than one row: %d; every row is kept. %s%s", len(duplicates), examples, more
    )


# Finding the files.


def local_metadata_files(data_dir: str | os.PathLike[str], splits: Sequence[str]) -> dict[str, str]:
    """Find the metadata file of each split in ``data_dir`` and return split -> path.

    The Hub name (train_data.json, val_data.json, test_data.json) is used when present.
    Otherwise exactly one of the other names in LOCAL_FILE_STEMS, in .json or .jsonl, must exist.
    """
    directory = Path(data_dir)
    if not directory.is_dir():
        raise MetadataError(f"metadata folder {directory} does not exist or is not a folder")

    found: dict[str, str] = {}
    for split in splits:
        found[split] = str(_find_split_file(directory, split))
    return found


def _find_split_file(directory: Path, split: str) -> Path:
    hub_name = _hub_filename(split)
    candidates = [f"{stem}{suffix}" for stem in LOCAL_FILE_STEMS[split] for suffix in (".json", ".jsonl")]
    present = [name for name in candidates if (directory / name).is_file()]

    if hub_name in present:
        others = [name for name in present if name != hub_name]
        if others:
            logger.info("%s: using %s for split %s and ignoring %s", directory, hub_name, split, others)
        return directory / hub_name
    if len(present) == 1:
        return directory / present[0]
    if present:
        raise MetadataError(
            f"metadata folder {directory} contains several files for split {split!r}: {present}; "
            f"keep one, or name it with data_files={{{split!r}: PATH}}"
        )
    raise MetadataError(
        f"no metadata file for split {split!r} in {directory}: looked for {candidates}; "
        f"name the file with data_files={{{split!r}: PATH}}"
    )


def _hub_filename(split: str) -> str:
    if split not in HUB_FILES:
        raise MetadataError(f"unknown split {split!r}; expected one of {list(HUB_FILES)}")
    return HUB_FILES[split]


# Downloading from the Hub.


def download_metadata(
    repo_id: str,
    splits: Sequence[str],
    *,
    revision: str | None = None,
    cache_dir: str | None = None,
    token: str | bool | None = None,
) -> dict[str, str]:
    """Download the metadata file of each split from a Hub dataset repository; return split -> path.

    Files are cached by huggingface_hub, which honours HF_ENDPOINT and HF_HUB_OFFLINE. Each
    file is first checked with one HEAD request without retries, because huggingface_hub alone
    retries an unreachable Hub for about 23 s per file (waits of 1, 2, 4, 8 and 8 s in version
    2.4). When the Hub cannot be reached, the cached copy is used if there is one, and
    MetadataSourceError is raised otherwise.
    """
    filenames = {split: _hub_filename(split) for split in splits}
    unreachable: Exception | None = None
    if constants.HF_HUB_OFFLINE:
        logger.info("HF_HUB_OFFLINE is set: looking for %s in the cache only", list(filenames.values()))

    paths: dict[str, str] = {}
    for split, filename in filenames.items():
        if unreachable is None and not constants.HF_HUB_OFFLINE:
            unreachable = _probe_hub(repo_id, filename, revision=revision, token=token)
        if unreachable is not None or constants.HF_HUB_OFFLINE:
            paths[split] = _cached_file(repo_id, filename, revision, cache_dir, unreachable)
        else:
            paths[split] = _download_file(repo_id, filename, revision, cache_dir, token)
    return paths


def _probe_hub(
    repo_id: str, filename: str, *, revision: str | None, token: str | bool | None
) -> Exception | None:
    """Send one HEAD request for a file; return the error if the Hub cannot be reached.

    Raise MetadataSourceError at once when the Hub responds that the repository, the revision
    or the file does not exist or needs a token, since the cache cannot help with those.
    """
    url = hf_hub_url(repo_id, filename, repo_type="dataset", revision=revision)
    options: dict[str, Any] = {}
    # huggingface_hub 2.4 retries a failed HEAD request unless retry_on_errors is False.
    # NOTE: versions without that argument are assumed not to retry; only 2.4 was checked.
    if "retry_on_errors" in inspect.signature(get_hf_file_metadata).parameters:
        options["retry_on_errors"] = False

    try:
        get_hf_file_metadata(
            url,
            token=token,
            timeout=constants.HF_HUB_ETAG_TIMEOUT,
            library_name="gaia-builder",
            library_version=__version__,
            **options,
        )
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as error:
        raise _source_error(repo_id, filename, revision, error) from error
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            raise _source_error(repo_id, filename, revision, error) from error
        return error
    # huggingface_hub raises the errors of its HTTP library (requests before 1.0, httpx after),
    # which share no base class with its own, so whatever else fails means "unreachable".
    except Exception as error:
        return error
    return None


def _download_file(
    repo_id: str, filename: str, revision: str | None, cache_dir: str | None, token: str | bool | None
) -> str:
    try:
        path: str = hf_hub_download(
            repo_id,
            filename,
            repo_type="dataset",
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            library_name="gaia-builder",
            library_version=__version__,
        )
    except (ValueError, TypeError):
        # Invalid arguments, such as a malformed repo_id: the message of huggingface_hub is clear.
        raise
    # As in _probe_hub, the HTTP library's errors have no common base class with the Hub's.
    except Exception as error:
        raise _source_error(repo_id, filename, revision, error) from error

    logger.info("downloaded %s of dataset %s to %s", filename, repo_id, path)
    return path


def _cached_file(
    repo_id: str, filename: str, revision: str | None, cache_dir: str | None, unreachable: Exception | None
) -> str:
    try:
        path: str = hf_hub_download(
            repo_id,
            filename,
            repo_type="dataset",
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=True,
        )
    except LocalEntryNotFoundError as error:
        cause = unreachable or error
        raise _source_error(repo_id, filename, revision, cause, cached=False) from cause

    if unreachable is not None:
        logger.warning(
            "cannot reach %s (%s): using the cached copy of %s of dataset %s at %s, which may be out of date",
            constants.ENDPOINT,
            _describe(unreachable),
            filename,
            repo_id,
            path,
        )
    return path


def _source_error(
    repo_id: str, filename: str, revision: str | None, error: Exception, *, cached: bool | None = None
) -> MetadataSourceError:
    where = f"{filename} of dataset {repo_id}" + (f" at revision {revision!r}" if revision else "")
    endpoint = constants.ENDPOINT
    if isinstance(error, GatedRepoError):
        reason = f"{endpoint} requires accepting the terms of {repo_id} and a token; pass token=..."
    elif isinstance(error, RepositoryNotFoundError):
        reason = f"{endpoint} has no dataset {repo_id!r}, or it is private and needs a token; check repo_id"
    elif isinstance(error, RevisionNotFoundError):
        reason = f"{endpoint} has no revision {revision!r} of {repo_id}; check revision"
    elif isinstance(error, EntryNotFoundError) and not isinstance(error, LocalEntryNotFoundError):
        reason = f"{endpoint} has no file {filename!r} in {repo_id}"
    elif constants.HF_HUB_OFFLINE:
        reason = "HF_HUB_OFFLINE is set and the file is not in the cache; unset HF_HUB_OFFLINE to download it"
    else:
        reason = f"cannot reach {endpoint} ({_describe(error)})"
        if cached is False:
            reason += " and the file is not in the cache"
        reason += "; check the network, or HF_ENDPOINT if you use a mirror"
    return MetadataSourceError(f"cannot download {where}: {reason}. {LOCAL_METADATA_HINT}")


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    first_line = text[0] if text else ""
    return f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__
