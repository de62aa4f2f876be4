"""Tests of the shared host limits: slots, the rate gate, pauses, and budgets across processes."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import io
import json
import multiprocessing
import os
import queue
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from PIL import Image

from gaia_builder.config import FetchOptions
from gaia_builder.fetch import Fetcher, FetchStats
from gaia_builder.limits import HostLimits, LimitWaitTimeout, VirtualClock, host_key

# Seconds allowed beyond a computed bound for scheduling on a busy 2-core CI machine.
SLACK = 0.5

# Seconds a child process may take to start (importing datasets and aiohttp) and to finish.
PROCESS_TIMEOUT = 60.0

KEY = "images.example.org:443"


def asyncio_test(function: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test function in a fresh event loop."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(function(*args, **kwargs))

    return wrapper


def make_limits(tmp_path: Path, clock: VirtualClock | None = None, **overrides: Any) -> HostLimits:
    values: dict[str, Any] = {
        "max_connections_per_host": 2,
        "requests_per_second": 10.0,
        "burst": 3,
        "max_pause": 60.0,
        "clock": clock,
        "poll_interval": 0.01,
    }
    values.update(overrides)
    return HostLimits(tmp_path / "hosts", **values)


# Host keys.


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://Images.Example.ORG/a.jpg?itok=x", "images.example.org:443"),
        ("http://images.example.org/a.jpg", "images.example.org:80"),
        ("http://images.example.org:8080/a.jpg", "images.example.org:8080"),
        ("http://[::1]:8081/a.jpg", "[::1]:8081"),
        ("http://127.0.0.1:0/a.jpg", "127.0.0.1:0"),
        ("https://images.example.org:80/a.jpg", "images.example.org:80"),
    ],
)
def test_host_key(url: str, expected: str) -> None:
    assert host_key(url) == expected


def test_host_key_without_host() -> None:
    with pytest.raises(ValueError, match="no host"):
        host_key("file:///etc/hostname")


def test_host_dirs_are_distinct(tmp_path: Path) -> None:
    """Keys that differ only in characters that are unsafe in file names get their own folders."""
    limits = make_limits(tmp_path)
    assert limits.host_dir("[::1]:80") != limits.host_dir("[::1:]80")


# Connection slots.


@asyncio_test
async def test_slot_limit_and_release(tmp_path: Path) -> None:
    """A third request waits while two hold the slots, and goes once one is released."""
    limits = make_limits(tmp_path)
    released = asyncio.Event()
    entered_after_release: list[bool] = []

    async def third() -> None:
        async with limits.slot(KEY):
            entered_after_release.append(released.is_set())

    async with limits.slot(KEY):
        second = contextlib.AsyncExitStack()
        await second.enter_async_context(limits.slot(KEY))
        with pytest.raises(LimitWaitTimeout):
            async with limits.slot(KEY, deadline=limits.clock.time() + 0.1):
                pass

        task = asyncio.create_task(third())
        await asyncio.sleep(0)  # let the task start polling
        released.set()
        await second.aclose()
        await asyncio.wait_for(task, timeout=SLACK)

    assert entered_after_release == [True]


@asyncio_test
async def test_slot_waiters_served_in_order(tmp_path: Path) -> None:
    """Coroutines of one process that wait for a slot of the same host get it first come, first served."""
    limits = make_limits(tmp_path, max_connections_per_host=1)
    order: list[int] = []

    async def waiter(number: int) -> None:
        async with limits.slot(KEY):
            order.append(number)

    async with limits.slot(KEY):
        tasks = []
        for number in range(4):
            tasks.append(asyncio.create_task(waiter(number)))
            await asyncio.sleep(0)  # let the task queue up before the next one
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=SLACK)

    assert order == [0, 1, 2, 3]


@asyncio_test
async def test_slot_deadline(tmp_path: Path) -> None:
    limits = make_limits(tmp_path, max_connections_per_host=1)
    async with limits.slot(KEY):
        start = time.monotonic()
        with pytest.raises(LimitWaitTimeout, match="connection slots"):
            async with limits.slot(KEY, deadline=limits.clock.time() + 0.2):
                pass
        elapsed = time.monotonic() - start

    assert elapsed < 0.2 + SLACK


@asyncio_test
async def test_slot_held_by_other_process(tmp_path: Path) -> None:
    """A slot file locked through another open file, as another process would, is busy."""
    limits = make_limits(tmp_path, max_connections_per_host=1)
    fd = os.open(limits.host_dir(KEY) / "slot-0.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(LimitWaitTimeout):
            async with limits.slot(KEY, deadline=limits.clock.time() + 0.1):
                pass
    finally:
        os.close(fd)

    async with limits.slot(KEY, deadline=limits.clock.time() + 0.1):
        pass


@asyncio_test
async def test_slot_wait_cancelled(tmp_path: Path) -> None:
    """A cancelled wait leaves no slot taken."""
    limits = make_limits(tmp_path, max_connections_per_host=1)
    async with limits.slot(KEY):

        async def waiter() -> None:
            async with limits.slot(KEY):
                pass

        task = asyncio.create_task(waiter())
        await asyncio.sleep(0)  # let the task start polling
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    async with limits.slot(KEY, deadline=limits.clock.time() + 0.1):
        pass


# The rate gate.


@asyncio_test
async def test_rate_burst_then_interval(tmp_path: Path) -> None:
    """The first ``burst`` turns are free; each later one waits one interval (1 / rate)."""
    clock = VirtualClock()
    limits = make_limits(tmp_path, clock, requests_per_second=10.0, burst=3)
    waits = [await limits.wait_for_turn(KEY) for _ in range(6)]

    assert waits[:3] == [0.0, 0.0, 0.0]
    assert waits[3:] == [pytest.approx(0.1, abs=0.01)] * 3


@asyncio_test
async def test_rate_shared_between_instances(tmp_path: Path) -> None:
    """Two HostLimits on one state folder, as in two processes, share one budget."""
    clock = VirtualClock()
    first = make_limits(tmp_path, clock, requests_per_second=10.0, burst=2)
    second = make_limits(tmp_path, clock, requests_per_second=10.0, burst=2)

    waits = [await first.wait_for_turn(KEY), await second.wait_for_turn(KEY), await first.wait_for_turn(KEY)]

    assert waits[:2] == [0.0, 0.0]
    assert waits[2] == pytest.approx(0.1, abs=0.01)


@asyncio_test
async def test_rate_deadline(tmp_path: Path) -> None:
    """A turn that would come after the deadline fails at once, without waiting."""
    clock = VirtualClock()
    limits = make_limits(tmp_path, clock, requests_per_second=1.0, burst=1)
    await limits.wait_for_turn(KEY)

    with pytest.raises(LimitWaitTimeout, match="next request"):
        await limits.wait_for_turn(KEY, deadline=clock.time() + 0.5)
    assert clock.sleeps == []


@asyncio_test
async def test_pause_holds_turns(tmp_path: Path) -> None:
    clock = VirtualClock()
    limits = make_limits(tmp_path, clock)
    await limits.pause(KEY, 5.0)

    waited = await limits.wait_for_turn(KEY)

    assert waited == pytest.approx(5.0, abs=0.01)


@asyncio_test
async def test_pause_never_shortens(tmp_path: Path) -> None:
    clock = VirtualClock()
    limits = make_limits(tmp_path, clock)
    long_end = await limits.pause(KEY, 30.0)
    short_end = await limits.pause(KEY, 1.0)

    assert short_end == long_end
    assert await limits.paused_until(KEY) == long_end


@asyncio_test
async def test_pause_capped(tmp_path: Path) -> None:
    clock = VirtualClock()
    limits = make_limits(tmp_path, clock, max_pause=60.0)
    before = clock.time()
    end = await limits.pause(KEY, 3600.0)

    assert end - before == pytest.approx(60.0, abs=0.5)


@asyncio_test
async def test_stale_future_state_cut(tmp_path: Path) -> None:
    """Times far in the future, left by a clock since set back, are cut to legitimate values."""
    clock = VirtualClock()
    limits = make_limits(tmp_path, clock, requests_per_second=10.0, burst=3, max_pause=60.0)
    far = clock.time() + 1e6
    (limits.host_dir(KEY) / "rate.json").write_text(json.dumps({"tat": far, "paused_until": far}))

    waited = await limits.wait_for_turn(KEY)

    assert waited <= 60.0 + 0.1 + 0.01


@asyncio_test
async def test_unreadable_state_reset(tmp_path: Path) -> None:
    """A rate file cut short by a killed process is read as a fresh state."""
    clock = VirtualClock()
    limits = make_limits(tmp_path, clock)
    (limits.host_dir(KEY) / "rate.json").write_text('{"tat": 17')

    assert await limits.wait_for_turn(KEY) == 0.0
    assert await limits.paused_until(KEY) == 0.0


# The server side: no host receives more than its budget, from one process or from two.

WATCH_CONNECTIONS = 2
WATCH_RATE = 20.0
WATCH_BURST = 2
WATCH_REQUESTS = 30
# The first WATCH_SLOW requests are held for WATCH_HOLD seconds, so that the slot cap binds.
# The others get their response at once, so that the rate binds.
WATCH_SLOW = 8
WATCH_HOLD = 0.3
# Seconds by which network and scheduling delays may bring two arrivals closer than their turns.
ARRIVAL_JITTER = 0.05


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 60, 20)).save(buffer, "JPEG")
    return buffer.getvalue()


class WatchingServer:
    """A loopback server that records when each request arrives and how many run at once."""

    def __init__(self) -> None:
        self.arrivals: list[float] = []
        self.active = 0
        self.peak = 0
        self.port = 0
        self.body = _jpeg()
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.arrivals.append(time.monotonic())
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if int(request.match_info["number"]) < WATCH_SLOW:
                await asyncio.sleep(WATCH_HOLD)  # a slow response, holding its connection
            return web.Response(body=self.body, content_type="image/jpeg")
        finally:
            self.active -= 1

    def urls(self, numbers: range) -> list[str]:
        return [f"http://127.0.0.1:{self.port}/{number}.jpg" for number in numbers]

    async def __aenter__(self) -> WatchingServer:
        app = web.Application()
        app.router.add_get("/{number:[0-9]+}.jpg", self.handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.2, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


def watch_options(state_dir: Path) -> FetchOptions:
    return FetchOptions(
        max_in_flight=16,
        max_connections_per_host=WATCH_CONNECTIONS,
        max_requests_per_second_per_host=WATCH_RATE,
        rate_burst=WATCH_BURST,
        max_retries=0,
        connect_timeout=5.0,
        read_timeout=5.0,
        attempt_timeout=10.0,
        state_dir=str(state_dir),
    )


def max_in_window(times: list[float], window: float) -> int:
    """Return the largest number of times that fall in any half-open interval of ``window`` seconds."""
    ordered = sorted(times)
    best = 0
    first = 0
    for last, when in enumerate(ordered):
        while when - ordered[first] >= window:
            first += 1
        best = max(best, last - first + 1)
    return best


def check_budget(server: WatchingServer) -> None:
    """Assert the connection cap, the rate in every 1 s window and between any two arrivals."""
    arrivals = sorted(server.arrivals)
    assert len(arrivals) == WATCH_REQUESTS
    assert server.peak <= WATCH_CONNECTIONS
    # GCRA lets at most rate x window requests plus the burst into any window.
    assert max_in_window(arrivals, 1.0) <= WATCH_RATE + WATCH_BURST

    # The same bound between any two arrivals: after the burst, one request per 1 / rate seconds.
    for first in range(len(arrivals)):
        for last in range(first + 1, len(arrivals)):
            span = arrivals[last] - arrivals[first]
            count = last - first + 1
            assert count <= WATCH_BURST + (span + ARRIVAL_JITTER) * WATCH_RATE, (first, last, span)


@asyncio_test
async def test_budget_one_process(tmp_path: Path) -> None:
    async with WatchingServer() as server, Fetcher(watch_options(tmp_path / "hosts")) as fetcher:
        results = await asyncio.gather(*(fetcher.fetch(url) for url in server.urls(range(WATCH_REQUESTS))))

    assert all(result.ok for result in results)
    check_budget(server)


def fetch_in_child(options: FetchOptions, urls: list[str], start: Any, messages: Any) -> None:
    """Run one Fetcher in a child process once ``start`` is set; report ok flags and stats."""

    async def fetch_all() -> tuple[list[bool], FetchStats]:
        async with Fetcher(options) as fetcher:
            results = await asyncio.gather(*(fetcher.fetch(url) for url in urls))
            return [result.ok for result in results], fetcher.stats

    messages.put("ready")
    if not start.wait(PROCESS_TIMEOUT):
        return
    messages.put(asyncio.run(fetch_all()))


@asyncio_test
async def test_budget_two_processes(tmp_path: Path) -> None:
    """Two processes with their own Fetcher and one state folder share one budget per host."""
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    messages = context.Queue()
    loop = asyncio.get_running_loop()

    async def receive() -> Any:
        # The queue blocks, so it is read in a thread while the loop serves requests.
        try:
            return await loop.run_in_executor(None, functools.partial(messages.get, timeout=PROCESS_TIMEOUT))
        except queue.Empty:
            pytest.fail(f"a child process sent nothing within {PROCESS_TIMEOUT} s")

    async with WatchingServer() as server:
        options = watch_options(tmp_path / "hosts")
        halves = [server.urls(range(0, WATCH_REQUESTS, 2)), server.urls(range(1, WATCH_REQUESTS, 2))]
        children = [
            context.Process(target=fetch_in_child, args=(options, urls, start, messages)) for urls in halves
        ]
        for child in children:
            child.start()
        try:
            assert [await receive() for _ in children] == ["ready", "ready"]
            start.set()
            reports = [await receive() for _ in children]
        finally:
            for child in children:
                await loop.run_in_executor(None, child.join, PROCESS_TIMEOUT)
                if child.is_alive():
                    child.kill()

    ok_flags = [flag for flags, _ in reports for flag in flags]
    stats = reports[0][1].merge(reports[1][1])
    assert all(ok_flags)
    assert len(ok_flags) == WATCH_REQUESTS
    assert stats.hosts[host_key(server.urls(range(1))[0])].requests == WATCH_REQUESTS
    assert [child.exitcode for child in children] == [0, 0]
    check_budget(server)
