"""Options of a gaia build: the builder config and the fetch and image settings it derives.

Every option can be passed to ``load_dataset("gaia", ...)`` as a keyword argument and to the
CLI as a flag of the same name (underscores become dashes). :meth:`GaiaConfig.validate` checks
them all and raises :class:`~gaia_builder.errors.ConfigError` naming the option, the value and
the accepted range.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets

from . import __version__
from .errors import ConfigError

PROJECT_URL = "https://pypi.org/project/gaia-builder/"
DEFAULT_USER_AGENT = f"gaia-builder/{__version__} (+{PROJECT_URL})"

HUB_REPO_ID = "azavras/GAIA"
SPLIT_NAMES = ("train", "validation", "test")

# Config names and what each does with images.
CONFIG_IMAGE_MODES = {
    "default": "resized",  # decoded, resized and re-encoded as the GAIA authors did
    "original": "original",  # the publisher's bytes, untouched
    "metadata": None,  # no image is fetched
}

RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")
ENCODE_FORMATS = ("png", "jpeg", "webp")

# PNG is lossless, so its zlib level changes only speed and size. Level 9 (the GAIA recipe's
# encode_quality) costs about four times the CPU of level 1 for files about 1.4 % smaller.
# Measured by benchmarks/fidelity.py on 80 generated images, one thread of a 2-core machine, for
# the whole image step: level 1 took 46 ms per image for 498 KiB, level 9 took 190 ms for 491 KiB.
DEFAULT_PNG_COMPRESS_LEVEL = 1
DEFAULT_JPEG_QUALITY = 95
DEFAULT_WEBP_QUALITY = 95


@dataclass(frozen=True)
class ImageOptions:
    """Settings that turn fetched bytes into the stored image."""

    mode: str = "resized"  # "resized" or "original"
    image_size: int = 512
    resize_mode: str = "keep_ratio"
    resize_only_if_bigger: bool = False
    encode_format: str = "png"
    encode_quality: int = DEFAULT_PNG_COMPRESS_LEVEL
    max_pixels: int = 250_000_000


@dataclass(frozen=True)
class FetchOptions:
    """Politeness, retry and deadline settings of the image fetcher.

    Every count is per run: the limits are shared by all splits and all worker processes of
    the machine through files under ``state_dir``.
    """

    max_in_flight: int = 16
    max_connections_per_host: int = 4
    max_requests_per_second_per_host: float = 4.0
    rate_burst: int = 4
    max_retries: int = 5
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    max_retry_after: float = 300.0
    connect_timeout: float = 20.0
    read_timeout: float = 60.0
    attempt_timeout: float = 300.0
    max_redirects: int = 10
    max_bytes: int = 256 * 1024 * 1024
    user_agent: str = DEFAULT_USER_AGENT
    disallowed_header_directives: tuple[str, ...] = ()
    state_dir: str | None = None

    @property
    def row_deadline(self) -> float:
        """The maximum time one URL can hold its row, in seconds, from its first request.

        Each attempt is capped by attempt_timeout and each wait between attempts by the larger
        of backoff_max and max_retry_after. Waiting for a free connection slot before the first
        request is not counted: that is queueing behind other rows, not this row's fault.
        """
        waits = self.max_retries * max(self.backoff_max, self.max_retry_after)
        return (self.max_retries + 1) * self.attempt_timeout + waits


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


@dataclass(eq=False)
class GaiaConfig(datasets.BuilderConfig):
    """BuilderConfig of the GAIA builder; see the README for every option."""

    # Where the metadata comes from. Not named repo_id: datasets' builder takes that argument
    # itself, to name the cache folder, and it would never reach the config.
    metadata_repo_id: str = HUB_REPO_ID
    revision: str | None = None
    splits: tuple[str, ...] = SPLIT_NAMES

    # Images; the defaults are ImageOptions' own, but encode_quality None picks the default of
    # the chosen format.
    image_size: int = ImageOptions.image_size
    resize_mode: str = ImageOptions.resize_mode
    resize_only_if_bigger: bool = ImageOptions.resize_only_if_bigger
    encode_format: str = ImageOptions.encode_format
    encode_quality: int | None = None
    max_pixels: int = ImageOptions.max_pixels

    # Fetching; the defaults are FetchOptions' own.
    max_in_flight: int = FetchOptions.max_in_flight
    max_connections_per_host: int = FetchOptions.max_connections_per_host
    max_requests_per_second_per_host: float = FetchOptions.max_requests_per_second_per_host
    rate_burst: int = FetchOptions.rate_burst
    max_retries: int = FetchOptions.max_retries
    backoff_initial: float = FetchOptions.backoff_initial
    backoff_max: float = FetchOptions.backoff_max
    max_retry_after: float = FetchOptions.max_retry_after
    connect_timeout: float = FetchOptions.connect_timeout
    read_timeout: float = FetchOptions.read_timeout
    attempt_timeout: float = FetchOptions.attempt_timeout
    max_redirects: int = FetchOptions.max_redirects
    max_bytes: int = FetchOptions.max_bytes
    user_agent: str = FetchOptions.user_agent
    disallowed_header_directives: tuple[str, ...] = FetchOptions.disallowed_header_directives

    # Caches and sharding.
    fetch_cache_dir: str | None = None
    use_fetch_cache: bool = True
    num_shards: int | None = None
    prefetch: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate()

    def create_config_id(self, config_kwargs: dict[str, Any], custom_features: Any = None) -> str:
        """Name the cache folder after the options that change the output, in a canonical form.

        Politeness, deadlines and cache locations change how rows are fetched, not which rows
        come out, so changing them reuses a prepared split. Options equal to their default, and
        lists given instead of tuples, give the same folder as leaving them out.
        """
        # datasets sets options on a copy of a predefined config without running __post_init__.
        self.validate()
        canonical: dict[str, Any] = {}
        for key, value in config_kwargs.items():
            if key in OUTPUT_NEUTRAL_OPTIONS:
                continue
            if key in ("splits", "disallowed_header_directives"):
                value = _as_str_tuple(key, value)
            elif isinstance(value, list):
                value = tuple(value)
            if key in _DEFAULTS and value == _DEFAULTS[key]:
                continue
            canonical[key] = value
        config_id: str = super().create_config_id(canonical, custom_features)
        return config_id

    def __eq__(self, other: object) -> bool:
        # Equal when the output is: datasets rejects a config that shares a predefined name
        # but differs from it, and politeness options must not make it differ.
        if not isinstance(other, GaiaConfig):
            return NotImplemented
        names = (set(vars(self)) | set(vars(other))) - OUTPUT_NEUTRAL_OPTIONS
        return all(getattr(self, name, None) == getattr(other, name, None) for name in names)

    __hash__ = None  # type: ignore[assignment]

    @property
    def image_mode(self) -> str | None:
        """ "resized", "original" or None (metadata only), from the config name."""
        return CONFIG_IMAGE_MODES.get(self.name, "resized")

    def validate(self) -> None:
        """Check every option; raise ConfigError naming the first invalid one and the fix."""
        self.splits = _as_str_tuple("splits", self.splits)
        self.disallowed_header_directives = _as_str_tuple(
            "disallowed_header_directives", self.disallowed_header_directives
        )

        if self.name not in CONFIG_IMAGE_MODES:
            raise ConfigError(
                f"invalid config name {self.name!r}: expected one of {sorted(CONFIG_IMAGE_MODES)}"
            )
        for split in self.splits:
            if split not in SPLIT_NAMES:
                raise ConfigError(f"invalid value for splits: {split!r} is not one of {list(SPLIT_NAMES)}")
        if not self.splits:
            raise ConfigError(
                f"invalid value for splits: it is empty; name one or more of {list(SPLIT_NAMES)}"
            )
        if not isinstance(self.metadata_repo_id, str) or self.metadata_repo_id.count("/") != 1:
            raise ConfigError(
                f"invalid value for metadata_repo_id: {self.metadata_repo_id!r}; expected 'owner/name'"
            )

        _check_choice("resize_mode", self.resize_mode, RESIZE_MODES)
        _check_choice("encode_format", self.encode_format, ENCODE_FORMATS)
        _check_int("image_size", self.image_size, 1, 65_535)
        _check_int("max_pixels", self.max_pixels, 1, None)
        if self.encode_quality is not None:
            low, high = (0, 9) if self.encode_format == "png" else (1, 100)
            _check_int("encode_quality", self.encode_quality, low, high, f"for {self.encode_format}")

        _check_int("max_in_flight", self.max_in_flight, 1, 1024)
        _check_int("max_connections_per_host", self.max_connections_per_host, 1, 256)
        _check_int("rate_burst", self.rate_burst, 1, 10_000)
        _check_int("max_retries", self.max_retries, 0, 100)
        _check_int("max_redirects", self.max_redirects, 0, 100)
        _check_int("max_bytes", self.max_bytes, 1, None)
        _check_int("prefetch", self.prefetch, 1, 100_000)
        if self.num_shards is not None:
            _check_int("num_shards", self.num_shards, 1, 100_000)
        _check_positive("max_requests_per_second_per_host", self.max_requests_per_second_per_host)
        for name in ("connect_timeout", "read_timeout", "attempt_timeout", "backoff_max", "max_retry_after"):
            _check_positive(name, getattr(self, name))
        _check_positive("backoff_initial", self.backoff_initial, allow_zero=True)
        if (
            not isinstance(self.user_agent, str)
            or not self.user_agent.strip()
            or any(ord(character) < 32 or ord(character) == 127 for character in self.user_agent)
        ):
            raise ConfigError(
                f"invalid value for user_agent: {self.user_agent!r}; expected a non-empty string "
                "without control characters such as line breaks"
            )
        for flag in ("resize_only_if_bigger", "use_fetch_cache"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(
                    f"invalid value for {flag}: {getattr(self, flag)!r}; expected True or False"
                )

    def image_options(self) -> ImageOptions:
        """Return the image settings of this config (the metadata config does not use them)."""
        quality = self.encode_quality
        if quality is None:
            quality = {
                "png": DEFAULT_PNG_COMPRESS_LEVEL,
                "jpeg": DEFAULT_JPEG_QUALITY,
                "webp": DEFAULT_WEBP_QUALITY,
            }[self.encode_format]
        return ImageOptions(
            mode=self.image_mode or "resized",
            image_size=self.image_size,
            resize_mode=self.resize_mode,
            resize_only_if_bigger=self.resize_only_if_bigger,
            encode_format=self.encode_format,
            encode_quality=quality,
            max_pixels=self.max_pixels,
        )

    def fetch_options(self, state_dir: str | None = None) -> FetchOptions:
        """Return the fetch settings of this config; ``state_dir`` is the folder of the shared host limits."""
        names = _field_names(FetchOptions) - {"state_dir"}
        values = {name: getattr(self, name) for name in names}
        return FetchOptions(state_dir=state_dir, **values)


# Options that change how rows are fetched but not the rows that come out.
OUTPUT_NEUTRAL_OPTIONS = frozenset(
    {
        "max_in_flight",
        "max_connections_per_host",
        "max_requests_per_second_per_host",
        "rate_burst",
        "max_retries",
        "backoff_initial",
        "backoff_max",
        "max_retry_after",
        "connect_timeout",
        "read_timeout",
        "attempt_timeout",
        "fetch_cache_dir",
        "use_fetch_cache",
        "num_shards",
        "prefetch",
    }
)

_DEFAULTS = {
    item.name: item.default
    for item in dataclasses.fields(GaiaConfig)
    if item.default is not dataclasses.MISSING
}

OPTION_NAMES = frozenset(_field_names(GaiaConfig) - _field_names(datasets.BuilderConfig))


def _as_str_tuple(name: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, Sequence) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise ConfigError(f"invalid value for {name}: {value!r}; expected a list of strings")


def _check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"invalid value for {name}: {value!r}; expected one of {list(choices)}")


def _check_int(name: str, value: object, low: int, high: int | None, context: str = "") -> None:
    bounds = f"from {low} to {high}" if high is not None else f"of at least {low}"
    where = f" {context}" if context else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"invalid value for {name}{where}: {value!r}; expected a whole number {bounds}")
    number: int = value
    if number < low or (high is not None and number > high):
        raise ConfigError(f"invalid value for {name}{where}: {value}; expected a whole number {bounds}")


def _check_positive(name: str, value: object, *, allow_zero: bool = False) -> None:
    ok = False
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        ok = value >= 0 if allow_zero else value > 0
    if not ok:
        expected = "a finite number of at least 0" if allow_zero else "a finite number greater than 0"
        raise ConfigError(f"invalid value for {name}: {value!r}; expected {expected}")


def suggest_option(name: str, known: Mapping[str, object] | set[str] | frozenset[str] = OPTION_NAMES) -> str:
    """Return a "did you mean" hint for an unknown option name, or an empty string."""
    import difflib

    matches = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {matches[0]!r}?)" if matches else ""
