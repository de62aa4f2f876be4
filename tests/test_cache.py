"""Tests of the per-URL fetch cache: round trips, damaged entries, concurrent and killed writers."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import multiprocessing.context
import multiprocessing.synchronize
import os
import signal
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from gaia_builder.cache import CACHE_FORMAT, CacheStats, FetchCache, default_cache_dir, sha256_hex, url_key
from gaia_builder.errors import OPTION_DEPENDENT_ERRORS, RowError
from gaia_builder.fetch import FetchResult

# Every wait on another process gives up after this many seconds.
DEADLINE = 60.0
WORKERS = 4
ROUNDS = 12
SHARED_URL = "http://127.0.0.1/shared.png"
BODY_SIZE = 64 * 1024


def png_bytes(width: int = 32, height: int = 24) -> bytes:
    image = Image.new("RGB", (width, height), (12, 90, 200))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def success(url: str, data: bytes, attempts: int = 1) -> FetchResult:
    return FetchResult(
        url=url,
        data=data,
        final_url=url + "?redirected=1",
        content_type="image/png",
        error=None,
        attempts=attempts,
        transient=False,
    )


def failure(url: str, error: RowError, *, transient: bool = False) -> FetchResult:
    return FetchResult(
        url=url,
        data=None,
        final_url=None,
        content_type=None,
        error=error,
        attempts=3,
        transient=transient,
    )


def worker_body(worker: int, round_number: int) -> bytes:
    """Return a body that identifies the worker and round that wrote it, so a mixed write shows up."""
    stamp = f"{worker}:{round_number}:".encode()
    return stamp + bytes([worker]) * (BODY_SIZE - len(stamp))


def own_url(worker: int, round_number: int) -> str:
    return f"http://127.0.0.1/worker-{worker}/{round_number}.png"


def put_many(root: str, worker: int, barrier: multiprocessing.synchronize.Barrier) -> None:
    """Worker process: put the shared URL and this worker's own URLs, starting with the others."""
    cache = FetchCache(root)
    barrier.wait(timeout=DEADLINE)
    for round_number in range(ROUNDS):
        cache.put(success(SHARED_URL, worker_body(worker, round_number)))
        cache.put(success(own_url(worker, round_number), worker_body(worker, round_number)))


def put_until_replace(root: str, url: str, before_replace: multiprocessing.synchronize.Event) -> None:
    """Worker process: write an entry, then hang just before os.replace until killed."""

    replace = os.replace

    def hang(src: Any, dst: Any, **options: Any) -> None:
        if not os.fspath(dst).endswith(".entry"):
            replace(src, dst, **options)  # the CACHEDIR.TAG of a new cache
            return
        before_replace.set()
        threading.Event().wait(timeout=DEADLINE)
        raise TimeoutError("the test did not kill this writer in time")

    os.replace = hang
    FetchCache(root).put(success(url, b"new body " * 1000))


def entry_files(root: Path) -> list[Path]:
    return sorted(root.glob("??/*.entry"))


def temporary_files(root: Path) -> list[Path]:
    return sorted(root.glob("??/*.tmp"))


def spawn_context() -> multiprocessing.context.SpawnContext:
    # spawn exists on every platform (fork does not on Windows) and starts a clean interpreter.
    return multiprocessing.get_context("spawn")


@pytest.fixture
def cache(tmp_path: Path) -> FetchCache:
    return FetchCache(tmp_path / "fetch")


def test_get_absent_returns_none(cache: FetchCache) -> None:
    assert cache.get("http://127.0.0.1/missing.png") is None
    assert "http://127.0.0.1/missing.png" not in cache


def test_success_round_trip(cache: FetchCache) -> None:
    url = "http://127.0.0.1/images/a.png?itok=abc"
    stored = success(url, png_bytes(), attempts=2)

    cache.put(stored)
    loaded = cache.get(url)

    assert loaded == stored
    assert loaded is not None
    assert loaded.ok
    assert loaded.sha256 == hashlib.sha256(png_bytes()).hexdigest()
    assert url in cache


