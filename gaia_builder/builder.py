"""The ``datasets`` builder of GAIA: metadata in, images fetched and processed, rows out."""

from __future__ import annotations

import difflib
import functools
import json
import logging
import math
import os
import uuid
import weakref
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import datasets
from datasets.download.streaming_download_manager import StreamingDownloadManager

from .cache import FetchCache, default_cache_dir
from .config import CONFIG_IMAGE_MODES, OPTION_NAMES, GaiaConfig
from .errors import ConfigError, MetadataError, RowError
from .features import gaia_features
from .metadata import MetadataRow, download_metadata, load_rows, local_metadata_files
from .pipeline import PipelineStats, RowOutcome, RowPipeline
from .registry import DATASET_NAME, builder_hash

logger = logging.getLogger(__name__)

_DESCRIPTION = """\
GAIA is a global, multi-modal, multi-scale vision-language dataset for remote sensing: 41,030
satellite and aerial images from 1998 to 2024, each with five synthetic captions written by
GPT-4o from the publisher's text, and 13 metadata fields (location, coordinates, satellites,
sensors, modalities, resolution class, credits). The metadata is published on the Hugging Face
Hub (azavras/GAIA); the images are fetched from their publishers (NASA, ESA, Copernicus,
EUMETSAT and others), who keep their rights.
"""

_CITATION = """\
@article{zavras2025gaia,
  title   = {GAIA: A Global, Multi-modal, Multi-scale Vision-Language Dataset
             for Remote Sensing Image Analysis},
  author  = {Zavras, Angelos and Michail, Dimitrios and Zhu, Xiao Xiang
             and Demir, Beg{\\"u}m and Papoutsis, Ioannis},
  journal = {arXiv preprint arXiv:2502.09598},
  year    = {2025}
}
"""

_HOMEPAGE = "https://github.com/Orion-AI-Lab/GAIA"
_LICENSE = "MIT for the metadata and captions; each image belongs to its publisher, named in `credits`."

_VERSION = datasets.Version("1.0.0")

# With this many shards per split, DataLoader workers and nodes of a streaming run each get
# their own rows, and num_proc can spread a build over processes.
DEFAULT_NUM_SHARDS = 16

# Set by torchrun and accelerate in every process they start: the number of processes of a
# distributed run, which split_dataset_by_node is usually given.
WORLD_SIZE_ENV = "WORLD_SIZE"

# Set by the CLI: each generator call writes its counts there as JSON, so that a run over
# several processes can be summarised.
STATS_DIR_ENV = "GAIA_STATS_DIR"

# The pipeline runs of each builder that may still be open, closed by Gaia._prepare_split. They
# live outside the builder because datasets pickles builders for num_proc, and a WeakSet does
# not pickle.
_OPEN_RUNS: weakref.WeakKeyDictionary[Gaia, weakref.WeakSet[Generator[RowOutcome, None, None]]] = (
    weakref.WeakKeyDictionary()
)


