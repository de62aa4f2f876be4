"""Tests of the fetcher against real aiohttp servers on 127.0.0.1, one test per fault.

Each fault test fetches a good URL from the same Fetcher alongside the bad one, checks the
error class, and checks that the call ended within a bound computed from the small timeouts
it sets. A VirtualClock skips the backoff and Retry-After waits, so retries take no real time
while the clock still records the waits they would have taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import gc
import gzip
import io
import logging
import pickle
import random
import socket
import struct
import time
import warnings
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.abc
import pytest
import yarl
from aiohttp import web
from PIL import Image
from raw_server import raw_server

from gaia_builder.config import FetchOptions
from gaia_builder.errors import redact_url
from gaia_builder.fetch import (
    Fetcher,
    FetchResult,
    FetchStats,
    HostStats,
    backoff_delay,
    describe_non_image,
    find_disallowed_directive,
    parse_retry_after,
    sniff_image_format,
    user_agent_token,
)
from gaia_builder.limits import Clock, HostLimits, SystemClock, VirtualClock, host_key

# Seconds allowed beyond a computed bound for scheduling on a busy 2-core CI machine.
SLACK = 0.5

# Seconds a raw test server waits for a request head before it gives up on the connection.

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def asyncio_test(function: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test function in a fresh event loop."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(function(*args, **kwargs))

    return wrapper


def make_image(image_format: str = "JPEG", size: tuple[int, int] = (16, 12)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (30, 120, 200)).save(buffer, image_format)
    return buffer.getvalue()


JPEG = make_image("JPEG")
PNG = make_image("PNG")
HTML = b"<!DOCTYPE html>\n<html><head><title>Page not found</title></head><body>Gone</body></html>"


def make_options(tmp_path: Path, **overrides: Any) -> FetchOptions:
    """Small timeouts, one retry, a rate that never binds and a fresh state folder."""
    values: dict[str, Any] = {
        "max_in_flight": 8,
        "max_connections_per_host": 4,
        "max_requests_per_second_per_host": 1000.0,
        "rate_burst": 100,
        "max_retries": 1,
        "backoff_initial": 0.1,
        "backoff_max": 1.0,
        "max_retry_after": 10.0,
        "connect_timeout": 0.5,
        "read_timeout": 0.3,
        "attempt_timeout": 1.0,
        "max_redirects": 3,
        "max_bytes": 100_000,
        "state_dir": str(tmp_path / "hosts"),
    }
    values.update(overrides)
    return FetchOptions(**values)


class MaxJitter(random.Random):
    """A random source whose draws are all at the top of their range, so waits are the caps."""

    def random(self) -> float:
        return 1.0


class LoopbackServer:
    """An aiohttp.web server on 127.0.0.1 that records the path and clock time of each request.

    Handlers are looked up by path on each request, so a test may add them while it runs.
    """

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock = clock if clock is not None else SystemClock()
        self.handlers: dict[str, Handler] = {"/good.jpg": respond(JPEG, "image/jpeg")}
        self.requests: list[tuple[str, float]] = []
        self.user_agents: list[str] = []
        self.first_request = asyncio.Event()
        # Set on exit so that handlers that stall or stream forever end.
        self.closing = asyncio.Event()
        self.port = 0
        self._runner: web.AppRunner | None = None

    def add(self, path: str, handler: Handler) -> None:
        self.handlers[path] = handler

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def hits(self, path: str) -> int:
        return sum(1 for requested, _ in self.requests if requested == path)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.path, self.clock.time()))
        self.user_agents.append(request.headers.get("User-Agent", ""))
        self.first_request.set()

        handler = self.handlers.get(request.path)
        if handler is None:
            raise web.HTTPNotFound()
        return await handler(request)

    async def __aenter__(self) -> LoopbackServer:
        app = web.Application()
        app.router.add_get("/{path:.*}", self._dispatch)
        self._runner = web.AppRunner(app, shutdown_timeout=0.2, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.closing.set()
        assert self._runner is not None
        await self._runner.cleanup()


def respond(
    body: bytes, content_type: str, status: int = 200, headers: dict[str, str] | None = None
) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(
            body=body, status=status, headers={"Content-Type": content_type, **(headers or {})}
        )

    return handler


def respond_in_turn(*handlers: Handler) -> Handler:
    """Serve the handlers one per request, repeating the last one."""
    calls = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal calls
        current = handlers[min(calls, len(handlers) - 1)]
        calls += 1
        return await current(request)

    return handler


def redirect(location: str, status: int = 302) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Location": location})

    return handler


async def fetch_beside_good(fetcher: Fetcher, server: LoopbackServer, url: str) -> FetchResult:
    """Fetch ``url`` and the server's good image together; check the good one and return the other."""
    result, good = await asyncio.gather(fetcher.fetch(url), fetcher.fetch(server.url("/good.jpg")))
    assert good.ok, good.error
    assert good.data == JPEG
    return result


