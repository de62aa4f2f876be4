"""Benchmark ``gaia prepare`` against img2dataset with the GAIA paper's recipe, side by side.

Both tools fetch the same generated corpus from a loopback HTTP server started by this script,
in the same run, alternating (img2dataset, gaia, img2dataset, gaia... with --repeat). Each run
writes into fresh folders, and gaia's fetch cache starts empty each time. The script prints:

- images/s of each tool and their ratio, and CPU seconds per image (the rusage of the tool's
  whole process tree). Also peak RSS (the largest peak of one process, and the largest sum over
  the tree sampled every 20 ms) and output bytes per image;
- the share of rows whose output width and height are identical, and the PSNR of gaia's pixels
  against img2dataset's, matched by row id;
- the CPU floor: each tool's decode, resize and encode CPU per image, measured in this process
  on the same corpus; gaia's CPU per image and images/s against its floor, and the ratio of the
  two floors, which is the throughput ratio that pipelines without overhead would reach;
- a latency-bound run: 4 loopback hosts answering after 200 ms, 4 connections per host, and
  gaia's images/s against that politeness limit (hosts x connections / latency);
- the time of a cached reload (``load_dataset`` of an already prepared 4,000-row split),
  against reading its Arrow files directly.

Every figure is printed beside an anchor measured in the same run; nothing is asserted, and
the exit status is 0 whenever both tools ran. The targets are listed at the end as met or
missed.

img2dataset runs with the flags the GAIA authors published (input json, url_col image_src,
caption_col image_alt, webdataset output, extra columns id and captions, 4 processes x 4
threads, retries 5, image_size 512, keep_ratio, PNG at encode_quality 9, 512 samples per shard,
disallowed_header_directives []). gaia runs with its defaults, except its politeness limits: on
loopback they are raised (see LOOPBACK_RATE and LOOPBACK_CONNECTIONS) so that the per-host rate
gate is not what is measured.

Needs the bench extra, which brings img2dataset 1.47.0, OpenCV, numpy and psutil:
``pip install -e '.[bench]'``, then ``python benchmarks/compare_img2dataset.py --rows 2048``.
See benchmarks/README.md for the options and how to read the output.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# albumentations, imported by img2dataset, sends a request to PyPI for its latest version at
# import unless this variable is set. The Hugging Face libraries must not reach the Hub either.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import cv2
import datasets
import fidelity  # benchmarks/fidelity.py: corpus pixels, PSNR and the GAIA recipe's image settings
import numpy as np
import psutil
from aiohttp import web
from img2dataset.resizer import Resizer
from PIL import Image

from gaia_builder.builder import Gaia
from gaia_builder.config import GaiaConfig
from gaia_builder.images import process_image

# gaia's politeness limits on loopback. Its defaults (4 requests per second and 4 connections
# per host) would make the rate gate the bottleneck of a CPU benchmark. 16 connections match
# img2dataset's 4 processes x 4 threads.
LOOPBACK_RATE = 1000.0
LOOPBACK_CONNECTIONS = 16

# The latency-bound run: its politeness limit is hosts x connections / latency images/s.
LATENCY_HOSTS = 4
LATENCY_SECONDS = 0.2
LATENCY_CONNECTIONS = 4

# The img2dataset recipe of the GAIA paper (Zavras et al., arXiv:2502.09598), passed to
# img2dataset.download as keyword arguments.
IMG2DATASET_RECIPE: dict[str, Any] = {
    "input_format": "json",
    "url_col": "image_src",
    "caption_col": "image_alt",
    "output_format": "webdataset",
    "save_additional_columns": ["id", "captions"],
    "processes_count": 4,
    "thread_count": 4,
    "retries": 5,
    "image_size": 512,
    "resize_mode": "keep_ratio",
    "encode_format": "png",
    "encode_quality": 9,
    "number_sample_per_shard": 512,
    "disallowed_header_directives": [],
}
IMG2DATASET_CALL = (
    "import json, sys; from img2dataset import download; download(**json.load(open(sys.argv[1])))"
)

# Source kinds of the regular corpus, cycled in this order: 28 JPEG in 32 (2 of them grayscale),
# then one PNG, one PNG with alpha, one TIFF and one GIF. GAIA's hosts publish mostly JPEG
# photographs; this share is an estimate, not a count over GAIA's URLs.
KIND_CYCLE = (
    ("jpeg",) * 7 + ("png",) + ("jpeg",) * 6 + ("jpeg-gray",) + ("tiff",)
    + ("jpeg",) * 7 + ("png-rgba",) + ("jpeg",) * 6 + ("jpeg-gray",) + ("gif",)
)  # fmt: skip
EXTENSIONS = {"jpeg": "jpg", "jpeg-gray": "jpg", "png": "png", "png-rgba": "png", "tiff": "tif", "gif": "gif"}
CONTENT_TYPES = {"jpg": "image/jpeg", "png": "image/png", "tif": "image/tiff", "gif": "image/gif"}

# Part of the corpus folder's name: a change to how sources are generated gets a new folder.
CORPUS_VERSION = 2

# Every SMALL_EVERY-th source is small enough that keep_ratio enlarges it. So are the JPEGs whose
# shorter side is drawn under 512 px.
SMALL_EVERY = 16

# Pixels are generated at most this many pixels on the long side, then scaled up to the source
# size, so that a 5400 px source takes a fraction of a second to make. The detail that survives
# scaling to 512 px stays photo-like, and so do the PNG sizes.
GENERATED_MAX_SIDE = 1600

# One source as large as NASA's biggest mosaics (Blue Marble, 21600 x 10800 px).
GIANT_SIZE = (21600, 10800)

# The image of the latency-bound run and of the reload split: a flat 512 x 512 JPEG that needs
# neither resizing nor much encoding, about 3 ms of CPU. So the CPU stays far below the fetch
# limit, and the reload split builds in seconds.
SMALL_SOURCE_SIZE = (512, 512)
SMALL_SOURCE_COLOUR = (40, 90, 160)

TARGETS_TEXT = """\
targets: throughput >= 3.0x img2dataset with 100 % identical dimensions and PSNR median >= 45 dB;
         CPU per image <= 1.25x the floor; latency-bound run >= 0.9x the politeness limit;
         peak RSS <= 1.5 GB; cached reload of the 4,000-row split <= 2 s"""


# ---------------------------------------------------------------------------------------------
# Corpus


@dataclass(frozen=True)
class Source:
    """One generated image file that the server publishes under one or more URLs."""

    kind: str
    width: int
    height: int
    path: Path

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.kind]


def source_size(index: int, kind: str, rng: np.random.Generator) -> tuple[int, int]:
    """Return a size from 720 x 480 to 5400 x 2700 px, or a small one every SMALL_EVERY sources."""
    if index % SMALL_EVERY == SMALL_EVERY // 2:
        short = int(rng.integers(150, 480))
        return round(short * rng.uniform(1.2, 1.8)), short

    width = int(math.exp(rng.uniform(math.log(720), math.log(5400))))
    height = max(480, round(width / rng.uniform(1.33, 2.0)))
    if kind == "gif":  # GIF sources are small animations and maps
        width, height = min(width, 1200), min(height, 800)
    return (height, width) if rng.random() < 0.2 else (width, height)


def make_pixels(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Return photo-like RGB pixels of the given size, generated small and scaled up."""
    scale = min(1.0, GENERATED_MAX_SIDE / max(width, height))
    small = fidelity.photo(max(1, round(width * scale)), max(1, round(height * scale)), rng)
    if scale == 1.0:
        return small
    return np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC))