def test_success_round_trip_decodes(cache: FetchCache) -> None:
    url = "http://127.0.0.1/images/b.png"
    cache.put(success(url, png_bytes(40, 30)))

    loaded = cache.get(url)

    assert loaded is not None
    assert loaded.data is not None
    assert Image.open(io.BytesIO(loaded.data)).size == (40, 30)


def test_empty_body_round_trip(cache: FetchCache) -> None:
    """An empty body comes back as b"", not as None."""
    url = "http://127.0.0.1/empty"
    cache.put(success(url, b""))

    loaded = cache.get(url)

    assert loaded is not None
    assert loaded.data == b""


def test_failure_round_trip(cache: FetchCache) -> None:
    url = "http://127.0.0.1/gone.png"
    stored = failure(url, RowError("http_404", "http://127.0.0.1/gone.png: 404 Not Found"))

    cache.put(stored)
    loaded = cache.get(url)

    assert loaded == stored
    assert loaded is not None
    assert not loaded.ok
    assert url in cache


def test_entry_layout(cache: FetchCache) -> None:
    """An entry is one file named by the URL's SHA-256, in a folder named by its first two digits."""
    url = "http://127.0.0.1/layout.png"
    body = png_bytes()
    cache.put(success(url, body))

    key = url_key(url)
    path = cache.root / key[:2] / f"{key}.entry"
    header_line, _, stored_body = path.read_bytes().partition(b"\n")
    header = json.loads(header_line)

    assert entry_files(cache.root) == [path]
    assert cache.entry_path(url) == path
    assert stored_body == body
    assert header["cache_format"] == CACHE_FORMAT
    assert header["url"] == url
    assert header["sha256"] == sha256_hex(body)
    assert header["size"] == len(body)
    assert "gaia_version" in header
    assert "stored_at" in header


def test_transient_failure_not_stored(cache: FetchCache) -> None:
    url = "http://127.0.0.1/busy.png"
    cache.put(failure(url, RowError("http_503", "503 Service Unavailable"), transient=True))

    assert cache.get(url) is None
    assert url not in cache
    assert entry_files(cache.root) == []


def test_transient_failure_keeps_entry(cache: FetchCache) -> None:
    """A transient failure does not replace an entry stored earlier."""
    url = "http://127.0.0.1/busy.png"
    stored = success(url, png_bytes())
    cache.put(stored)

    cache.put(failure(url, RowError("timeout", "read timed out"), transient=True))

    assert cache.get(url) == stored


@pytest.mark.parametrize("error_class", sorted(OPTION_DEPENDENT_ERRORS))
def test_option_dependent_failure_not_stored(cache: FetchCache, error_class: str) -> None:
    """A failure that another max_bytes, max_redirects or directive list may avoid is not stored."""
    url = "http://127.0.0.1/big.png"
    cache.put(failure(url, RowError(error_class, "depends on an option")))

    assert cache.get(url) is None
    assert entry_files(cache.root) == []


def test_option_dependent_entry_ignored(cache: FetchCache) -> None:
    """An entry of too_large, as older versions stored, is read as absent and so fetched again."""
    url = "http://127.0.0.1/big.png"
    cache.put(failure(url, RowError("http_404", "404 Not Found")))
    path = cache.entry_path(url)
    header_line, _, body = path.read_bytes().partition(b"\n")
    header = json.loads(header_line)
    header["error_class"] = "too_large"
    path.write_bytes(json.dumps(header).encode() + b"\n" + body)

    assert cache.get(url) is None
    assert url not in cache


def test_put_replaces_entry(cache: FetchCache) -> None:
    url = "http://127.0.0.1/changed.png"
    cache.put(success(url, png_bytes()))
    replacement = failure(url, RowError("not_an_image", "text/html page"))

    cache.put(replacement)

    assert cache.get(url) == replacement
    assert len(entry_files(cache.root)) == 1