async def wait_until(condition: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Poll an async condition until it holds, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# Success, User-Agent and lifecycle.


@asyncio_test
async def test_fetch_image(tmp_path: Path) -> None:
    options = make_options(tmp_path)
    async with LoopbackServer() as server, Fetcher(options) as fetcher:
        result = await fetcher.fetch(server.url("/good.jpg"))

    assert result.ok
    assert result.data == JPEG
    assert result.error is None
    assert result.attempts == 1
    assert result.final_url == server.url("/good.jpg")
    assert result.content_type == "image/jpeg"
    assert result.transient is False


@asyncio_test
async def test_fetch_sends_user_agent(tmp_path: Path) -> None:
    options = make_options(tmp_path, user_agent="gaia-builder/9.9 (+https://example.org/)")
    async with LoopbackServer() as server, Fetcher(options) as fetcher:
        await fetcher.fetch(server.url("/good.jpg"))
        await fetcher.fetch(server.url("/missing.jpg"))

    assert server.user_agents == [options.user_agent, options.user_agent]


@asyncio_test
async def test_fetch_outside_context_raises(tmp_path: Path) -> None:
    fetcher = Fetcher(make_options(tmp_path))
    with pytest.raises(RuntimeError, match="async with"):
        await fetcher.fetch("http://127.0.0.1:9/x.jpg")


@asyncio_test
async def test_fetcher_closes_cleanly(tmp_path: Path) -> None:
    """Entering, fetching and leaving leaves no unclosed session or connector behind."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with LoopbackServer() as server:
            async with Fetcher(make_options(tmp_path)) as fetcher:
                await fetcher.fetch(server.url("/good.jpg"))
            with pytest.raises(RuntimeError):
                await fetcher.fetch(server.url("/good.jpg"))
        gc.collect()

    unclosed = [str(warning.message) for warning in caught if "Unclosed" in str(warning.message)]
    assert unclosed == []


# Retry-After and retries.


def retry_after_date(clock: Clock, seconds: int) -> Handler:
    """Respond with 429 and a Retry-After HTTP-date ``seconds`` ahead, plus a Date header."""

    async def handler(request: web.Request) -> web.Response:
        now = clock.time()
        headers = {
            "Retry-After": email.utils.formatdate(now + seconds, usegmt=True),
            "Date": email.utils.formatdate(now, usegmt=True),
        }
        return web.Response(status=429, headers=headers)

    return handler


def shared_limits(options: FetchOptions, clock: Clock) -> HostLimits:
    """Open the fetcher's shared host state as another process of the run would."""
    assert options.state_dir is not None
    return HostLimits(
        options.state_dir,
        max_connections_per_host=options.max_connections_per_host,
        requests_per_second=options.max_requests_per_second_per_host,
        burst=options.rate_burst,
        max_pause=options.max_retry_after,
        clock=clock,
    )


@pytest.mark.parametrize("form", ["seconds", "http-date"])
@asyncio_test
async def test_fetch_retry_after_pauses_host(tmp_path: Path, form: str) -> None:
    """A 429 with Retry-After pauses the host in the shared state, then the row succeeds."""
    pause = 3
    clock = VirtualClock()
    options = make_options(tmp_path, max_retries=2)
    busy = respond(b"", "text/plain", status=429, headers={"Retry-After": str(pause)})
    if form == "http-date":
        busy = retry_after_date(clock, pause)

    async with LoopbackServer(clock) as server, Fetcher(options, clock=clock) as fetcher:
        server.add("/busy.jpg", respond_in_turn(busy, respond(JPEG, "image/jpeg")))
        limits = shared_limits(options, clock)
        key = host_key(server.url("/"))
        task = asyncio.create_task(fetcher.fetch(server.url("/busy.jpg")))

        # Send another row of the same host once the 429 has been handled.
        await wait_until(lambda: _has_paused(limits, key))
        good = await fetcher.fetch(server.url("/good.jpg"))
        result = await task
        paused_until = await limits.paused_until(key)

    first_time = server.requests[0][1]
    later_times = [when for _, when in server.requests[1:]]
    assert result.ok, result.error
    assert good.ok, good.error
    assert result.attempts == 2
    assert paused_until >= first_time + pause
    assert len(later_times) == 2
    assert min(later_times) >= first_time + pause
    assert clock.sleeps[0] == pytest.approx(pause, abs=0.01)


async def _has_paused(limits: HostLimits, key: str) -> bool:
    return await limits.paused_until(key) > 0


@asyncio_test
async def test_fetch_waits_out_shared_pause(tmp_path: Path) -> None:
    """A pause written by another process holds back this fetcher's requests to that host."""
    clock = VirtualClock()
    options = make_options(tmp_path)
    async with LoopbackServer(clock) as server, Fetcher(options, clock=clock) as fetcher:
        other_process = shared_limits(options, clock)
        paused_until = await other_process.pause(host_key(server.url("/")), 4.0)
        result = await fetcher.fetch(server.url("/good.jpg"))

    assert result.ok, result.error
    assert server.requests[0][1] >= paused_until
    assert clock.sleeps == [pytest.approx(4.0, abs=0.01)]


@asyncio_test
async def test_fetch_retry_after_over_max(tmp_path: Path) -> None:
    """A Retry-After longer than max_retry_after fails the row as rate_limited at once."""
    clock = VirtualClock()
    options = make_options(tmp_path, max_retries=3, max_retry_after=10.0)
    async with LoopbackServer(clock) as server, Fetcher(options, clock=clock) as fetcher:
        server.add("/busy.jpg", respond(b"", "text/plain", status=429, headers={"Retry-After": "3600"}))
        start = time.monotonic()
        result = await fetch_beside_good(fetcher, server, server.url("/busy.jpg"))
        elapsed = time.monotonic() - start

    assert result.error is not None
    assert result.error.error_class == "rate_limited"
    assert "3600" in result.error.detail
    assert "max_retry_after" in result.error.detail
    assert result.attempts == 1
    assert result.transient is True
    assert server.hits("/busy.jpg") == 1
    assert elapsed < SLACK


@asyncio_test
async def test_fetch_server_error_forever(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A 500 on every attempt is retried after growing waits, then fails as http_500."""
    clock = VirtualClock()
    options = make_options(tmp_path, max_retries=4, backoff_initial=0.1, backoff_max=0.5)
    caplog.set_level(logging.WARNING, logger="gaia_builder.fetch")
    async with LoopbackServer(clock) as server, Fetcher(options, clock=clock, rng=MaxJitter()) as fetcher:
        server.add("/broken.jpg", respond(b"oops", "text/plain", status=500))
        start = time.monotonic()
        result = await fetch_beside_good(fetcher, server, server.url("/broken.jpg"))
        elapsed = time.monotonic() - start
        stats = fetcher.stats.host(host_key(server.url("/")))

    retry_lines = [record.getMessage() for record in caplog.records if "Retrying" in record.getMessage()]
    assert result.error is not None
    assert result.error.error_class == "http_500"
    assert result.error.detail == f"GET {server.url('/broken.jpg')} returned 500 Internal Server Error"
    assert result.attempts == 5
    assert result.transient is True
    assert server.hits("/broken.jpg") == 5
    assert clock.sleeps == pytest.approx([0.1, 0.2, 0.4, 0.5])
    assert stats.retries == 4
    assert stats.retry_wait_seconds == pytest.approx(1.2)
    assert len(retry_lines) == 4
    assert "[4/4]" in retry_lines[-1]
    assert elapsed < SLACK


@asyncio_test
async def test_fetch_retry_then_success(tmp_path: Path) -> None:
    clock = VirtualClock()
    options = make_options(tmp_path, max_retries=2)
    async with LoopbackServer(clock) as server, Fetcher(options, clock=clock) as fetcher:
        flaky = respond_in_turn(respond(b"", "text/plain", status=503), respond(PNG, "image/png"))
        server.add("/flaky.png", flaky)
        result = await fetcher.fetch(server.url("/flaky.png"))

    assert result.ok, result.error
    assert result.data == PNG
    assert result.attempts == 2
    assert len(clock.sleeps) == 1
    assert clock.sleeps[0] <= options.backoff_initial


@pytest.mark.parametrize(("status", "phrase"), [(403, "Forbidden"), (404, "Not Found"), (410, "Gone")])
@asyncio_test
async def test_fetch_final_client_error(tmp_path: Path, status: int, phrase: str) -> None:
    """A 403, 404 or 410 is final: exactly one request, no retry."""
    clock = VirtualClock()
    options = make_options(tmp_path, max_retries=3)
    async with LoopbackServer(clock) as server, Fetcher(options, clock=clock) as fetcher:
        server.add("/gone.jpg", respond(b"no", "text/plain", status=status))
        result = await fetch_beside_good(fetcher, server, server.url("/gone.jpg"))

    assert result.error is not None
    assert result.error.error_class == f"http_{status}"
    assert result.error.detail == f"GET {server.url('/gone.jpg')} returned {status} {phrase}"
    assert result.attempts == 1
    assert result.transient is False
    assert server.hits("/gone.jpg") == 1
    assert clock.sleeps == []


@pytest.mark.parametrize("status", ["000", "099"])
@asyncio_test
async def test_fetch_status_below_100(tmp_path: Path, status: str) -> None:
    """aiohttp passes on a status of "000" or "099", and the row fails as an invalid response."""
    options = make_options(tmp_path, max_retries=2)
    response = f"HTTP/1.1 {status} Odd\r\nContent-Length: 0\r\n\r\n".encode()
    async with raw_server(response) as base, Fetcher(options) as fetcher:
        result = await fetcher.fetch(f"{base}/x.jpg")

    assert result.error is not None
    assert result.error.error_class == "connection_error"
    assert f"status {status}" in result.error.detail
    assert result.attempts == 1
    assert result.transient is False


@asyncio_test
async def test_fetch_status_over_599(tmp_path: Path) -> None:
    """A status of 600-999, outside RFC 9110's range but sent by some servers, gets its own http_ class."""
    response = b"HTTP/1.1 999 Request Denied\r\nContent-Length: 0\r\n\r\n"
    async with raw_server(response) as base, Fetcher(make_options(tmp_path)) as fetcher:
        result = await fetcher.fetch(f"{base}/x.jpg")

    assert result.error is not None
    assert result.error.error_class == "http_999"
    assert result.error.detail == f"GET {base}/x.jpg returned 999 Request Denied"


# Deadlines and broken connections.


@asyncio_test
async def test_fetch_stall_before_headers(tmp_path: Path) -> None:
    """A server that accepts and never responds is cut by read_timeout on every attempt."""
    clock = VirtualClock()
    options = make_options(tmp_path, read_timeout=0.2, attempt_timeout=2.0, max_retries=1)
    async with LoopbackServer(clock) as server, Fetcher(options, clock=clock) as fetcher:

        async def stall(request: web.Request) -> web.Response:
            await server.closing.wait()
            return web.Response(body=JPEG)

        server.add("/stall.jpg", stall)
        start = time.monotonic()
        result = await fetch_beside_good(fetcher, server, server.url("/stall.jpg"))
        elapsed = time.monotonic() - start

    assert result.error is not None
    assert result.error.error_class == "timeout"
    assert "read_timeout" in result.error.detail
    assert result.attempts == 2
    assert result.transient is True
    assert result.final_url is None
    assert elapsed < 2 * options.read_timeout + SLACK


@asyncio_test
async def test_fetch_slow_drip_body(tmp_path: Path) -> None:
    """A body sent one byte at a time, faster than read_timeout, is cut by attempt_timeout."""
    clock = VirtualClock()
    options = make_options(tmp_path, read_timeout=0.3, attempt_timeout=0.5, max_retries=1)
    async with LoopbackServer(clock) as server, Fetcher(options, clock=clock) as fetcher:

        async def drip(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": "image/jpeg", "Content-Length": "10000"})
            await response.prepare(request)
            # The client hangs up when its deadline passes.
            with contextlib.suppress(ConnectionError):
                while not server.closing.is_set():
                    await response.write(JPEG[:1])
                    await asyncio.sleep(0.05)  # the drip rate, well under read_timeout
            return response

        server.add("/drip.jpg", drip)
        start = time.monotonic()
        result = await fetch_beside_good(fetcher, server, server.url("/drip.jpg"))
        elapsed = time.monotonic() - start

    assert result.error is not None
    assert result.error.error_class == "timeout"
    assert "attempt_timeout" in result.error.detail
    assert result.attempts == 2
    assert elapsed < 2 * options.attempt_timeout + SLACK


@asyncio_test
async def test_fetch_endless_stream(tmp_path: Path) -> None:
    """An endless multipart stream (a webcam feed) is cut by attempt_timeout."""
    clock = VirtualClock()
    options = make_options(tmp_path, attempt_timeout=0.5, max_retries=0, max_bytes=100_000_000)
    async with LoopbackServer(clock) as server, Fetcher(options, clock=clock) as fetcher:

        async def stream(request: web.Request) -> web.StreamResponse:
            headers = {"Content-Type": "multipart/x-mixed-replace; boundary=frame"}
            response = web.StreamResponse(headers=headers)
            await response.prepare(request)
            # The client hangs up when its deadline passes.
            with contextlib.suppress(ConnectionError):
                while not server.closing.is_set():
                    await response.write(b"--frame\r\nContent-Type: image/jpeg\r\n\r\n" + JPEG + b"\r\n")
                    await asyncio.sleep(0.01)  # the frame rate
            return response

        server.add("/live", stream)
        start = time.monotonic()
        result = await fetch_beside_good(fetcher, server, server.url("/live"))
        elapsed = time.monotonic() - start

    assert result.error is not None
    assert result.error.error_class == "timeout"
    assert result.attempts == 1
    assert elapsed < options.attempt_timeout + SLACK


@asyncio_test
async def test_fetch_connection_reset(tmp_path: Path) -> None:
    """A server that resets the connection after reading the request gives connection_error."""

    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        # SO_LINGER with a zero timeout makes close() send a TCP RST.
        writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        writer.transport.abort()

    reset_server = await asyncio.start_server(reset, "127.0.0.1", 0)
    raw_port = reset_server.sockets[0].getsockname()[1]
    clock = VirtualClock()
    options = make_options(tmp_path, max_retries=2)
    try:
        async with LoopbackServer(clock) as server, Fetcher(options, clock=clock) as fetcher:
            start = time.monotonic()
            result = await fetch_beside_good(fetcher, server, f"http://127.0.0.1:{raw_port}/x.jpg")
            elapsed = time.monotonic() - start
    finally:
        reset_server.close()
        await reset_server.wait_closed()

    assert result.error is not None
    assert result.error.error_class == "connection_error"
    assert result.attempts == 3
    assert result.transient is True
    assert elapsed < SLACK


class FailingResolver(aiohttp.abc.AbstractResolver):
    """Resolves nothing, as a resolver does for a name that does not exist."""

    def __init__(self) -> None:
        self.lookups: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp.abc.ResolveResult]:
        self.lookups.append(host)
        raise OSError(socket.EAI_NONAME, "Name or service not known")

    async def close(self) -> None:
        pass


@asyncio_test
async def test_fetch_unresolvable_host(tmp_path: Path) -> None:
    resolver = FailingResolver()
    clock = VirtualClock()
    options = make_options(tmp_path, max_retries=2)
    async with LoopbackServer(clock) as server, Fetcher(options, resolver=resolver, clock=clock) as fetcher:
        start = time.monotonic()
        result = await fetch_beside_good(fetcher, server, "http://images.example.invalid/x.jpg")
        elapsed = time.monotonic() - start

    assert result.error is not None
    assert result.error.error_class == "dns_error"
    assert "images.example.invalid" in result.error.detail
    assert resolver.lookups == ["images.example.invalid"]
    assert result.attempts == 1
    assert elapsed < SLACK


@asyncio_test
async def test_fetch_tls_error(tmp_path: Path) -> None:
    """https:// to a plain-HTTP port fails the TLS handshake: tls_error, not retried."""
    clock = VirtualClock()
    options = make_options(tmp_path, max_retries=2)
    async with LoopbackServer(clock) as server, Fetcher(options, clock=clock) as fetcher:
        start = time.monotonic()
        result = await fetch_beside_good(fetcher, server, f"https://127.0.0.1:{server.port}/good.jpg")
        elapsed = time.monotonic() - start

    assert result.error is not None
    assert result.error.error_class == "tls_error"
    assert result.attempts == 1
    assert result.transient is False
    assert elapsed < SLACK


@asyncio_test
async def test_fetch_cancel_releases_slot(tmp_path: Path) -> None:
    """Cancelling a fetch propagates CancelledError and frees its host slot."""
    options = make_options(tmp_path, max_connections_per_host=1, read_timeout=30.0, attempt_timeout=30.0)
    async with LoopbackServer() as server, Fetcher(options) as fetcher:

        async def stall(request: web.Request) -> web.Response:
            await server.closing.wait()
            return web.Response(body=JPEG)

        server.add("/stall.jpg", stall)
        task = asyncio.create_task(fetcher.fetch(server.url("/stall.jpg")))
        await asyncio.wait_for(server.first_request.wait(), timeout=5.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        start = time.monotonic()
        good = await fetcher.fetch(server.url("/good.jpg"))
        elapsed = time.monotonic() - start

    assert good.ok, good.error
    assert elapsed < SLACK


# Content checks.


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        pytest.param(HTML, "text/html; charset=utf-8", id="html-page"),
        pytest.param(HTML, "image/jpeg", id="html-labelled-jpeg"),
        pytest.param(b'{"error": "not found"}', "application/json", id="json"),
        pytest.param(b"", "image/jpeg", id="empty"),
    ],
)
@asyncio_test
async def test_fetch_not_an_image(tmp_path: Path, body: bytes, content_type: str) -> None:
    options = make_options(tmp_path, max_retries=2)
    async with LoopbackServer() as server, Fetcher(options) as fetcher:
        server.add("/page.jpg", respond(body, content_type))
        result = await fetch_beside_good(fetcher, server, server.url("/page.jpg"))

    assert result.error is not None
    assert result.error.error_class == "not_an_image"
    assert content_type in result.error.detail
    assert result.attempts == 1
    assert result.transient is False
    assert result.data is None


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        pytest.param(PNG, "application/octet-stream", id="octet-stream"),
        pytest.param(JPEG, "text/html", id="jpeg-labelled-html"),
        pytest.param(
            b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', "text/xml", id="svg"
        ),
        pytest.param(b"\x00\x00\x00\x18ftypavif\x00\x00\x00\x00mif1", "image/avif", id="avif"),
    ],
)
@asyncio_test
async def test_fetch_image_with_any_label(tmp_path: Path, body: bytes, content_type: str) -> None:
    """Image bytes pass whatever the Content-Type; the image stage judges SVG and AVIF."""
    async with LoopbackServer() as server, Fetcher(make_options(tmp_path)) as fetcher:
        server.add("/image", respond(body, content_type))
        result = await fetcher.fetch(server.url("/image"))

    assert result.ok, result.error
    assert result.data == body


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (JPEG, "JPEG"),
        (PNG, "PNG"),
        (make_image("GIF"), "GIF"),
        (make_image("TIFF"), "TIFF"),
        (make_image("WEBP"), "WebP"),
        (make_image("BMP"), "BMP"),
        (b"\x00\x00\x00\x0cjP  \r\n\x87\n\x00\x00\x00\x14ftypjp2 ", "JPEG 2000"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00", "HEIF/AVIF"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'></svg>", "SVG"),
        (HTML, None),
        (b"BMW of North America", None),
    ],
)
def test_sniff_image_format(body: bytes, expected: str | None) -> None:
    assert sniff_image_format(body) == expected


