"""Time to the first example and rows per second when streaming gaia from a loopback server.

The script serves generated JPEG photographs from an aiohttp server on 127.0.0.1 that responds
to every request after ``--latency-ms``, writes a metadata file of ``--rows`` rows (JSON Lines)
whose ``image_src`` points at that server, and streams it with
``load_dataset("gaia", split="validation", data_files=..., streaming=True)``. It prints, as
the median of ``--repeats`` runs:

- the time from the ``load_dataset`` call to the first example, beside the same time for
  streaming the same file with the packaged ``json`` builder (reading the metadata alone), as a
  ratio, and as a multiple of the server latency;
- rows per second from the first example to row ``--measure``, beside the rate that the server
  latency and the connection limit allow (connections / latency) and the rate at which this
  machine's CPUs process the same images (gaia's ``process_image``, then decoding its output as
  datasets does for the consumer, in a thread per CPU), as a ratio to the lower of the two.

Every cache (Arrow files, fetched images, host limits) is in a new temporary folder, so every
run fetches every image. The politeness defaults (4 connections and 4 requests per second per
host) would make the host limit the only thing measured, so the script lifts them; set
``--connections`` and ``--rate`` to measure them instead.

Run: ``python benchmarks/first_example.py [--rows 2000] [--latency-ms 50] [--measure 200]``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import io
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Set before datasets and huggingface_hub are imported, because both read these variables at
# import: every Hugging Face cache goes to a temporary folder, and no request goes to the Hub.
_CACHE_ROOT = tempfile.TemporaryDirectory(prefix="gaia-first-example-")
os.environ["HF_HOME"] = _CACHE_ROOT.name
os.environ["HF_DATASETS_CACHE"] = str(Path(_CACHE_ROOT.name) / "datasets")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_UPDATE_DOWNLOAD_COUNTS"] = "0"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import datasets  # noqa: E402
import numpy as np  # noqa: E402
from aiohttp import web  # noqa: E402
from PIL import Image  # noqa: E402

import gaia  # noqa: E402, F401  (registers "gaia" with datasets)
from gaia_builder.builder import default_num_shards  # noqa: E402
from gaia_builder.config import GaiaConfig  # noqa: E402
from gaia_builder.images import process_image  # noqa: E402

# Distinct images served in turn; each row has its own URL, so none is fetched twice.
IMAGE_COUNT = 8
CPU_SAMPLE = 48


def photo_jpeg(width: int, height: int, seed: int) -> bytes:
    """Return a JPEG that compresses like a photograph: smooth gradients plus noise."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0.0, 1.0, width)[None, :, None]
    y = np.linspace(0.0, 1.0, height)[:, None, None]
    phase = rng.uniform(0.0, 6.0, size=3)
    smooth = 127.5 + 100.0 * np.sin(6.0 * x + 4.0 * y + phase)
    pixels = np.clip(smooth + rng.normal(0.0, 12.0, size=(height, width, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


class LatencyServer:
    """An aiohttp server on 127.0.0.1, in its own thread, that responds after a fixed latency."""

    def __init__(self, bodies: list[bytes], latency: float) -> None:
        self.bodies = bodies
        self.latency = latency
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="latency-server", daemon=True)

    async def handle(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.latency)
        number = int(request.match_info["number"])
        return web.Response(body=self.bodies[number % len(self.bodies)], content_type="image/jpeg")

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/{number:[0-9]+}.jpg", self.handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _stop(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    def url(self, number: int, run: int) -> str:
        return f"http://127.0.0.1:{self.port}/{number}.jpg?run={run}"

    @contextmanager
    def running(self) -> Iterator[LatencyServer]:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10.0)
        try:
            yield self
        finally:
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10.0)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10.0)
            self._loop.close()


def write_metadata(path: Path, server: LatencyServer, rows: int, run: int) -> Path:
    """Write ``rows`` GAIA records as JSON Lines; ``run`` makes every URL new for each run."""
    with path.open("w", encoding="utf-8") as file:
        for number in range(rows):
            record = {
                "id": f"benchmark-row-{number:05d}",
                "image_src": server.url(number, run),
                "image_alt": f"Row {number}",
                "captions": [f"Caption {index} of row {number}." for index in range(5)],
                "credits": "",
                "location": "Somewhere, Country",
                "lat": 10.0 + number / 1000,
                "lon": 20.0 - number / 1000,
                "tag": ["benchmark", "loopback", "jpeg"],
                "resolution": "High",
                "satellite": ["Sentinel-2"],
                "sensor": ["MSI"],
                "modalities": ["Optical"],
            }
            file.write(json.dumps(record) + "\n")
    return path


@dataclass
class Run:
    first_example: float  # seconds from the load_dataset call to the first example
    rows_per_second: float  # from the first example to the last measured one
    rows: int


def time_json(metadata: Path) -> float:
    """Return the seconds from load_dataset("json", streaming=True) to its first example."""
    start = time.perf_counter()
    dataset = datasets.load_dataset(
        "json", data_files={"validation": str(metadata)}, split="validation", streaming=True
    )
    next(iter(dataset))
    return time.perf_counter() - start


