"""Hostile inputs found by installing gaia as a newcomer and attacking it on 127.0.0.1.

The tests pin the bugs that attack found, since fixed, and behaviour that held up under the same
attacks and that no other test file covers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import io
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.abc
import datasets
import pytest
from aiohttp import web
from click.testing import CliRunner, Result
from factories import record, write_metadata
from PIL import Image
from pytest_httpserver import HTTPServer
from raw_server import raw_server

from gaia_builder.builder import Gaia
from gaia_builder.cache import FetchCache
from gaia_builder.cli import main
from gaia_builder.config import FetchOptions, GaiaConfig, ImageOptions
from gaia_builder.errors import ConfigError, ImageError, MetadataError, is_error_class
from gaia_builder.fetch import Fetcher, FetchResult
from gaia_builder.images import process_image
from gaia_builder.metadata import check_row, read_records
from gaia_builder.pipeline import RowOutcome, RowPipeline

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Seconds a raw test server waits for a request head before it gives up on the connection.

# Short deadlines, no retries by default and backoff waits of at most 0.05 s, so that every failing
# fetch ends within seconds.
FAST_FETCH: dict[str, Any] = {
    "max_in_flight": 4,
    "max_connections_per_host": 4,
    "max_requests_per_second_per_host": 1000.0,
    "rate_burst": 100,
    "max_retries": 0,
    "backoff_initial": 0.01,
    "backoff_max": 0.05,
    "max_retry_after": 1.0,
    "connect_timeout": 1.0,
    "read_timeout": 1.0,
    "attempt_timeout": 3.0,
}


def asyncio_test(function: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test function in a fresh event loop."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(function(*args, **kwargs))

    return wrapper


def png_bytes(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 90).save(buffer, "PNG")
    return buffer.getvalue()


PNG = png_bytes((64, 48))


def fetch_options(tmp_path: Path, **overrides: Any) -> FetchOptions:
    return FetchOptions(**{**FAST_FETCH, "state_dir": str(tmp_path / "hosts"), **overrides})


async def fetch_one(tmp_path: Path, url: str, **overrides: Any) -> FetchResult:
    async with Fetcher(fetch_options(tmp_path, **overrides)) as fetcher:
        return await fetcher.fetch(url)


@contextlib.asynccontextmanager
async def web_server(routes: dict[str, Handler]) -> AsyncIterator[str]:
    """Serve ``routes`` with aiohttp.web on a free 127.0.0.1 port and yield the base URL."""
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.SockSite(runner, listener).start()
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        await runner.cleanup()


def serve(body: bytes, **headers: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, headers=headers)

    return handler


class LoopbackResolver(aiohttp.abc.AbstractResolver):
    """Resolve every host name to 127.0.0.1, so that no name reaches the system resolver."""

    def __init__(self) -> None:
        self.lookups: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp.abc.ResolveResult]:
        self.lookups.append(host)
        result = aiohttp.abc.ResolveResult(
            hostname=host, host="127.0.0.1", port=port, family=socket.AF_INET, proto=0, flags=0
        )
        return [result]

    async def close(self) -> None:
        pass


def invoke(args: list[str]) -> Result:
    return CliRunner().invoke(main, args)


def prepare_args(tmp_path: Path, metadata: Path, *extra: str, split: str = "validation") -> list[str]:
    return [
        "prepare",
        "--data-files",
        f"{split}={metadata}",
        "--cache-dir",
        str(tmp_path / "datasets"),
        "--fetch-cache-dir",
        str(tmp_path / "fetch"),
        "--failures",
        str(tmp_path / "failures.jsonl"),
        *extra,
    ]


# Fetching: fixed bugs.


@pytest.mark.parametrize("status", [600, 999])
@asyncio_test
async def test_fetch_nonstandard_status(tmp_path: Path, status: int) -> None:
    """A status outside 100-599 fails the row with a documented class instead of raising."""
    response = f"HTTP/1.1 {status} Weird\r\nContent-Length: 0\r\n\r\n".encode()
    async with raw_server(response) as base:
        result = await fetch_one(tmp_path, f"{base}/a.png")

    assert result.error is not None
    assert is_error_class(result.error.error_class)


@asyncio_test
async def test_fetch_retry_after_superscript_digit(tmp_path: Path) -> None:
    """A Retry-After made of a Unicode digit that float() rejects is ignored, not raised."""
    response = b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: \xc2\xb2\r\nContent-Length: 0\r\n\r\n"
    async with raw_server(response) as base:
        result = await fetch_one(tmp_path, f"{base}/a.png")

    assert result.error is not None
    assert result.error.error_class == "http_429"


@asyncio_test
async def test_fetch_error_names_no_false_redirect(tmp_path: Path) -> None:
    async with web_server({}) as base:
        result = await fetch_one(tmp_path, f"{base}/a b.png")

    assert result.error is not None
    assert result.error.error_class == "http_404"
    assert "redirected" not in result.error.detail


@asyncio_test
async def test_fetch_gzip_bomb_message(tmp_path: Path) -> None:
    bomb = gzip.compress(bytes(8 * 1024 * 1024), compresslevel=9)
    routes = {"/bomb.png": serve(bomb, **{"Content-Encoding": "gzip", "Content-Type": "image/png"})}
    async with web_server(routes) as base:
        result = await fetch_one(tmp_path, f"{base}/bomb.png", max_bytes=1024 * 1024)

    assert result.error is not None
    assert "without a Content-Length" not in result.error.detail


# Fetching: behaviour that held up.


@asyncio_test
async def test_fetch_redirect_without_location(tmp_path: Path) -> None:
    """A 302 with no Location header is a final http_302, sent once and not retried."""

    async def no_location(request: web.Request) -> web.StreamResponse:
        return web.Response(status=302)

    async with web_server({"/a.png": no_location}) as base:
        result = await fetch_one(tmp_path, f"{base}/a.png", max_retries=2)

    assert result.error is not None
    assert result.error.error_class == "http_302"
    assert result.attempts == 1
    assert result.transient is False


@asyncio_test
async def test_fetch_redirect_other_port(tmp_path: Path) -> None:
    async with web_server({"/b.png": serve(PNG, **{"Content-Type": "image/png"})}) as target:

        async def moved(request: web.Request) -> web.StreamResponse:
            return web.Response(status=301, headers={"Location": f"{target}/b.png"})

        async with web_server({"/a.png": moved}) as base:
            result = await fetch_one(tmp_path, f"{base}/a.png")

    assert result.ok, result.error
    assert result.data == PNG
    assert result.final_url == f"{target}/b.png"


@asyncio_test
async def test_fetch_gzip_body_decoded(tmp_path: Path) -> None:
    routes = {
        "/a.png": serve(gzip.compress(PNG), **{"Content-Encoding": "gzip", "Content-Type": "image/png"})
    }
    async with web_server(routes) as base:
        result = await fetch_one(tmp_path, f"{base}/a.png")

    assert result.ok, result.error
    assert result.data == PNG


@asyncio_test
async def test_fetch_gzip_bomb_too_large(tmp_path: Path) -> None:
    """A small gzip body that inflates past max_bytes fails as too_large, not out of memory."""
    bomb = gzip.compress(bytes(8 * 1024 * 1024), compresslevel=9)
    routes = {"/bomb.png": serve(bomb, **{"Content-Encoding": "gzip", "Content-Type": "image/png"})}
    async with web_server(routes) as base:
        result = await fetch_one(tmp_path, f"{base}/bomb.png", max_bytes=1024 * 1024)

    assert len(bomb) < 64 * 1024
    assert result.error is not None
    assert result.error.error_class == "too_large"


@asyncio_test
async def test_fetch_body_shorter_than_length(tmp_path: Path) -> None:
    """A server that closes before Content-Length bytes gives a transient connection_error."""
    response = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n" % (len(PNG) + 500)
    async with raw_server(response + PNG) as base:
        result = await fetch_one(tmp_path, f"{base}/a.png")

    assert result.error is not None
    assert result.error.error_class == "connection_error"
    assert result.transient is True


@asyncio_test
async def test_fetch_garbage_status_line(tmp_path: Path) -> None:
    """Bytes that are not HTTP give a connection_error that a later run does not retry."""
    async with raw_server(b"\x00\xff this is not HTTP\r\n\r\n") as base:
        result = await fetch_one(tmp_path, f"{base}/a.png", max_retries=2)

    assert result.error is not None
    assert result.error.error_class == "connection_error"
    assert result.attempts == 1
    assert result.transient is False


@asyncio_test
async def test_fetch_idn_host(tmp_path: Path) -> None:
    """A Unicode host name is looked up and sent as its IDNA (punycode) form."""
    hosts: list[str] = []

    async def record_host(request: web.Request) -> web.StreamResponse:
        hosts.append(request.headers.get("Host", ""))
        return web.Response(body=PNG, content_type="image/png")

    resolver = LoopbackResolver()
    async with web_server({"/a.png": record_host}) as base:
        port = base.rsplit(":", 1)[1]
        async with Fetcher(fetch_options(tmp_path), resolver=resolver) as fetcher:
            result = await fetcher.fetch(f"http://bücher.test:{port}/a.png")

    assert result.ok, result.error
    assert resolver.lookups == ["xn--bcher-kva.test"]
    assert hosts == [f"xn--bcher-kva.test:{port}"]


# The fetch cache: fixed bug.


def run_row(url: str, tmp_path: Path, **overrides: Any) -> RowOutcome:
    """Run one row through a pipeline whose fetch cache lives in ``tmp_path``."""
    pipeline = RowPipeline(
        fetch_options=fetch_options(tmp_path, **overrides),
        image_options=ImageOptions(),
        cache=FetchCache(tmp_path / "fetch"),
        prefetch=2,
        workers=1,
    )
    outcomes = pipeline.run([check_row(record(0, url), source="val.json", index=0)])
    try:
        return next(outcomes)
    finally:
        outcomes.close()


@pytest.mark.parametrize(
    ("option", "value", "error_class"),
    [
        ("max_bytes", 64, "too_large"),
        ("disallowed_header_directives", ("noai",), "robots_disallowed"),
        ("max_redirects", 0, "too_many_redirects"),
    ],
)
def test_cache_refetches_after_option_change(
    httpserver: HTTPServer, tmp_path: Path, option: str, value: object, error_class: str
) -> None:
    """A row that failed only because of an option is fetched again once the option allows it."""
    httpserver.expect_request("/img.png").respond_with_data(
        PNG, content_type="image/png", headers={"X-Robots-Tag": "noai"}
    )
    httpserver.expect_request("/start.png").respond_with_data(
        "", status=302, headers={"Location": "/img.png"}
    )
    url = httpserver.url_for("/start.png")

    first = run_row(url, tmp_path, **{option: value})
    second = run_row(url, tmp_path)

    assert first.error is not None
    assert first.error.error_class == error_class
    assert second.error is None
    assert second.image is not None


# Images.


def test_resize_output_within_max_pixels() -> None:
    """An upscaled sliver either fails as too_many_pixels or stays within max_pixels."""
    options = ImageOptions(image_size=64, max_pixels=10_000)

    outcome = resize_outcome(png_bytes((1, 1000), "L"), options)

    assert outcome == "too_many_pixels" or (isinstance(outcome, int) and outcome <= options.max_pixels)


def resize_outcome(data: bytes, options: ImageOptions) -> int | str:
    """Return the pixels of the stored image, or the row error class when there is none."""
    try:
        result = process_image(data, options, source="sliver.png")
    except ImageError as error:
        return error.row_error.error_class
    return result.width * result.height


def test_one_pixel_image_upscaled() -> None:
    result = process_image(png_bytes((1, 1)), ImageOptions(), source="dot.png")

    assert (result.width, result.height) == (512, 512)
    assert (result.original_width, result.original_height) == (1, 1)


def test_gif_thousand_frames_first_frame() -> None:
    """Only the first of 1000 frames is decoded, and it is the one stored."""
    frames = [
        Image.new("RGB", (8, 8), (255, 0, 0) if index % 2 == 0 else (0, 0, 255)) for index in range(1000)
    ]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=10)
    data = buffer.getvalue()

    result = process_image(data, ImageOptions(resize_mode="no"), source="many.gif")
    stored = Image.open(io.BytesIO(result.data))

    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 1000
    assert stored.convert("RGB").getpixel((4, 4)) == (255, 0, 0)


# Metadata: fixed bugs.


def test_read_records_huge_integer(tmp_path: Path) -> None:
    path = tmp_path / "val.json"
    path.write_text('[{"id": "a", "image_src": "http://127.0.0.1:9/a.png", "lat": ' + "9" * 5000 + "}]")

    with pytest.raises(MetadataError, match=r"val\.json"):
        read_records(path)


def test_read_records_deep_nesting(tmp_path: Path) -> None:
    path = tmp_path / "val.json"
    path.write_text("[" * 100_000 + "]" * 100_000)

    with pytest.raises(MetadataError, match=r"val\.json"):
        read_records(path)


def test_lone_surrogate_row_kept(tmp_path: Path) -> None:
    """Every row comes out even when one string contains an unpaired UTF-16 surrogate escape."""
    records = [
        record(0, "http://127.0.0.1:9/0.png", image_alt="broken \ud800 text"),
        record(1, "http://127.0.0.1:9/1.png"),
    ]
    metadata = write_metadata(tmp_path / "val.json", records, "records")

    dataset = datasets.load_dataset(
        "gaia",
        "metadata",
        split="validation",
        data_files={"validation": str(metadata)},
        cache_dir=str(tmp_path),
    )

    assert len(dataset) == 2


# Metadata: behaviour that held up.


@pytest.mark.parametrize(
    "url",
    [
        "javascript:alert(1)",
        "file:///etc/passwd",
        "//127.0.0.1/a.jpg",
        "http://[::1/a.jpg",
        "http:/a.jpg",
    ],
)
def test_check_row_hostile_url(url: str) -> None:
    row = check_row(record(0, url), source="val.json", index=0)

    assert row.error is not None
    assert row.error.error_class == "invalid_url"
    assert row.values["image_src"] == url


def test_read_records_negative_row_keys(tmp_path: Path) -> None:
    """Row keys of pandas' to_json layout are ordered as integers, negative ones first."""
    path = tmp_path / "val.json"
    path.write_text(json.dumps({"id": {"1": "b", "-1": "z", "0": "a"}}))

    assert [row["id"] for row in read_records(path)] == ["z", "a", "b"]