@pytest.mark.parametrize(
    ("body", "content_type", "expected"),
    [
        (b"", None, "an empty body"),
        (HTML, "image/jpeg", "an HTML page"),
        (b"[1, 2, 3]", None, "a JSON document"),
        (b"Service temporarily unavailable", "application/octet-stream", "plain text"),
        (b'<?xml version="1.0"?><rss></rss>', "text/xml", "an XML document"),
        (b"\x01\x02\x03\xfe\xff binary", "text/plain", "a text/plain body"),
        (b"\x01\x02\x03\xfe\xff binary", None, None),
        (PNG, "text/html", None),
    ],
)
def test_describe_non_image(body: bytes, content_type: str | None, expected: str | None) -> None:
    assert describe_non_image(body, content_type) == expected


# Redirects.


@asyncio_test
async def test_fetch_redirect_chain(tmp_path: Path) -> None:
    """Relative and absolute Locations are followed; every hop counts as a request."""
    async with LoopbackServer() as server, Fetcher(make_options(tmp_path)) as fetcher:
        server.add("/a/start.jpg", redirect("next.jpg", 301))
        server.add("/a/next.jpg", redirect("/b/last.jpg", 302))
        server.add("/b/last.jpg", redirect(server.url("/good.jpg"), 307))
        result = await fetcher.fetch(server.url("/a/start.jpg"))
        stats = fetcher.stats.host(host_key(server.url("/")))

    assert result.ok, result.error
    assert result.data == JPEG
    assert result.final_url == server.url("/good.jpg")
    assert result.url == server.url("/a/start.jpg")
    assert result.attempts == 4
    assert stats.requests == 4
    assert stats.responses == {301: 1, 302: 1, 307: 1, 200: 1}


