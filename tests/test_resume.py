"""Resuming an interrupted build from the fetch cache, and reloading a prepared split offline.

Builds run in subprocesses against a loopback image server that takes about 100 ms per image.
To stop a build at a known point, the server serves the first half of the requests and delays
each later one by HOLD_SECONDS before it responds 503. The test then waits until each image
served has its fetch cache entry, so that "each image is served once over both runs" is exact:
the held rows failed as transient, so a rerun requests them again.
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
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
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
from gaia_builder import cli
from gaia_builder.cache import FetchCache

ROWS = 200
HALF = ROWS // 2
IMAGE_SIZE = (48, 32)  # served images, in pixels

# Server-side latency of each image response, in seconds.
LATENCY = 0.1

# Rows in progress at once. Row r is requested before rows r + PREFETCH and later are, because
# the pipeline starts row r + PREFETCH only after the consumer has taken row r. So a run served
# for HALF requests has requested every row up to HALF - PREFETCH.
PREFETCH = 32

# Rows whose image is gone (404), and rows whose first request gets 503 and later ones 200.
# The 503 rows come before HALF - PREFETCH, so that the stopped run requests each of them.
MISSING_ROWS = frozenset(range(13, ROWS, 20))
FLAKY_ROWS = frozenset(range(7, HALF - PREFETCH, 20))

# Deadlines, in seconds. Starting Python and importing datasets takes most of the first one.
START_DEADLINE = 60.0
CACHE_DEADLINE = 10.0
EXIT_DEADLINE = 5.0
RUN_TIMEOUT = 120.0
POLL_INTERVAL = 0.02

# Delay before the server responds 503 to a request after the first half, in seconds. A short
# delay keeps rows finishing after the stop signal, so the CLI can raise again a Ctrl-C that
# CPython dropped.
HOLD_SECONDS = 0.5

# Fast, still polite settings for a loopback server. max_retries is 0 so that a 503 stays a
# transient failure of the stopped run.
BUILD_OPTIONS: dict[str, Any] = {
    "image_size": 16,
    "prefetch": PREFETCH,
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
    later ones. After ``hold_after(n)``, every request after the next n is held for HOLD_SECONDS
    (or until ``release()``), then gets 503. ``statuses()`` lists the status of each response
    per path, held requests left out.
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
        """Respond to held requests, cut the latency short and stop serving."""
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
            self._released.wait(HOLD_SECONDS)
            return Response("held after the first half of the requests\n", status=503)

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
        flag = name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            flags += [f"--{flag}", str(value)]
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

    def start(self) -> AbstractContextManager[tuple[subprocess.Popen[bytes], Path, Path]]:
        """Start the command; see ``started``."""
        return started(self.argv, self.tmp_path, f"run{next(self.runs)}")

    def run(self) -> str:
        """Run the command to completion and return its stdout."""
        with self.start() as (process, stdout, stderr):
            returncode = wait_for_exit(process, RUN_TIMEOUT, stderr)
            assert returncode == 0, stderr.read_text()[-4000:]
            return stdout.read_text()

    def fetch_cache(self) -> FetchCache:
        return FetchCache(self.options["fetch_cache_dir"])


def built_split(output: str) -> datasets.Dataset:
    """Return the split that ``gaia prepare`` reports it built, read from its Arrow files."""
    match = re.search(r"^Built validation in (.+)$", output, re.MULTILINE)
    assert match is not None, output
    files = sorted(Path(match[1]).glob("*-validation*.arrow"))
    assert files, f"no Arrow file of the validation split in {match[1]}"
    return datasets.concatenate_datasets([datasets.Dataset.from_file(str(path)) for path in files])


@contextmanager
def started(argv: list[str], cwd: Path, name: str) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    """Start ``argv``; yield the process and the files receiving its stdout and stderr.

    The process is killed on exit from the block if it is still running.
    """
    stdout_path = cwd / f"{name}.out"
    stderr_path = cwd / f"{name}.err"
    # With PYTHONFAULTHANDLER set, SIGABRT makes a hung process print the stack of each thread.
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=stdout, stderr=stderr)
    try:
        yield process, stdout_path, stderr_path
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(RUN_TIMEOUT)


def wait_for_exit(process: subprocess.Popen[bytes], timeout: float, stderr: Path) -> int:
    """Return the exit code of ``process``; fail with the stack of each of its threads if it hangs."""
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        process.wait(RUN_TIMEOUT)
        pytest.fail(f"the process did not exit within {timeout:g} s:\n{stderr.read_text()[-8000:]}")


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
            assert list(actual[column]) == list(expected[column]), column
    assert image_digests(actual) == image_digests(expected)


def wait_until_half_stored(
    server: ImageServer, build: Build, process: subprocess.Popen[bytes], stderr: Path
) -> None:
    """Wait until half the rows got a response and each of those is in the fetch cache."""

    def responded() -> bool:
        if process.poll() is not None:
            pytest.fail(f"the build exited early with {process.returncode}: {stderr.read_text()[-4000:]}")
        return server.wait_for_responses(HALF, POLL_INTERVAL)

    poll_until(responded, START_DEADLINE, f"the server sent {HALF} responses")
    cache = build.fetch_cache()
    stored = [server.url(path) for path, statuses in server.statuses().items() if statuses[-1] in (200, 404)]
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
            wait_until_half_stored(server, build, process, stderr)
            before_stop = server.statuses()
            process.send_signal(signal_number)
            returncode = wait_for_exit(process, EXIT_DEADLINE, stderr)
        server.release()
        output = build.run()
        after_rerun = server.statuses()

    if signal_number == signal.SIGINT:
        assert returncode == 130
        assert "run the same command again to resume" in stderr.read_text()
    else:
        assert returncode == -signal.SIGKILL
    flaky = {image_path(number) for number in FLAKY_ROWS}
    missing = {image_path(number) for number in MISSING_ROWS}
    # Preconditions of the checks below: the stopped run got its 503s and some of its 404s.
    assert {path: before_stop.get(path) for path in flaky} == {path: [503] for path in flaky}
    assert missing & before_stop.keys(), "no missing row was requested before the stop"

    assert_same_rows(built_split(output), baseline)
    for path, statuses in before_stop.items():
        requested_again = after_rerun[path][len(statuses) :]
        if path in flaky:
            assert requested_again == [200], path
        else:
            assert requested_again == [], path
    for path, statuses in after_rerun.items():
        if path in flaky:
            assert statuses == [503, 200], path
        elif path in missing:
            assert statuses == [404], path
        else:
            assert statuses == [200], path
    assert len(after_rerun) == ROWS

    from_cache = HALF - len(flaky)
    assert f"{from_cache} read from the fetch cache, {ROWS - from_cache} requested" in output


def test_interrupt_without_fetch_cache_says_refetch(tmp_path: Path) -> None:
    """With the fetch cache off, Ctrl-C prints that a rerun fetches every image again."""
    rows = 20
    with make_server(rows, LATENCY, flaky=False) as server:
        metadata = write_split(server, rows, tmp_path / "val.json")
        build = Build(tmp_path, metadata, {**BUILD_OPTIONS, "use_fetch_cache": False})

        server.hold_after(rows // 4)
        with build.start() as (process, _, stderr):
            poll_until(
                lambda: process.poll() is not None or server.wait_for_responses(rows // 4, POLL_INTERVAL),
                START_DEADLINE,
                f"the server sent {rows // 4} responses",
            )
            process.send_signal(signal.SIGINT)
            returncode = wait_for_exit(process, EXIT_DEADLINE, stderr)

    assert returncode == 130, stderr.read_text()[-4000:]
    assert "running the command again fetches every image again" in stderr.read_text()
    assert not Path(build.options["fetch_cache_dir"]).exists()


class _Referent:
    """An object that a weakref can point at."""


def test_dropped_interrupt_raised_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C that CPython drops inside a weakref callback is raised again by the CLI's check."""
    dropped: list[type[BaseException] | None] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: dropped.append(unraisable.exc_type))
    interrupt = cli._Interrupt()

    def send_sigint(_: object) -> None:
        signal.raise_signal(signal.SIGINT)
        # The handler runs here, at the first instruction after the signal, inside the callback.
        dropped.append(None)

    with cli._handle_sigint(interrupt):
        referent = _Referent()
        reference = weakref.ref(referent, send_sigint)
        del referent
        assert dropped == [KeyboardInterrupt]
        with pytest.raises(KeyboardInterrupt):
            interrupt.check()
    assert reference() is None


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

    deadline = time.monotonic() + 2
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


