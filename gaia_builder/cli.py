"""The ``gaia`` command: build GAIA splits, export them, and regenerate dataset_infos.json."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import typing
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import click
import datasets
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from . import __version__
from .builder import STATS_DIR_ENV, Gaia
from .config import SPLIT_NAMES, GaiaConfig
from .errors import GaiaError, RowError, redact_credentials
from .fetch import FetchStats

logger = logging.getLogger(__name__)

# Help text of every builder option exposed as a flag. The flag is the option name with dashes.
OPTION_HELP: dict[str, str] = {
    "metadata_repo_id": "Hub dataset repository that contains the metadata files.",
    "revision": "Branch, tag or commit of the metadata repository.",
    "image_size": "Target size in pixels for the resize mode.",
    "resize_mode": "How images are resized: no, keep_ratio, keep_ratio_largest, center_crop or border.",
    "resize_only_if_bigger": "Never enlarge an image smaller than the target.",
    "encode_format": "Format of stored images (default config): png, jpeg or webp.",
    "encode_quality": "PNG zlib level 0-9, or JPEG/WebP quality 1-100.",
    "max_pixels": (
        "Images whose decoded pixels (after JPEG reduction) or resized output exceed this "
        "fail as too_many_pixels."
    ),
    "max_in_flight": "Requests in flight at once in each process.",
    "max_connections_per_host": "Connections to one host at once, shared by all processes.",
    "max_requests_per_second_per_host": "Requests per second to one host, shared by all processes.",
    "rate_burst": "Requests a host may receive at once before the rate applies.",
    "max_retries": "Retries of a transient failure (timeouts, 429, 5xx, connection errors).",
    "backoff_initial": "First wait before a retry, in seconds; it doubles up to backoff_max.",
    "backoff_max": "Longest wait between two retries, in seconds.",
    "max_retry_after": "Longest Retry-After pause honoured, in seconds; longer ones fail the row.",
    "connect_timeout": "Deadline to open a connection, in seconds.",
    "read_timeout": "Deadline for each read from the socket, in seconds.",
    "attempt_timeout": "Deadline for one whole request, headers and body, in seconds.",
    "max_redirects": "Redirects followed before a row fails as too_many_redirects.",
    "max_bytes": "Largest image body accepted, in bytes.",
    "user_agent": "User-Agent header sent to image hosts.",
    "disallowed_header_directives": (
        "Comma-separated X-Robots-Tag directives that make an image be skipped (for example noai)."
    ),
    "fetch_cache_dir": "Folder of the per-URL cache of fetched images.",
    "use_fetch_cache": "Reuse and fill the per-URL cache.",
    "num_shards": "Shards per split, for num_proc and streaming workers.",
    "prefetch": "Rows in progress at once in each process.",
}

_SPLIT_CHOICES = [*SPLIT_NAMES, "all"]


def _option_type(name: str) -> Any:
    hint = typing.get_type_hints(GaiaConfig)[name]
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    base = args[0] if args else hint
    if base is bool:
        return bool
    if base in (int, float):
        return base
    return str


def builder_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """Add a flag for every builder option in OPTION_HELP; unset flags keep the config default."""
    for name in reversed(list(OPTION_HELP)):
        flag = "--" + name.replace("_", "-")
        option_type = _option_type(name)
        if option_type is bool:
            negative = "--no-" + name.replace("_", "-")
            decorator = click.option(f"{flag}/{negative}", name, default=None, help=OPTION_HELP[name])
        else:
            decorator = click.option(flag, name, type=option_type, default=None, help=OPTION_HELP[name])
        function = decorator(function)
    return function


def source_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """Add the flags that choose the config, the splits and where metadata and caches are."""
    decorators = [
        click.option(
            "--split",
            "split",
            type=click.Choice(_SPLIT_CHOICES),
            default="all",
            show_default=True,
            help="Split to build.",
        ),
        click.option(
            "--config",
            "config_name",
            type=click.Choice(["default", "original", "metadata"]),
            default="default",
            show_default=True,
            help="default: resized images; original: the publisher's bytes; metadata: no images.",
        ),
        click.option(
            "--data-files",
            "data_files",
            multiple=True,
            metavar="SPLIT=PATH",
            help="A local metadata file for a split; repeat for several.",
        ),
        click.option(
            "--data-dir",
            "data_dir",
            type=click.Path(file_okay=False, exists=True),
            help="Folder that contains train_data.json, val_data.json and test_data.json.",
        ),
        click.option(
            "--cache-dir",
            "cache_dir",
            type=click.Path(file_okay=False),
            help="Cache folder of datasets (default: the datasets cache).",
        ),
        click.option(
            "--num-proc",
            "num_proc",
            type=click.IntRange(min=1),
            default=None,
            help="Processes that build shards at once; host limits stay shared.",
        ),
    ]
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


def _parse_data_files(values: Iterable[str]) -> dict[str, str] | None:
    data_files: dict[str, str] = {}
    for value in values:
        split, separator, path = value.partition("=")
        if not separator or not split or not path:
            raise click.BadParameter(
                f"{value!r} is not SPLIT=PATH, for example validation=val_data.json",
                param_hint="--data-files",
            )
        if split not in SPLIT_NAMES:
            raise click.BadParameter(
                f"{split!r} is not a GAIA split; use one of {', '.join(SPLIT_NAMES)}",
                param_hint="--data-files",
            )
        if split in data_files:
            raise click.BadParameter(f"split {split!r} is given twice", param_hint="--data-files")
        if not Path(path).is_file():
            raise click.BadParameter(f"file not found for split {split!r}: {path}", param_hint="--data-files")
        data_files[split] = path
    return data_files or None


def _data_files_for(split: str, data_files: dict[str, str] | None) -> dict[str, str] | None:
    # Keys of data_files decide which splits datasets builds, so --split picks one of them.
    if data_files is None or split == "all":
        return data_files
    if split not in data_files:
        raise click.BadParameter(
            f"--split {split} has no file; add --data-files {split}=PATH or choose one of "
            f"{', '.join(data_files)}",
            param_hint="--data-files",
        )
    return {split: data_files[split]}


def make_builder(
    config_name: str,
    split: str,
    data_files: Iterable[str],
    data_dir: str | None,
    cache_dir: str | None,
    options: dict[str, Any],
) -> Gaia:
    """Build the Gaia builder for CLI flags, validating them all before anything runs."""
    config_kwargs = {name: value for name, value in options.items() if value is not None}
    if split != "all":
        config_kwargs["splits"] = (split,)
    try:
        return Gaia(
            config_name=config_name,
            cache_dir=cache_dir,
            data_files=_data_files_for(split, _parse_data_files(data_files)),
            data_dir=data_dir,
            **config_kwargs,
        )
    except GaiaError as error:
        raise click.UsageError(str(error)) from error


def _selected_splits(builder: Gaia, split: str) -> list[str]:
    available = list(builder.info.splits or {})
    if split == "all":
        return available
    if split not in available:
        raise click.UsageError(f"split {split!r} was not built; the metadata gave {available}")
    return [split]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="gaia")
@click.option("-v", "--verbose", count=True, help="More log output (-v: info, -vv: debug).")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only, and no progress bar.")
@click.pass_context
def main(context: click.Context, verbose: int, quiet: bool) -> None:
    """Build the GAIA remote-sensing dataset with Hugging Face datasets."""
    levels = {0: logging.WARNING, 1: logging.INFO}
    level = logging.ERROR if quiet else levels.get(verbose, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    package_logger = logging.getLogger("gaia_builder")
    package_logger.handlers[:] = [handler]
    package_logger.setLevel(level)
    package_logger.propagate = False
    if verbose < 2:
        datasets.logging.set_verbosity_warning()
    context.obj = {"quiet": quiet}


@contextlib.contextmanager
def _exit_on_failure(builder: Gaia) -> Iterator[None]:
    """Turn Ctrl-C into exit code 130 with the resume hint, and gaia errors into exit code 1."""
    try:
        yield
    except KeyboardInterrupt:
        click.echo(_interrupted_message(builder), err=True)
        sys.exit(130)
    except (GaiaError, OSError) as error:
        click.echo(f"Error: {error}", err=True)
        sys.exit(1)


@main.command()
@source_options
@click.option(
    "--failures",
    "failures_path",
    type=click.Path(dir_okay=False),
    help="JSON Lines file for failed rows (default: gaia-failures-<config>.jsonl in the current folder).",
)
@builder_options
@click.pass_context
def prepare(
    context: click.Context,
    split: str,
    config_name: str,
    data_files: tuple[str, ...],
    data_dir: str | None,
    cache_dir: str | None,
    num_proc: int | None,
    failures_path: str | None,
    **options: Any,
) -> None:
    """Fetch images and build the Arrow cache of one split or all of them."""
    builder = make_builder(config_name, split, data_files, data_dir, cache_dir, options)
    quiet = bool(context.obj["quiet"])
    with _exit_on_failure(builder), tempfile.TemporaryDirectory(prefix="gaia-stats-") as stats_dir:
        _prepare(builder, num_proc, quiet, stats_dir)
        run_stats = _read_run_stats(stats_dir)

    splits = {name: builder.as_dataset(split=name) for name in _selected_splits(builder, split)}
    failures = Path(failures_path or f"gaia-failures-{config_name}.jsonl")
    failed = _write_failures(splits, failures)
    click.echo(_summary(builder, splits, run_stats, failures if failed else None))


@main.command()
@source_options
@click.option(
    "--format",
    "export_format",
    type=click.Choice(["parquet", "webdataset"]),
    required=True,
    help="parquet: a folder for the Hub dataset viewer; webdataset: img2dataset-style tar shards.",
)
@click.option("--output", "output", type=click.Path(file_okay=False), required=True, help="Folder to write.")
@click.option("--overwrite", is_flag=True, help="Replace a previous gaia export in the output folder.")
@click.option(
    "--samples-per-shard",
    "samples_per_shard",
    type=click.IntRange(min=1),
    default=512,
    show_default=True,
    help="Rows per WebDataset shard.",
)
@builder_options
@click.pass_context
def export(
    context: click.Context,
    split: str,
    config_name: str,
    data_files: tuple[str, ...],
    data_dir: str | None,
    cache_dir: str | None,
    num_proc: int | None,
    export_format: str,
    output: str,
    overwrite: bool,
    samples_per_shard: int,
    **options: Any,
) -> None:
    """Build the splits where needed, then write them as Parquet or WebDataset shards."""
    from .export import export_parquet, export_webdataset

    builder = make_builder(config_name, split, data_files, data_dir, cache_dir, options)
    quiet = bool(context.obj["quiet"])
    with _exit_on_failure(builder):
        with tempfile.TemporaryDirectory(prefix="gaia-stats-") as stats_dir:
            _prepare(builder, num_proc, quiet, stats_dir)
        splits = {name: builder.as_dataset(split=name) for name in _selected_splits(builder, split)}
        if export_format == "parquet":
            build_options = {name: value for name, value in options.items() if value is not None}
            summary = export_parquet(
                splits, output, config_name=config_name, build_options=build_options, overwrite=overwrite
            )
        else:
            summary = export_webdataset(
                splits, output, samples_per_shard=samples_per_shard, overwrite=overwrite
            )

    for name, rows in summary.rows.items():
        click.echo(f"  {name}: {rows} rows, {summary.rows_with_image.get(name, 0)} with an image")
    click.echo(
        f"Wrote {len(summary.files)} files ({summary.num_bytes / 2**20:.1f} MiB) to {summary.output_dir}"
    )


def _interrupted_message(builder: Gaia) -> str:
    if not builder.config.use_fetch_cache:
        return (
            "\nInterrupted. The fetch cache is off (--no-use-fetch-cache), so running the command "
            "again fetches every image again."
        )
    return (
        "\nInterrupted. Every image fetched so far is kept in the fetch cache; run the same "
        "command again to resume."
    )


class _Progress:
    """One tqdm bar per split with rows, rows per second, images and failures."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar: tqdm[Any] | None = None
        self.split: str | None = None
        self.images = 0
        self.failed = 0

    def __call__(self, split: str, error: RowError | None) -> None:
        if split != self.split or self.bar is None:
            self.close()
            self.split = split
            self.images = self.failed = 0
            self.bar = tqdm(
                desc=f"gaia {split}",
                unit=" rows",
                disable=self.quiet,
                dynamic_ncols=True,
                bar_format="{desc}: {n_fmt}{unit} [{elapsed}, {rate_fmt}{postfix}]",
            )
        if error is None:
            self.images += 1
        else:
            self.failed += 1
        self.bar.set_postfix(images=self.images, failed=self.failed, refresh=False)
        self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _Interrupt:
    """A SIGINT handler that raises KeyboardInterrupt and remembers the signal.

    CPython ignores an exception raised while a weakref callback or a ``__del__`` method runs,
    so a Ctrl-C that arrives then is lost and the build goes on. ``check`` raises it again.
    """

    def __init__(self) -> None:
        self.received = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.received = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.received:
            raise KeyboardInterrupt