@asyncio_test
async def test_fetch_error_names_redirect(tmp_path: Path) -> None:
    """An error after a redirect names the URL that failed and the image_src it came from."""
    async with LoopbackServer() as server, Fetcher(make_options(tmp_path)) as fetcher:
        server.add("/a b.jpg", redirect("/gone.jpg"))
        result = await fetch_beside_good(fetcher, server, server.url("/a b.jpg"))

    assert result.error is not None
    assert result.error.error_class == "http_404"
    assert result.error.detail.startswith(f"GET {server.url('/gone.jpg')} (redirected from ")
    assert f"(redirected from {server.url('/a b.jpg')})" in result.error.detail


@asyncio_test
async def test_fetch_error_quoted_url_not_redirected(tmp_path: Path) -> None:
    """A URL that yarl quotes (a space, a non-ASCII letter) is not reported as redirected."""
    async with LoopbackServer() as server, Fetcher(make_options(tmp_path)) as fetcher:
        result = await fetch_beside_good(fetcher, server, server.url("/Zürich map.jpg"))

    assert result.error is not None
    assert result.error.error_class == "http_404"
    assert result.error.detail == f"GET {server.url('/Z%C3%BCrich%20map.jpg')} returned 404 Not Found"


@asyncio_test
async def test_fetch_redirect_loop(tmp_path: Path) -> None:
    options = make_options(tmp_path, max_redirects=10, max_retries=2)
    async with LoopbackServer() as server, Fetcher(options) as fetcher:
        server.add("/a.jpg", redirect("/b.jpg"))
        server.add("/b.jpg", redirect("/a.jpg"))
        result = await fetch_beside_good(fetcher, server, server.url("/a.jpg"))

    assert result.error is not None
    assert result.error.error_class == "redirect_loop"
    assert result.attempts == 2
    assert result.transient is False