class Gaia(datasets.GeneratorBasedBuilder):
    """GAIA: remote-sensing images with five captions each and 13 metadata fields."""

    VERSION = _VERSION
    BUILDER_CONFIG_CLASS = GaiaConfig
    BUILDER_CONFIGS: ClassVar[list[datasets.BuilderConfig]] = [
        GaiaConfig(
            name="default",
            version=_VERSION,
            description="Images resized as the GAIA authors did: keep_ratio 512, PNG.",
        ),
        GaiaConfig(name="original", version=_VERSION, description="The publisher's image bytes, untouched."),
        GaiaConfig(
            name="metadata", version=_VERSION, description="The 13 metadata fields only; no image is fetched."
        ),
    ]
    DEFAULT_CONFIG_NAME = "default"

    config: GaiaConfig

    # Called once per row as (split, row error or None) by the CLI's progress bar. Runs only in
    # the process that calls download_and_prepare, so the CLI sets it only when num_proc is 1.
    progress_callback: Callable[[str, RowError | None], None] | None = None

    def __init__(
        self, *args: Any, dataset_name: str | None = None, hash: str | None = None, **kwargs: Any
    ) -> None:
        # Built directly (as the CLI does) the builder gets the name and source hash that
        # load_dataset("gaia") gives it, so both share one Arrow cache.
        super().__init__(
            *args, dataset_name=dataset_name or DATASET_NAME, hash=hash or builder_hash(), **kwargs
        )

    def _create_builder_config(
        self, config_name: str | None = None, custom_features: Any = None, **config_kwargs: Any
    ) -> Any:
        # datasets reports an unknown option as a bare "doesn't have a key"; name the fix instead.
        if config_name is not None and config_name not in CONFIG_IMAGE_MODES:
            raise ConfigError(
                f"unknown GAIA config {config_name!r}: expected one of {sorted(CONFIG_IMAGE_MODES)}"
            )
        known = OPTION_NAMES | {"data_files", "data_dir", "description", "version", "name"}
        for key in config_kwargs:
            if key not in known and key != "config_id":
                matches = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f" (did you mean {matches[0]!r}?)" if matches else ""
                raise ConfigError(f"unknown GAIA option {key!r}{hint}; the options are listed in the README")
        builder_config, config_id = super()._create_builder_config(
            config_name, custom_features, **config_kwargs
        )
        builder_config.validate()
        return builder_config, config_id

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(
            description=_DESCRIPTION,
            features=gaia_features(with_images=self.config.image_mode is not None),
            homepage=_HOMEPAGE,
            license=_LICENSE,
            citation=_CITATION,
        )

    def _split_generators(self, dl_manager: Any) -> list[datasets.SplitGenerator]:
        streaming = isinstance(dl_manager, StreamingDownloadManager)
        files = self._metadata_files(streaming=streaming)
        num_shards = self.config.num_shards or default_num_shards()
        if streaming:
            _warn_if_nodes_share_shards(num_shards)
        return [
            datasets.SplitGenerator(
                name=split,
                gen_kwargs={
                    "split": split,
                    "files": tuple(paths),
                    "shards": [(index, num_shards) for index in range(num_shards)],
                },
            )
            for split, paths in files.items()
        ]

    def _metadata_files(self, streaming: bool) -> dict[str, list[str]]:
        data_files = self.config.data_files
        if data_files:
            resolved = {str(split): [str(path) for path in paths] for split, paths in data_files.items()}
            for split, paths in resolved.items():
                for path in paths:
                    if "://" in path and not path.startswith("file://"):
                        raise MetadataError(
                            f"data_files[{split!r}] names the remote file {path}; gaia reads local metadata "
                            "files only: download it first, or leave data_files unset to use the Hub"
                        )
            return resolved
        if self.config.data_dir:
            found = local_metadata_files(self.config.data_dir, self.config.splits)
            return {split: [path] for split, path in found.items()}
        downloaded = download_metadata(
            self.config.metadata_repo_id,
            self.config.splits,
            revision=self.config.revision,
            token=self.token,
        )
        return {split: [path] for split, path in downloaded.items()}

    def _generate_examples(
        self, split: str, files: tuple[str, ...], shards: Sequence[tuple[int, int]]
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        rows = _load_split_rows(files)
        positions = [
            position for shard, count in shards for position in _shard_range(len(rows), shard, count)
        ]
        if self.config.image_mode is None:
            stats = PipelineStats()
            for position in positions:
                row = rows[position]
                self._report(split, row.error)
                stats.add(RowOutcome(row, error=row.error))
                yield position, _metadata_example(row, str(row.error) if row.error else None)
            _write_stats(split, stats)
            return

        pipeline = self._pipeline()
        outcomes = pipeline.run(rows[position] for position in positions)
        _OPEN_RUNS.setdefault(self, weakref.WeakSet()).add(outcomes)
        try:
            for position, outcome in zip(positions, outcomes, strict=False):
                self._report(split, outcome.error)
                yield position, _image_example(outcome)
        finally:
            outcomes.close()
            _log_stats(split, pipeline.stats)
            _write_stats(split, pipeline.stats)

    def _prepare_split(self, split_generator: datasets.SplitGenerator, *args: Any, **kwargs: Any) -> None:
        try:
            super()._prepare_split(split_generator, *args, **kwargs)
        finally:
            # An exception raised in datasets' code between two rows, such as a Ctrl-C while it
            # writes one, leaves _generate_examples suspended. The traceback keeps it alive (an
            # interactive session stores the last one), and with it the pipeline's event loop
            # thread and HTTP session. Closing the pipeline run stops them now.
            for run in list(_OPEN_RUNS.pop(self, ())):
                run.close()

    def _report(self, split: str, error: RowError | None) -> None:
        if self.progress_callback is not None:
            self.progress_callback(split, error)

    def _pipeline(self) -> RowPipeline:
        cache = None
        if self.config.use_fetch_cache:
            cache_root = (
                Path(self.config.fetch_cache_dir) if self.config.fetch_cache_dir else default_cache_dir()
            )
            cache = FetchCache(cache_root)
        return RowPipeline(
            fetch_options=self.config.fetch_options(),
            image_options=self.config.image_options(),
            cache=cache,
            prefetch=self.config.prefetch,
        )


def _world_size() -> int:
    text = os.environ.get(WORLD_SIZE_ENV, "")
    try:
        return max(int(text), 1) if text else 1
    except ValueError:
        logger.warning("ignoring %s=%r: expected a whole number of processes", WORLD_SIZE_ENV, text)
        return 1


def default_num_shards() -> int:
    """Return DEFAULT_NUM_SHARDS rounded up to a multiple of ``WORLD_SIZE`` when it is set.

    ``split_dataset_by_node`` hands each node whole shards only when the number of shards is a
    multiple of the world size. Otherwise every node reads every row and keeps one in world
    size, so every node would fetch every image.
    """
    world_size = _world_size()
    return math.ceil(DEFAULT_NUM_SHARDS / world_size) * world_size


def _warn_if_nodes_share_shards(num_shards: int) -> None:
    world_size = _world_size()
    if num_shards % world_size:
        logger.warning(
            "num_shards=%d is not a multiple of %s=%d, so split_dataset_by_node would make every "
            "node fetch every image; set num_shards to a multiple of %d, or pass strategy='shards' "
            "to split_dataset_by_node",
            num_shards,
            WORLD_SIZE_ENV,
            world_size,
            world_size,
        )


def _shard_range(total: int, shard: int, count: int) -> range:
    """Rows of shard ``shard`` of ``count``: contiguous, so each shard keeps metadata order."""
    return range(total * shard // count, total * (shard + 1) // count)


@functools.lru_cache(maxsize=3)
def _load_cached(files: tuple[tuple[str, int, int], ...]) -> list[MetadataRow]:
    return load_rows([path for path, _, _ in files])


def _load_split_rows(files: tuple[str, ...]) -> list[MetadataRow]:
    # Every shard of a split reads the same files; parse them once per process. The size and
    # modification time in the key make an edited file parse again.
    keys = []
    for path in files:
        local = path.removeprefix("file://")
        stat = os.stat(local)
        keys.append((local, stat.st_mtime_ns, stat.st_size))
    return _load_cached(tuple(keys))


def _metadata_example(row: MetadataRow, error: str | None) -> dict[str, Any]:
    example = dict(row.values)
    example["error"] = error
    return example


def _image_example(outcome: RowOutcome) -> dict[str, Any]:
    example = _metadata_example(outcome.row, str(outcome.error) if outcome.error else None)
    image = outcome.image
    fetched = outcome.fetch
    example["image"] = {"bytes": image.data, "path": None} if image is not None else None
    example["width"] = image.width if image is not None else None
    example["height"] = image.height if image is not None else None
    example["original_width"] = image.original_width if image is not None else None
    example["original_height"] = image.original_height if image is not None else None
    example["sha256"] = outcome.sha256
    example["final_url"] = fetched.final_url if fetched is not None else None
    return example


def _log_stats(split: str, stats: PipelineStats) -> None:
    failures = ", ".join(f"{name} {count}" for name, count in stats.errors.most_common()) or "none"
    logger.info(
        "%s: %d rows, %d images (%d from the cache, %d fetched); failures: %s",
        split,
        stats.rows,
        stats.images,
        stats.from_cache,
        stats.fetched,
        failures,
    )


def _write_stats(split: str, stats: PipelineStats) -> None:
    directory = os.environ.get(STATS_DIR_ENV)
    if not directory:
        return
    record = {
        "split": split,
        "rows": stats.rows,
        "images": stats.images,
        "from_cache": stats.from_cache,
        "fetched": stats.fetched,
        "errors": dict(stats.errors),
        "hosts": stats.fetch.as_dict() if stats.fetch is not None else {},
    }
    path = Path(directory) / f"{split}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(record))
    os.replace(temporary, path)