@contextlib.contextmanager
def _handle_sigint(handler: _Interrupt) -> Iterator[None]:
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _prepare(builder: Gaia, num_proc: int | None, quiet: bool, stats_dir: str) -> None:
    os.environ[STATS_DIR_ENV] = stats_dir
    progress = _Progress(quiet)
    interrupt = _Interrupt()

    def on_row(split: str, error: RowError | None) -> None:
        # NOTE: a lost Ctrl-C takes effect only when the next row is done, and never with
        # num_proc above 1, where no progress callback runs.
        interrupt.check()
        progress(split, error)

    if num_proc in (None, 1):
        builder.progress_callback = on_row
        datasets.disable_progress_bars()
    try:
        with _handle_sigint(interrupt), logging_redirect_tqdm(loggers=[logging.getLogger("gaia_builder")]):
            builder.download_and_prepare(num_proc=num_proc)
    finally:
        builder.progress_callback = None
        progress.close()
        datasets.enable_progress_bars()
        os.environ.pop(STATS_DIR_ENV, None)


def _read_run_stats(directory: str) -> dict[str, Any]:
    """Add up the counts that each generator call wrote, in this process or a worker."""
    totals: dict[str, Any] = {"runs": 0, "from_cache": 0, "fetched": 0, "hosts": FetchStats(hosts={})}
    for path in sorted(Path(directory).glob("*.json")):
        record = json.loads(path.read_text())
        totals["runs"] += 1
        totals["from_cache"] += record["from_cache"]
        totals["fetched"] += record["fetched"]
        totals["hosts"] = totals["hosts"].merge(FetchStats.from_dict(record.get("hosts", {})))
    return totals