def interrupt_python(process: subprocess.Popen[bytes], stderr: Path) -> None:
    """Send SIGINT, and send it again if CPython reports that it dropped the KeyboardInterrupt.

    CPython prints and ignores an exception raised while a weakref callback or a ``__del__``
    method runs, so a Ctrl-C that arrives then is lost, and a user presses it again.
    """
    process.send_signal(signal.SIGINT)
    poll_until(
        lambda: process.poll() is not None or "KeyboardInterrupt" in stderr.read_text(),
        EXIT_DEADLINE,
        "the process exited or reported the KeyboardInterrupt",
    )
    if process.poll() is None:
        process.send_signal(signal.SIGINT)


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
        argv = [sys.executable, "-c", LOAD_UNTIL_INTERRUPTED, json.dumps(kwargs)]
        with started(argv, tmp_path, "load") as (process, stdout, stderr):
            poll_until(
                lambda: process.poll() is not None or server.wait_for_responses(HALF, POLL_INTERVAL),
                START_DEADLINE,
                f"the server sent {HALF} responses",
            )
            interrupt_python(process, stderr)
            returncode = wait_for_exit(process, EXIT_DEADLINE, stderr)

    assert returncode == 0, stderr.read_text()[-4000:]
    result = json.loads(stdout.read_text().splitlines()[-1])
    assert result["interrupted"] is True
    assert result["threads"] == []
    assert result["open_loops"] == 0


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

        # ``interrupt`` keeps the traceback alive, and with it the suspended generator, as an
        # interactive session keeps its last traceback.
        poll_until(
            lambda: not pipeline_threads() - threads_before, EXIT_DEADLINE, "the pipeline threads stopped"
        )
    raised_in = {Path(str(entry.path)).name for entry in interrupt.traceback}
    assert "pipeline.py" not in raised_in, "the interrupt passed through the pipeline's generator"