@asyncio_test
async def test_fetch_too_many_redirects(tmp_path: Path) -> None:
    options = make_options(tmp_path, max_redirects=3)
    async with LoopbackServer() as server, Fetcher(options) as fetcher:
        for number in range(10):
            server.add(f"/hop/{number}", redirect(f"/hop/{number + 1}"))
        result = await fetch_beside_good(fetcher, server, server.url("/hop/0"))

    assert result.error is not None
    assert result.error.error_class == "too_many_redirects"
    assert result.attempts == options.max_redirects + 1
    assert result.final_url == server.url("/hop/3")


@asyncio_test
async def test_fetch_redirect_to_other_scheme(tmp_path: Path) -> None:
    async with LoopbackServer() as server, Fetcher(make_options(tmp_path)) as fetcher:
        server.add("/ftp.jpg", redirect("ftp://127.0.0.1/x.jpg"))
        result = await fetch_beside_good(fetcher, server, server.url("/ftp.jpg"))

    assert result.error is not None
    assert result.error.error_class == "invalid_url"
    assert "ftp://127.0.0.1/x.jpg" in result.error.detail
    assert result.attempts == 1


# Size cap.


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@asyncio_test
async def test_fetch_oversized_body(tmp_path: Path, chunked: bool) -> None:
    options = make_options(tmp_path, max_bytes=50_000)
    oversized = JPEG + bytes(60_000)
    async with LoopbackServer() as server, Fetcher(options) as fetcher:

        async def big(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
            if chunked:
                response.enable_chunked_encoding()
            else:
                response.content_length = len(oversized)
            await response.prepare(request)
            for start in range(0, len(oversized), 8192):
                await response.write(oversized[start : start + 8192])
            await response.write_eof()
            return response

        server.add("/big.jpg", big)
        result = await fetch_beside_good(fetcher, server, server.url("/big.jpg"))

    assert result.error is not None
    assert result.error.error_class == "too_large"
    assert ("without a Content-Length" in result.error.detail) is chunked
    assert "max_bytes=50000" in result.error.detail
    assert result.attempts == 1
    assert result.transient is False


@asyncio_test
async def test_fetch_oversized_gzip_body(tmp_path: Path) -> None:
    """A gzip body under max_bytes that decodes to more fails as too_large, naming the encoding."""
    options = make_options(tmp_path, max_bytes=50_000)
    compressed = gzip.compress(JPEG + bytes(200_000))
    async with LoopbackServer() as server, Fetcher(options) as fetcher:
        server.add("/packed.jpg", respond(compressed, "image/jpeg", headers={"Content-Encoding": "gzip"}))
        result = await fetch_beside_good(fetcher, server, server.url("/packed.jpg"))

    assert len(compressed) < options.max_bytes
    assert result.error is not None
    assert result.error.error_class == "too_large"
    assert "more than max_bytes=50000 bytes after decoding its Content-Encoding gzip" in result.error.detail
    assert "Content-Length" not in result.error.detail


# URLs that are never requested.


@pytest.mark.parametrize(
    "url",
    [
        "ftp://127.0.0.1/x.jpg",
        "file:///etc/hostname",
        "data:image/png;base64,iVBORw0KGgo=",
        "127.0.0.1/x.jpg",
        "http:///x.jpg",
        "",
    ],
)
@asyncio_test
async def test_fetch_invalid_url(tmp_path: Path, url: str) -> None:
    async with LoopbackServer() as server, Fetcher(make_options(tmp_path)) as fetcher:
        result = await fetch_beside_good(fetcher, server, url)

    assert result.error is not None
    assert result.error.error_class == "invalid_url"
    assert result.attempts == 0
    assert result.transient is False
    assert server.hits("/x.jpg") == 0


# X-Robots-Tag.


@pytest.mark.parametrize(
    ("header", "disallowed", "expected"),
    [
        ("noai, noimageai", ("noai",), "robots_disallowed"),
        ("NoImageAI", ("noimageai",), "robots_disallowed"),
        ("gaia-builder: noai", ("noai",), "robots_disallowed"),
        ("otherbot: noai", ("noai",), None),
        ("noai", (), None),
    ],
)
@asyncio_test
async def test_fetch_x_robots_tag(
    tmp_path: Path, header: str, disallowed: tuple[str, ...], expected: str | None
) -> None:
    options = make_options(tmp_path, disallowed_header_directives=disallowed)
    async with LoopbackServer() as server, Fetcher(options) as fetcher:
        server.add("/tagged.jpg", respond(JPEG, "image/jpeg", headers={"X-Robots-Tag": header}))
        result = await fetcher.fetch(server.url("/tagged.jpg"))

    assert (result.error.error_class if result.error else None) == expected


def test_find_disallowed_directive_valued() -> None:
    """unavailable_after carries a date after its colon, not a user-agent prefix."""
    values = ["unavailable_after: 25 Jun 2010 15:00:00 PST, noindex"]
    assert find_disallowed_directive(values, ("noindex",), "gaia-builder") == "noindex"


def test_user_agent_token() -> None:
    assert user_agent_token("gaia-builder/0.1.0 (+https://pypi.org/project/gaia-builder/)") == "gaia-builder"


# Helpers.


def test_backoff_delay_caps_grow() -> None:
    delays = [backoff_delay(retry, initial=1.0, maximum=10.0, rng=MaxJitter()) for retry in range(1, 7)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_backoff_delay_jitter_range() -> None:
    rng = random.Random(1234)
    delays = [backoff_delay(3, initial=1.0, maximum=10.0, rng=rng) for _ in range(200)]
    assert min(delays) >= 0.0
    assert max(delays) <= 4.0
    assert len(set(delays)) > 100


@pytest.mark.parametrize(
    ("value", "date", "expected"),
    [
        ("120", None, 120.0),
        ("0", None, 0.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", "Wed, 21 Oct 2015 07:27:30 GMT", 30.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", None, 0.0),
        ("-5", None, None),
        ("soon", None, None),
        ("\u00b2", None, None),  # superscript two: str.isdigit() is True, float() raises
        ("\u0661\u0662", None, None),  # Arabic-Indic digits: not the ASCII DIGIT of RFC 9110
    ],
)
def test_parse_retry_after(value: str, date: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=time.time(), date=date) == expected


def test_fetch_stats_merge_and_pickle() -> None:
    first = FetchStats({"a:443": HostStats(requests=3, responses={200: 2, 429: 1}, succeeded=2)})
    second = FetchStats({"a:443": HostStats(requests=1, responses={404: 1}, errors={"http_404": 1})})
    second.host("b:80").requests = 5

    merged = pickle.loads(pickle.dumps(first.merge(second)))

    assert merged.hosts["a:443"].requests == 4
    assert merged.hosts["a:443"].responses == {200: 2, 429: 1, 404: 1}
    assert merged.hosts["a:443"].errors == {"http_404": 1}
    assert merged.hosts["b:80"].requests == 5
    assert first.hosts["a:443"].requests == 3
    assert FetchStats.from_dict(merged.as_dict()) == merged


def test_fetch_stats_summary() -> None:
    stats = FetchStats(
        {"a:443": HostStats(requests=7, responses={429: 2}, errors={"timeout": 1}, succeeded=5)}
    )
    lines = stats.summary().splitlines()
    assert lines[0].split()[:3] == ["host", "requests", "429s"]
    assert lines[1].split()[:6] == ["a:443", "7", "2", "0", "5", "1"]
    assert lines[1].endswith("timeout 1")


# ---------------------------------------------------------------------------------------------
# Credentials in URLs


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("GET http://user:s3cret@127.0.0.1:80/a.jpg failed", "GET http://***@127.0.0.1:80/a.jpg failed"),
        ("'https://TOKEN@example.test/x'", "'https://***@example.test/x'"),
        ("http://127.0.0.1/a@b.jpg", "http://127.0.0.1/a@b.jpg"),
        ("http://127.0.0.1/p?q=u:p@x", "http://127.0.0.1/p?q=u:p@x"),
        ("a http://u:p@h/ and b https://v:q@k/", "a http://***@h/ and b https://***@k/"),
        ("mailto:user@example.test", "mailto:user@example.test"),
        ("GET http://u:it's@h/x", "GET http://***@h/x"),
        ("'http://u:p@SECRET@h/x' is", "'http://***@h/x' is"),
        ("_http://u:p@h/", "_http://***@h/"),
    ],
    ids=[
        "password",
        "token-as-user",
        "at-in-path",
        "at-in-query",
        "two-urls",
        "no-authority",
        "quote-in-password",
        "raw-at-in-password",
        "word-before-scheme",
    ],
)
def test_redact_url(text: str, expected: str) -> None:
    assert redact_url(text) == expected