def build_corpus(folder: Path, distinct: int, seed: int) -> tuple[list[Source], Source]:
    """Generate ``distinct`` regular sources and the giant JPEG in ``folder``, or reuse them.

    Returns the regular sources and the giant one. The manifest is written last, so a folder
    without it is an interrupted generation and is made again.
    """
    manifest = folder / "manifest.json"
    if manifest.exists():
        entries = json.loads(manifest.read_text())
        sources = [Source(e["kind"], e["width"], e["height"], folder / e["file"]) for e in entries]
        return sources[:-1], sources[-1]

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    sources = []
    started = time.perf_counter()
    for index in range(distinct):
        kind = KIND_CYCLE[index % len(KIND_CYCLE)]
        width, height = source_size(index, kind, rng)
        data = fidelity.encode_sample(kind, make_pixels(width, height, rng), rng)
        path = folder / f"{index:04d}.{EXTENSIONS[kind]}"
        path.write_bytes(data)
        sources.append(Source(kind, width, height, path))
    sources.append(make_giant(folder, rng))

    entries = [{"kind": s.kind, "width": s.width, "height": s.height, "file": s.path.name} for s in sources]
    manifest.write_text(json.dumps(entries))
    print(f"generated {distinct + 1} sources in {time.perf_counter() - started:.0f} s under {folder}")
    return sources[:-1], sources[-1]


