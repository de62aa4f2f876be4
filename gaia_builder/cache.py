"""The per-URL cache of fetch outcomes, which lets an interrupted build resume.

``datasets`` deletes the ``.incomplete`` folder of a failed build, so fetched images are kept
in a separate folder (by default under ``HF_DATASETS_CACHE``) that survives Ctrl-C, a killed
process and a reboot. A rerun reads every stored outcome instead of fetching it again.

Layout: one file per URL at ``<root>/<key[:2]>/<key>.entry``, where ``key`` is the SHA-256 of
the URL. The two-character fan-out keeps each folder at about 1/256 of the entries (about 160
for GAIA's 41k images). An entry file is a JSON header on its first line, followed by the
body bytes exactly as fetched. Because the header and the body live in one file, a single
``os.replace`` swaps both, so a reader sees either the old entry or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import datasets.config

from . import __version__
from .errors import OPTION_DEPENDENT_ERRORS, RowError, is_error_class, redact_credentials
from .fetch import FetchResult

logger = logging.getLogger(__name__)

# Entries written with another format are ignored, so they are fetched again and replaced.
CACHE_FORMAT = 1

ENTRY_SUFFIX = ".entry"
TEMP_SUFFIX = ".tmp"

# The header is one JSON line with the URLs and the error detail, so 1 MiB leaves ample room.
# The cap bounds what a damaged file can make get() read before the body.
MAX_HEADER_BYTES = 1024 * 1024

# Marks the folder as a cache for backup and archiving tools (https://bford.info/cachedir/).
CACHEDIR_TAG_NAME = "CACHEDIR.TAG"
CACHEDIR_TAG = (
    b"Signature: 8a477f597d28d172789f06886806bc55\n"
    b"# This file is a cache tag created by gaia-builder: the folder holds fetched images.\n"
    b"# For information about cache directory tags see https://bford.info/cachedir/\n"
)

_HEX_DIGITS = frozenset("0123456789abcdef")


def default_cache_dir() -> Path:
    """Return the default cache folder, ``HF_DATASETS_CACHE/gaia/fetch``, as set right now."""
    return Path(datasets.config.HF_DATASETS_CACHE) / "gaia" / "fetch"


def sha256_hex(data: bytes) -> str:
    """Return the SHA-256 of ``data`` as 64 lowercase hexadecimal digits."""
    return hashlib.sha256(data).hexdigest()


def url_key(url: str) -> str:
    """Return the cache key of ``url``: the SHA-256 of its UTF-8 encoding."""
    # surrogatepass keeps the key defined for a lone surrogate, which JSON "\ud800" can produce.
    return sha256_hex(url.encode("utf-8", "surrogatepass"))


@dataclass(frozen=True)
class CacheStats:
    """Counts and sizes of the files in a fetch cache."""

    entries: int  # readable entries: successes plus failures
    successes: int
    failures: int  # stored permanent failures
    unreadable: int  # entries that get() ignores: damaged, or written in another cache format
    temporary_files: int  # left behind by writers that were killed before os.replace
    total_bytes: int  # size of all entry and temporary files, in bytes


class DamagedEntryError(ValueError):
    """An entry file that cannot be trusted: truncated, malformed or failing its SHA-256 check."""


class OtherFormatError(ValueError):
    """An entry file written with another cache format."""


class FetchCache:
    """A folder of fetch outcomes keyed by URL, shared safely by concurrent processes.

    Successes and permanent failures are stored. Transient failures and failures that depend on
    an option (OPTION_DEPENDENT_ERRORS) are not, so a later run retries them. Every write is
    atomic (temporary file in the same folder, then ``os.replace``), so a process killed
    at any moment leaves no partial entry behind, at most a temporary file that ``get`` never
    reads (see ``remove_temporary_files``). Several processes may read and write the same or
    different URLs at once; when two write the same URL, the last ``os.replace`` wins.

    ``put`` writes and ``get`` reads a whole body, so call them from a worker thread
    in async code.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._tagged = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"

    def entry_path(self, url: str) -> Path:
        """Return the path of the entry file of ``url``, whether it exists or not."""
        key = url_key(url)
        return self.root / key[:2] / f"{key}{ENTRY_SUFFIX}"

    def get(self, url: str) -> FetchResult | None:
        """Return the stored success or permanent failure of ``url``, or None.

        None means the URL has no entry, or the entry cannot be used. A damaged or unreadable
        entry is logged at WARNING, never raised, and the next ``put`` replaces it. An entry of
        another cache format or with an error class unknown to this version is skipped quietly.
        """
        path = self.entry_path(url)
        try:
            with open(path, "rb") as file:
                header = _read_header(file, url)
                data = _read_body(file, header)
        except FileNotFoundError:
            return None
        except OtherFormatError as error:
            logger.debug("ignoring fetch cache entry %s of %s: %s", path, redact_credentials(url), error)
            return None
        except DamagedEntryError as error:
            logger.warning(
                "ignoring damaged fetch cache entry %s of %s: %s; the URL will be fetched again",
                path,
                redact_credentials(url),
                error,
            )
            return None
        except OSError as error:
            logger.warning(
                "failed to read fetch cache entry %s of %s: %s; the URL will be fetched again",
                path,
                redact_credentials(url),
                error,
            )
            return None

        return _result_from_header(header, data)

    def __contains__(self, url: object) -> bool:
        """Tell whether ``url`` has an entry whose header is valid and whose size matches.

        This reads only the header, so it is cheap, but it does not check the body's SHA-256.
        So ``get`` may still return None for a body damaged in place.
        """
        if not isinstance(url, str):
            return False

        try:
            with open(self.entry_path(url), "rb") as file:
                _read_header(file, url)
        except (OSError, DamagedEntryError, OtherFormatError):
            return False
        return True

    def put(self, result: FetchResult) -> None:
        """Store a success or a permanent failure atomically; ignore transient and option-dependent failures.

        A result with neither data nor an error, or with a header over MAX_HEADER_BYTES, is
        logged at WARNING and not stored. Raises OSError, naming the URL and the folder, when
        the entry cannot be written (disk full, no permission); the temporary file is removed
        first.
        """
        if result.transient:
            logger.debug(
                "not caching transient failure of %s: %s", redact_credentials(result.url), result.error
            )
            return
        if result.error is not None and result.error.error_class in OPTION_DEPENDENT_ERRORS:
            # A rerun with the option raised, as the error advises, must fetch the URL again.
            logger.debug(
                "not caching option-dependent failure of %s: %s",
                redact_credentials(result.url),
                result.error,
            )
            return
        if result.data is None and result.error is None:
            # This is a bug in the fetcher, but one lost cache entry must not end a build of hours.
            logger.warning(
                "not caching the fetch result of %s: it has neither data nor an error",
                redact_credentials(result.url),
            )
            return

        header_line = _encode_header(result)
        if len(header_line) > MAX_HEADER_BYTES:
            logger.warning(
                "not caching the fetch result of %s: its header has %d bytes, more than the %d allowed",
                redact_credentials(result.url),
                len(header_line),
                MAX_HEADER_BYTES,
            )
            return

        path = self.entry_path(result.url)
        try:
            self._ensure_tagged()
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomically(path, header_line, result.data or b"")
        except OSError as error:
            raise OSError(
                error.errno,
                f"failed to write the fetch cache entry of {redact_credentials(result.url)!r}: "
                f"{error.strerror or error}. "
                f"Free disk space or fix the permissions of {self.root}, "
                "or turn the cache off with use_fetch_cache=False",
                str(path),
            ) from error

    def stats(self) -> CacheStats:
        """Count the entries and temporary files and sum their sizes.

        Entries are classified from their headers and file sizes, so a body damaged in place
        without a size change still counts as readable.
        """
        counts = {"successes": 0, "failures": 0, "unreadable": 0, "temporary_files": 0}
        total_bytes = 0
        for path in self._cache_files():
            try:
                total_bytes += path.stat().st_size
            except FileNotFoundError:  # replaced or removed by another process meanwhile
                continue

            if path.name.endswith(TEMP_SUFFIX):
                counts["temporary_files"] += 1
            else:
                counts[_classify_entry(path)] += 1

        return CacheStats(entries=counts["successes"] + counts["failures"], total_bytes=total_bytes, **counts)

    def clear(self) -> None:
        """Remove every entry and temporary file, and the fan-out folders once empty.

        Other files under the root are kept. Do not run this while another process writes to
        the cache, because a ``put`` that loses its folder to ``clear`` raises OSError.
        """
        removed = 0
        for path in self._cache_files():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1

        for folder in self._fan_out_folders():
            with contextlib.suppress(OSError):  # not empty: it contains files that are not ours
                folder.rmdir()

        logger.info("removed %d files from the fetch cache %s", removed, self.root)

    def remove_temporary_files(self, *, older_than: float = 3600.0) -> int:
        """Remove temporary files older than ``older_than`` seconds and return their number.

        Writers killed before ``os.replace`` leave them behind. They are never read and only
        waste space. The age limit spares the files of writers still running, because even a
        write of 256 MiB (the default max_bytes) should take far less than the default hour.
        """
        now = time.time()
        removed = 0
        for path in self._cache_files():
            if not path.name.endswith(TEMP_SUFFIX):
                continue
            with contextlib.suppress(FileNotFoundError):
                if now - path.stat().st_mtime > older_than:
                    path.unlink()
                    removed += 1

        if removed:
            logger.info("removed %d temporary files from the fetch cache %s", removed, self.root)
        return removed

    def _fan_out_folders(self) -> Iterator[Path]:
        try:
            children = list(self.root.iterdir())
        except FileNotFoundError:
            return
        for child in sorted(children):
            if len(child.name) == 2 and set(child.name) <= _HEX_DIGITS and child.is_dir():
                yield child

    def _cache_files(self) -> Iterator[Path]:
        """Yield the entry and temporary files, skipping any other file under the root."""
        for folder in self._fan_out_folders():
            with os.scandir(folder) as scan:
                for item in scan:
                    if item.name.endswith((ENTRY_SUFFIX, TEMP_SUFFIX)) and item.is_file():
                        yield Path(item.path)

    def _ensure_tagged(self) -> None:
        if self._tagged:
            return

        self.root.mkdir(parents=True, exist_ok=True)
        tag = self.root / CACHEDIR_TAG_NAME
        if not tag.exists():
            _write_atomically(tag, CACHEDIR_TAG, b"")
        self._tagged = True


