"""Per-host connection and rate limits shared by every process of a run on one machine.

GAIA's images sit on a handful of hosts, and a build may run many fetchers at once: one per
split, one per ``num_proc`` worker, one per DataLoader worker. A limit kept in memory would
give each of them its own budget. :class:`HostLimits` keeps the budget in small files under a
state directory instead, so every process that uses the same directory shares one budget per
host:

- **Connection slots.** Host ``h`` has ``max_connections_per_host`` slot files. A request
  holds an exclusive, non-blocking ``flock`` on one of them from before it is sent until its
  body is read. A request that finds every slot taken polls again after a short interval. The
  kernel drops a lock when its process dies, so a crashed worker never keeps a slot.
- **Request rate.** Host ``h`` has one rate file holding the GCRA (generic cell rate
  algorithm) state: the theoretical arrival time of the next request and a ``paused_until``
  time set from a ``Retry-After`` header. A request takes its turn under a lock on that file.
  A host then receives at most ``burst`` requests in quick succession and
  ``requests_per_second`` on average.
- **Pauses.** :meth:`HostLimits.pause` moves ``paused_until`` forward, so a 429 or 503 with
  ``Retry-After`` holds back every row and every process that sends to that host.

The Fetcher's default state directory is per user, under the ``datasets`` cache, so every run
of one user on one machine shares it.

Times in the rate file are ``time.time()`` seconds, which all processes of a machine share. A
stored time further ahead than the state can legitimately be (after the wall clock was set
back, or by a run with other settings) is cut back to the furthest legitimate value.

What the budget does not cover:

- other machines, and processes that use a different state directory;
- idle keep-alive connections: a slot counts requests in flight, so a process may keep an idle
  connection open to a host while another process's request occupies the slot;
- requests that do not go through :class:`HostLimits` (the metadata download, for example).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

import datasets.config
import yarl

logger = logging.getLogger(__name__)

# Seconds between two tries for a connection slot that another request holds. Requests to an
# image host last from a tenth of a second to minutes, so 50 ms adds little delay.
SLOT_POLL_INTERVAL = 0.05

# Seconds between two tries for the lock of a rate file. Its holder keeps it for a few file
# operations, so the wait is normally a single interval.
STATE_LOCK_POLL_INTERVAL = 0.001

DEFAULT_PORTS = {"http": 80, "https": 443}

# fcntl.flock rather than the filelock package: a flock belongs to the open file, so two
# coroutines of one process exclude each other just as two processes do, and it is released by
# the kernel when its process dies. filelock adds per-thread reentrancy that would let two
# coroutines of one thread share a slot.
if sys.platform == "win32":  # pragma: no cover
    import msvcrt

    def _try_lock(fd: int) -> bool:
        # NOTE: this branch has not been run; msvcrt.locking locks one byte from the position.
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


class Clock(Protocol):
    """The time source of the limits and of the fetcher's retry waits."""

    def time(self) -> float:
        """Return the current time in seconds since the epoch, which all processes share."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait for ``seconds``."""
        ...


class SystemClock:
    """The real clock: ``time.time()`` and ``asyncio.sleep``."""

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class VirtualClock:
    """A clock for tests whose sleeps return at once and move its time forward instead.

    Its time runs at the real rate, so network deadlines still measure real seconds, plus the
    skipped waits. Concurrent sleeps overlap as real ones do: two coroutines that each sleep
    5 s from the same moment move the clock forward by 5 s, not 10 s. Unlike a real clock, a
    short sleep that overlaps a longer one may return after the longer one has ended.
    ``sleeps`` records every requested wait in seconds, in call order.
    """

    def __init__(self) -> None:
        self.sleeps: list[float] = []
        self._offset = 0.0

    def time(self) -> float:
        return time.time() + self._offset

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        wake_at = self.time() + seconds

        # Let other coroutines run first, as a real sleep would.
        await asyncio.sleep(0)

        self._offset += max(0.0, wake_at - self.time())


class LimitWaitTimeout(TimeoutError):
    """A connection slot or a request turn was not granted before the caller's deadline."""


def host_key(url: str | yarl.URL) -> str:
    """Return the key that limits are shared under: the lowercased host and the port.

    ``https://Example.com/a.jpg`` gives ``example.com:443``; an IPv6 host keeps its brackets.
    Raise ValueError for a URL without a host.
    """
    parsed = url if isinstance(url, yarl.URL) else yarl.URL(url)
    host = parsed.raw_host
    if not host:
        raise ValueError(f"URL {str(url)!r} has no host")

    host = host.lower()
    if ":" in host:
        host = f"[{host}]"
    # An explicit port is kept even when it is 0, which is falsy.
    port = parsed.explicit_port if parsed.explicit_port is not None else DEFAULT_PORTS.get(parsed.scheme, 0)
    return f"{host}:{port}"