def _write_failures(splits: dict[str, datasets.Dataset], path: Path) -> int:
    count = 0
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        for split, dataset in splits.items():
            columns = dataset.select_columns(["id", "image_src", "error"])
            for row in columns:
                if row["error"] is None:
                    continue
                url = row["image_src"]
                shown_url = redact_credentials(url) if isinstance(url, str) else url
                record = {"split": split, "id": row["id"], "url": shown_url, "error": row["error"]}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
    if count:
        temporary.replace(path)
    else:
        temporary.unlink()
    return count


def _host_of(url: str | None) -> str:
    try:
        return urlsplit(url or "").hostname or "(no host)"
    except ValueError:  # for example an unclosed IPv6 bracket, which the row error already reports
        return "(invalid url)"


def _summary(
    builder: Gaia, splits: dict[str, datasets.Dataset], run_stats: dict[str, Any], failures: Path | None
) -> str:
    lines = [f"Built {', '.join(splits)} in {builder.cache_dir}"]
    by_class: Counter[str] = Counter()
    by_host: dict[str, Counter[str]] = {}
    for split, dataset in splits.items():
        errors = dataset.select_columns(["image_src", "error"])
        split_failures = 0
        for row in errors:
            if row["error"] is None:
                continue
            split_failures += 1
            error_class = RowError.parse(row["error"]).error_class
            by_class[error_class] += 1
            host = _host_of(row["image_src"])
            by_host.setdefault(host, Counter())[error_class] += 1
        lines.append(
            f"  {split}: {len(dataset)} rows, {len(dataset) - split_failures} ok, {split_failures} failed"
        )
    if not run_stats["runs"]:
        lines.append("Reused the prepared Arrow cache: nothing was fetched")
    elif builder.config.image_mode is not None:
        lines.append(
            f"URLs: {run_stats['from_cache']} read from the fetch cache, {run_stats['fetched']} requested"
        )
    if by_class:
        lines.append("Failures by error class:")
        lines.extend(f"  {name:<20} {count}" for name, count in by_class.most_common())
        lines.append("Failures by host:")
        for host, counts in sorted(by_host.items(), key=lambda item: -sum(item[1].values())):
            detail = ", ".join(f"{name} {count}" for name, count in counts.most_common())
            lines.append(f"  {host}: {detail}")
    if run_stats["hosts"].hosts:
        lines.append("Requests by host:")
        lines.extend(f"  {line}" for line in run_stats["hosts"].summary().splitlines())
    if failures is not None:
        lines.append(f"Failed rows written to {failures}")
    return "\n".join(lines)


@main.command()
@click.option(
    "--data-dir",
    "data_dir",
    type=click.Path(file_okay=False, exists=True),
    help="Folder that contains the real train_data.json, val_data.json and test_data.json.",
)
@click.option(
    "--output",
    "output",
    type=click.Path(dir_okay=False),
    default="dataset_infos.json",
    show_default=True,
    help="File to write.",
)
def infos(data_dir: str | None, output: str) -> None:
    """Regenerate dataset_infos.json; with --data-dir, split sizes are counted from the metadata."""
    from .infos import count_rows, write_dataset_infos
    from .metadata import local_metadata_files

    try:
        sizes = count_rows(local_metadata_files(data_dir, SPLIT_NAMES)) if data_dir else None
        path = write_dataset_infos(output, sizes)
    except GaiaError as error:
        click.echo(f"Error: {error}", err=True)
        sys.exit(1)
    counted = ", ".join(f"{split} {count}" for split, count in sizes.items()) if sizes else "no split sizes"
    click.echo(f"Wrote {path} ({counted})")


if __name__ == "__main__":  # pragma: no cover
    main()