@pytest.mark.parametrize(
    "url",
    ["http://u:two words@127.0.0.1/x", "http://u:p\tq@127.0.0.1/x", "http://u:p%C3%A4@127.0.0.1/x"],
    ids=["space", "tab", "percent-encoded"],
)
def test_redact_url_of_known_url(url: str) -> None:
    """Given the URL, its user information is hidden even where whitespace stops the pattern."""
    text = f"GET {yarl.URL(url)} (redirected from {url}) failed"

    redacted = redact_url(text, url)

    assert "u:" not in redacted
    assert redacted.count("://***@127.0.0.1") == 2


@asyncio_test
async def test_credentials_sent_but_never_shown(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """User and password in image_src go out as Basic auth but appear in no message or final_url."""
    authorizations: list[str] = []

    async def protected(request: web.Request) -> web.Response:
        authorizations.append(request.headers.get("Authorization", ""))
        return web.Response(body=JPEG, content_type="image/jpeg")

    caplog.set_level(logging.DEBUG, logger="gaia_builder")
    async with LoopbackServer() as server:
        server.add("/private.jpg", protected)
        server.add("/missing.jpg", respond(HTML, "text/html", status=404))
        server.add("/busy.jpg", respond(HTML, "text/html", status=503))
        base = f"http://reader:s3cret@127.0.0.1:{server.port}"
        async with Fetcher(make_options(tmp_path, backoff_initial=0.01, backoff_max=0.01)) as fetcher:
            fetched = await fetcher.fetch(f"{base}/private.jpg")
            missing = await fetcher.fetch(f"{base}/missing.jpg")
            busy = await fetcher.fetch(f"{base}/busy.jpg")
            invalid = await fetcher.fetch("ftp://reader:s3cret@127.0.0.1/x.jpg")
            not_latin1 = await fetcher.fetch(
                f"http://reader:s3cret\u20ac@127.0.0.1:{server.port}/private.jpg"
            )

    assert fetched.ok
    assert authorizations == ["Basic cmVhZGVyOnMzY3JldA=="]  # base64 of reader:s3cret
    assert fetched.final_url == f"http://***@127.0.0.1:{server.port}/private.jpg"
    for result in (missing, busy, invalid):
        assert result.error is not None
        assert "s3cret" not in result.error.detail
        assert "***@127.0.0.1" in result.error.detail
    assert busy.attempts == 2  # so the retry warning was logged too
    assert not_latin1.error is not None
    assert not_latin1.error.error_class == "invalid_url"
    assert "Latin-1" in not_latin1.error.detail
    assert "s3cret" not in not_latin1.error.detail
    assert "s3cret" not in caplog.text
    assert "reader:***" not in caplog.text
    assert "Giving up on" in caplog.text
