"""Fetch and process the images of a sequence of rows, and yield the rows in their input order.

``datasets`` consumes ``_generate_examples`` as a plain generator, so the asynchronous work runs
on an event loop in a background thread. The generator keeps a window of ``prefetch`` rows in
progress and yields each row as soon as it and every row before it are done. Closing the
generator early (``break``, ``take``) cancels the pending rows, closes the HTTP session and joins
the thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Generator, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp.abc

from .cache import FetchCache
from .config import FetchOptions, ImageOptions
from .errors import ImageError, RowError, redact_credentials
from .fetch import Fetcher, FetchResult, FetchStats
from .images import ProcessedImage, process_image
from .metadata import MetadataRow

logger = logging.getLogger(__name__)

T = TypeVar("T")

# How long closing the pipeline may wait for cancelled requests and the session to wind down.
SHUTDOWN_TIMEOUT = 10.0


@dataclass(frozen=True)
class RowOutcome:
    """One row with its image, or the reason it has none."""

    row: MetadataRow
    image: ProcessedImage | None = None
    fetch: FetchResult | None = None
    error: RowError | None = None
    from_cache: bool = False
    sha256: str | None = None  # of the fetched bytes, as 64 hexadecimal digits; None without bytes


@dataclass
class PipelineStats:
    """Counts of one pipeline run; ``fetch`` contains the per-host figures of the fetcher."""

    rows: int = 0
    images: int = 0
    from_cache: int = 0
    fetched: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    fetch: FetchStats | None = None

    def add(self, outcome: RowOutcome) -> None:
        self.rows += 1
        if outcome.image is not None:
            self.images += 1
        if outcome.error is not None:
            self.errors[outcome.error.error_class] += 1
        if outcome.from_cache:
            self.from_cache += 1
        elif outcome.fetch is not None and outcome.fetch.attempts > 0:
            self.fetched += 1


class _LoopThread:
    """An asyncio event loop running in a daemon thread, with a blocking way to run coroutines."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="gaia-fetch-loop", daemon=True)
        self._thread.start()

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return self.submit(coroutine).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(SHUTDOWN_TIMEOUT)
        if self._thread.is_alive():
            logger.warning("the fetch event loop did not stop within %.0f s", SHUTDOWN_TIMEOUT)
            return
        self.loop.close()