# Options: bugs found by the attack, now fixed.


def test_builder_keeps_metadata_repo_id(tmp_path: Path) -> None:
    builder = Gaia(config_name="metadata", metadata_repo_id="someone/gaia-fork", cache_dir=str(tmp_path))

    assert builder.config.metadata_repo_id == "someone/gaia-fork"


def test_load_dataset_keeps_metadata_repo_id(tmp_path: Path) -> None:
    builder = datasets.load_dataset_builder(
        "gaia", "metadata", metadata_repo_id="someone/gaia-fork", cache_dir=str(tmp_path)
    )

    assert builder.config.metadata_repo_id == "someone/gaia-fork"


def test_user_agent_control_characters_rejected() -> None:
    with pytest.raises(ConfigError, match="user_agent"):
        GaiaConfig(name="default", user_agent="gaia\r\nX-Injected: 1")


# The command line: bugs found by the attack, now fixed.


def test_prepare_summary_malformed_ipv6_url(tmp_path: Path) -> None:
    records = [record(0, "http://127.0.0.1:9/a.png"), record(1, "http://[::1/a.jpg")]
    metadata = write_metadata(tmp_path / "val.json", records, "records")

    result = invoke(prepare_args(tmp_path, metadata, "--config", "metadata"))

    assert result.exit_code == 0, result.output
    assert "invalid_url" in result.output