def time_gaia(metadata: Path, folder: Path, measure: int, config: dict[str, Any]) -> Run:
    """Stream gaia until row ``measure``; return the time to the first example and the rate after."""
    start = time.perf_counter()
    dataset = datasets.load_dataset(
        "gaia",
        split="validation",
        data_files={"validation": str(metadata)},
        streaming=True,
        cache_dir=str(folder / "datasets"),
        fetch_cache_dir=str(folder / "fetch"),
        **config,
    )
    first = 0.0
    count = 0
    failures = 0
    for row in dataset.take(measure):
        count += 1
        failures += row["error"] is not None
        if count == 1:
            first = time.perf_counter()
    end = time.perf_counter()
    if failures:
        print(f"warning: {failures} of {count} rows failed; the figures are not comparable", file=sys.stderr)
    rate = (count - 1) / (end - first) if count > 1 and end > first else float("nan")
    return Run(first_example=first - start, rows_per_second=rate, rows=count)


def cpu_rows_per_second(bodies: list[bytes], config: dict[str, Any]) -> float:
    """Return the rows per second that this machine's CPUs allow, one thread per CPU.

    A row costs gaia's process_image on the fetched bytes, and decoding its output, which
    datasets does for the consumer of a streamed row.
    """
    options = GaiaConfig(name="default", **config).image_options()

    def process_and_decode(data: bytes) -> None:
        processed = process_image(data, options)
        Image.open(io.BytesIO(processed.data)).load()

    workers = os.cpu_count() or 1
    work = [bodies[index % len(bodies)] for index in range(CPU_SAMPLE)]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(process_and_decode, work[:workers]))  # warm-up
        start = time.perf_counter()
        list(pool.map(process_and_decode, work))
        return CPU_SAMPLE / (time.perf_counter() - start)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2000, help="rows in the metadata file")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="server delay per response, in ms")
    parser.add_argument("--measure", type=int, default=200, help="rows over which the rate is measured")
    parser.add_argument("--repeats", type=int, default=3, help="runs; medians are printed")
    parser.add_argument("--width", type=int, default=1024, help="width of the served JPEGs, in pixels")
    parser.add_argument("--height", type=int, default=768, help="height of the served JPEGs, in pixels")
    parser.add_argument("--prefetch", type=int, default=None, help="gaia's prefetch (default: gaia's)")
    parser.add_argument("--num-shards", type=int, default=None, help="gaia's num_shards (default: gaia's)")
    parser.add_argument("--connections", type=int, default=16, help="max_connections_per_host")
    parser.add_argument("--rate", type=float, default=1000.0, help="max_requests_per_second_per_host")
    args = parser.parse_args()
    if not 1 < args.measure <= args.rows:
        parser.error(f"--measure must be from 2 to --rows ({args.rows}), not {args.measure}")
    return args


def gaia_config(args: argparse.Namespace) -> dict[str, Any]:
    config: dict[str, Any] = {
        "max_connections_per_host": args.connections,
        "max_in_flight": max(args.connections, 16),
        "max_requests_per_second_per_host": args.rate,
        "rate_burst": max(args.connections, 4),
    }
    if args.prefetch is not None:
        config["prefetch"] = args.prefetch
    if args.num_shards is not None:
        config["num_shards"] = args.num_shards
    return config


def main() -> None:
    args = parse_args()
    latency = args.latency_ms / 1000
    config = gaia_config(args)
    bodies = [photo_jpeg(args.width, args.height, seed) for seed in range(IMAGE_COUNT)]
    root = Path(_CACHE_ROOT.name)

    json_times: list[float] = []
    runs: list[Run] = []
    with LatencyServer(bodies, latency).running() as server:
        for run in range(args.repeats):
            folder = root / f"run-{run}"
            folder.mkdir()
            metadata = write_metadata(folder / "val_data.jsonl", server, args.rows, run)
            json_times.append(time_json(metadata))
            runs.append(time_gaia(metadata, folder, args.measure, config))
    cpu_rate = cpu_rows_per_second(bodies, config)

    first = statistics.median(run.first_example for run in runs)
    json_first = statistics.median(json_times)
    rate = statistics.median(run.rows_per_second for run in runs)
    network_rate = min(args.connections / latency, args.rate) if latency > 0 else args.rate
    bound = min(network_rate, cpu_rate)
    prefetch = config.get("prefetch", GaiaConfig.prefetch)
    num_shards = config.get("num_shards") or default_num_shards()

    print(
        f"{args.rows} rows, {args.width}x{args.height} JPEG, latency {args.latency_ms:.0f} ms, "
        f"{args.connections} connections, prefetch {prefetch}, {num_shards} shards, "
        f"{os.cpu_count()} CPUs, median of {args.repeats} runs"
    )
    print(f"time to first example: gaia {first * 1000:.0f} ms, json {json_first * 1000:.0f} ms")
    print(f"  ratio gaia / json: {first / json_first:.1f}")
    if latency > 0:
        print(f"  ratio gaia / server latency: {first / latency:.1f}")
    print(f"rows/s over the first {args.measure} rows: {rate:.1f}")
    print(f"  bound: {bound:.1f} (network {network_rate:.1f}, CPU {cpu_rate:.1f})")
    print(f"  ratio measured / bound: {rate / bound:.2f}")


if __name__ == "__main__":
    main()
