"""Resuming an interrupted build from the fetch cache, and reloading a prepared split offline.

Builds run in subprocesses against a loopback image server that takes about 100 ms per image.
To stop a build at a known point, the server holds every request after the first half open
without responding. The test then waits until each response that was sent has its fetch cache
entry, so that "each image is requested once over both runs" is exact. Only the requests held
open at the moment of the stop are in flight, and a rerun sends them again.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import datasets
import pytest
from datasets.arrow_writer import ArrowWriter
from factories import image_bytes, record, write_metadata
from hub_stub import HubStub, closed_port_endpoint
from PIL import Image
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

import gaia  # noqa: F401  (registers "gaia" with datasets)
from gaia_builder.cache import FetchCache
from gaia_builder.cli import make_builder

ROWS = 200
HALF = ROWS // 2
IMAGE_SIZE = (48, 32)  # served images, in pixels

# Server-side latency of each image response, in seconds.
LATENCY = 0.1

# Rows whose image is gone (404), and rows whose first request gets 503 and later ones 200.
# The 503 rows sit in the first half so that the stopped run requests each of them.
MISSING_ROWS = frozenset(range(13, ROWS, 20))
FLAKY_ROWS = frozenset(range(7, 80, 20))

# Deadlines, in seconds. Starting Python and importing datasets takes most of the first one.
START_DEADLINE = 60.0
CACHE_DEADLINE = 10.0
EXIT_DEADLINE = 5.0
RUN_TIMEOUT = 120.0
HOLD_TIMEOUT = 60.0
POLL_INTERVAL = 0.02

# Fast, still polite settings for a loopback server. max_retries is 0 so that a 503 stays a
# transient failure of the stopped run. read_timeout outlasts the time requests are held open.
BUILD_OPTIONS: dict[str, Any] = {
    "image_size": 16,
    "max_in_flight": 16,
    "max_connections_per_host": 8,
    "max_requests_per_second_per_host": 1000.0,
    "rate_burst": 100,
    "max_retries": 0,
    "backoff_initial": 0.0,
    "backoff_max": 0.01,
    "connect_timeout": 5.0,
    "read_timeout": 30.0,
    "attempt_timeout": 60.0,
}


class ImageServer:
    """Serve one image per path on 127.0.0.1 with server-side latency and scripted faults.

    Paths in ``missing`` get 404. Paths in ``flaky`` get 503 on their first request and 200 on
    later ones. After ``hold_after(n)``, every request after the n-th is held open without a
    response until ``release()``. ``statuses()`` lists the status of each response per path.
    """

    def __init__(
        self,
        images: Mapping[str, bytes],
        *,
        missing: frozenset[str] = frozenset(),
        flaky: frozenset[str] = frozenset(),
        latency: float = 0.0,
    ) -> None:
        self.images = dict(images)
        self.missing = missing
        self.flaky = flaky
        self.latency = latency
        self._server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
        self._condition = threading.Condition()
        self._released = threading.Event()
        self._stopping = threading.Event()
        self._hold_after: int | None = None
        self._arrivals = 0
        self._responses = 0
        self._statuses: dict[str, list[int]] = defaultdict(list)

    def url(self, path: str) -> str:
        return self._server.url_for(path)

    def __enter__(self) -> ImageServer:
        self._server.expect_request(re.compile(".*")).respond_with_handler(self._respond)
        self._server.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Release held requests, cut the latency short and stop serving."""
        self._stopping.set()
        self.release()
        if self._server.is_running():
            self._server.stop()
        self._server.check_handler_errors()

    def statuses(self) -> dict[str, list[int]]:
        with self._condition:
            return {path: list(statuses) for path, statuses in self._statuses.items()}

    @property
    def responses(self) -> int:
        with self._condition:
            return self._responses

    def reset(self) -> None:
        """Forget every request, so flaky paths respond 503 again."""
        with self._condition:
            self._arrivals = 0
            self._responses = 0
            self._statuses.clear()

    def hold_after(self, count: int) -> None:
        with self._condition:
            self._hold_after = self._arrivals + count
            self._released.clear()

    def release(self) -> None:
        with self._condition:
            self._hold_after = None
        self._released.set()

    def wait_for_responses(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` responses were sent since the last reset; False on timeout."""
        with self._condition:
            return self._condition.wait_for(lambda: self._responses >= count, timeout)

    def _respond(self, request: Request) -> Response:
        with self._condition:
            self._arrivals += 1
            held = self._hold_after is not None and self._arrivals > self._hold_after
        if held:
            # The client is stopped while this waits, so nobody reads this response.
            self._released.wait(HOLD_TIMEOUT)
            return Response("held until the client stopped\n", status=503)

        # Server-side latency: ends early only when the server stops.
        self._stopping.wait(self.latency)
        with self._condition:
            status = self._status(request.path)
            self._statuses[request.path].append(status)
            self._responses += 1
            self._condition.notify_all()
        if status != 200:
            return Response(f"status {status}\n", status=status)
        return Response(self.images[request.path], content_type="image/png")

    def _status(self, path: str) -> int:
        if path not in self.images or path in self.missing:
            return 404
        if path in self.flaky and not self._statuses[path]:
            return 503
        return 200


def image_path(number: int) -> str:
    return f"/images/{number:03d}.png"


def make_server(rows: int, latency: float = 0.0, *, flaky: bool = True) -> ImageServer:
    """Serve ``rows`` images, with the 404s of MISSING_ROWS and, if ``flaky``, the 503s of FLAKY_ROWS."""
    images = {image_path(number): image_bytes(IMAGE_SIZE, "PNG", seed=number) for number in range(rows)}
    flaky_rows = FLAKY_ROWS if flaky else frozenset()
    return ImageServer(
        images,
        missing=frozenset(image_path(number) for number in MISSING_ROWS if number < rows),
        flaky=frozenset(image_path(number) for number in flaky_rows if number < rows),
        latency=latency,
    )


def write_split(server: ImageServer, rows: int, path: Path) -> Path:
    records = [record(number, server.url(image_path(number))) for number in range(rows)]
    return write_metadata(path, records, "records")


def poll_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting until {what}")
        time.sleep(POLL_INTERVAL)


def option_flags(options: Mapping[str, Any]) -> list[str]:
    flags = []
    for name, value in options.items():
        flags += ["--" + name.replace("_", "-"), str(value)]
    return flags


class Build:
    """The ``gaia prepare`` command of one split, its caches and its output files."""

    def __init__(self, tmp_path: Path, metadata: Path, options: Mapping[str, Any]) -> None:
        self.tmp_path = tmp_path
        self.metadata = metadata
        self.options = {**options, "fetch_cache_dir": str(tmp_path / "fetch")}
        self.cache_dir = str(tmp_path / "datasets")
        self.runs = itertools.count(1)

    @property
    def argv(self) -> list[str]:
        return [
            sys.executable, "-m", "gaia_builder.cli", "prepare",
            "--split", "validation",
            "--data-files", f"validation={self.metadata}",
            "--cache-dir", self.cache_dir,
            "--failures", str(self.tmp_path / "failures.jsonl"),
            *option_flags(self.options),
        ]  # fmt: skip

    @contextmanager
    def start(self) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
        """Start the command; yield the process and the files receiving its stdout and stderr."""
        run = next(self.runs)
        stdout_path = self.tmp_path / f"run{run}.out"
        stderr_path = self.tmp_path / f"run{run}.err"
        with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
            process = subprocess.Popen(self.argv, cwd=self.tmp_path, stdout=stdout, stderr=stderr)
        try:
            yield process, stdout_path, stderr_path
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(RUN_TIMEOUT)

    def run(self) -> str:
        """Run the command to completion and return its stdout."""
        with self.start() as (process, stdout, stderr):
            returncode = process.wait(RUN_TIMEOUT)
            assert returncode == 0, stderr.read_text()[-4000:]
            return stdout.read_text()

    def prepared(self) -> datasets.Dataset:
        """Return the split that the command prepared; raise if it was not prepared."""
        builder = make_builder(
            "default", "validation", [f"validation={self.metadata}"], None, self.cache_dir, self.options
        )
        return builder.as_dataset(split="validation")

    def fetch_cache(self) -> FetchCache:
        return FetchCache(self.options["fetch_cache_dir"])


def undecoded(dataset: datasets.Dataset) -> datasets.Dataset:
    return dataset.cast_column("image", datasets.Image(decode=False))


def image_digests(dataset: datasets.Dataset) -> list[str | None]:
    return [
        hashlib.sha256(image["bytes"]).hexdigest() if image is not None else None
        for image in undecoded(dataset)["image"]
    ]


def assert_same_rows(actual: datasets.Dataset, expected: datasets.Dataset) -> None:
    assert actual.column_names == expected.column_names
    assert len(actual) == len(expected)
    for column in expected.column_names:
        if column != "image":
            assert actual[column] == expected[column], column
    assert image_digests(actual) == image_digests(expected)


def stop_halfway(server: ImageServer, build: Build, process: subprocess.Popen[bytes], stderr: Path) -> None:
    """Wait until half the rows got a response and each of those is in the fetch cache."""

    def responded() -> bool:
        if process.poll() is not None:
            pytest.fail(f"the build exited early with {process.returncode}: {stderr.read_text()[-4000:]}")
        return server.wait_for_responses(HALF, POLL_INTERVAL)

    poll_until(responded, START_DEADLINE, f"the server sent {HALF} responses")
    cache = build.fetch_cache()
    stored = [
        server.url(path) for path, statuses in server.statuses().items() if statuses[-1] in (200, 404)
    ]
    poll_until(lambda: all(url in cache for url in stored), CACHE_DEADLINE, "every response was stored")
    assert process.poll() is None, "the build finished before it was stopped"


@pytest.mark.parametrize("signal_number", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_stopped_build_resumes(signal_number: int, tmp_path: Path) -> None:
    """A build stopped halfway resumes to the rows of an uninterrupted build, refetching nothing kept."""
    with make_server(ROWS, LATENCY) as server:
        metadata = write_split(server, ROWS, tmp_path / "val.json")
        baseline = datasets.load_dataset(
            "gaia",
            split="validation",
            data_files={"validation": str(metadata)},
            cache_dir=str(tmp_path / "baseline"),
            **{**BUILD_OPTIONS, "max_retries": 1, "fetch_cache_dir": str(tmp_path / "baseline-fetch")},
        )
        server.reset()
        build = Build(tmp_path, metadata, BUILD_OPTIONS)

        server.hold_after(HALF)
        with build.start() as (process, _, stderr):
            stop_halfway(server, build, process, stderr)
            before_stop = server.statuses()
            stopped_at = time.monotonic()
            process.send_signal(signal_number)
            returncode = process.wait(RUN_TIMEOUT)
            exit_seconds = time.monotonic() - stopped_at
        server.release()
        output = build.run()
        after_rerun = server.statuses()

    if signal_number == signal.SIGINT:
        assert exit_seconds < EXIT_DEADLINE
        assert returncode == 130
        assert "run the same command again to resume" in stderr.read_text()
    flaky = {image_path(number) for number in FLAKY_ROWS}
    missing = {image_path(number) for number in MISSING_ROWS}
    assert all(before_stop.get(path) == [503] for path in flaky), "a flaky row was not requested in time"
    assert missing & before_stop.keys(), "no missing row was requested before the stop"

    assert_same_rows(build.prepared(), baseline)
    for path, statuses in before_stop.items():
        requested_again = after_rerun[path][len(statuses) :]
        if path in flaky:
            assert requested_again == [200], path
        else:
            assert requested_again == [], path
    for path, statuses in after_rerun.items():
        expected = [503, 200] if path in flaky else [404] if path in missing else [200]
        assert statuses == expected, path
    assert len(after_rerun) == ROWS

    from_cache = HALF - len(flaky)
    assert f"{from_cache} answered from the fetch cache, {ROWS - from_cache} requested" in output


LOAD_UNTIL_INTERRUPTED = textwrap.dedent(
    """
    import asyncio, gc, json, sys, threading, time
    import datasets, gaia

    try:
        datasets.load_dataset("gaia", split="validation", **json.loads(sys.argv[1]))
        interrupted = False
    except KeyboardInterrupt:
        interrupted = True

    def pipeline_threads():
        return [thread.name for thread in threading.enumerate() if thread.name.startswith("gaia-")]

    deadline = time.monotonic() + 5
    while pipeline_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    loops = [item for item in gc.get_objects() if isinstance(item, asyncio.AbstractEventLoop)]
    print(json.dumps({
        "interrupted": interrupted,
        "threads": pipeline_threads(),
        "open_loops": sum(1 for loop in loops if not loop.is_running() and not loop.is_closed()),
    }))
    """
)


def test_load_dataset_interrupt_stops_pipeline(tmp_path: Path) -> None:
    """SIGINT during load_dataset raises KeyboardInterrupt promptly and stops the fetch threads."""
    with make_server(ROWS, LATENCY) as server:
        metadata = write_split(server, ROWS, tmp_path / "val.json")
        kwargs = {
            **BUILD_OPTIONS,
            "data_files": {"validation": str(metadata)},
            "cache_dir": str(tmp_path / "datasets"),
            "fetch_cache_dir": str(tmp_path / "fetch"),
        }
        server.hold_after(HALF)
        process = subprocess.Popen(
            [sys.executable, "-c", LOAD_UNTIL_INTERRUPTED, json.dumps(kwargs)],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            poll_until(
                lambda: process.poll() is not None or server.wait_for_responses(HALF, POLL_INTERVAL),
                START_DEADLINE,
                f"the server sent {HALF} responses",
            )
            stopped_at = time.monotonic()
            process.send_signal(signal.SIGINT)
            stdout, stderr = process.communicate(timeout=RUN_TIMEOUT)
            exit_seconds = time.monotonic() - stopped_at
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(RUN_TIMEOUT)

    assert process.returncode == 0, stderr.decode()[-4000:]
    result = json.loads(stdout.decode().splitlines()[-1])
    assert result["interrupted"] is True
    assert result["threads"] == []
    assert result["open_loops"] == 0
    assert exit_seconds < EXIT_DEADLINE


def pipeline_threads() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.name.startswith("gaia-")}


def test_interrupt_outside_generator_stops_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C while datasets writes a row, not while gaia waits, still stops the fetch threads.

    The interrupt is raised from ArrowWriter.write after its fifth row, where a real SIGINT lands
    when it arrives between two rows.
    """
    rows = 40
    original_write = ArrowWriter.write
    writes = itertools.count(1)

    def write_then_interrupt(self: ArrowWriter, *args: Any, **kwargs: Any) -> None:
        original_write(self, *args, **kwargs)
        if next(writes) == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(ArrowWriter, "write", write_then_interrupt)
    threads_before = pipeline_threads()
    with make_server(rows, LATENCY) as server:
        metadata = write_split(server, rows, tmp_path / "val.json")
        with pytest.raises(KeyboardInterrupt) as interrupt:
            datasets.load_dataset(
                "gaia",
                split="validation",
                data_files={"validation": str(metadata)},
                cache_dir=str(tmp_path / "datasets"),
                fetch_cache_dir=str(tmp_path / "fetch"),
                **BUILD_OPTIONS,
            )

        # The traceback keeps the suspended generator alive, as an interactive session does.
        poll_until(
            lambda: not pipeline_threads() - threads_before, EXIT_DEADLINE, "the pipeline threads stopped"
        )
    assert interrupt.value is not None


RECORD_CONNECTIONS = textwrap.dedent(
    """
    import hashlib, json, socket, sys

    attempts = []

    def refuse(kind, original):
        def wrapper(*args, **kwargs):
            attempts.append(f"{kind} {args[1:] if kind != 'getaddrinfo' else args[:2]}")
            raise OSError(f"no {kind} is allowed offline")
        return wrapper

    socket.socket.connect = refuse("connect", socket.socket.connect)
    socket.socket.connect_ex = refuse("connect_ex", socket.socket.connect_ex)
    socket.getaddrinfo = refuse("getaddrinfo", socket.getaddrinfo)

    import datasets, gaia

    dataset = datasets.load_dataset("gaia", split="validation", **json.loads(sys.argv[1]))
    stored = dataset.cast_column("image", datasets.Image(decode=False))
    print(json.dumps({
        "attempts": attempts,
        "ids": dataset["id"],
        "errors": dataset["error"],
        "images": [
            hashlib.sha256(image["bytes"]).hexdigest() if image else None for image in stored["image"]
        ],
    }))
    """
)


def load_offline(kwargs: Mapping[str, Any], cwd: Path) -> dict[str, Any]:
    """Load the split in a subprocess with HF_HUB_OFFLINE=1 that records every connection attempt."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": closed_port_endpoint()}
    completed = subprocess.run(
        [sys.executable, "-c", RECORD_CONNECTIONS, json.dumps(kwargs)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout.splitlines()[-1])


def test_offline_reload_data_files(tmp_path: Path) -> None:
    """A split prepared from data_files loads offline with no server and no connection attempt."""
    rows = 20
    with make_server(rows, flaky=False) as server:
        metadata = write_split(server, rows, tmp_path / "val.json")
        kwargs = {
            **BUILD_OPTIONS,
            "data_files": {"validation": str(metadata)},
            "cache_dir": str(tmp_path / "datasets"),
            "fetch_cache_dir": str(tmp_path / "fetch"),
        }
        prepared = datasets.load_dataset("gaia", split="validation", **kwargs)

    reloaded = load_offline(kwargs, tmp_path)

    assert reloaded["attempts"] == []
    assert reloaded["ids"] == prepared["id"]
    assert reloaded["errors"] == prepared["error"]
    assert reloaded["images"] == image_digests(prepared)


def test_offline_reload_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A split prepared from the Hub loads offline with the Hub and the image server stopped."""
    rows = 20
    with make_server(rows, flaky=False) as server:
        files = {
            "val_data.json": write_split(server, rows, tmp_path / "val.json").read_bytes(),
            "train_data.json": json.dumps([record(900, server.url(image_path(0)))]).encode(),
            "test_data.json": json.dumps([record(901, server.url(image_path(1)))]).encode(),
        }
        kwargs = {
            **BUILD_OPTIONS,
            "cache_dir": str(tmp_path / "datasets"),
            "fetch_cache_dir": str(tmp_path / "fetch"),
        }
        with HubStub("azavras/GAIA", files) as hub:
            hub.point_hub_at(monkeypatch)
            prepared = datasets.load_dataset("gaia", split="validation", **kwargs)
            assert hub.requests_for("val_data.json"), "the metadata was not downloaded from the stub"

    reloaded = load_offline(kwargs, tmp_path)

    assert reloaded["attempts"] == []
    assert reloaded["ids"] == prepared["id"]
    assert reloaded["errors"] == prepared["error"]
    assert reloaded["images"] == image_digests(prepared)


@pytest.mark.parametrize(
    ("config_name", "changed", "size", "image_format"),
    [
        ("default", {"image_size": 24}, (36, 24), "PNG"),
        ("default", {"resize_mode": "center_crop"}, (16, 16), "PNG"),
        ("default", {"encode_format": "jpeg"}, (24, 16), "JPEG"),
        ("original", {}, IMAGE_SIZE, "PNG"),
    ],
)
def test_processing_change_reuses_fetch_cache(
    config_name: str, changed: dict[str, Any], size: tuple[int, int], image_format: str, tmp_path: Path
) -> None:
    """Changing only how images are processed rebuilds from the fetch cache without a request."""
    rows = 20
    with make_server(rows, flaky=False) as server:
        metadata = write_split(server, rows, tmp_path / "val.json")
        kwargs = {
            **BUILD_OPTIONS,
            "data_files": {"validation": str(metadata)},
            "cache_dir": str(tmp_path / "datasets"),
            "fetch_cache_dir": str(tmp_path / "fetch"),
        }
        first = datasets.load_dataset("gaia", split="validation", **kwargs)
        responses = server.responses
        second = datasets.load_dataset("gaia", config_name, split="validation", **{**kwargs, **changed})

        assert server.responses == responses

    assert second.cache_files != first.cache_files
    assert second["error"] == first["error"]
    ok = [index for index, error in enumerate(second["error"]) if error is None]
    assert ok, "no row has an image"
    images = undecoded(second)["image"]
    for index in ok:
        image = Image.open(io.BytesIO(images[index]["bytes"]))
        assert image.size == size, index
        assert image.format == image_format, index