def test_put_without_outcome_not_stored(cache: FetchCache, caplog: pytest.LogCaptureFixture) -> None:
    """A result with neither data nor an error is logged and skipped, not raised."""
    url = "http://127.0.0.1/nothing.png"
    result = FetchResult(
        url=url, data=None, final_url=None, content_type=None, error=None, attempts=1, transient=False
    )

    with caplog.at_level(logging.WARNING, logger="gaia_builder.cache"):
        cache.put(result)

    assert cache.get(url) is None
    assert url in caplog.text


def test_put_unwritable_root_raises(tmp_path: Path) -> None:
    """The OSError names the URL and suggests a fix."""
    root = tmp_path / "not-a-folder"
    root.write_bytes(b"")
    url = "http://127.0.0.1/a.png"

    with pytest.raises(OSError, match="use_fetch_cache=False") as raised:
        FetchCache(root).put(success(url, b"body"))

    assert url in str(raised.value)
    assert temporary_files(tmp_path) == []


def corrupt_truncated_body(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-10])


def corrupt_header_json(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(b"{not json" + data[data.index(b"\n") :])


def corrupt_body_byte(path: Path) -> None:
    """Flip one body byte, keeping the size, so only the SHA-256 check can notice."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def corrupt_missing_newline(path: Path) -> None:
    path.write_bytes(path.read_bytes().split(b"\n")[0][:20])


def corrupt_header_url(path: Path) -> None:
    header_line, _, body = path.read_bytes().partition(b"\n")
    header = json.loads(header_line)
    header["url"] = "http://127.0.0.1/another.png"
    path.write_bytes(json.dumps(header).encode() + b"\n" + body)


def corrupt_attempts_type(path: Path) -> None:
    header_line, _, body = path.read_bytes().partition(b"\n")
    header = json.loads(header_line)
    header["attempts"] = "three"
    path.write_bytes(json.dumps(header).encode() + b"\n" + body)


@pytest.mark.parametrize(
    "corrupt",
    [
        corrupt_truncated_body,
        corrupt_header_json,
        corrupt_body_byte,
        corrupt_missing_newline,
        corrupt_header_url,
        corrupt_attempts_type,
    ],
)
def test_damaged_entry_ignored_with_warning(
    cache: FetchCache, caplog: pytest.LogCaptureFixture, corrupt: Callable[[Path], None]
) -> None:
    url = "http://127.0.0.1/damaged.png"
    cache.put(success(url, png_bytes()))
    corrupt(cache.entry_path(url))

    with caplog.at_level(logging.WARNING, logger="gaia_builder.cache"):
        loaded = cache.get(url)

    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert loaded is None
    assert len(warnings) == 1
    assert url in warnings[0].getMessage()


@pytest.mark.parametrize("corrupt", [corrupt_truncated_body, corrupt_header_json, corrupt_header_url])
def test_contains_damaged_entry_false(cache: FetchCache, corrupt: Callable[[Path], None]) -> None:
    url = "http://127.0.0.1/damaged.png"
    cache.put(success(url, png_bytes()))
    corrupt(cache.entry_path(url))

    assert url not in cache


def test_unreadable_entry_ignored_with_warning(cache: FetchCache, caplog: pytest.LogCaptureFixture) -> None:
    """An entry path that cannot be opened (here a folder) is treated as absent."""
    url = "http://127.0.0.1/folder.png"
    cache.entry_path(url).mkdir(parents=True)

    with caplog.at_level(logging.WARNING, logger="gaia_builder.cache"):
        loaded = cache.get(url)

    assert loaded is None
    assert url not in cache
    assert "failed to read" in caplog.text


def test_damaged_entry_replaced_by_put(cache: FetchCache) -> None:
    url = "http://127.0.0.1/damaged.png"
    cache.put(success(url, png_bytes()))
    corrupt_truncated_body(cache.entry_path(url))
    stored = success(url, png_bytes(8, 8))

    cache.put(stored)

    assert cache.get(url) == stored


def test_other_format_ignored_quietly(cache: FetchCache, caplog: pytest.LogCaptureFixture) -> None:
    """An entry of another cache format is skipped without a warning: it is expected after an upgrade."""
    url = "http://127.0.0.1/old.png"
    cache.put(success(url, png_bytes()))
    path = cache.entry_path(url)
    header_line, _, body = path.read_bytes().partition(b"\n")
    header = json.loads(header_line)
    header["cache_format"] = CACHE_FORMAT + 1
    path.write_bytes(json.dumps(header).encode() + b"\n" + body)

    with caplog.at_level(logging.WARNING, logger="gaia_builder.cache"):
        loaded = cache.get(url)

    assert loaded is None
    assert url not in cache
    assert caplog.records == []


def test_unknown_error_class_ignored(cache: FetchCache) -> None:
    url = "http://127.0.0.1/renamed.png"
    cache.put(failure(url, RowError("http_404", "404 Not Found")))
    path = cache.entry_path(url)
    header_line, _, body = path.read_bytes().partition(b"\n")
    header = json.loads(header_line)
    header["error_class"] = "class_from_a_later_version"
    path.write_bytes(json.dumps(header).encode() + b"\n" + body)

    assert cache.get(url) is None


def test_large_entry_read_copies_once(cache: FetchCache) -> None:
    """Reading an entry allocates about one body's worth of memory, not two."""
    url = "http://127.0.0.1/large.tif"
    size = 16 * 1024 * 1024
    cache.put(success(url, os.urandom(size)))

    tracemalloc.start()
    try:
        loaded = cache.get(url)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert loaded is not None
    assert loaded.data is not None
    assert len(loaded.data) == size
    assert peak < 1.25 * size


def test_default_cache_dir_reads_datasets_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The folder follows HF_DATASETS_CACHE as set at call time, not at import time."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "elsewhere")

    assert default_cache_dir() == tmp_path / "elsewhere" / "gaia" / "fetch"


def test_stats_counts_entries(cache: FetchCache) -> None:
    for number in range(3):
        cache.put(success(f"http://127.0.0.1/{number}.png", png_bytes()))
    cache.put(failure("http://127.0.0.1/gone.png", RowError("http_404", "404 Not Found")))
    cache.put(success("http://127.0.0.1/damaged.png", png_bytes()))
    corrupt_truncated_body(cache.entry_path("http://127.0.0.1/damaged.png"))
    leftover = cache.entry_path("http://127.0.0.1/killed.png").with_suffix(".0123.tmp")
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"partial")
    on_disk = sum(path.stat().st_size for path in entry_files(cache.root) + temporary_files(cache.root))

    stats = cache.stats()

    assert stats == CacheStats(
        entries=4, successes=3, failures=1, unreadable=1, temporary_files=1, total_bytes=on_disk
    )