def test_prepare_metadata_summary_fresh_build(tmp_path: Path) -> None:
    metadata = write_metadata(tmp_path / "val.json", [record(0, "http://127.0.0.1:9/a.png")], "records")

    result = invoke(prepare_args(tmp_path, metadata, "--config", "metadata"))

    assert result.exit_code == 0, result.output
    assert "Reused the prepared Arrow cache" not in result.output


def test_prepare_missing_data_file(tmp_path: Path) -> None:
    result = invoke(prepare_args(tmp_path, tmp_path / "missing.json", "--config", "metadata"))

    assert isinstance(result.exception, SystemExit), result.exception
    assert "missing.json" in result.output


def test_prepare_split_not_in_data_files(httpserver: HTTPServer, tmp_path: Path) -> None:
    httpserver.expect_request("/a.png").respond_with_data(PNG, content_type="image/png")
    metadata = write_metadata(tmp_path / "test.json", [record(0, httpserver.url_for("/a.png"))], "records")

    result = invoke(prepare_args(tmp_path, metadata, "--split", "validation", split="test"))

    assert result.exit_code == 2, result.output
    assert len(httpserver.log) == 0


# The command line: behaviour that held up.


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--max-requests-per-second-per-host", "nan"),
        ("--attempt-timeout", "inf"),
        ("--backoff-max", "-1"),
        ("--max-retries", "-1"),
    ],
)
def test_prepare_rejects_invalid_numbers(tmp_path: Path, flag: str, value: str) -> None:
    metadata = write_metadata(tmp_path / "val.json", [record(0, "http://127.0.0.1:9/a.png")], "records")

    result = invoke([*prepare_args(tmp_path, metadata), flag, value])

    assert result.exit_code == 2, result.output
    assert f"invalid value for {flag[2:].replace('-', '_')}" in result.output