def _encode_header(result: FetchResult) -> bytes:
    data = result.data
    header: dict[str, Any] = {
        "cache_format": CACHE_FORMAT,
        "url": result.url,
        "final_url": result.final_url,
        "content_type": result.content_type,
        "error_class": result.error.error_class if result.error else None,
        "error_detail": result.error.detail if result.error else None,
        "attempts": result.attempts,
        "size": len(data) if data is not None else None,
        "sha256": result.with_sha256().sha256,
        "gaia_version": __version__,
        "stored_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    # json.dumps escapes every newline inside strings, so the header is exactly one line.
    return json.dumps(header, ensure_ascii=True).encode("ascii") + b"\n"


def _write_atomically(path: Path, header: bytes, body: bytes) -> None:
    """Write ``header`` then ``body`` to a new file and rename it over ``path``.

    There is no fsync: a killed process cannot damage a renamed file, and an entry that a power
    loss damages fails the size and SHA-256 checks of ``get`` and is fetched again. With its two
    fsyncs, the cache cost about 4 ms of CPU per image in benchmarks/compare_img2dataset.py.
    """
    # tempfile.mkstemp is not used because its mode 0600 ignores the umask, which would hide
    # a cache shared by a group. The random suffix keeps concurrent writers of one URL apart.
    temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}{TEMP_SUFFIX}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    descriptor = os.open(temp, flags, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(header)
            file.write(body)
        # NOTE: on Windows, os.replace raises PermissionError while another process has the
        # old entry open; put() then reports the OSError. Only POSIX has been tested.
        os.replace(temp, path)
    except BaseException:
        # Also on KeyboardInterrupt, so that Ctrl-C leaves no temporary file behind.
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise


def _read_header(file: BinaryIO, url: str | None) -> dict[str, Any]:
    """Read and check the header line, and check that the file size matches it.

    ``url`` is the URL the entry must belong to; None accepts any URL.
    """
    line = file.readline(MAX_HEADER_BYTES)
    if not line.endswith(b"\n"):
        raise DamagedEntryError("its header line is missing, truncated or too long")
    try:
        header = json.loads(line)
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        raise DamagedEntryError(f"its header is not valid JSON ({error})") from error
    if not isinstance(header, dict):
        raise DamagedEntryError("its header is not a JSON object")

    if header.get("cache_format") != CACHE_FORMAT:
        raise OtherFormatError(f"cache format {header.get('cache_format')!r}, expected {CACHE_FORMAT}")
    _check_header(header, url)

    expected_size = len(line) + (header["size"] or 0)
    actual_size = os.fstat(file.fileno()).st_size
    if actual_size != expected_size:
        raise DamagedEntryError(f"the file has {actual_size} bytes, its header promises {expected_size}")
    return header


def _check_header(header: dict[str, Any], url: str | None) -> None:
    if not isinstance(header.get("url"), str) or (url is not None and header["url"] != url):
        raise DamagedEntryError(f"its header names another URL, {header.get('url')!r}")

    for name in ("final_url", "content_type", "error_class", "error_detail", "sha256"):
        if not isinstance(header.get(name), (str, type(None))):
            raise DamagedEntryError(f"{name} is {header.get(name)!r}, expected a string or null")
    for name in ("attempts", "size"):
        value = header.get(name)
        valid = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        if not valid and not (name == "size" and value is None):
            raise DamagedEntryError(f"{name} is {value!r}, expected a whole number of at least 0")

    if (header["size"] is None) != (header["sha256"] is None):
        raise DamagedEntryError("size and sha256 must both be set or both be null")
    if (header["error_class"] is None) != (header["error_detail"] is None):
        raise DamagedEntryError("error_class and error_detail must both be set or both be null")
    if header["size"] is None and header["error_class"] is None:
        raise DamagedEntryError("it has neither a body nor an error")
    if header["error_class"] is not None and not is_error_class(header["error_class"]):
        # Renamed or added by another gaia version, so the entry is not damaged, only foreign.
        raise OtherFormatError(f"unknown row error class {header['error_class']!r}")
    if header["error_class"] in OPTION_DEPENDENT_ERRORS:
        # Earlier gaia versions stored these failures, but the options may have changed since.
        raise OtherFormatError(f"option-dependent error class {header['error_class']!r}")


def _read_body(file: BinaryIO, header: dict[str, Any]) -> bytes | None:
    """Read the body and check its SHA-256. Return None when the entry stores no body."""
    size = header["size"]
    if size is None:
        return None

    # A buffered read(n) of a large n reads straight into the returned bytes object, so a
    # 60 MB body is copied once, from the kernel.
    data = file.read(size)
    if len(data) != size:
        raise DamagedEntryError(f"its body has {len(data)} bytes, its header promises {size}")
    digest = sha256_hex(data)
    if digest != header["sha256"]:
        raise DamagedEntryError(f"its body has SHA-256 {digest}, its header promises {header['sha256']}")
    return data


def _result_from_header(header: dict[str, Any], data: bytes | None) -> FetchResult:
    error = None
    if header["error_class"] is not None:
        error = RowError(header["error_class"], header["error_detail"])

    return FetchResult(
        url=header["url"],
        data=data,
        final_url=header["final_url"],
        content_type=header["content_type"],
        error=error,
        attempts=header["attempts"],
        transient=False,
        sha256=header["sha256"],  # _read_body has checked it against the body
    )


def _classify_entry(path: Path) -> str:
    """Return the CacheStats counter of an entry: successes, failures or unreadable."""
    try:
        with open(path, "rb") as file:
            header = _read_header(file, None)
    except (OSError, DamagedEntryError, OtherFormatError):
        return "unreadable"
    return "failures" if header["error_class"] is not None else "successes"


__all__ = [
    "CACHE_FORMAT",
    "CacheStats",
    "FetchCache",
    "default_cache_dir",
    "sha256_hex",
    "url_key",
]