def test_stats_missing_root(tmp_path: Path) -> None:
    stats = FetchCache(tmp_path / "absent").stats()

    assert stats == CacheStats(
        entries=0, successes=0, failures=0, unreadable=0, temporary_files=0, total_bytes=0
    )


def test_clear_removes_entries(cache: FetchCache) -> None:
    """clear removes entries, temporary files and empty fan-out folders, and keeps other files."""
    urls = [f"http://127.0.0.1/{number}.png" for number in range(5)]
    for url in urls:
        cache.put(success(url, png_bytes()))
    leftover = cache.entry_path(urls[0]).with_suffix(".0123.tmp")
    leftover.write_bytes(b"partial")
    notes = cache.root / "notes.txt"
    notes.write_text("kept")

    cache.clear()

    assert cache.stats().entries == 0
    assert cache.stats().temporary_files == 0
    assert all(cache.get(url) is None for url in urls)
    assert sorted(path.name for path in cache.root.iterdir()) == ["CACHEDIR.TAG", "notes.txt"]


def test_clear_then_put(cache: FetchCache) -> None:
    url = "http://127.0.0.1/again.png"
    cache.put(success(url, png_bytes()))
    cache.clear()
    stored = success(url, png_bytes())

    cache.put(stored)

    assert cache.get(url) == stored