def default_state_dir() -> Path:
    """Return the per-user folder of shared host state, under the ``datasets`` cache."""
    return Path(datasets.config.HF_DATASETS_CACHE) / "gaia" / "hosts"


def _host_dir_name(key: str) -> str:
    # Readable and safe on every filesystem; the hash keeps keys that differ only in replaced
    # characters (IPv6 brackets and colons) apart.
    readable = re.sub(r"[^a-z0-9.-]+", "_", key)
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return f"{readable}-{digest}"


class _LocalSlots:
    """A FIFO counting semaphore whose waits take a timeout, for the coroutines of one process.

    Written out because asyncio.Semaphore takes no timeout, and asyncio.wait_for around its
    acquire() can swallow a cancellation on Python 3.10 and 3.11.
    """

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def acquire(self, timeout: float | None) -> bool:
        """Take a slot, waiting at most ``timeout`` seconds; return False if none came in time."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return True

        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            # asyncio.wait never cancels the waiter, so a slot handed over is never lost.
            await asyncio.wait({waiter}, timeout=timeout)
        except asyncio.CancelledError:
            self._abandon(waiter)
            raise

        if waiter.done():
            return True
        self._abandon(waiter)
        return False

    def release(self) -> None:
        """Hand the slot to the longest waiter, or free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1

    def _abandon(self, waiter: asyncio.Future[None]) -> None:
        if waiter.done():
            # The slot was handed over just as the wait ended; pass it on.
            self.release()
        else:
            waiter.cancel()
            self._waiters.remove(waiter)