def make_giant(folder: Path, rng: np.random.Generator) -> Source:
    width, height = GIANT_SIZE
    small = Image.fromarray(fidelity.photo(width // 8, height // 8, rng))
    path = folder / "giant.jpg"
    small.resize(GIANT_SIZE, Image.Resampling.BICUBIC).save(path, "JPEG", quality=90)
    return Source("jpeg", width, height, path)


def small_source(folder: Path) -> Source:
    """Return the small JPEG of the latency-bound run and the reload split, made once."""
    path = folder / "flat.jpg"
    if not path.exists():
        Image.new("RGB", SMALL_SOURCE_SIZE, SMALL_SOURCE_COLOUR).save(path, "JPEG", quality=90)
    return Source("jpeg", *SMALL_SOURCE_SIZE, path)


def assign_sources(rows: int, regular: Sequence[Source], giant: Source | None) -> list[Source]:
    """Return the source of each row: the regular sources in turn, and the giant one in the middle."""
    assigned = [regular[row % len(regular)] for row in range(rows)]
    if giant is not None:
        assigned[rows // 2] = giant
    return assigned


# ---------------------------------------------------------------------------------------------
# Metadata and server


def make_records(sources: Sequence[Source], bases: Sequence[str], prefix: str) -> list[dict[str, Any]]:
    """Return one GAIA metadata record per row, its URL on the row's host, hosts in turn."""
    records = []
    for row, source in enumerate(sources):
        base = bases[row % len(bases)]
        records.append(
            {
                "id": f"{prefix}-{row:05d}",
                "image_src": f"{base}/images/{prefix}-{row:05d}-{source.path.stem}.{source.extension}",
                "image_alt": f"Generated scene {row}",
                "captions": [f"Caption {number} of generated scene {row}." for number in range(5)],
                "credits": "generated by benchmarks/compare_img2dataset.py",
                "location": "Nowhere, Loopback",
                "lat": 0.0,
                "lon": 0.0,
                "tag": ["generated", "benchmark", source.kind],
                "resolution": "High",
                "satellite": ["none"],
                "sensor": ["none"],
                "modalities": ["Optical"],
            }
        )
    return records


@dataclass
class ServedWindow:
    """Requests served since the last reset, with the times of the first request and last response."""

    requests: int = 0
    first_request: float = math.inf  # time.perf_counter() seconds
    last_response: float = -math.inf

    @property
    def seconds(self) -> float:
        return self.last_response - self.first_request if self.requests else math.nan


class ImageServer:
    """Serve image files from memory on loopback sites, from an event loop in a daemon thread.

    Every site serves every file, under ``/images/<name>``; a name ends with ``-<file stem>.<ext>``.
    Each response is sent after ``latency`` seconds.
    """

    def __init__(self, sources: Sequence[Source], hosts: Sequence[str], latency: float) -> None:
        self.latency = latency
        self.window = ServedWindow()
        self._bodies = {source.path.name: source.path.read_bytes() for source in sources}
        self._lock = threading.Lock()
        self._sockets = [_listen(host) for host in hosts]
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="image-server", daemon=True)

    @property
    def bases(self) -> list[str]:
        """The base URL of each site, such as ``http://127.0.0.1:41234``."""
        return [f"http://{host}:{port}" for host, port, *_ in (s.getsockname() for s in self._sockets)]

    def __enter__(self) -> ImageServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    def reset(self) -> ServedWindow:
        """Start a new window of counts and return the one that ends."""
        with self._lock:
            window, self.window = self.window, ServedWindow()
        return window

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/images/{name}", self._serve)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        for sock in self._sockets:
            await web.SockSite(self._runner, sock).start()

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        name = request.match_info["name"]
        file_name = name.rsplit("-", 1)[-1]
        body = self._bodies.get(file_name)
        if body is None:
            raise web.HTTPNotFound(text=f"no generated image is named {file_name!r}")
        if self.latency:
            await asyncio.sleep(self.latency)

        extension = file_name.rsplit(".", 1)[-1]
        response = web.Response(body=body, content_type=CONTENT_TYPES[extension])
        await response.prepare(request)
        await response.write_eof()
        with self._lock:
            window = self.window
            window.requests += 1
            window.first_request = min(window.first_request, started)
            window.last_response = max(window.last_response, time.perf_counter())
        return response


def _listen(host: str) -> socket.socket:
    if not host.startswith("127."):
        raise ValueError(f"invalid host {host}: the benchmark listens on loopback addresses (127.x.x.x) only")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(256)
    return sock


def loopback_hosts(count: int, layout: str) -> list[str]:
    """Return ``count`` listening addresses: all 127.0.0.1 (distinct ports), or 127.0.0.2 and up."""
    if layout == "ports":
        return ["127.0.0.1"] * count
    return [f"127.0.0.{2 + index}" for index in range(count)]


# ---------------------------------------------------------------------------------------------
# Running a tool


@dataclass(frozen=True)
class Usage:
    """The cost of one tool run, measured from outside its process tree."""

    wall: float  # seconds
    cpu: float  # user + system seconds of the process and every child it waited for
    peak_rss_process: int  # bytes, the largest peak RSS of one process of the tree (VmHWM)
    peak_rss_tree: int  # bytes, the largest sum of the tree's RSS seen by the sampler
    load: float  # the machine's 1-minute load average at the end, other processes included


class TreeSampler(threading.Thread):
    """Sample the memory of a process and its descendants every ``interval`` seconds.

    ``peak_process`` is the largest VmHWM, the kernel's own peak RSS of one process since its
    exec, so it catches peaks between two samples. getrusage's ru_maxrss would be wrong here,
    because a child inherits the peak RSS of the parent that forked it, and this script keeps
    the corpus in memory. ``peak_tree`` is the largest sum of the tree's VmRSS seen by a sample, so a peak
    shorter than ``interval`` can be missed.

    The tree itself is listed every ``list_every`` samples only, because psutil lists children by
    reading the stat file of every process on the machine. At every sample, that took 8 % of a
    core from the tool under test. A process that starts between two listings enters the
    tree sum at the next listing; its VmHWM still records its peak.
    """

    def __init__(self, pid: int, interval: float = 0.02, list_every: int = 25) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.peak_tree = 0
        self._peaks: dict[int, int] = {}  # pid -> VmHWM in bytes
        self._root = psutil.Process(pid)
        self._interval = interval
        self._list_every = list_every
        self._pids: list[int] = [pid]
        self._samples = 0
        self._stopped = threading.Event()

    @property
    def peak_process(self) -> int:
        return max(self._peaks.values(), default=0)

    def run(self) -> None:
        while not self._stopped.wait(self._interval):
            self._sample()

    def stop(self) -> None:
        self._stopped.set()
        self.join()

    def _sample(self) -> None:
        if self._samples % self._list_every == 0:
            try:
                self._pids = [self._root.pid, *(child.pid for child in self._root.children(recursive=True))]
            except psutil.Error:
                return
        self._samples += 1
        total = 0
        for pid in self._pids:
            memory = _proc_memory(pid)
            if memory is not None:
                total += memory["VmRSS"]
                self._peaks[pid] = memory["VmHWM"]
        self.peak_tree = max(self.peak_tree, total)


def _proc_memory(pid: int) -> dict[str, int] | None:
    """Return VmRSS and VmHWM of a process in bytes from /proc, or None once it has exited."""
    memory = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    memory[name] = int(value.split()[0]) * 1024  # the kernel writes kB
    except (FileNotFoundError, ProcessLookupError):
        return None
    return memory if len(memory) == 2 else None  # a zombie has no memory lines


def run_measured(command: Sequence[str], *, env: dict[str, str], cwd: Path, timeout: float) -> Usage:
    """Run ``command`` to its end and return its wall time, CPU time and peak RSS.

    The command gets its own session, so that a run past ``timeout`` seconds is killed with all
    its children. Its output goes to ``cwd/output.log``. Raises RuntimeError when it fails.
    """
    log_path = cwd / "output.log"
    started = time.perf_counter()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    sampler = TreeSampler(process.pid)
    sampler.start()
    killer = threading.Timer(timeout, _kill_group, (process.pid,))
    killer.start()
    try:
        # wait4 rather than Popen.wait: it returns the rusage of the child and of every
        # descendant that was waited for, which is the whole tree's CPU time.
        _, status, rusage = os.wait4(process.pid, 0)
    finally:
        killer.cancel()
        sampler.stop()
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)

    if process.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        reason = (
            f"was killed after {timeout:.0f} s" if wall >= timeout else f"exited with {process.returncode}"
        )
        raise RuntimeError(f"{command[0]} {reason}; the end of {log_path}:\n{tail}")
    return Usage(
        wall=wall,
        cpu=rusage.ru_utime + rusage.ru_stime,
        peak_rss_process=sampler.peak_process,
        peak_rss_tree=sampler.peak_tree,
        load=os.getloadavg()[0],
    )


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def child_env(home: Path) -> dict[str, str]:
    """Return the environment of a tool run: caches under ``home``, no proxy, no Hub access."""
    env = {key: value for key, value in os.environ.items() if not key.lower().endswith("_proxy")}
    env.update(
        HF_HOME=str(home / "hf"),
        HF_DATASETS_CACHE=str(home / "hf" / "datasets"),
        HF_HUB_OFFLINE="1",
        HF_UPDATE_DOWNLOAD_COUNTS="0",
        HF_HUB_DISABLE_TELEMETRY="1",
        NO_ALBUMENTATIONS_UPDATE="1",
    )
    return env


@dataclass
class RunResult:
    """One tool run: its cost, its images by row id, and the size of its output."""

    tool: str
    usage: Usage
    window: ServedWindow
    images: dict[str, tuple[bytes, int, int]]  # id -> (PNG bytes, width, height); emptied by drop_images
    output_bytes: int  # on disk
    image_count: int = 0
    png_bytes: int = 0

    def __post_init__(self) -> None:
        self.image_count = len(self.images)
        self.png_bytes = sum(len(png) for png, _, _ in self.images.values())

    @property
    def rate(self) -> float:
        return self.image_count / self.usage.wall

    @property
    def cpu_per_image(self) -> float:
        return self.usage.cpu / max(1, self.image_count)

    def drop_images(self) -> None:
        """Free the images once the pixels of a later run are the ones compared."""
        self.images = {}


def run_img2dataset(
    python: str, metadata: Path, folder: Path, server: ImageServer, timeout: float
) -> RunResult:
    folder.mkdir(parents=True)
    output = folder / "output"
    arguments = {"url_list": str(metadata), "output_folder": str(output), **IMG2DATASET_RECIPE}
    arguments_path = folder / "arguments.json"
    arguments_path.write_text(json.dumps(arguments))

    server.reset()
    usage = run_measured(
        [python, "-c", IMG2DATASET_CALL, str(arguments_path)],
        env=child_env(folder),
        cwd=folder,
        timeout=timeout,
    )
    return RunResult("img2dataset", usage, server.reset(), read_webdataset(output), folder_size(output))


def read_webdataset(folder: Path) -> dict[str, tuple[bytes, int, int]]:
    """Return the images of img2dataset's tar shards by row id, with their width and height."""
    images = {}
    for shard in sorted(folder.glob("*.tar")):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as archive:
            for member in archive:
                key, _, extension = member.name.partition(".")
                handle = archive.extractfile(member)
                if handle is not None and extension in ("png", "json"):
                    members.setdefault(key, {})[extension] = handle.read()
        for parts in members.values():
            meta = json.loads(parts["json"])
            images[meta["id"]] = (parts["png"], meta["width"], meta["height"])
    return images


def gaia_command(python: str, metadata: Path, folder: Path, connections: int) -> list[str]:
    return [
        python, "-m", "gaia_builder.cli", "prepare",
        "--split", "train",
        "--data-files", f"train={metadata}",
        "--cache-dir", str(folder / "datasets"),
        "--fetch-cache-dir", str(folder / "fetch"),
        "--max-requests-per-second-per-host", str(LOOPBACK_RATE),
        "--max-connections-per-host", str(connections),
    ]  # fmt: skip


def run_gaia(
    python: str, metadata: Path, folder: Path, server: ImageServer, timeout: float, connections: int
) -> RunResult:
    folder.mkdir(parents=True)
    server.reset()
    command = gaia_command(python, metadata, folder, connections)
    usage = run_measured(command, env=child_env(folder), cwd=folder, timeout=timeout)
    window = server.reset()

    dataset = gaia_split(metadata, folder / "datasets")
    images = {}
    for row in dataset.select_columns(["id", "image", "width", "height"]):
        if row["image"] is not None:
            images[row["id"]] = (row["image"]["bytes"], row["width"], row["height"])
    return RunResult("gaia", usage, window, images, folder_size(folder / "datasets"))


def gaia_split(metadata: Path, cache_dir: Path) -> datasets.Dataset:
    """Return the prepared train split of ``gaia prepare``, with undecoded image bytes."""
    builder = Gaia(
        config_name="default",
        cache_dir=str(cache_dir),
        data_files={"train": str(metadata)},
        splits=("train",),
    )
    dataset = builder.as_dataset(split="train")
    return dataset.cast_column("image", datasets.Image(decode=False))


def folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


# ---------------------------------------------------------------------------------------------
# Fidelity and CPU floor


@dataclass(frozen=True)
class Fidelity:
    matched: int
    same_size: float  # share of matched rows
    median_db: float
    p5_db: float


def compare_pixels(gaia: RunResult, reference: RunResult) -> Fidelity:
    """Compare gaia's images with img2dataset's, row by row, matched by id.

    Rows with the same pair of PNG files (the same source behind another URL) are compared
    once. Identical images count as 99 dB, as in fidelity.py.
    """
    matched = sorted(gaia.images.keys() & reference.images.keys())
    by_pair: dict[tuple[str, str], float] = {}
    same_size = 0
    values = []
    for row_id in matched:
        ours, width, height = gaia.images[row_id]
        theirs, their_width, their_height = reference.images[row_id]
        if (width, height) != (their_width, their_height):
            continue
        same_size += 1
        pair = (hashlib.sha1(ours).hexdigest(), hashlib.sha1(theirs).hexdigest())
        if pair not in by_pair:
            by_pair[pair] = min(99.0, fidelity.psnr(_rgb(ours), _rgb(theirs)))
        values.append(by_pair[pair])
    if not values:
        return Fidelity(len(matched), 0.0, math.nan, math.nan)
    return Fidelity(
        len(matched), same_size / len(matched), statistics.median(values), fidelity.percentile(values, 0.05)
    )


def _rgb(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


@dataclass(frozen=True)
class Floor:
    """CPU seconds per row of each tool's image step alone, on one thread in this process."""

    gaia: float
    img2dataset: float
    by_kind: dict[str, tuple[int, float, float]]  # kind -> (rows, gaia, img2dataset)


def measure_floor(rows: Sequence[Source]) -> Floor:
    """Measure gaia's process_image and img2dataset's resizer on each distinct source once.

    Rows then weigh the sources by how often they appear. Both run with the settings of their
    run above: gaia's defaults, and the GAIA recipe for img2dataset.
    """
    options = GaiaConfig(name="default").image_options()
    resizer = Resizer(
        image_size=fidelity.IMAGE_SIZE,
        resize_mode="keep_ratio",
        resize_only_if_bigger=False,
        encode_format="png",
        encode_quality=fidelity.PAPER_PNG_LEVEL,
    )
    cv2.setNumThreads(1)  # as img2dataset's workers do
    seconds: dict[Path, tuple[float, float]] = {}
    for source in set(rows):
        data = source.path.read_bytes()
        started = time.process_time()
        process_image(data, options)
        middle = time.process_time()
        resizer(io.BytesIO(data))
        seconds[source.path] = (middle - started, time.process_time() - middle)

    by_kind: dict[str, tuple[int, float, float]] = {}
    for source in rows:
        kind = source.kind + (" enlarged" if min(source.width, source.height) < fidelity.IMAGE_SIZE else "")
        count, ours, theirs = by_kind.get(kind, (0, 0.0, 0.0))
        ours_now, theirs_now = seconds[source.path]
        by_kind[kind] = (count + 1, ours + ours_now, theirs + theirs_now)
    total_ours = sum(ours for _, ours, _ in by_kind.values())
    total_theirs = sum(theirs for _, _, theirs in by_kind.values())
    return Floor(total_ours / len(rows), total_theirs / len(rows), by_kind)


# ---------------------------------------------------------------------------------------------
# Cached reload

RELOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import datasets, gaia_builder
    metadata, cache_dir = sys.argv[1], sys.argv[2]
    started = time.perf_counter()
    dataset = datasets.load_dataset(
        "gaia", split="train", data_files={"train": metadata}, splits=["train"], cache_dir=cache_dir
    )
    reload = time.perf_counter() - started
    images = dataset.cast_column("image", datasets.Image(decode=False))["image"]
    started = time.perf_counter()
    parts = [datasets.Dataset.from_file(cache_file["filename"]) for cache_file in dataset.cache_files]
    direct = datasets.concatenate_datasets(parts)
    read = time.perf_counter() - started
    images = sum(image is not None for image in images)
    print(json.dumps({"reload": reload, "read": read, "rows": len(dataset), "images": images}))
    """
)


def measure_reload(
    python: str, metadata: Path, folder: Path, server: ImageServer, timeout: float
) -> dict[str, Any]:
    """Prepare the split with ``gaia prepare``, then time ``load_dataset`` in a fresh process."""
    run_gaia(python, metadata, folder, server, timeout, LOOPBACK_CONNECTIONS)
    server.reset()
    completed = subprocess.run(
        [python, "-c", RELOAD_SCRIPT, str(metadata), str(folder / "datasets")],
        env=child_env(folder),
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    figures: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    figures["requests"] = server.reset().requests  # a reload that fetches would show here
    return figures


# ---------------------------------------------------------------------------------------------
# Report


def megabytes(count: float) -> str:
    return f"{count / 1e6:,.0f} MB"


def describe_run(result: RunResult) -> str:
    usage = result.usage
    served = result.window
    return (
        f"  {result.tool:<11} {result.image_count:5d} images in {usage.wall:6.1f} s "
        f"= {result.rate:6.1f} images/s; "
        f"CPU {result.cpu_per_image * 1000:5.0f} ms/image; peak RSS {megabytes(usage.peak_rss_process)} "
        f"(process), {megabytes(usage.peak_rss_tree)} (tree); "
        f"fetching {served.seconds:5.1f} s from first request to last response; load average {usage.load:.1f}"
    )


@dataclass
class Report:
    """The figures of the whole run, printed together at the end."""

    lines: list[str] = field(default_factory=list)
    targets: list[tuple[str, bool, str]] = field(default_factory=list)

    def add(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)

    def target(self, name: str, met: bool, figure: str) -> None:
        self.targets.append((name, met, figure))

    def print_targets(self) -> None:
        print(TARGETS_TEXT)
        for name, met, figure in self.targets:
            print(f"  {'met   ' if met else 'MISSED'} {name}: {figure}")


def median_of(results: Sequence[RunResult], attribute: str) -> float:
    return statistics.median(float(getattr(result, attribute)) for result in results)


def report_comparison(report: Report, i2d: list[RunResult], gaia: list[RunResult], floor: Floor) -> None:
    i2d_rate, gaia_rate = median_of(i2d, "rate"), median_of(gaia, "rate")
    i2d_cpu, gaia_cpu = median_of(i2d, "cpu_per_image"), median_of(gaia, "cpu_per_image")
    ratio = gaia_rate / i2d_rate
    report.add(
        f"throughput (median of {len(gaia)}): gaia {gaia_rate:.1f} images/s, "
        f"img2dataset {i2d_rate:.1f}: {ratio:.2f}x"
    )
    report.add(
        f"CPU per image: gaia {gaia_cpu * 1000:.0f} ms, img2dataset {i2d_cpu * 1000:.0f} ms: "
        f"{i2d_cpu / gaia_cpu:.2f}x less"
    )

    gaia_rss = max(max(r.usage.peak_rss_process, r.usage.peak_rss_tree) for r in gaia)
    i2d_rss = max(max(r.usage.peak_rss_process, r.usage.peak_rss_tree) for r in i2d)
    report.add(
        f"peak RSS: gaia {megabytes(gaia_rss)}, img2dataset {megabytes(i2d_rss)} "
        "(the larger of process and tree, over the runs)"
    )

    for result in (i2d[-1], gaia[-1]):
        pngs = result.png_bytes
        count = max(1, result.image_count)
        report.add(
            f"output per image: {result.tool} {result.output_bytes / count / 1024:.0f} KiB on disk, "
            f"{pngs / count / 1024:.0f} KiB of PNG"
        )

    match = compare_pixels(gaia[-1], i2d[-1])
    report.add(
        f"pixels, {match.matched} rows matched by id: identical dimensions {match.same_size:.1%}, "
        f"PSNR of gaia against img2dataset median {match.median_db:.1f} dB, "
        f"5th percentile {match.p5_db:.1f} dB"
    )

    report_floor(report, floor, gaia_cpu, gaia_rate)
    report.add(
        f"  img2dataset's run uses {i2d_cpu / floor.img2dataset:.2f}x its floor; a pipeline with no overhead "
        f"on either side would reach {floor.img2dataset / floor.gaia:.2f}x img2dataset's throughput"
    )

    report.target("throughput", ratio >= 3.0, f"{ratio:.2f}x img2dataset")
    report.target("identical dimensions", match.same_size == 1.0, f"{match.same_size:.1%}")
    report.target("PSNR median", match.median_db >= 45.0, f"{match.median_db:.1f} dB")
    report.target("CPU per image", gaia_cpu <= 1.25 * floor.gaia, f"{gaia_cpu / floor.gaia:.2f}x the floor")
    report.target("peak RSS", gaia_rss <= 1.5e9, megabytes(gaia_rss))


def report_floor(report: Report, floor: Floor, gaia_cpu: float, gaia_rate: float) -> None:
    cores = os.cpu_count() or 1
    floor_rate = cores / floor.gaia
    report.add(
        f"CPU floor (image step alone, one thread, in-process): gaia {floor.gaia * 1000:.0f} ms/image, "
        f"img2dataset {floor.img2dataset * 1000:.0f} ms/image; gaia's floor allows {floor_rate:.1f} images/s "
        f"on {cores} cores. gaia's run uses {gaia_cpu / floor.gaia:.2f}x the floor's CPU per image "
        f"and reaches {gaia_rate / floor_rate:.2f}x its rate"
    )
    for kind, (count, ours, theirs) in sorted(floor.by_kind.items(), key=lambda item: -item[1][0]):
        report.add(
            f"  {kind:<15} {count:5d} rows: gaia {ours / count * 1000:6.1f} ms, "
            f"img2dataset {theirs / count * 1000:6.1f} ms ({theirs / ours:.2f}x)"
        )


# ---------------------------------------------------------------------------------------------


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])

    # The corpus and the servers.
    parser.add_argument("--rows", type=int, default=2048, help="rows of the comparison (default 2048)")
    parser.add_argument(
        "--distinct",
        type=int,
        default=128,
        help="distinct generated sources cycled over the rows (default 128)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated corpus (default 0)")
    parser.add_argument("--hosts", type=int, default=4, help="loopback hosts of the comparison (default 4)")
    parser.add_argument(
        "--loopback",
        choices=("ports", "addresses"),
        default="ports",
        help="hosts as distinct ports on 127.0.0.1 (default), or as 127.0.0.2, 127.0.0.3...",
    )
    parser.add_argument(
        "--latency",
        type=float,
        default=0.0,
        help="seconds before each response of the comparison (default 0)",
    )

    # The runs.
    parser.add_argument(
        "--repeat", type=int, default=1, help="pairs of runs, img2dataset then gaia (default 1)"
    )
    parser.add_argument(
        "--latency-rows",
        type=int,
        default=800,
        help="rows of the latency-bound run (default 800; 0 skips it)",
    )
    parser.add_argument(
        "--reload-rows", type=int, default=4000, help="rows of the reloaded split (default 4000; 0 skips it)"
    )
    parser.add_argument("--skip-img2dataset", action="store_true", help="run gaia only, for profiling")

    # The environments and folders.
    parser.add_argument(
        "--img2dataset-python",
        default=sys.executable,
        help="Python with img2dataset 1.47.0 (default: this one)",
    )
    parser.add_argument(
        "--gaia-python", default=sys.executable, help="Python with gaia installed (default: this one)"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "gaia-compare",
        help="folder of the corpus (kept between runs) and of the run outputs (replaced)",
    )
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="seconds after which a tool run is killed (default 900)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    workdir: Path = arguments.workdir
    corpus_dir = workdir / f"corpus-v{CORPUS_VERSION}-seed{arguments.seed}-{arguments.distinct}"
    regular, giant = build_corpus(corpus_dir, arguments.distinct, arguments.seed)
    small = small_source(corpus_dir)
    runs_dir = workdir / "runs"
    shutil.rmtree(runs_dir, ignore_errors=True)
    runs_dir.mkdir(parents=True)

    report = Report()
    rows = assign_sources(arguments.rows, regular, giant)
    i2d_runs, gaia_runs = run_comparison(report, arguments, rows, runs_dir)

    floor = measure_floor(rows)
    if i2d_runs:
        report_comparison(report, i2d_runs, gaia_runs, floor)
    else:
        report_floor(report, floor, median_of(gaia_runs, "cpu_per_image"), median_of(gaia_runs, "rate"))

    if arguments.latency_rows:
        run_latency_bound(report, arguments, small, runs_dir)
    if arguments.reload_rows:
        run_reload(report, arguments, small, runs_dir)
    report.print_targets()
    return 0


def run_comparison(
    report: Report, arguments: argparse.Namespace, rows: Sequence[Source], runs_dir: Path
) -> tuple[list[RunResult], list[RunResult]]:
    """Run img2dataset and gaia in turn, ``--repeat`` times, and return their runs."""
    hosts = loopback_hosts(arguments.hosts, arguments.loopback)
    i2d_runs: list[RunResult] = []
    gaia_runs: list[RunResult] = []
    with ImageServer(sorted(set(rows), key=lambda source: source.path), hosts, arguments.latency) as server:
        metadata = runs_dir / "train_data.json"
        metadata.write_text(json.dumps(make_records(rows, server.bases, "scene")))
        report.add(
            f"{arguments.rows} rows, {len(set(rows))} distinct sources, {arguments.hosts} loopback hosts "
            f"({arguments.loopback}), {arguments.latency * 1000:.0f} ms latency; gaia runs with its "
            f"defaults except --max-requests-per-second-per-host {LOOPBACK_RATE:g} "
            f"--max-connections-per-host {LOOPBACK_CONNECTIONS}, raised so that the rate gate is not "
            "the bottleneck on loopback"
        )
        for index in range(arguments.repeat):
            # Only the last pair's pixels are compared, and 2048 images take about 1.4 GB of memory.
            for result in (*i2d_runs, *gaia_runs):
                result.drop_images()

            if not arguments.skip_img2dataset:
                folder = runs_dir / f"img2dataset-{index}"
                python = arguments.img2dataset_python
                i2d_runs.append(run_img2dataset(python, metadata, folder, server, arguments.timeout))
                report.add(describe_run(i2d_runs[-1]))

            folder = runs_dir / f"gaia-{index}"
            python = arguments.gaia_python
            gaia_runs.append(
                run_gaia(python, metadata, folder, server, arguments.timeout, LOOPBACK_CONNECTIONS)
            )
            report.add(describe_run(gaia_runs[-1]))
    return i2d_runs, gaia_runs


def run_latency_bound(report: Report, arguments: argparse.Namespace, small: Source, runs_dir: Path) -> None:
    hosts = loopback_hosts(LATENCY_HOSTS, arguments.loopback)
    with ImageServer([small], hosts, LATENCY_SECONDS) as server:
        metadata = runs_dir / "latency_data.json"
        rows = [small] * arguments.latency_rows
        metadata.write_text(json.dumps(make_records(rows, server.bases, "latency")))
        result = run_gaia(
            arguments.gaia_python,
            metadata,
            runs_dir / "gaia-latency",
            server,
            arguments.timeout,
            LATENCY_CONNECTIONS,
        )
    limit = LATENCY_HOSTS * LATENCY_CONNECTIONS / LATENCY_SECONDS
    fetch_rate = result.window.requests / result.window.seconds
    report.add(
        f"latency-bound: {LATENCY_HOSTS} hosts x {LATENCY_CONNECTIONS} connections / {LATENCY_SECONDS:g} s = "
        f"{limit:.0f} images/s allowed; gaia fetched {fetch_rate:.1f} images/s from first request to last "
        f"response ({fetch_rate / limit:.2f}x the limit), {result.rate:.1f} images/s over the whole command "
        f"({result.rate / limit:.2f}x), {result.image_count} of {arguments.latency_rows} images"
    )
    report.target(
        "latency-bound run", fetch_rate >= 0.9 * limit, f"{fetch_rate / limit:.2f}x the politeness limit"
    )


def run_reload(report: Report, arguments: argparse.Namespace, small: Source, runs_dir: Path) -> None:
    with ImageServer([small], ["127.0.0.1"], 0.0) as server:
        metadata = runs_dir / "reload_data.json"
        rows = [small] * arguments.reload_rows
        metadata.write_text(json.dumps(make_records(rows, server.bases, "reload")))
        figures = measure_reload(
            arguments.gaia_python, metadata, runs_dir / "gaia-reload", server, arguments.timeout
        )
    report.add(
        f"cached reload of a {figures['rows']}-row split ({figures['images']} images): load_dataset took "
        f"{figures['reload']:.2f} s, {figures['reload'] / figures['read']:.1f}x reading its Arrow files "
        f"directly ({figures['read']:.3f} s); {figures['requests']} image requests during the reload"
    )
    report.target("cached reload", figures["reload"] <= 2.0, f"{figures['reload']:.2f} s")


if __name__ == "__main__":
    sys.exit(main())
