"""Streaming: ``load_dataset("gaia", streaming=True)`` against a threaded loopback image server.

Each test starts its own server, which counts the requests it receives and can hold chosen
rows until the test releases them, so that a test can see which rows are still in flight.
"""

from __future__ import annotations

import gc
import inspect
import logging
import multiprocessing
import queue
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import datasets
import pytest
from datasets.distributed import split_dataset_by_node
from factories import image_bytes, record, write_metadata
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

import gaia  # noqa: F401  (registers "gaia" with datasets)
from gaia_builder.builder import DEFAULT_NUM_SHARDS, WORLD_SIZE_ENV
from gaia_builder.errors import RowError

# Seconds a delayed request waits for the test to release it before the server responds anyway,
# and the maximum time a test waits for threads to end or for requests to arrive.
HOLD_TIMEOUT = 10.0
WAIT_TIMEOUT = 10.0
PROCESS_TIMEOUT = 60.0

# Fast, still polite settings for a loopback server, and small images so that processing is cheap.
FAST = {
    "max_requests_per_second_per_host": 1000.0,
    "rate_burst": 100,
    "max_retries": 1,
    "backoff_initial": 0.0,
    "backoff_max": 0.01,
    "connect_timeout": 5.0,
    "read_timeout": HOLD_TIMEOUT + 5.0,
    "attempt_timeout": HOLD_TIMEOUT + 10.0,
    "image_size": 32,
}

# Row kinds of a mixed corpus, cycled through by row number, with the error class of each.
KINDS = ("png", "jpeg", "gone", "png", "page", "moved", "jpeg", "error", "invalid", "missing")
EXPECTED_CLASS = {
    "png": None,
    "jpeg": None,
    "moved": None,
    "gone": "http_404",
    "page": "not_an_image",
    "error": "http_500",
    "invalid": "invalid_url",
    "missing": "invalid_metadata",
}


class ImageServer:
    """A threaded loopback server of generated images that counts requests and can hold them.

    ``/png/<n>.png`` and ``/jpeg/<n>.jpg`` serve image ``n``. ``/gone/`` responds with 404,
    ``/page/`` with an HTML page, ``/error/`` with 500, and ``/moved/<n>.png`` redirects to
    ``/png/<n>.png``. A row for which ``hold(n)`` is true gets its response only once
    ``release`` is set, and every other request waits ``latency`` seconds.
    """

    def __init__(self, server: HTTPServer) -> None:
        self.server = server
        self.release = threading.Event()
        self.hold: Callable[[int], bool] = lambda number: False
        self.latency = 0.0  # seconds every request waits before its response
        self._never_set = threading.Event()
        self.received: list[int] = []
        self.completed = 0
        self.active = 0
        self.peak = 0
        self.handler_threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        server.expect_request(re.compile("^/")).respond_with_handler(self.handle)

    def url(self, kind: str, number: int) -> str | None:
        if kind == "missing":
            return None
        if kind == "invalid":
            return f"ftp://images.invalid/{number}.jpg"
        suffix = "jpg" if kind in ("jpeg", "gone", "page", "error") else "png"
        return self.server.url_for(f"/{kind}/{number}.{suffix}")

    def handle(self, request: Request) -> Response:
        kind, name = request.path.strip("/").split("/")
        number = int(name.split(".")[0])
        with self._lock:
            self.received.append(number)
            self.handler_threads.add(threading.current_thread())
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            if self.hold(number):
                self.release.wait(HOLD_TIMEOUT)
            elif self.latency:
                self._never_set.wait(self.latency)
            return self.respond(kind, number)
        finally:
            with self._lock:
                self.active -= 1
                self.completed += 1

    def respond(self, kind: str, number: int) -> Response:
        size = (40 + 8 * (number % 5), 32 + 8 * (number % 3))
        if kind == "png":
            return Response(image_bytes(size, "PNG", seed=number), content_type="image/png")
        if kind == "jpeg":
            return Response(image_bytes(size, "JPEG", seed=number), content_type="image/jpeg")
        if kind == "moved":
            return Response("", status=301, headers={"Location": f"/png/{number}.png"})
        if kind == "page":
            return Response("<!doctype html><html><body>moved</body></html>", content_type="text/html")
        if kind == "error":
            return Response("try later", status=500)
        return Response("not found", status=404)

    def wait_for_received(self, count: int) -> int:
        """Poll until ``count`` requests have arrived or WAIT_TIMEOUT passes; return the count."""
        deadline = time.monotonic() + WAIT_TIMEOUT
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return len(self.received)