class RowPipeline:
    """Fetch, cache and process the images of rows, a bounded window at a time.

    Args:
        fetch_options: politeness, retry and deadline settings.
        image_options: how fetched bytes become the stored image.
        cache: the per-URL cache; None fetches everything and stores nothing.
        prefetch: rows in progress at once, the row last yielded included; it bounds memory
            whatever the number of rows.
        resolver_factory: builds the aiohttp resolver inside the event loop (tests inject one).
        workers: threads for decoding, resizing and encoding; defaults to the number of CPUs.
    """

    def __init__(
        self,
        *,
        fetch_options: FetchOptions,
        image_options: ImageOptions,
        cache: FetchCache | None = None,
        prefetch: int = 64,
        resolver_factory: Callable[[], aiohttp.abc.AbstractResolver] | None = None,
        workers: int | None = None,
    ) -> None:
        self.fetch_options = fetch_options
        self.image_options = image_options
        self.cache = cache
        self.prefetch = prefetch
        self.resolver_factory = resolver_factory
        self.workers = workers or os.cpu_count() or 1
        self.stats = PipelineStats()
        self._cache_failed = False

    def run(self, rows: Iterable[MetadataRow]) -> Generator[RowOutcome, None, None]:
        """Yield one outcome per row, in the order of ``rows``."""
        loop_thread = _LoopThread()
        # Threads, not processes, because Pillow 13 releases the GIL while it decodes, resizes and
        # compresses. On 2 cores, 512 rows of benchmarks/compare_img2dataset.py: threads 11.7 images/s
        # at 107 ms of CPU each, processes 11.8 images/s at 118 ms each and with 0.5 GB more memory.
        cpu_pool = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="gaia-image")
        io_pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="gaia-cache")
        fetcher: Fetcher | None = None
        pending: deque[concurrent.futures.Future[RowOutcome]] = deque()
        try:
            fetcher = loop_thread.run(self._open_fetcher())
            row_iterator = iter(rows)

            def refill() -> None:
                while len(pending) < self.prefetch:
                    row = next(row_iterator, None)
                    if row is None:
                        return
                    coroutine = self._process_row(row, fetcher, cpu_pool, io_pool)
                    pending.append(loop_thread.submit(coroutine))

            refill()
            while pending:
                outcome = pending.popleft().result()
                self.stats.add(outcome)
                yield outcome
                # Refilled only when the consumer requests the next row. So the rows in progress
                # and the row last yielded are at most ``prefetch``, and a consumer that stops
                # after n rows has started at most prefetch + n - 1 rows.
                refill()
        finally:
            for future in pending:
                future.cancel()
            if fetcher is not None:
                self._close_fetcher(loop_thread, fetcher)
            loop_thread.stop()
            cpu_pool.shutdown(wait=False, cancel_futures=True)
            io_pool.shutdown(wait=True, cancel_futures=True)

    async def _open_fetcher(self) -> Fetcher:
        resolver = self.resolver_factory() if self.resolver_factory is not None else None
        fetcher = Fetcher(self.fetch_options, resolver=resolver)
        return await fetcher.__aenter__()

    def _close_fetcher(self, loop_thread: _LoopThread, fetcher: Fetcher) -> None:
        async def close() -> None:
            current = asyncio.current_task()
            others = [task for task in asyncio.all_tasks() if task is not current]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            await fetcher.__aexit__(None, None, None)

        try:
            loop_thread.run(close(), timeout=SHUTDOWN_TIMEOUT)
        except concurrent.futures.TimeoutError:
            logger.warning("closing the HTTP session took longer than %.0f s", SHUTDOWN_TIMEOUT)
        self.stats.fetch = fetcher.stats

    def _hash_and_store(self, result: FetchResult) -> FetchResult:
        """Hash the body of ``result``, store the result in the cache if there is one, and return it.

        The returned result has ``sha256`` set. This runs in the I/O pool, because hashlib
        releases the GIL on large buffers, so neither the event loop nor the consumer waits.
        """
        result = result.with_sha256()
        if self.cache is None:
            return result
        # A full disk or a read-only cache must not end a build that can go on without it.
        try:
            self.cache.put(result)
        except OSError as error:
            if not self._cache_failed:
                logger.warning("cannot write to the fetch cache, continuing without storing: %s", error)
            self._cache_failed = True
        return result

    async def _process_row(
        self,
        row: MetadataRow,
        fetcher: Fetcher | None,
        cpu_pool: concurrent.futures.Executor,
        io_pool: concurrent.futures.Executor,
    ) -> RowOutcome:
        if row.error is not None or fetcher is None:
            return RowOutcome(row, error=row.error)

        url = row.values["image_src"]
        loop = asyncio.get_running_loop()
        result: FetchResult | None = None
        if self.cache is not None:
            result = await loop.run_in_executor(io_pool, self.cache.get, url)
        from_cache = result is not None
        if result is None:
            result = await fetcher.fetch(url)
            # Hashed once, off the event loop, for both the cache entry and the row's sha256.
            result = await loop.run_in_executor(io_pool, self._hash_and_store, result)

        if result.error is not None or result.data is None:
            return RowOutcome(row, fetch=result, error=result.error, from_cache=from_cache)
        source = result.final_url or redact_credentials(url)
        image = await loop.run_in_executor(cpu_pool, _process, result.data, self.image_options, source)
        if isinstance(image, RowError):
            return RowOutcome(row, fetch=result, error=image, from_cache=from_cache, sha256=result.sha256)
        return RowOutcome(row, image=image, fetch=result, from_cache=from_cache, sha256=result.sha256)


def _process(data: bytes, options: ImageOptions, source: str) -> ProcessedImage | RowError:
    """Return the processed image or the row error. Runs in the image pool."""
    try:
        return process_image(data, options, source=source)
    except ImageError as error:
        return error.row_error
    except Exception as error:  # a Pillow failure that images.py does not map must not end a build
        logger.exception("unexpected error while processing the image of %s", source)
        detail = f"{source}: unexpected {type(error).__name__} while decoding: {error}"
        return RowError("decode_error", detail)