RECORD_CONNECTIONS = textwrap.dedent(
    """
    import hashlib, json, socket, sys

    attempts = []

    def reject(kind):
        def wrapper(*args, **kwargs):
            attempts.append(f"{kind} {args[1:] if kind != 'getaddrinfo' else args[:2]}")
            raise OSError(f"no {kind} is allowed offline")
        return wrapper

    socket.socket.connect = reject("connect")
    socket.socket.connect_ex = reject("connect_ex")
    socket.getaddrinfo = reject("getaddrinfo")

    import datasets, gaia

    dataset = datasets.load_dataset("gaia", split="validation", **json.loads(sys.argv[1]))
    stored = dataset.cast_column("image", datasets.Image(decode=False))
    print(json.dumps({
        "attempts": attempts,
        "ids": list(dataset["id"]),
        "errors": list(dataset["error"]),
        "images": [
            hashlib.sha256(image["bytes"]).hexdigest() if image else None for image in stored["image"]
        ],
        "sizes": [[row["width"], row["height"]] if row["width"] else None for row in stored],
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


@pytest.mark.parametrize("changed", [{}, {"image_size": 24}], ids=["reload", "rebuild"])
def test_offline_load_data_files(changed: dict[str, Any], tmp_path: Path) -> None:
    """A split prepared from data_files loads, or rebuilds from the fetch cache, with no connection."""
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

    loaded = load_offline({**kwargs, **changed}, tmp_path)

    assert loaded["attempts"] == []
    assert loaded["ids"] == list(prepared["id"])
    assert loaded["errors"] == list(prepared["error"])
    if changed:
        assert loaded["sizes"] == [[36, 24] if error is None else None for error in prepared["error"]]
    else:
        assert loaded["images"] == image_digests(prepared)


@pytest.mark.parametrize("changed", [{}, {"image_size": 24}], ids=["reload", "rebuild"])
def test_offline_load_hub(changed: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A split prepared from the Hub loads, or rebuilds from the caches, with the servers stopped."""
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

    loaded = load_offline({**kwargs, **changed}, tmp_path)

    assert loaded["attempts"] == []
    assert loaded["ids"] == list(prepared["id"])
    assert loaded["errors"] == list(prepared["error"])
    if changed:
        assert loaded["sizes"] == [[36, 24] if error is None else None for error in prepared["error"]]
    else:
        assert loaded["images"] == image_digests(prepared)


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
    assert list(second["error"]) == list(first["error"])
    ok = [index for index, error in enumerate(second["error"]) if error is None]
    assert ok, "no row has an image"
    images = undecoded(second)["image"]
    for index in ok:
        image = Image.open(io.BytesIO(images[index]["bytes"]))
        assert image.size == size, index
        assert image.format == image_format, index