def test_cachedir_tag_written(cache: FetchCache) -> None:
    cache.put(success("http://127.0.0.1/a.png", b"body"))

    tag = (cache.root / "CACHEDIR.TAG").read_bytes()

    assert tag.startswith(b"Signature: 8a477f597d28d172789f06886806bc55")


def test_remove_temporary_files_by_age(cache: FetchCache) -> None:
    cache.put(success("http://127.0.0.1/a.png", b"body"))
    folder = cache.entry_path("http://127.0.0.1/a.png").parent
    old = folder / ".old.tmp"
    recent = folder / ".recent.tmp"
    old.write_bytes(b"partial")
    recent.write_bytes(b"partial")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))

    removed = cache.remove_temporary_files(older_than=3600)

    assert removed == 1
    assert not old.exists()
    assert recent.exists()
    assert cache.get("http://127.0.0.1/a.png") is not None


def test_concurrent_puts_leave_complete_entries(cache: FetchCache, caplog: pytest.LogCaptureFixture) -> None:
    """Four processes put one shared URL and their own URLs while this process reads the shared one."""
    context = spawn_context()
    barrier = context.Barrier(WORKERS)
    workers = [
        context.Process(target=put_many, args=(str(cache.root), worker, barrier)) for worker in range(WORKERS)
    ]
    expected_shared = {worker_body(worker, n) for worker in range(WORKERS) for n in range(ROUNDS)}

    for process in workers:
        process.start()
    reads: list[bytes | None] = []
    deadline = time.monotonic() + DEADLINE
    with caplog.at_level(logging.WARNING, logger="gaia_builder.cache"):
        while any(process.is_alive() for process in workers) and time.monotonic() < deadline:
            result = cache.get(SHARED_URL)
            reads.append(result.data if result is not None else None)
    for process in workers:
        process.join(timeout=max(0.0, deadline - time.monotonic()))

    assert [process.exitcode for process in workers] == [0] * WORKERS
    assert caplog.records == []
    assert reads
    assert all(data is None or data in expected_shared for data in reads)
    assert temporary_files(cache.root) == []
    assert cache.stats().unreadable == 0
    assert cache.stats().entries == 1 + WORKERS * ROUNDS
    shared = cache.get(SHARED_URL)
    assert shared is not None
    assert shared.data in expected_shared
    for worker in range(WORKERS):
        for round_number in range(ROUNDS):
            loaded = cache.get(own_url(worker, round_number))
            assert loaded is not None
            assert loaded.data == worker_body(worker, round_number)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
@pytest.mark.parametrize("previous", [None, b"old body"])
def test_killed_writer_leaves_no_entry(cache: FetchCache, previous: bytes | None) -> None:
    """A writer killed with SIGKILL before os.replace leaves the earlier entry, or none, visible."""
    url = "http://127.0.0.1/killed.png"
    if previous is not None:
        cache.put(success(url, previous))
    context = spawn_context()
    before_replace = context.Event()
    writer = context.Process(target=put_until_replace, args=(str(cache.root), url, before_replace))

    writer.start()
    reached = before_replace.wait(timeout=DEADLINE)
    writer.kill()
    writer.join(timeout=DEADLINE)

    assert reached
    assert writer.exitcode == -signal.SIGKILL
    assert len(temporary_files(cache.root)) == 1
    loaded = cache.get(url)
    if previous is None:
        assert loaded is None
        assert url not in cache
        assert cache.stats().entries == 0
    else:
        assert loaded is not None
        assert loaded.data == previous
        assert cache.stats().entries == 1