class HostLimits:
    """Connection slots, a request rate and Retry-After pauses per host, shared through files.

    Every process that passes the same ``state_dir`` shares one budget per host. Waits are
    cancellable, and a cancelled wait leaves no slot taken and takes no turn. An instance
    belongs to the event loop that first waits on it.

    Args:
        state_dir: the folder of shared state, created if missing.
        max_connections_per_host: requests in flight to one host, over all processes.
        requests_per_second: mean request rate to one host, over all processes.
        burst: requests that a host may receive at once after a quiet spell.
        max_pause: the maximum pause in seconds that :meth:`pause` accepts. A stored pause
            further ahead was written by a clock that has since been set back, and is cut.
        clock: the time source; :class:`SystemClock` by default.
        poll_interval: seconds between two tries for a busy connection slot.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        max_connections_per_host: int,
        requests_per_second: float,
        burst: int,
        max_pause: float,
        clock: Clock | None = None,
        poll_interval: float = SLOT_POLL_INTERVAL,
    ) -> None:
        if max_connections_per_host < 1 or burst < 1:
            raise ValueError(
                f"max_connections_per_host ({max_connections_per_host}) and burst ({burst}) "
                f"must be at least 1"
            )
        if not (requests_per_second > 0 and math.isfinite(requests_per_second)):
            raise ValueError(
                f"requests_per_second must be a finite number above 0, not {requests_per_second!r}"
            )

        self.state_dir = Path(state_dir)
        self.max_connections_per_host = max_connections_per_host
        self.requests_per_second = requests_per_second
        self.burst = burst
        self.max_pause = max_pause
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.poll_interval = poll_interval

        # GCRA: one request per emission interval, and up to ``burst`` at once.
        self._interval = 1.0 / requests_per_second
        self._tolerance = (burst - 1) * self._interval
        self._host_dirs: dict[str, Path] = {}
        self._local_slots: dict[str, _LocalSlots] = {}

    def host_dir(self, key: str) -> Path:
        """Return the folder of one host's slot and rate files, creating it on first use."""
        path = self._host_dirs.get(key)
        if path is None:
            path = self.state_dir / _host_dir_name(key)
            path.mkdir(parents=True, exist_ok=True)
            self._host_dirs[key] = path
        return path

    @contextlib.asynccontextmanager
    async def slot(self, key: str, *, deadline: float | None = None) -> AsyncIterator[None]:
        """Hold one of the host's connection slots for the duration of the ``async with`` block.

        Raise LimitWaitTimeout when no slot is free by ``deadline`` (a :meth:`Clock.time` value).
        """
        # Coroutines of this process first queue in memory, so that at most
        # max_connections_per_host of them per host poll the slot files.
        local = self._local_slots.get(key)
        if local is None:
            local = self._local_slots[key] = _LocalSlots(self.max_connections_per_host)
        timeout = None if deadline is None else max(0.0, deadline - self.clock.time())
        if not await local.acquire(timeout):
            raise LimitWaitTimeout(
                f"all {self.max_connections_per_host} connection slots of {key} stayed busy until "
                f"the deadline; other rows of this process are sending to the same host"
            )

        try:
            fd = await self._acquire_slot(key, deadline)
            try:
                yield
            finally:
                _unlock(fd)
                os.close(fd)
        finally:
            local.release()

    async def _acquire_slot(self, key: str, deadline: float | None) -> int:
        # No await may come between taking a lock and returning its descriptor: a cancellation
        # there would leak the slot until the process exits.
        while True:
            fd = self._try_slots(key)
            if fd is not None:
                return fd

            if deadline is not None and self.clock.time() + self.poll_interval > deadline:
                raise LimitWaitTimeout(
                    f"all {self.max_connections_per_host} connection slots of {key} stayed busy until "
                    f"the deadline; other rows or processes are sending to the same host"
                )
            # Slots are freed by real requests ending, so this waits in real time whatever the clock.
            await asyncio.sleep(self.poll_interval)

    def _try_slots(self, key: str) -> int | None:
        # These calls open and lock small local files without blocking and take microseconds,
        # so they run on the event loop rather than in a thread.
        folder = self.host_dir(key)
        for index in range(self.max_connections_per_host):
            fd = os.open(folder / f"slot-{index}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            if _try_lock(fd):
                return fd
            os.close(fd)
        return None

    async def wait_for_turn(self, key: str, *, deadline: float | None = None) -> float:
        """Wait until the host's rate and any pause allow one more request, and take that turn.

        Return the seconds waited. Raise LimitWaitTimeout, without waiting, when the turn would
        come after ``deadline`` (a :meth:`Clock.time` value).
        """
        waited = 0.0
        while True:
            wait = await self._take_turn(key)
            if wait <= 0:
                return waited

            if deadline is not None and self.clock.time() + wait > deadline:
                raise LimitWaitTimeout(
                    f"the next request to {key} may only be sent in {wait:.1f} s, after the deadline "
                    f"(rate limit or Retry-After pause)"
                )
            await self.clock.sleep(wait)
            waited += wait

    async def _take_turn(self, key: str) -> float:
        # Return 0 after taking a turn, or the seconds to wait before asking again.
        async with self._state(key) as state:
            now = self.clock.time()
            if state["paused_until"] > now:
                return state["paused_until"] - now

            arrival = max(state["tat"], now)
            allowed_at = arrival - self._tolerance
            if allowed_at > now:
                return allowed_at - now

            state["tat"] = arrival + self._interval
            return 0.0

    async def pause(self, key: str, seconds: float) -> float:
        """Hold back every request to the host for ``seconds`` (capped at ``max_pause``).

        A pause never shortens a longer one already set. Return the time the pause ends.
        """
        seconds = min(max(seconds, 0.0), self.max_pause)
        async with self._state(key) as state:
            state["paused_until"] = max(state["paused_until"], self.clock.time() + seconds)
            return state["paused_until"]

    async def paused_until(self, key: str) -> float:
        """Return the time until which the host is paused (in the past when it is not)."""
        async with self._state(key) as state:
            return state["paused_until"]

    @contextlib.asynccontextmanager
    async def _state(self, key: str) -> AsyncIterator[dict[str, float]]:
        """Lock the host's rate file and yield its state; write the state back on exit if changed."""
        path = self.host_dir(key) / "rate.json"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # Another process holds the lock; no event can announce its release.
            while not _try_lock(fd):  # noqa: ASYNC110
                await asyncio.sleep(STATE_LOCK_POLL_INTERVAL)
            try:
                stored = _read_state(fd, path)
                state = self._cut_future_times(stored)
                yield state
                if state != stored:
                    _write_state(fd, state)
            finally:
                _unlock(fd)
        finally:
            os.close(fd)

    def _cut_future_times(self, stored: dict[str, float]) -> dict[str, float]:
        # Neither time can legitimately lie further ahead than this. A value beyond it was
        # written before the clock was set back. It is cut in the file too, because otherwise
        # every later read would find it too far ahead again.
        now = self.clock.time()
        return {
            "tat": min(stored["tat"], now + self._tolerance + self._interval),
            "paused_until": min(stored["paused_until"], now + self.max_pause),
        }


def _read_state(fd: int, path: Path) -> dict[str, float]:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096)
    state = {"tat": 0.0, "paused_until": 0.0}
    if not text:
        return state

    try:
        stored = json.loads(text)
        state["tat"] = float(stored["tat"])
        state["paused_until"] = float(stored["paused_until"])
        if not all(math.isfinite(value) for value in state.values()):
            raise ValueError("a time is not finite")
    except (ValueError, KeyError, TypeError):
        # A process killed while writing leaves a partial file. Starting afresh loses only the
        # last few turns.
        logger.debug("Ignoring unreadable rate state in %s: %r", path, text[:200])
        return {"tat": 0.0, "paused_until": 0.0}
    return state


def _write_state(fd: int, state: dict[str, float]) -> None:
    data = json.dumps(state).encode()
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, data)
    os.ftruncate(fd, len(data))
