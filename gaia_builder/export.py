"""Export a built GAIA split as Parquet for the Hub viewer, or as img2dataset-style WebDataset shards.

:func:`export_parquet` writes the layout that ``Dataset.push_to_hub`` uploads: a dataset card
(``README.md``) whose YAML names the config, the data files of each split and the features, and
``data/{split}-NNNNN-of-NNNNN.parquet`` files with the image bytes embedded. Uploading the
folder as a dataset repository is left to the user (``huggingface-cli upload``): nothing here
sends a request.

:func:`export_webdataset` writes, per split, the files that img2dataset 1.47 wrote for the GAIA
paper: ``NNNNN.tar`` with ``<key>.<ext>``, ``<key>.txt`` and ``<key>.json`` per image, beside
``NNNNN.parquet`` (every row of the shard with its status) and ``NNNNN_stats.json``.

Safety rules shared by both:

- Every file is written under a temporary name in its final folder, flushed to disk, then
  renamed with :func:`os.replace`, so a crash never leaves a half-written file under a final
  name. A process that is killed can leave temporary files named ``.<name>.<hex>.gaia-tmp``.
  The file written last marks a finished unit, as in img2dataset: ``NNNNN_stats.json`` a
  WebDataset shard, ``README.md`` a Parquet export.
- The output folder must be empty. With ``overwrite=True``, a folder that contains a previous
  export is emptied first, but only of the files that export listed in ``.gaia-export.json``.
  Any other file in the folder makes the export raise :class:`ExportError` before it deletes
  anything. The record lists each file before the file gets its final name, so even a killed
  export can be overwritten.
- No file name is built from a row's values: WebDataset keys are numbers, and split and config
  names are checked against ``[A-Za-z0-9_]+``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import secrets
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets.info import DatasetInfo, DatasetInfosDict
from datasets.splits import SplitDict, SplitInfo
from datasets.table import embed_table_storage
from datasets.utils.metadata import MetadataConfigs
from huggingface_hub import DatasetCard, DatasetCardData

from . import __version__
from .errors import ExportError
from .features import METADATA_FIELDS

logger = logging.getLogger(__name__)

# push_to_hub writes row groups of at most 100 MB (config.MAX_ROW_GROUP_SIZE in datasets 5.2),
# because the Hub viewer rejects row groups of about 300 MB. 500 MB per file is datasets'
# MAX_SHARD_SIZE.
DEFAULT_MAX_ROW_GROUP_BYTES = 100 * 2**20
DEFAULT_MAX_FILE_BYTES = 500 * 2**20

# img2dataset's number_sample_per_shard in the GAIA recipe.
DEFAULT_SAMPLES_PER_SHARD = 512

RECORD_NAME = ".gaia-export.json"
_TEMP_SUFFIX = ".gaia-tmp"
_TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{8}\.gaia-tmp")
_SAFE_NAME = re.compile(r"[A-Za-z0-9_]+")

# Rows read at once while filling a shard, which bounds memory to this many images. Sizing a
# split reads no image bytes, so it takes larger batches.
_BATCH_ROWS = 64
_SCAN_BATCH_ROWS = 1000

# Parquet stores each value with a few bytes of framing (length prefixes, definition and
# repetition levels, page headers). Counting 8 bytes per leaf value keeps the planned size at
# or above what pyarrow 26 reports as a row group's total_byte_size, and tests check the bound.
_BYTES_PER_LEAF_VALUE = 8

# Room kept in each file for its footer and page index. Measured with pyarrow 26 on GAIA's 22
# leaf columns: about 5.5 kB per file (the schema with the features JSON, twice) and about
# 160 bytes per leaf column per row group. The reserves are about twice that.
_FILE_RESERVE_BYTES = 8192
_ROW_GROUP_RESERVE_BYTES_PER_LEAF = 320


@dataclass(frozen=True)
class ExportSummary:
    """Files and row counts of a finished export.

    ``files`` are the files written, in order, except the ``.gaia-export.json`` record.
    ``rows`` and ``rows_with_image`` count the rows of each split and those with an image.
    ``num_bytes`` is the size of ``files`` on disk.
    """

    output_dir: Path
    files: tuple[Path, ...]
    rows: Mapping[str, int]
    rows_with_image: Mapping[str, int]
    num_bytes: int


# --------------------------------------------------------------------------------------------
# The output folder: emptiness check, overwrite, atomic writes and the record of written files.
# --------------------------------------------------------------------------------------------


class _OutputFolder:
    """Output folder of one export, which records every file and folder before creating it."""

    def __init__(self, root: Path, export_format: str) -> None:
        self.root = root
        self.export_format = export_format
        self.files: list[str] = []
        self.dirs: list[str] = []

    def prepare(self, overwrite: bool) -> None:
        """Create the folder, or check that it is empty, or remove a previous export from it."""
        if self.root.exists() and not self.root.is_dir():
            raise ExportError(f"output path {self.root} is a file, not a folder; choose a folder path")
        self.root.mkdir(parents=True, exist_ok=True)

        if any(self.root.iterdir()):
            if not overwrite:
                raise ExportError(
                    f"output folder {self.root} is not empty; choose an empty folder, or pass "
                    "overwrite=True to replace a previous gaia export there"
                )
            _remove_previous_export(self.root)

        self._write_record(complete=False)

    def make_dir(self, relative: str) -> None:
        """Create a subfolder, after recording it."""
        self.dirs.append(relative)
        self._write_record(complete=False)
        (self.root / relative).mkdir(exist_ok=True)

    @contextmanager
    def open_atomic(self, relative: str) -> Iterator[BinaryIO]:
        """Open ``relative`` for writing under a temporary name, renamed only if the block succeeds."""
        final = self.root / relative
        temp = final.with_name(f".{final.name}.{secrets.token_hex(4)}{_TEMP_SUFFIX}")
        try:
            with open(temp, "xb") as file:
                yield file
                file.flush()
                os.fsync(file.fileno())
            self.files.append(relative)
            self._write_record(complete=False)
            os.replace(temp, final)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise

    def write_bytes(self, relative: str, data: bytes) -> None:
        with self.open_atomic(relative) as file:
            file.write(data)

    def finish(self) -> None:
        """Mark the export complete in its record."""
        self._write_record(complete=True)

    def summary(self, rows: Mapping[str, int], rows_with_image: Mapping[str, int]) -> ExportSummary:
        paths = tuple(self.root / relative for relative in self.files)
        return ExportSummary(
            output_dir=self.root,
            files=paths,
            rows=dict(rows),
            rows_with_image=dict(rows_with_image),
            num_bytes=sum(path.stat().st_size for path in paths),
        )

    def _write_record(self, complete: bool) -> None:
        record = {
            "format": self.export_format,
            "gaia_builder_version": __version__,
            "complete": complete,
            "dirs": self.dirs,
            "files": self.files,
        }
        final = self.root / RECORD_NAME
        temp = final.with_name(f".{final.name}.{secrets.token_hex(4)}{_TEMP_SUFFIX}")
        temp.write_text(json.dumps(record, indent=2), encoding="utf-8")
        os.replace(temp, final)


def _read_record(root: Path) -> tuple[list[str], list[str]]:
    path = root / RECORD_NAME
    if not path.is_file():
        raise ExportError(
            f"output folder {root} is not empty and contains no record of a previous gaia export "
            f"({RECORD_NAME} is missing). gaia deletes only files it wrote, so empty the folder "
            "yourself or choose another one"
        )
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        files = [str(name) for name in record["files"]]
        dirs = [str(name) for name in record["dirs"]]
    except (ValueError, KeyError, TypeError) as error:
        raise ExportError(
            f"invalid export record {path} ({error}); empty the folder yourself or choose another one"
        ) from error
    return files, dirs


def _inside(root: Path, relative: str) -> Path:
    """Resolve a recorded path, which must name something strictly inside ``root``."""
    path = (root / relative).resolve()
    base = root.resolve()
    if path == base or base not in path.parents:
        raise ExportError(
            f"{root / RECORD_NAME} lists {relative!r}, which is outside the folder; "
            "empty the folder yourself or choose another one"
        )
    return path


def _remove_previous_export(root: Path) -> None:
    """Delete the files a previous export recorded, after checking that nothing else is there."""
    files, dirs = _read_record(root)
    file_paths = {_inside(root, name) for name in files}
    dir_paths = {_inside(root, name) for name in dirs}
    record_path = (root / RECORD_NAME).resolve()

    foreign = [str(path.relative_to(root.resolve())) for path in file_paths if path.is_dir()]
    temps: list[Path] = []
    for folder in [root.resolve(), *sorted(dir_paths)]:
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry in file_paths or entry in dir_paths or entry == record_path:
                continue
            if entry.is_file() and _TEMP_NAME.fullmatch(entry.name):
                temps.append(entry)
            else:
                foreign.append(str(entry.relative_to(root.resolve())))
    if foreign:
        shown = ", ".join(sorted(foreign)[:5])
        raise ExportError(
            f"output folder {root} contains files that no gaia export wrote ({shown}); "
            "move them away or choose another folder"
        )

    for path in [*file_paths, *temps]:
        path.unlink(missing_ok=True)
    for folder in sorted(dir_paths, key=lambda path: len(path.parts), reverse=True):
        if folder.is_dir():
            folder.rmdir()
    record_path.unlink()
    logger.info("removed a previous export of %d files from %s", len(file_paths), root)


# --------------------------------------------------------------------------------------------
# Checks of the arguments.
# --------------------------------------------------------------------------------------------


def _check_splits(splits: Mapping[str, datasets.Dataset]) -> dict[str, datasets.Dataset]:
    if not splits:
        raise ExportError("no split to export; pass a mapping such as {'validation': dataset}")

    checked: dict[str, datasets.Dataset] = {}
    for name, dataset in splits.items():
        if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
            raise ExportError(
                f"invalid split name {name!r}: split names become file names, so use only "
                "letters, digits and underscores, such as 'train' or 'validation'"
            )
        if not isinstance(dataset, datasets.Dataset):
            raise ExportError(f"split {name!r} is a {type(dataset).__name__}, not a datasets.Dataset")
        if len(dataset) == 0:
            # datasets cannot load a split whose data files hold no rows.
            raise ExportError(f"split {name!r} has no rows; leave it out of the export")
        checked[name] = dataset

    first_name, first = next(iter(checked.items()))
    for name, dataset in checked.items():
        if dataset.features != first.features:
            raise ExportError(
                f"split {name!r} has other features than split {first_name!r}; export splits of one "
                "build together (one config has one set of features)"
            )
    return checked


def _check_whole_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ExportError(f"invalid value for {name}: {value!r}; expected a whole number of at least 1")


def _image_columns(features: datasets.Features) -> list[str]:
    return [name for name, feature in features.items() if isinstance(feature, datasets.Image)]


# --------------------------------------------------------------------------------------------
# Parquet for the Hub viewer.
# --------------------------------------------------------------------------------------------


@dataclass
class _SplitScan:
    """Per-row sizes and counts of one split, read before any Parquet file is written."""

    row_bytes: np.ndarray
    rows_with_image: int
    error_classes: Counter[str]
    has_external_images: bool


def export_parquet(
    splits: Mapping[str, datasets.Dataset],
    output_dir: str | os.PathLike[str],
    *,
    config_name: str,
    build_options: Mapping[str, object],
    overwrite: bool = False,
    max_row_group_bytes: int = DEFAULT_MAX_ROW_GROUP_BYTES,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> ExportSummary:
    """Write ``splits`` as a Hub dataset repository: Parquet with embedded images and a card.

    Rows are packed in order into row groups of at most ``max_row_group_bytes`` and files of at
    most ``max_file_bytes``, sized by each row's image bytes and text. A single row larger than
    a limit gets a row group or file of its own, with a warning. ``build_options`` are the
    options the split was built with, which the card lists. The card is written last, so a
    folder without ``README.md`` contains an unfinished export.
    """
    _check_whole_number("max_row_group_bytes", max_row_group_bytes)
    _check_whole_number("max_file_bytes", max_file_bytes)
    if not isinstance(config_name, str) or not _SAFE_NAME.fullmatch(config_name):
        raise ExportError(
            f"invalid config_name {config_name!r}: use letters, digits and underscores, such as 'default'"
        )
    checked = _check_splits(splits)
    features = next(iter(checked.values())).features

    folder = _OutputFolder(Path(output_dir), "parquet")
    folder.prepare(overwrite)
    folder.make_dir("data")

    schema = features.arrow_schema
    options = _parquet_writer_options(features, schema)
    limits = _PackingLimits.for_schema(schema, max_row_group_bytes, max_file_bytes)
    scans: dict[str, _SplitScan] = {}
    download_size = 0
    for split, dataset in checked.items():
        scan = _scan_split(split, dataset, _image_columns(features))
        plan = _plan_files(split, scan.row_bytes, limits)
        for index, groups in enumerate(plan):
            relative = f"data/{split}-{index:05d}-of-{len(plan):05d}.parquet"
            _write_parquet_file(folder, relative, dataset, groups, schema, options, scan.has_external_images)
            download_size += (folder.root / relative).stat().st_size
        scans[split] = scan
        logger.info(
            "wrote split %r as %d Parquet files: %d rows, %d with an image",
            split,
            len(plan),
            len(dataset),
            scan.rows_with_image,
        )

    card = _dataset_card(config_name, features, checked, scans, build_options, download_size)
    folder.write_bytes("README.md", card.encode("utf-8"))
    folder.finish()
    return folder.summary(
        rows={split: len(dataset) for split, dataset in checked.items()},
        rows_with_image={split: scan.rows_with_image for split, scan in scans.items()},
    )


def _parquet_writer_options(features: datasets.Features, schema: pa.Schema) -> dict[str, Any]:
    """Return the ParquetWriter options of push_to_hub, without statistics on image bytes."""
    options: dict[str, Any] = {"write_page_index": True}

    # datasets 5.2 stores embedded bytes uncompressed and PLAIN-encoded, and cuts pages by
    # content-defined chunking so that re-uploads deduplicate on the Hub. Where the installed
    # datasets lacks these helpers, pyarrow's defaults apply.
    try:
        from datasets.arrow_writer import get_parquet_column_options
    except ImportError:
        get_parquet_column_options = None
    if get_parquet_column_options is not None:
        options.update(get_parquet_column_options(features, schema))
    cdc_options = getattr(datasets.config, "DEFAULT_CDC_OPTIONS", None)
    if cdc_options is not None:
        options["use_content_defined_chunking"] = cdc_options

    # Minimum and maximum statistics of image bytes are whole images (up to pyarrow's 4 kB
    # statistics limit) in the footer and page index, and no reader filters on them.
    image_columns = set(_image_columns(features))
    options["write_statistics"] = [
        path
        for name in schema.names
        if name not in image_columns
        for path in _leaf_paths(name, schema.field(name).type)
    ]
    return options


def _leaf_paths(path: str, kind: pa.DataType) -> list[str]:
    """Return the Parquet leaf column paths of a field, such as ``captions.list.element``."""
    if pa.types.is_struct(kind):
        return [leaf for child in kind for leaf in _leaf_paths(f"{path}.{child.name}", child.type)]
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return _leaf_paths(f"{path}.list.element", kind.value_type)
    return [path]


def _scan_split(split: str, dataset: datasets.Dataset, image_columns: Sequence[str]) -> _SplitScan:
    """Size every row and count images and error classes, reading offsets but no image bytes."""
    sizes: list[np.ndarray] = []
    rows_with_image = 0
    error_classes: Counter[str] = Counter()
    has_external_images = False

    offset = 0
    for batch in dataset.with_format("arrow").iter(batch_size=_SCAN_BATCH_ROWS):
        batch_sizes = np.zeros(batch.num_rows, dtype=np.int64)
        for column in batch.columns:
            batch_sizes += _per_chunk(column, _row_bytes)
        for name in image_columns:
            external = _external_image_bytes(split, name, batch.column(name), offset)
            has_external_images = has_external_images or bool(external.any())
            batch_sizes += external
        if image_columns:
            rows_with_image += int(_per_chunk(batch.column(image_columns[0]), _has_image).sum())
        if "error" in batch.column_names:
            error_classes.update(_error_class(text) for text in batch.column("error").to_pylist() if text)
        sizes.append(batch_sizes)
        offset += batch.num_rows

    row_bytes = np.concatenate(sizes) if sizes else np.zeros(0, dtype=np.int64)
    return _SplitScan(row_bytes, rows_with_image, error_classes, has_external_images)


def _per_chunk(column: pa.ChunkedArray, function: Callable[[pa.Array], np.ndarray]) -> np.ndarray:
    """Apply ``function`` to each chunk and join the results.

    Chunks are not combined, because combining copies every image.
    """
    results = [function(chunk) for chunk in column.chunks]
    return np.concatenate(results) if results else np.zeros(0, dtype=np.int64)


def _row_bytes(array: pa.Array) -> np.ndarray:
    """Return the bytes each value of ``array`` takes in Parquet, framing included (an estimate)."""
    data, leaves = _value_bytes(array)
    return data + _BYTES_PER_LEAF_VALUE * leaves


def _value_bytes(array: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Return, per row of ``array``, its data bytes and its number of leaf values."""
    kind = array.type
    rows = len(array)

    if pa.types.is_struct(kind):
        data = np.zeros(rows, dtype=np.int64)
        leaves = np.zeros(rows, dtype=np.int64)
        for index in range(kind.num_fields):
            child_data, child_leaves = _value_bytes(pc.struct_field(array, [index]))
            data += child_data
            leaves += child_leaves
        return data, leaves

    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        child_data, child_leaves = _value_bytes(pc.list_flatten(array))
        parents = pc.list_parent_indices(array).to_numpy()
        data = np.bincount(parents, weights=child_data, minlength=rows).astype(np.int64)
        # A null or empty list is still one leaf entry (its definition level).
        leaves = np.maximum(np.bincount(parents, weights=child_leaves, minlength=rows).astype(np.int64), 1)
        return data, leaves

    if pa.types.is_binary(kind) or pa.types.is_string(kind) or _is_large_binary_or_string(kind):
        lengths = pc.fill_null(pc.binary_length(array), 0)
        return lengths.to_numpy().astype(np.int64), np.ones(rows, dtype=np.int64)

    try:
        width = max(1, kind.bit_width // 8)
    except ValueError:  # a variable-width type that GAIA's features do not use
        width = 8
    return np.full(rows, width, dtype=np.int64), np.ones(rows, dtype=np.int64)


def _is_large_binary_or_string(kind: pa.DataType) -> bool:
    return bool(pa.types.is_large_binary(kind) or pa.types.is_large_string(kind))


def _external_image_bytes(split: str, column: str, images: pa.ChunkedArray, offset: int) -> np.ndarray:
    """Return the file sizes of images stored as a local path only, which are embedded when written."""
    sizes = np.zeros(len(images), dtype=np.int64)
    data = pc.struct_field(images, ["bytes"])
    paths = pc.struct_field(images, ["path"])
    missing = pc.and_(pc.is_null(data), pc.is_valid(paths))
    for index in np.flatnonzero(missing.to_numpy()):
        path = paths[int(index)].as_py()
        if not os.path.isfile(path):
            raise ExportError(
                f"row {offset + int(index)} of split {split!r}: column {column!r} has no image bytes and its "
                f"path {path!r} is not a local file; rebuild the split so that it stores image bytes"
            )
        sizes[index] = os.path.getsize(path)
    return sizes


def _has_image(images: pa.Array) -> np.ndarray:
    """Return, per row, 1 where the image struct contains bytes or a path, else 0."""
    stored = pc.or_(
        pc.is_valid(pc.struct_field(images, ["bytes"])), pc.is_valid(pc.struct_field(images, ["path"]))
    )
    present = pc.and_(pc.is_valid(images), pc.fill_null(stored, False))
    return present.to_numpy(zero_copy_only=False).astype(np.int64)


def _error_class(text: str) -> str:
    """Return the class of an ``error`` value of the form ``"<class>: <detail>"``."""
    return text.partition(": ")[0]


@dataclass(frozen=True)
class _PackingLimits:
    """Byte budgets of a row group and of a file, and the footer room a row group costs."""

    row_group_bytes: int
    file_bytes: int
    row_group_reserve: int

    @classmethod
    def for_schema(cls, schema: pa.Schema, max_row_group_bytes: int, max_file_bytes: int) -> _PackingLimits:
        leaves = sum(len(_leaf_paths(name, schema.field(name).type)) for name in schema.names)
        metadata = sum(len(key) + len(value) for key, value in (schema.metadata or {}).items())
        file_reserve = _FILE_RESERVE_BYTES + 2 * metadata
        return cls(
            row_group_bytes=max_row_group_bytes,
            file_bytes=max(1, max_file_bytes - file_reserve),
            row_group_reserve=leaves * _ROW_GROUP_RESERVE_BYTES_PER_LEAF,
        )


def _plan_files(split: str, row_bytes: np.ndarray, limits: _PackingLimits) -> list[list[tuple[int, int]]]:
    """Pack rows in order into row groups, and row groups into files; return row ranges per file."""
    groups = _pack(row_bytes, limits.row_group_bytes)
    for start, stop in groups:
        size = int(row_bytes[start:stop].sum())
        if size > limits.row_group_bytes:
            logger.warning(
                "row %d of split %r takes %d bytes, more than max_row_group_bytes=%d; it gets a row group "
                "of its own, which the Hub viewer may fail to read",
                start,
                split,
                size,
                limits.row_group_bytes,
            )

    group_costs = [int(row_bytes[start:stop].sum()) + limits.row_group_reserve for start, stop in groups]
    files = _pack(np.array(group_costs, dtype=np.int64), limits.file_bytes)
    return [groups[first:last] for first, last in files]


def _pack(sizes: np.ndarray, limit: int) -> list[tuple[int, int]]:
    """Cut ``sizes`` into consecutive ranges whose sums stay within ``limit``.

    An item larger than ``limit`` gets a range of its own.
    """
    ranges: list[tuple[int, int]] = []
    start = 0
    total = 0
    for index, size in enumerate(sizes.tolist()):
        if index > start and total + size > limit:
            ranges.append((start, index))
            start = index
            total = 0
        total += size
    if start < len(sizes):
        ranges.append((start, len(sizes)))
    return ranges


def _write_parquet_file(
    folder: _OutputFolder,
    relative: str,
    dataset: datasets.Dataset,
    groups: Sequence[tuple[int, int]],
    schema: pa.Schema,
    options: Mapping[str, Any],
    embed: bool,
) -> None:
    """Write one Parquet file holding one row group per range in ``groups``."""
    rows = dataset.with_format("arrow")
    with folder.open_atomic(relative) as file:
        writer = pq.ParquetWriter(file, schema, **options)
        try:
            for start, stop in groups:
                table = rows[start:stop]
                if embed:
                    table = embed_table_storage(table)
                writer.write_table(table.cast(schema), row_group_size=stop - start)
        finally:
            writer.close()


# --------------------------------------------------------------------------------------------
# The dataset card.
# --------------------------------------------------------------------------------------------

_CITATION = """\
@article{zavras2025gaia,
  title={GAIA: A Global, Multi-modal, Multi-scale Vision-Language Dataset for Remote Sensing Image Analysis},
  author={Zavras, Angelos and Michail, Dimitrios and Zhu, Xiao Xiang and Demir, Beg{\\"u}m
          and Papoutsis, Ioannis},
  journal={arXiv preprint arXiv:2502.09598},
  year={2025}
}"""

_TAGS = ["remote-sensing", "satellite-imagery", "earth-observation", "image-captioning"]

# Hub task categories: captioning (image-to-text) and the CLIP-style zero-shot classification
# that the GAIA paper evaluates.
_TASK_CATEGORIES = ["image-to-text", "zero-shot-image-classification"]


def _size_category(rows: int) -> str:
    """Return the Hub's size_categories bucket for a row count."""
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")]
    for bound, label in bounds:
        if rows < bound:
            return label
    return "1M<n<10M"


def _dataset_card(
    config_name: str,
    features: datasets.Features,
    splits: Mapping[str, datasets.Dataset],
    scans: Mapping[str, _SplitScan],
    build_options: Mapping[str, object],
    download_size: int,
) -> str:
    card_data = DatasetCardData(
        license="mit",
        language=["en"],
        pretty_name="GAIA",
        task_categories=_TASK_CATEGORIES,
        tags=_TAGS,
        annotations_creators=["machine-generated"],
        size_categories=[_size_category(sum(len(dataset) for dataset in splits.values()))],
    )

    info = DatasetInfo(features=features, splits=SplitDict(), download_size=download_size)
    for split, dataset in splits.items():
        num_bytes = int(scans[split].row_bytes.sum())
        info.splits.add(SplitInfo(name=split, num_bytes=num_bytes, num_examples=len(dataset)))
    info.dataset_size = sum(split_info.num_bytes for split_info in info.splits.values())
    DatasetInfosDict({config_name: info}).to_dataset_card_data(card_data)

    data_files = [{"split": split, "path": f"data/{split}-*"} for split in splits]
    MetadataConfigs({config_name: {"data_files": data_files}}).to_dataset_card_data(card_data)

    body = _card_body(config_name, splits, scans, build_options, has_images=bool(_image_columns(features)))
    return str(DatasetCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}"))


def _card_body(
    config_name: str,
    splits: Mapping[str, datasets.Dataset],
    scans: Mapping[str, _SplitScan],
    build_options: Mapping[str, object],
    has_images: bool,
) -> str:
    options = json.dumps(dict(build_options), indent=2, sort_keys=True, default=str)
    sections = [
        _CARD_INTRO,
        _CARD_RIGHTS,
        _CARD_BUILD.format(version=__version__, config_name=config_name, options=options),
        _card_counts(splits, scans, has_images),
        _CARD_COLUMNS,
        "## Citation\n\n```bibtex\n" + _CITATION + "\n```\n",
    ]
    return "\n".join(sections)


_CARD_INTRO = """\
# GAIA

GAIA is a global vision-language dataset for remote sensing. The first version of its paper,
[GAIA: A Global, Multi-modal, Multi-scale Vision-Language Dataset for Remote Sensing Image
Analysis](https://arxiv.org/abs/2502.09598) (Zavras et al., 2025), describes 41,030 images
observed between 1998 and 2024 all over the globe, each with 5 captions written by GPT-4o
(205,150 image-text pairs); a later revision counts 40,201 images. The images were scraped with
their titles from remote-sensing publishers, and each row carries its location, sensor,
satellite, modality and resolution class.

The metadata and captions come from the authors' files in the Hub dataset `azavras/GAIA`. The
images in this copy were fetched from their publishers by
[gaia-builder](https://pypi.org/project/gaia-builder/).
"""

_CARD_RIGHTS = """\
## License and image rights

The metadata and captions are released under the MIT license. The images are not covered by
it: each image belongs to its publisher, named in the row's `credits` field (for example NASA,
ESA, Copernicus or EUMETSAT), and the publisher's terms of use apply to it.
"""

_CARD_BUILD = """\
## How this copy was built

With gaia-builder {version}, config `{config_name}`, and these build options:

```json
{options}
```

A row whose image could not be fetched or decoded is kept: its `image` is null and its `error`
is `<class>: <detail>`, where the class names the failure (for example `http_404`, `timeout`
or `not_an_image`). `sha256` is the SHA-256 of the bytes the publisher sent, before any
resizing.
"""

_CARD_COLUMNS = """\
## Columns

- `id`: the slug of the source page; `image_src`: the image URL; `image_alt`: the scraped title.
- `captions`: the 5 GPT-4o captions; `credits`: the image's publisher.
- `location`, `lat`, `lon`: the place shown (the coordinates are synthetic, and a few are out
  of range); `tag`: 3 free-text tags.
- `resolution`: the sensor class ("Low" to "Very High", not pixels); `satellite`, `sensor`,
  `modalities`: lists of free text.
- `image`, `error`, `width`, `height`, `original_width`, `original_height`, `sha256`,
  `final_url`: the stored image and its provenance (absent from the metadata-only config).
"""


def _card_counts(
    splits: Mapping[str, datasets.Dataset], scans: Mapping[str, _SplitScan], has_images: bool
) -> str:
    lines = ["## Splits", ""]
    if not has_images:
        lines += ["| split | rows |", "|---|---:|"]
        lines += [f"| {split} | {len(dataset):,} |" for split, dataset in splits.items()]
        return "\n".join(lines) + "\n"

    lines += ["| split | rows | with image | without image |", "|---|---:|---:|---:|"]
    for split, dataset in splits.items():
        with_image = scans[split].rows_with_image
        lines.append(f"| {split} | {len(dataset):,} | {with_image:,} | {len(dataset) - with_image:,} |")

    lines += [
        "",
        "Rows without an image, by error class:",
        "",
        "| split | error class | rows |",
        "|---|---|---:|",
    ]
    failures = [
        (split, name, count) for split in splits for name, count in sorted(scans[split].error_classes.items())
    ]
    lines += [f"| {split} | `{name}` | {count:,} |" for split, name, count in failures]
    if not failures:
        lines.append("| all | none | 0 |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# WebDataset shards as img2dataset 1.47 writes them.
# --------------------------------------------------------------------------------------------

# img2dataset's oom_shard_count: shard names and the shard part of keys have 5 digits.
_SHARD_DIGITS = 5

_WEBDATASET_COLUMNS = (
    *METADATA_FIELDS,
    "image",
    "error",
    "width",
    "height",
    "original_width",
    "original_height",
    "sha256",
)

# img2dataset reports a failure after the bytes arrived (decoding, resizing, size checks) as
# failed_to_resize, and every failure before that as failed_to_download.
_RESIZE_ERROR_CLASSES = frozenset({"not_an_image", "unsupported_format", "decode_error", "too_many_pixels"})

# Columns of the per-shard Parquet file and of <key>.json after the metadata fields, in
# img2dataset's order: caption and url (image_alt and image_src, renamed as img2dataset renames
# caption_col and url_col), then the columns img2dataset adds.
_SHARD_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("caption", pa.string()),
    ("url", pa.string()),
    ("key", pa.string()),
    ("status", pa.string()),
    ("error_message", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("original_width", pa.int32()),
    ("original_height", pa.int32()),
    ("exif", pa.string()),
    ("sha256", pa.string()),
)

# Tar members get fixed metadata, so the same rows always give the same bytes. 0o444 is the mode
# of webdataset's TarWriter, which img2dataset uses.
_TAR_MTIME = 0
_TAR_MODE = 0o444

# Image formats by their leading bytes, with the member extensions accepted for each (the first is
# the default). Hand-written because Pillow's Image.open rejects images above twice its
# MAX_IMAGE_PIXELS before it reports their format, and publisher originals reach 233 Mpx.
_MAGIC_FORMATS: tuple[tuple[bytes, int, str, tuple[str, ...]], ...] = (
    (b"\x89PNG\r\n\x1a\n", 0, "PNG", ("png",)),
    (b"\xff\xd8\xff", 0, "JPEG", ("jpg", "jpeg")),
    (b"GIF87a", 0, "GIF", ("gif",)),
    (b"GIF89a", 0, "GIF", ("gif",)),
    (b"WEBP", 8, "WEBP", ("webp",)),
    (b"II*\x00", 0, "TIFF", ("tif", "tiff")),
    (b"MM\x00*", 0, "TIFF", ("tif", "tiff")),
    (b"BM", 0, "BMP", ("bmp",)),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", 0, "JPEG 2000", ("jp2",)),
)


@dataclass
class _ShardStats:
    """The counts img2dataset writes to NNNNN_stats.json."""

    count: int = 0
    successes: int = 0
    failed_to_download: int = 0
    failed_to_resize: int = 0
    status_dict: Counter[str] = field(default_factory=Counter)


def export_webdataset(
    splits: Mapping[str, datasets.Dataset],
    output_dir: str | os.PathLike[str],
    *,
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    overwrite: bool = False,
    image_extension: str | None = None,
) -> ExportSummary:
    """Write ``splits`` as WebDataset shards that notebooks written for img2dataset can read.

    Each split goes to ``DIR/{split}/``. Rows are taken in order, ``samples_per_shard`` per
    shard. Every row gets a key, but only rows with an image go into the tar, as img2dataset
    does with failed downloads.

    ``image_extension`` is the extension of every image member, such as ``"png"``, and an
    image in another format raises ExportError. With None, each image member is named by the
    image's own format.
    """
    _check_whole_number("samples_per_shard", samples_per_shard)
    _check_image_extension(image_extension)
    checked = _check_splits(splits)
    features = next(iter(checked.values())).features
    _check_webdataset_columns(features)

    folder = _OutputFolder(Path(output_dir), "webdataset")
    folder.prepare(overwrite)

    shard_schema = _shard_schema(features)
    key_digits = _key_digits(samples_per_shard)
    rows_with_image: dict[str, int] = {}
    for split, dataset in checked.items():
        folder.make_dir(split)
        successes = 0
        for shard_id, start in enumerate(range(0, len(dataset), samples_per_shard)):
            stop = min(start + samples_per_shard, len(dataset))
            location = _ShardLocation(split, shard_id, start, stop, key_digits)
            stats = _write_shard(folder, dataset, location, shard_schema, image_extension)
            successes += stats.successes
        rows_with_image[split] = successes
        logger.info(
            "wrote split %r as %d WebDataset shards: %d rows, %d with an image",
            split,
            -(-len(dataset) // samples_per_shard),
            len(dataset),
            successes,
        )

    folder.finish()
    return folder.summary(
        rows={split: len(dataset) for split, dataset in checked.items()},
        rows_with_image=rows_with_image,
    )


def _check_image_extension(extension: str | None) -> None:
    if extension is None:
        return
    known = sorted({name for *_, names in _MAGIC_FORMATS for name in names})
    if extension not in known:
        raise ExportError(
            f"invalid value for image_extension: {extension!r}; expected None or one of {known}"
        )


def _check_webdataset_columns(features: datasets.Features) -> None:
    if "image" not in features:
        raise ExportError(
            "the splits have no image column (a build of the metadata config); WebDataset shards "
            "hold images, so export a build of the default or original config"
        )
    missing = [name for name in _WEBDATASET_COLUMNS if name not in features]
    if missing:
        raise ExportError(f"the splits lack the columns {missing}, which the WebDataset .json files hold")


def _key_digits(samples_per_shard: int) -> int:
    """Return the digits of the index part of a key.

    img2dataset 1.47 uses ceil(log10(number_sample_per_shard)). That equals the number of
    digits of samples_per_shard - 1 (0 for one sample per shard), computed here on integers
    to avoid float rounding at powers of ten.
    """
    return len(str(samples_per_shard - 1)) if samples_per_shard > 1 else 0


def _sample_key(shard_id: int, index: int, key_digits: int) -> str:
    """Return img2dataset's key: shard_id * 10**key_digits + index, zero-padded to 5 + key_digits."""
    return f"{shard_id * 10**key_digits + index:0{_SHARD_DIGITS + key_digits}d}"


def _shard_schema(features: datasets.Features) -> pa.Schema:
    metadata = [pa.field(name, features.arrow_schema.field(name).type) for name in METADATA_FIELDS]
    return pa.schema(metadata + [pa.field(name, kind) for name, kind in _SHARD_COLUMNS])


@dataclass(frozen=True)
class _ShardLocation:
    """Split, number, row range [start, stop) and key digits of one shard."""

    split: str
    shard_id: int
    start: int
    stop: int
    key_digits: int

    @property
    def name(self) -> str:
        return f"{self.split}/{self.shard_id:0{_SHARD_DIGITS}d}"


def _write_shard(
    folder: _OutputFolder,
    dataset: datasets.Dataset,
    location: _ShardLocation,
    shard_schema: pa.Schema,
    image_extension: str | None,
) -> _ShardStats:
    """Write one shard's tar, Parquet and stats files, the stats file last as in img2dataset."""
    start_time = time.time()
    stats = _ShardStats()
    records: list[dict[str, Any]] = []

    rows = dataset.with_format("arrow")
    with (
        folder.open_atomic(f"{location.name}.tar") as file,
        tarfile.open(fileobj=file, mode="w", format=tarfile.USTAR_FORMAT) as tar,
    ):
        for batch_start in range(location.start, location.stop, _BATCH_ROWS):
            batch = rows[batch_start : min(batch_start + _BATCH_ROWS, location.stop)].to_pylist()
            for row_index, row in enumerate(batch, start=batch_start):
                record = _write_sample(tar, row, row_index, location, image_extension)
                _count(stats, record)
                records.append(record)

    with folder.open_atomic(f"{location.name}.parquet") as file:
        pq.write_table(pa.Table.from_pylist(records, schema=shard_schema), file)

    end_time = time.time()
    stats_json = {
        "count": stats.count,
        "successes": stats.successes,
        "failed_to_download": stats.failed_to_download,
        "failed_to_resize": stats.failed_to_resize,
        # img2dataset times the download of the shard, but here the export of the shard is timed.
        "duration": end_time - start_time,
        "start_time": start_time,
        "end_time": end_time,
        "status_dict": dict(stats.status_dict),
    }
    folder.write_bytes(f"{location.name}_stats.json", json.dumps(stats_json, indent=4).encode("utf-8"))
    return stats


def _write_sample(
    tar: tarfile.TarFile,
    row: dict[str, Any],
    row_index: int,
    location: _ShardLocation,
    image_extension: str | None,
) -> dict[str, Any]:
    """Add one row's members to the tar if it has an image, and return its img2dataset record."""
    key = _sample_key(location.shard_id, row_index - location.start, location.key_digits)
    where = f"row {row_index} (id {row['id']!r}) of split {location.split!r}"
    image = _image_bytes(row["image"], where)
    record = _sample_record(row, key, has_image=image is not None)
    if image is None:
        return record

    extension = _image_extension(image, image_extension, where)
    caption = row["image_alt"]
    members = {
        extension: image,
        "txt": ("" if caption is None else str(caption)).encode("utf-8"),
        # img2dataset writes json.dumps(meta, indent=4), with ASCII escapes.
        "json": json.dumps(record, indent=4).encode("utf-8"),
    }
    # Sorted by extension, the member order of webdataset's TarWriter.
    for suffix in sorted(members):
        _add_member(tar, f"{key}.{suffix}", members[suffix])
    return record


def _image_bytes(image: dict[str, Any] | None, where: str) -> bytes | None:
    if image is None:
        return None
    if image.get("bytes") is not None:
        return bytes(image["bytes"])
    path = image.get("path")
    if path is None:
        return None
    if not os.path.isfile(path):
        raise ExportError(
            f"{where}: the image has no bytes and its path {path!r} is not a local file; "
            "rebuild the split so that it stores image bytes"
        )
    return Path(path).read_bytes()


def _sample_record(row: dict[str, Any], key: str, has_image: bool) -> dict[str, Any]:
    """Return the row as img2dataset writes it to <key>.json and the shard's Parquet file."""
    record = {name: row[name] for name in METADATA_FIELDS}
    error = None if has_image else row["error"]
    record.update(
        caption=row["image_alt"],
        url=row["image_src"],
        key=key,
        status=_status(error, has_image),
        error_message=error,
        width=row["width"] if has_image else None,
        height=row["height"] if has_image else None,
        original_width=row["original_width"] if has_image else None,
        original_height=row["original_height"] if has_image else None,
        # NOTE: img2dataset reads EXIF tags from the fetched bytes with exifread. gaia keeps no
        # EXIF of the source, so this is always null.
        exif=None,
        sha256=row["sha256"] if has_image else None,
    )
    return record


def _status(error: str | None, has_image: bool) -> str:
    if has_image:
        return "success"
    if error is not None and _error_class(error) in _RESIZE_ERROR_CLASSES:
        return "failed_to_resize"
    return "failed_to_download"


def _count(stats: _ShardStats, record: Mapping[str, Any]) -> None:
    """Tally a record as img2dataset does: successes under "success", failures by error message."""
    stats.count += 1
    status = record["status"]
    if status == "success":
        stats.successes += 1
        stats.status_dict["success"] += 1
        return

    if status == "failed_to_resize":
        stats.failed_to_resize += 1
    else:
        stats.failed_to_download += 1
    stats.status_dict[record["error_message"] or "no error recorded"] += 1


def _image_extension(data: bytes, requested: str | None, where: str) -> str:
    """Return the member extension of an image, from its leading bytes."""
    for magic, offset, image_format, extensions in _MAGIC_FORMATS:
        if data[offset : offset + len(magic)] == magic:
            if requested is None:
                return extensions[0]
            if requested not in extensions:
                raise ExportError(
                    f"{where}: the image is {image_format}, not {requested}; pass image_extension=None "
                    "to name each image by its own format"
                )
            return requested
    raise ExportError(
        f"{where}: invalid image, its bytes start with {data[:12]!r}, which is not a known image "
        "format. The split is corrupt, so rebuild it"
    )


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = _TAR_MTIME
    info.mode = _TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))