@pytest.fixture(scope="module")
def http_server() -> Iterator[HTTPServer]:
    # Threaded, unlike the httpserver fixture, so that a held request does not block the others.
    # One per module, because stopping one takes half a second.
    http_server = HTTPServer(host="127.0.0.1", threaded=True)
    http_server.start()
    yield http_server
    http_server.stop()


@pytest.fixture
def server(http_server: HTTPServer) -> Iterator[ImageServer]:
    http_server.clear()
    image_server = ImageServer(http_server)
    try:
        yield image_server
    finally:
        image_server.release.set()
    http_server.check()


def options(tmp_path: Path, fetch_cache: str = "fetch-cache", **overrides: Any) -> dict[str, Any]:
    values = {
        **FAST,
        "fetch_cache_dir": str(tmp_path / fetch_cache),
        "cache_dir": str(tmp_path / "datasets"),
    }
    values.update(overrides)
    return values


def write_corpus(server: ImageServer, tmp_path: Path, rows: int, kinds: tuple[str, ...] = ("png",)) -> Path:
    # image_src is set afterwards because record() takes a string, and it is None for "missing" rows.
    records = [
        {**record(number, ""), "image_src": server.url(kinds[number % len(kinds)], number)}
        for number in range(rows)
    ]
    return write_metadata(tmp_path / "val_data.json", records, "records")


def stream(metadata: Path, **config: Any) -> datasets.IterableDataset:
    return datasets.load_dataset(
        "gaia", split="validation", data_files={"validation": str(metadata)}, streaming=True, **config
    )


def ids(rows: int) -> list[str]:
    """Return the ids of the first ``rows`` records, in metadata order."""
    return [record(number, "")["id"] for number in range(rows)]


def wait_for_threads_to_end(before: set[threading.Thread], ignored: set[threading.Thread]) -> set[str]:
    """Poll until no thread started since ``before`` is alive; return the names of those left."""
    deadline = time.monotonic() + WAIT_TIMEOUT
    while True:
        known = before | ignored
        extra = {thread.name for thread in threading.enumerate() if thread not in known}
        if not extra or time.monotonic() > deadline:
            return extra
        time.sleep(0.01)


def shutdown_complaints(caplog: pytest.LogCaptureFixture, stderr: str) -> list[str]:
    """Return the warnings and errors logged, and the asyncio and aiohttp complaints on stderr."""
    logged = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    printed = [
        line
        for line in stderr.splitlines()
        if "Task was destroyed" in line or "Unclosed" in line or "Exception ignored" in line
    ]
    return logged + printed


@pytest.mark.parametrize("num_shards", [1, 3, 7])
def test_streaming_equals_prepared(num_shards: int, server: ImageServer, tmp_path: Path) -> None:
    """Streamed rows have the features, values, images and row errors of the prepared split."""
    rows = 60
    metadata = write_corpus(server, tmp_path, rows, KINDS)

    prepared = datasets.load_dataset(
        "gaia",
        split="validation",
        data_files={"validation": str(metadata)},
        **options(tmp_path, "prepared-fetch-cache", num_shards=num_shards),
    )
    requests_for_prepared = len(server.received)
    # Its own fetch cache, so that the streaming run fetches every image itself.
    streamed = stream(metadata, **options(tmp_path, "streamed-fetch-cache", num_shards=num_shards))

    assert streamed.features == prepared.features
    assert streamed.num_shards == num_shards
    raw = datasets.Image(decode=False)
    prepared_rows = list(prepared.cast_column("image", raw))
    streamed_rows = list(streamed.cast_column("image", raw))
    assert len(streamed_rows) == rows
    assert len(server.received) == 2 * requests_for_prepared
    for number, (streamed_row, prepared_row) in enumerate(zip(streamed_rows, prepared_rows, strict=True)):
        assert streamed_row == prepared_row, number
    classes = [RowError.parse(row["error"]).error_class if row["error"] else None for row in streamed_rows]
    assert classes == [EXPECTED_CLASS[KINDS[number % len(KINDS)]] for number in range(rows)]


def take_five(dataset: datasets.IterableDataset) -> list[dict[str, Any]]:
    return list(dataset.take(5))


def break_after_five(dataset: datasets.IterableDataset) -> list[dict[str, Any]]:
    rows = []
    for row in dataset:
        rows.append(row)
        if len(rows) == 5:
            break
    return rows


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("consume", [take_five, break_after_five], ids=["take", "break"])
def test_early_stop_cancels_pending(
    consume: Callable[[datasets.IterableDataset], list[dict[str, Any]]],
    server: ImageServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Stopping after five rows cancels the held requests, ends every thread and warns of nothing.

    Rows 0 to 5 get their response at once, because take(5) in datasets 5.2 reads a sixth row
    before it stops. Later rows are held, so they are still in flight when the loop stops.
    """
    prefetch = 8
    server.hold = lambda number: number >= 6
    metadata = write_corpus(server, tmp_path, 200)
    dataset = stream(metadata, **options(tmp_path, prefetch=prefetch, num_shards=1))
    caplog.set_level(logging.WARNING)
    before = set(threading.enumerate())

    rows = consume(dataset)
    left = wait_for_threads_to_end(before, server.handler_threads)
    received = len(server.received)
    gc.collect()  # runs the finalizers that would report an unclosed session or a pending task

    assert [row["id"] for row in rows] == ids(5)
    assert left == set()
    assert received <= prefetch + 5
    assert shutdown_complaints(caplog, capfd.readouterr().err) == []


def test_first_row_before_window_fills(server: ImageServer, tmp_path: Path) -> None:
    """Row 0 is yielded as soon as it arrives, while the other rows of the window are held."""
    prefetch = 8
    server.hold = lambda number: number >= 1
    metadata = write_corpus(server, tmp_path, 40)
    dataset = stream(
        metadata, **options(tmp_path, prefetch=prefetch, max_connections_per_host=prefetch, num_shards=1)
    )

    iterator = iter(dataset)
    try:
        first = next(iterator)
        completed_at_first_row = server.completed
        in_flight = server.wait_for_received(prefetch)
        completed_later = server.completed
    finally:
        iterator.close()

    assert first["id"] == ids(1)[0]
    assert first["error"] is None
    assert completed_at_first_row == 1
    assert in_flight == prefetch
    assert completed_later == 1


def test_window_bounds_requests(server: ImageServer, tmp_path: Path) -> None:
    """Whenever the consumer has just read row i, at most prefetch + i requests have been sent."""
    prefetch = 4
    rows = 40
    metadata = write_corpus(server, tmp_path, rows)
    dataset = stream(metadata, **options(tmp_path, prefetch=prefetch, num_shards=1))

    requests_at_row = [len(server.received) for _ in dataset]

    assert len(requests_at_row) == rows
    assert [index for index, count in enumerate(requests_at_row) if count > prefetch + index] == []
    assert requests_at_row[-1] == rows


# contiguous=False is how datasets hands shards to DataLoader workers.
@pytest.mark.parametrize(
    ("num_shards", "parts", "contiguous"), [(6, 2, True), (6, 3, True), (7, 3, True), (7, 3, False)]
)
def test_shard_covers_rows_once(
    num_shards: int, parts: int, contiguous: bool, server: ImageServer, tmp_path: Path
) -> None:
    """IterableDataset.shard parts yield every row once, and each image is requested once."""
    rows = 30
    metadata = write_corpus(server, tmp_path, rows)
    dataset = stream(metadata, **options(tmp_path, num_shards=num_shards, use_fetch_cache=False))

    streamed = [
        row["id"]
        for index in range(parts)
        for row in dataset.shard(num_shards=parts, index=index, contiguous=contiguous)
    ]

    assert sorted(streamed) == sorted(ids(rows))
    assert Counter(server.received) == Counter(range(rows))


@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_split_by_node_covers_rows_once(
    world_size: int, server: ImageServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under torchrun's WORLD_SIZE, nodes get whole shards: each row and each request once."""
    monkeypatch.setenv(WORLD_SIZE_ENV, str(world_size))
    rows = 45
    metadata = write_corpus(server, tmp_path, rows)
    dataset = stream(metadata, **options(tmp_path, use_fetch_cache=False))

    per_node = [
        [row["id"] for row in split_dataset_by_node(dataset, rank=rank, world_size=world_size)]
        for rank in range(world_size)
    ]

    assert dataset.num_shards % world_size == 0
    assert dataset.num_shards >= DEFAULT_NUM_SHARDS
    assert sorted(row_id for node in per_node for row_id in node) == sorted(ids(rows))
    assert Counter(server.received) == Counter(range(rows))


@pytest.mark.skipif(
    "strategy" not in inspect.signature(split_dataset_by_node).parameters,
    reason="split_dataset_by_node has no strategy argument in this datasets version",
)
def test_split_by_node_strategy_shards(server: ImageServer, tmp_path: Path) -> None:
    """With strategy='shards', 7 shards over 3 nodes still give each row and request once."""
    rows = 21
    metadata = write_corpus(server, tmp_path, rows)
    dataset = stream(metadata, **options(tmp_path, num_shards=7, use_fetch_cache=False))

    streamed = [
        row["id"]
        for rank in range(3)
        for row in split_dataset_by_node(dataset, rank=rank, world_size=3, strategy="shards")
    ]

    assert sorted(streamed) == sorted(ids(rows))
    assert Counter(server.received) == Counter(range(rows))


def test_num_shards_not_multiple_of_world_size_warns(
    server: ImageServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(WORLD_SIZE_ENV, "3")
    metadata = write_corpus(server, tmp_path, 3)

    with caplog.at_level(logging.WARNING, logger="gaia_builder.builder"):
        stream(metadata, **options(tmp_path, num_shards=16))

    assert "num_shards=16 is not a multiple of WORLD_SIZE=3" in caplog.text


def test_dataloader_two_workers(server: ImageServer, tmp_path: Path) -> None:
    """Two DataLoader worker processes yield every row once and request each image once."""
    torch_data = pytest.importorskip("torch.utils.data")
    rows = 24
    metadata = write_corpus(server, tmp_path, rows)
    dataset = stream(metadata, **options(tmp_path, num_shards=4, use_fetch_cache=False))

    loader = torch_data.DataLoader(
        dataset.select_columns(["id", "error"]), batch_size=None, num_workers=2, timeout=PROCESS_TIMEOUT
    )
    streamed = [row["id"] for row in loader]

    assert sorted(streamed) == sorted(ids(rows))
    assert Counter(server.received) == Counter(range(rows))


def iterate_in_child(dataset: datasets.IterableDataset, index: int, start: Any, messages: Any) -> None:
    """Iterate one of two shards of ``dataset`` once ``start`` is set; send the ids read."""
    messages.put("ready")
    if not start.wait(PROCESS_TIMEOUT):
        return
    part = dataset.shard(num_shards=2, index=index)
    messages.put([row["id"] for row in part])


def test_worker_processes_share_host_limits(server: ImageServer, tmp_path: Path) -> None:
    """Two processes streaming one shard each never hold more than max_connections_per_host.

    Each process alone may hold that many connections, so without the limits shared through
    files the server would see twice as many requests at once.
    """
    rows = 24
    connections = 2
    server.latency = 0.05  # so that requests of the two processes overlap
    metadata = write_corpus(server, tmp_path, rows)
    dataset = stream(
        metadata,
        **options(tmp_path, num_shards=4, use_fetch_cache=False, max_connections_per_host=connections),
    )
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    messages = context.Queue()
    children = [
        context.Process(target=iterate_in_child, args=(dataset, index, start, messages)) for index in range(2)
    ]

    for child in children:
        child.start()
    try:
        ready = [messages.get(timeout=PROCESS_TIMEOUT) for _ in children]
        start.set()
        reports = [messages.get(timeout=PROCESS_TIMEOUT) for _ in children]
    except queue.Empty:
        pytest.fail(f"a child process sent nothing within {PROCESS_TIMEOUT} s")
    finally:
        for child in children:
            child.join(PROCESS_TIMEOUT)
            if child.is_alive():
                child.kill()

    assert ready == ["ready", "ready"]
    assert sorted(row_id for report in reports for row_id in report) == sorted(ids(rows))
    assert Counter(server.received) == Counter(range(rows))
    assert server.peak <= connections
    assert [child.exitcode for child in children] == [0, 0]


def test_stream_after_build_reads_fetch_cache(server: ImageServer, tmp_path: Path) -> None:
    """A streaming run after a build reads the fetched images, and permanent failures, from the cache."""
    rows = 10
    metadata = write_corpus(server, tmp_path, rows, ("png", "gone"))
    config = options(tmp_path)

    prepared = datasets.load_dataset(
        "gaia", split="validation", data_files={"validation": str(metadata)}, **config
    )
    requests_after_build = len(server.received)
    streamed = list(stream(metadata, **config))

    assert requests_after_build == rows
    assert len(server.received) == rows
    assert [row["error"] for row in streamed] == prepared["error"]
    assert [row["sha256"] for row in streamed] == prepared["sha256"]


def test_second_stream_sends_no_request(server: ImageServer, tmp_path: Path) -> None:
    rows = 10
    metadata = write_corpus(server, tmp_path, rows)
    config = options(tmp_path)

    first = [row["sha256"] for row in stream(metadata, **config)]
    requests_after_first = len(server.received)
    second = [row["sha256"] for row in stream(metadata, **config)]

    assert requests_after_first == rows
    assert len(server.received) == rows
    assert second == first
