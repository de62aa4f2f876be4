"""The polite image fetcher: shared host limits, retries with backoff, deadlines, content checks.

:class:`Fetcher` downloads one ``image_src`` per :meth:`Fetcher.fetch` call and never raises for
a failure of that URL: it returns a :class:`FetchResult` whose ``error`` carries a row error
class from :data:`gaia_builder.errors.ERROR_CLASSES` (or ``http_<status>``).

Every request, redirect hops included, passes three gates before it is sent:

1. a connection slot of its host, shared with every process of the run (:mod:`.limits`);
2. one of ``max_in_flight`` places of this fetcher;
3. a turn under the host's request rate, which also waits out any ``Retry-After`` pause.

Then aiohttp enforces ``connect_timeout`` (connecting, name lookup and TLS included),
``read_timeout`` (the longest silence while reading) and ``attempt_timeout`` (a whole attempt,
from its first request to the last byte of the final response, redirects included). Failed
attempts are retried after capped exponential backoff with full jitter, and
``FetchOptions.row_deadline`` bounds the time from the first request to the result.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import email.utils
import hashlib
import logging
import random
import socket
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import timezone
from http import HTTPStatus
from types import TracebackType
from typing import Any

import aiohttp
import aiohttp.abc
import yarl
from aiohttp import hdrs

from .config import FetchOptions
from .errors import RowError, redact_credentials, redact_url
from .limits import Clock, HostLimits, LimitWaitTimeout, SystemClock, default_state_dir, host_key

logger = logging.getLogger(__name__)

# Statuses retried within a run, because the server may respond differently later (RFC 9110
# section 15, RFC 8470 for 425). Every other 4xx is final.
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

# Content-Encodings that aiohttp 3.14 decodes while reading; br and zstd need optional packages.
DECODED_CONTENT_ENCODINGS = frozenset({"gzip", "deflate", "br", "zstd"})

# Error and redirect bodies up to this many bytes are read and discarded, so that the connection
# can be reused. A larger body is discarded together with its connection.
MAX_DRAINED_BODY = 64 * 1024

# Stats key of rows whose image_src has no usable host.
INVALID_URL_KEY = "(invalid url)"

# X-Robots-Tag directives that carry a value after a colon, which is not a user-agent prefix.
_VALUED_ROBOTS_DIRECTIVES = frozenset(
    {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}
)


@dataclass(frozen=True)
class FetchResult:
    """The outcome of fetching one URL."""

    url: str  # the requested URL
    data: bytes | None  # the body, None on failure
    final_url: str | None  # the URL of the last response after redirects; None without response
    content_type: str | None  # Content-Type of the last response
    error: RowError | None  # None on success
    attempts: int  # requests sent for this URL, redirect hops included; 0 for invalid_url
    transient: bool  # True when a later run should try again (timeouts, 5xx, 429, connection errors)
    # SHA-256 of data as 64 hexadecimal digits, or None until computed. The fetcher leaves it
    # None, so that no body is hashed on the event loop. Equality ignores it, because data determines it.
    sha256: str | None = field(default=None, compare=False)

    @property
    def ok(self) -> bool:
        """True when the body was fetched and passed the content checks."""
        return self.error is None and self.data is not None

    def with_sha256(self) -> FetchResult:
        """Return this result with ``sha256`` set, or unchanged when it is set or there is no body."""
        if self.data is None or self.sha256 is not None:
            return self
        return dataclasses.replace(self, sha256=hashlib.sha256(self.data).hexdigest())


@dataclass
class HostStats:
    """Counts for one host (lowercased host and port) over a run."""

    requests: int = 0  # requests sent, redirect hops and retries included
    responses: dict[int, int] = field(default_factory=dict)  # HTTP status -> responses
    retries: int = 0  # retries scheduled for rows of this host
    retry_reasons: dict[str, int] = field(default_factory=dict)  # error class -> retries
    retry_wait_seconds: float = 0.0  # sum of the scheduled waits between attempts
    succeeded: int = 0  # rows whose image was fetched
    errors: dict[str, int] = field(default_factory=dict)  # error class -> rows that failed

    def merge(self, other: HostStats) -> HostStats:
        """Return the sum of this host's counts and ``other``'s."""
        return HostStats(
            requests=self.requests + other.requests,
            responses=_add_counts(self.responses, other.responses),
            retries=self.retries + other.retries,
            retry_reasons=_add_counts(self.retry_reasons, other.retry_reasons),
            retry_wait_seconds=self.retry_wait_seconds + other.retry_wait_seconds,
            succeeded=self.succeeded + other.succeeded,
            errors=_add_counts(self.errors, other.errors),
        )


def _add_counts(left: dict[Any, int], right: dict[Any, int]) -> dict[Any, int]:
    total = dict(left)
    for key, count in right.items():
        total[key] = total.get(key, 0) + count
    return total


@dataclass
class FetchStats:
    """Per-host counts of requests, responses, retries and row outcomes.

    Made of plain dicts and numbers, so it pickles across processes; :meth:`merge` adds the
    stats of two fetchers, and :meth:`as_dict` gives a JSON-ready copy.
    """

    hosts: dict[str, HostStats] = field(default_factory=dict)

    def host(self, key: str) -> HostStats:
        """Return the counts of one host, adding an empty entry on first use."""
        stats = self.hosts.get(key)
        if stats is None:
            stats = self.hosts[key] = HostStats()
        return stats

    def merge(self, other: FetchStats) -> FetchStats:
        """Return new stats holding the sum of these and ``other``; neither is changed."""
        merged = copy.deepcopy(self)
        for key, stats in other.hosts.items():
            merged.hosts[key] = (
                merged.hosts[key].merge(stats) if key in merged.hosts else copy.deepcopy(stats)
            )
        return merged

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """Return the stats as JSON-ready dicts (status codes become strings)."""
        result = {}
        for key, stats in sorted(self.hosts.items()):
            values = dataclasses.asdict(stats)
            values["responses"] = {str(status): count for status, count in sorted(stats.responses.items())}
            result[key] = values
        return result

    @classmethod
    def from_dict(cls, data: dict[str, dict[str, Any]]) -> FetchStats:
        """Rebuild stats written by :meth:`as_dict`."""
        hosts = {}
        for key, values in data.items():
            values = dict(values)
            values["responses"] = {
                int(status): count for status, count in values.get("responses", {}).items()
            }
            hosts[key] = HostStats(**values)
        return cls(hosts)

    def summary(self) -> str:
        """Render a text table: one line per host, busiest first, with its most common errors."""
        header = f"{'host':<40} {'requests':>8} {'429s':>5} {'retries':>7} {'ok':>7} {'failed':>7}  errors"
        lines = [header]
        ranked = sorted(self.hosts.items(), key=lambda item: (-item[1].requests, item[0]))
        for key, stats in ranked:
            failed = sum(stats.errors.values())
            top = sorted(stats.errors.items(), key=lambda item: (-item[1], item[0]))[:3]
            errors = ", ".join(f"{name} {count}" for name, count in top)
            lines.append(
                f"{key:<40} {stats.requests:>8} {stats.responses.get(429, 0):>5} {stats.retries:>7} "
                f"{stats.succeeded:>7} {failed:>7}  {errors}"
            )
        return "\n".join(lines)


def backoff_delay(retry: int, *, initial: float, maximum: float, rng: random.Random) -> float:
    """Return the wait in seconds before retry number ``retry`` (1 for the first).

    Capped exponential backoff with full jitter: a uniform draw from 0 to
    ``min(maximum, initial * 2 ** (retry - 1))``. Full jitter spreads out the retries of rows
    that failed together, which a fixed backoff would send together again.
    """
    cap = min(maximum, initial * 2.0 ** (retry - 1))
    return rng.uniform(0.0, cap)


def parse_retry_after(value: str, *, now: float, date: str | None = None) -> float | None:
    """Return the pause in seconds that a ``Retry-After`` header value requests, or None if invalid.

    The value is either delay-seconds or an HTTP-date (RFC 9110 section 10.2.3). A date is
    measured from the response's ``Date`` header when one is given and valid, which cancels
    any offset between the server's clock and ``now``. A date in the past means no pause.
    """
    value = value.strip()
    # delay-seconds is 1*DIGIT, ASCII digits only. str.isdigit() alone also accepts "²", which
    # float() rejects.
    if value.isascii() and value.isdigit():
        return float(value)

    until = _parse_http_date(value)
    if until is None:
        return None
    reference = _parse_http_date(date) if date else None
    return max(0.0, until - (reference if reference is not None else now))


def _parse_http_date(value: str) -> float | None:
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed is None:  # Python 3.10 returns None for some invalid dates
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def find_disallowed_directive(
    values: Iterable[str], disallowed: Collection[str], user_agent_token: str
) -> str | None:
    """Return the first X-Robots-Tag directive in ``disallowed`` that applies to us, or None.

    Each header value is a comma-separated list of directives, optionally prefixed by a
    user-agent token and a colon (``googlebot: noindex``). A prefixed list applies only when
    the token is ours. Names are compared case-insensitively.
    """
    disallowed_set = {directive.strip().lower() for directive in disallowed}
    if not disallowed_set:
        return None

    for value in values:
        token, colon, rest = value.partition(":")
        token = token.strip().lower()
        if colon and token not in _VALUED_ROBOTS_DIRECTIVES and "," not in token:
            if token != user_agent_token:
                continue
            value = rest
        for directive in value.split(","):
            name = directive.split(":", 1)[0].strip().lower()
            if name in disallowed_set:
                return name
    return None


def user_agent_token(user_agent: str) -> str:
    """Return the product token of a User-Agent header, lowercased: ``gaia-builder`` for ours."""
    product = user_agent.strip().split(None, 1)[0] if user_agent.strip() else ""
    return product.split("/", 1)[0].lower()


# Content sniffing.
#
# A short signature table rather than the filetype or puremagic package: the fetcher only
# needs "an image format or not", and neither package recognises SVG, HTML or JSON bodies.
# Decoding is the image stage's job; this check only stops bodies that are clearly not images.

_IMAGE_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "BigTIFF"),
    (b"MM\x00+", "BigTIFF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000 codestream"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (b"\xff\x0a", "JPEG XL codestream"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"8BPS", "PSD"),
)

# ISO base media brands of HEIF and AVIF images (ISO/IEC 23008-12, AV1 image file format).
_HEIF_BRANDS = frozenset(
    {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis"}
)

# Sizes of the BMP info headers that follow the 14-byte file header (BITMAPCOREHEADER to V5).
_BMP_INFO_SIZES = frozenset({12, 40, 52, 56, 64, 108, 124})

_TEXT_SAMPLE = 4096


def sniff_image_format(body: bytes) -> str | None:
    """Return the image format that the body's first bytes announce, or None.

    Covers JPEG, PNG, GIF, TIFF, WebP, BMP, JPEG 2000, JPEG XL, ICO, PSD, HEIF/AVIF and SVG.
    A match means only that the body claims a format, not that it decodes.
    """
    for signature, name in _IMAGE_SIGNATURES:
        if body.startswith(signature):
            return name
    if body[:4] == b"RIFF" and body[8:12] == b"WEBP":
        return "WebP"
    if body[:2] == b"BM" and len(body) >= 18 and int.from_bytes(body[14:18], "little") in _BMP_INFO_SIZES:
        return "BMP"
    if body[4:8] == b"ftyp" and body[8:12] in _HEIF_BRANDS:
        return "HEIF/AVIF"
    if _looks_like_svg(body):
        return "SVG"
    return None


def _text_head(body: bytes) -> bytes:
    return body[:_TEXT_SAMPLE].lstrip(b"\xef\xbb\xbf \t\r\n").lower()


def _looks_like_svg(body: bytes) -> bool:
    head = _text_head(body)
    starts_as_xml = head.startswith((b"<?xml", b"<svg", b"<!doctype svg", b"<!--"))
    return starts_as_xml and b"<svg" in head


def describe_non_image(body: bytes, content_type: str | None) -> str | None:
    """Return what a body is when it is clearly not an image ("an HTML page"...), else None.

    Image signatures win over the Content-Type, because servers often label images
    ``application/octet-stream`` or not at all. Unknown binary bodies pass, and the image
    stage reports them as ``unsupported_format``, unless the Content-Type names a text type.
    """
    if not body:
        return "an empty body"
    if sniff_image_format(body) is not None:
        return None

    kind = _describe_text(body)
    if kind is not None:
        return kind

    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type.startswith("text/") or media_type.endswith(("/json", "+json", "/html", "/xhtml+xml")):
        return f"a {media_type} body"
    return None


def _describe_text(body: bytes) -> str | None:
    head = _text_head(body)
    if head.startswith((b"<!doctype html", b"<html")) or any(
        tag in head for tag in (b"<html", b"<head>", b"<body", b"<title>")
    ):
        return "an HTML page"
    if head.startswith(b"<?xml"):
        return "an XML document"
    if not _is_text(body[:_TEXT_SAMPLE]):
        return None
    if head.startswith((b"{", b"[")):
        return "a JSON document"
    return "plain text"


def _is_text(sample: bytes) -> bool:
    if b"\x00" in sample:
        return False
    # The sample may end inside a multibyte character.
    text = sample.decode("utf-8", errors="ignore")
    if len(text) < len(sample) // 4:
        return False
    printable = sum(1 for char in text if char.isprintable() or char in "\t\r\n\f")
    return printable >= 0.95 * len(text)


@dataclass
class _Outcome:
    """The result of one attempt, before it becomes a FetchResult or a retry."""

    host: str  # host key of the request that produced this outcome
    error: RowError | None = None
    data: bytes | None = None
    retryable: bool = False  # retried within this run
    transient: bool = False  # worth trying again in a later run
    retry_after: float | None = None  # pause in seconds requested by Retry-After
    retry_after_header: str | None = None
    redirect_to: yarl.URL | None = None


@dataclass
class _RowState:
    """The progress of one fetch() call."""

    url: str  # image_src as given
    target: yarl.URL  # image_src as parsed and sent, without its fragment
    host: str
    queue_deadline: float  # latest time to send the first request
    deadline: float | None = None  # row deadline, set when the first request is sent
    attempts: int = 0
    retries: int = 0
    final_url: str | None = None
    content_type: str | None = None


@dataclass
class _AttemptState:
    deadline: float | None = None  # set when the attempt's first request is sent


def _parse_request_url(url: str) -> yarl.URL | RowError:
    try:
        parsed = yarl.URL(url)
    except (TypeError, ValueError) as exc:
        return RowError("invalid_url", f"{url!r} is not a valid URL ({exc}); no request was sent")

    if parsed.scheme not in ("http", "https"):
        return RowError("invalid_url", f"{url!r} is not an http or https URL; no request was sent")
    if not parsed.raw_host:
        return RowError("invalid_url", f"{url!r} has no host; no request was sent")
    return parsed.with_fragment(None)


class Fetcher:
    """A polite fetcher of image URLs: shared per-host limits, retries, deadlines, content checks.

    Use it as an async context manager, which opens and closes the aiohttp session::

        async with Fetcher(options) as fetcher:
            result = await fetcher.fetch("https://example.com/image.jpg")

    Args:
        options: limits, retry settings and deadlines. ``options.state_dir`` is the folder of
            host limits shared with other processes. None there means a per-user folder in the
            ``datasets`` cache.
        resolver: the aiohttp DNS resolver; None uses aiohttp's default.
        clock: the time source of retry waits and rate limits. Tests pass a
            :class:`~gaia_builder.limits.VirtualClock` so that waits take no real time.
        rng: the random source of the backoff jitter.
    """

    def __init__(
        self,
        options: FetchOptions,
        *,
        resolver: aiohttp.abc.AbstractResolver | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.options = options
        self._resolver = resolver
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._rng = rng if rng is not None else random.Random()
        self._agent_token = user_agent_token(options.user_agent)
        self._stats = FetchStats()
        self._session: aiohttp.ClientSession | None = None
        self._limits: HostLimits | None = None
        self._in_flight: asyncio.Semaphore | None = None

    async def __aenter__(self) -> Fetcher:
        options = self.options
        state_dir = options.state_dir if options.state_dir is not None else default_state_dir()
        self._limits = HostLimits(
            state_dir,
            max_connections_per_host=options.max_connections_per_host,
            requests_per_second=options.max_requests_per_second_per_host,
            burst=options.rate_burst,
            max_pause=options.max_retry_after,
            clock=self._clock,
        )
        self._in_flight = asyncio.Semaphore(options.max_in_flight)

        connector = aiohttp.TCPConnector(
            limit=options.max_in_flight,
            limit_per_host=options.max_connections_per_host,
            resolver=self._resolver,
        )
        # Cookies are dropped so that every request is the same whichever process sends it. A
        # host that redirects to itself to set a cookie therefore ends as redirect_loop.
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers={hdrs.USER_AGENT: options.user_agent},
            cookie_jar=aiohttp.DummyCookieJar(),
            raise_for_status=False,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def stats(self) -> FetchStats:
        """A copy of the per-host counts so far."""
        return copy.deepcopy(self._stats)

    async def fetch(self, url: str) -> FetchResult:
        """Fetch one URL, retrying transient failures, and return the body or the row error.

        Never raises for a failure of this URL; asyncio.CancelledError propagates. The first
        request waits at most ``row_deadline`` for its host's slot and turn, and from the first
        request on the call ends within ``row_deadline``.
        """
        if self._session is None:
            raise RuntimeError("the Fetcher is not open; use it as `async with Fetcher(options) as fetcher:`")

        parsed = _parse_request_url(url)
        if isinstance(parsed, RowError):
            return self._fail_invalid(url, parsed)

        row = _RowState(
            url=url,
            target=parsed,
            host=host_key(parsed),
            queue_deadline=self._clock.time() + self.options.row_deadline,
        )
        outcome = await self._fetch_with_retries(row, parsed)
        return self._finish(row, outcome)

    async def _fetch_with_retries(self, row: _RowState, url: yarl.URL) -> _Outcome:
        options = self.options
        retry = 0
        while True:
            outcome = await self._attempt(row, url)
            if outcome.error is None:
                return outcome

            if outcome.retry_after is not None:
                await self._require_limits().pause(outcome.host, outcome.retry_after)
                if outcome.retry_after > options.max_retry_after:
                    return self._rate_limited(outcome)

            if not outcome.retryable or retry == options.max_retries:
                return outcome

            retry += 1
            wait = backoff_delay(
                retry, initial=options.backoff_initial, maximum=options.backoff_max, rng=self._rng
            )
            wait = max(wait, outcome.retry_after or 0.0)
            if row.deadline is not None and self._clock.time() + wait > row.deadline:
                shown_url = redact_credentials(row.url)
                logger.debug("Not retrying %s: a wait of %.2f s would pass the row deadline", shown_url, wait)
                return outcome

            row.retries = retry
            self._record_retry(row, outcome, retry, wait)
            await self._clock.sleep(wait)

    def _record_retry(self, row: _RowState, outcome: _Outcome, retry: int, wait: float) -> None:
        assert outcome.error is not None
        stats = self._stats.host(row.host)
        stats.retries += 1
        stats.retry_wait_seconds += wait
        reason = outcome.error.error_class
        stats.retry_reasons[reason] = stats.retry_reasons.get(reason, 0) + 1
        logger.warning(
            "Retrying %s [%d/%d] in %.2f s: %s",
            redact_credentials(row.url),
            retry,
            self.options.max_retries,
            wait,
            redact_url(str(outcome.error), row.url),
        )

    def _rate_limited(self, outcome: _Outcome) -> _Outcome:
        assert outcome.error is not None
        assert outcome.retry_after is not None
        detail = (
            f"{outcome.error.detail} with Retry-After: {outcome.retry_after_header} "
            f"(a pause of {outcome.retry_after:.0f} s), longer than "
            f"max_retry_after ({self.options.max_retry_after:g} s); "
            f"raise max_retry_after or fetch this row in a later run"
        )
        return dataclasses.replace(
            outcome, error=RowError("rate_limited", detail), retryable=False, transient=True
        )

    async def _attempt(self, row: _RowState, url: yarl.URL) -> _Outcome:
        """Send one request and follow its redirects; each hop passes its own host's limits."""
        attempt = _AttemptState()
        visited = {url}
        current = url
        redirects = 0
        while True:
            outcome = await self._request(row, attempt, current)
            target = outcome.redirect_to
            if target is None:
                return outcome

            if redirects == self.options.max_redirects:
                detail = (
                    f"GET {row.url} was redirected more than max_redirects={self.options.max_redirects} "
                    f"times; the last hop {current} pointed to {target}"
                )
                return _Outcome(host=outcome.host, error=RowError("too_many_redirects", detail))
            if target in visited:
                detail = f"GET {current} redirected to {target}, which this request had already visited"
                return _Outcome(host=outcome.host, error=RowError("redirect_loop", detail))

            visited.add(target)
            redirects += 1
            current = target

    async def _request(self, row: _RowState, attempt: _AttemptState, url: yarl.URL) -> _Outcome:
        """Pass the host's limits, then send one GET request and read its response."""
        limits = self._require_limits()
        assert self._in_flight is not None
        key = host_key(url)
        if attempt.deadline is not None:
            deadline = attempt.deadline
        elif row.deadline is not None:
            deadline = row.deadline
        else:
            deadline = row.queue_deadline

        # The rate turn is taken last, right before sending, so that requests reach the host
        # spaced as the rate gate granted them.
        try:
            async with limits.slot(key, deadline=deadline), self._in_flight:
                await limits.wait_for_turn(key, deadline=deadline)
                return await self._send(row, attempt, url, key)
        except LimitWaitTimeout as exc:
            detail = f"GET {url} was not sent before the deadline: {exc}"
            return _Outcome(host=key, error=RowError("timeout", detail), transient=True)

    async def _send(self, row: _RowState, attempt: _AttemptState, url: yarl.URL, key: str) -> _Outcome:
        options = self.options
        assert self._session is not None
        now = self._clock.time()
        if row.deadline is None:
            row.deadline = now + options.row_deadline
        if attempt.deadline is None:
            attempt.deadline = min(now + options.attempt_timeout, row.deadline)
        remaining = attempt.deadline - now
        if remaining <= 0:
            detail = f"GET {url} was not sent: no time was left before the attempt or row deadline"
            return _Outcome(host=key, error=RowError("timeout", detail), transient=True)

        row.attempts += 1
        self._stats.host(key).requests += 1
        timeout = aiohttp.ClientTimeout(
            total=remaining,
            connect=options.connect_timeout,
            sock_connect=options.connect_timeout,
            sock_read=options.read_timeout,
        )
        try:
            async with self._session.get(url, allow_redirects=False, timeout=timeout) as response:
                return await self._read_response(row, url, key, response)
        except asyncio.TimeoutError as exc:
            return self._timeout_outcome(url, key, exc, remaining)
        except (aiohttp.ClientError, OSError) as exc:
            return _classify_client_error(url, key, exc)
        except UnicodeEncodeError as exc:
            # aiohttp 3.14 encodes the URL's user name and password for Basic authentication in
            # Latin-1, and percent-encoding them in the URL does not help: yarl decodes them first.
            detail = (
                f"GET {url} was not sent: aiohttp could not encode the request ({exc}). A user name "
                "or password with characters outside Latin-1 is the usual cause; remove it from the URL"
            )
            return _Outcome(host=key, error=RowError("invalid_url", detail))

    async def _read_response(
        self, row: _RowState, url: yarl.URL, key: str, response: aiohttp.ClientResponse
    ) -> _Outcome:
        status = response.status
        responses = self._stats.host(key).responses
        responses[status] = responses.get(status, 0) + 1
        row.final_url = str(url)
        row.content_type = response.headers.get(hdrs.CONTENT_TYPE)
        requested = _describe_request(row, url)

        location = response.headers.get(hdrs.LOCATION)
        if status in REDIRECT_STATUSES and location is not None:
            await _drain_small_body(response)
            return _redirect_outcome(url, key, location)

        if not 200 <= status < 300:
            await _drain_small_body(response)
            return self._http_error_outcome(requested, key, response)

        directive = find_disallowed_directive(
            response.headers.getall("X-Robots-Tag", []),
            self.options.disallowed_header_directives,
            self._agent_token,
        )
        if directive is not None:
            detail = (
                f"{requested} returned X-Robots-Tag {directive!r}, which disallowed_header_directives lists; "
                f"remove it from that option to fetch such images"
            )
            return _Outcome(host=key, error=RowError("robots_disallowed", detail))

        return await self._read_image(requested, key, response)

    def _http_error_outcome(self, requested: str, key: str, response: aiohttp.ClientResponse) -> _Outcome:
        status = response.status
        if status < 100:
            # aiohttp 3.14 accepts any three digits, "000" and "099" included. RFC 9110 section 15
            # has no status below 100, so the server is broken, as for an unparsable response.
            detail = f"{requested} failed: invalid HTTP response (status {status:03d})"
            return _Outcome(host=key, error=RowError("connection_error", detail))

        detail = f"{requested} returned {status} {response.reason or _status_phrase(status)}"
        outcome = _Outcome(
            host=key,
            error=RowError(f"http_{status}", detail),
            retryable=status in RETRY_STATUSES,
            transient=status in RETRY_STATUSES or status >= 500,
        )

        header = response.headers.get(hdrs.RETRY_AFTER)
        if outcome.retryable and header is not None:
            date = response.headers.get(hdrs.DATE)
            outcome.retry_after = parse_retry_after(header, now=self._clock.time(), date=date)
            outcome.retry_after_header = header
        return outcome

    async def _read_image(self, requested: str, key: str, response: aiohttp.ClientResponse) -> _Outcome:
        max_bytes = self.options.max_bytes
        declared = response.content_length
        if declared is not None and declared > max_bytes:
            detail = (
                f"{requested} announced {declared} bytes (Content-Length), more than max_bytes={max_bytes}; "
                f"raise max_bytes to accept it"
            )
            return _Outcome(host=key, error=RowError("too_large", detail))

        # Chunks as they arrive, joined once at the end: one copy of the body.
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_any():
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                reason = _describe_oversized_body(response, max_bytes)
                detail = f"{requested} {reason}; raise max_bytes to accept it"
                return _Outcome(host=key, error=RowError("too_large", detail))

        data = b"".join(chunks)
        kind = describe_non_image(data, response.headers.get(hdrs.CONTENT_TYPE))
        if kind is not None:
            content_type = response.headers.get(hdrs.CONTENT_TYPE, "none")
            detail = f"{requested} returned {kind} (Content-Type: {content_type}), not an image"
            return _Outcome(host=key, error=RowError("not_an_image", detail))
        return _Outcome(host=key, data=data)

    def _timeout_outcome(self, url: yarl.URL, key: str, exc: BaseException, remaining: float) -> _Outcome:
        options = self.options
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            reason = f"no connection within connect_timeout={options.connect_timeout:g} s"
        elif isinstance(exc, aiohttp.SocketTimeoutError):
            reason = f"no data for read_timeout={options.read_timeout:g} s"
        elif remaining < options.attempt_timeout:
            reason = (
                f"no complete response within {remaining:.2f} s, "
                f"the time left of attempt_timeout={options.attempt_timeout:g} s or of the row deadline"
            )
        else:
            reason = f"no complete response within attempt_timeout={options.attempt_timeout:g} s"
        detail = f"GET {url} timed out: {reason}"
        return _Outcome(host=key, error=RowError("timeout", detail), retryable=True, transient=True)

    def _finish(self, row: _RowState, outcome: _Outcome) -> FetchResult:
        stats = self._stats.host(row.host)
        shown_url = redact_credentials(row.url)
        error = outcome.error
        if error is None:
            stats.succeeded += 1
            logger.debug(
                "Fetched %s: %d bytes in %d requests", shown_url, len(outcome.data or b""), row.attempts
            )
        else:
            error = RowError(error.error_class, redact_url(error.detail, row.url))
            stats.errors[error.error_class] = stats.errors.get(error.error_class, 0) + 1
            level = logging.WARNING if row.retries else logging.INFO
            logger.log(level, "Giving up on %s after %d requests: %s", shown_url, row.attempts, error)

        return FetchResult(
            url=row.url,
            data=outcome.data if error is None else None,
            final_url=redact_url(row.final_url, row.url) if row.final_url is not None else None,
            content_type=row.content_type,
            error=error,
            attempts=row.attempts,
            transient=error is not None and outcome.transient,
        )

    def _fail_invalid(self, url: str, error: RowError) -> FetchResult:
        error = RowError(error.error_class, redact_url(error.detail, url))
        stats = self._stats.host(INVALID_URL_KEY)
        stats.errors[error.error_class] = stats.errors.get(error.error_class, 0) + 1
        logger.info("Skipping %r: %s", redact_credentials(url), error)
        return FetchResult(url, None, None, None, error, attempts=0, transient=False)

    def _require_limits(self) -> HostLimits:
        if self._limits is None:
            raise RuntimeError("the Fetcher is not open; use it as `async with Fetcher(options) as fetcher:`")
        return self._limits


def _describe_request(row: _RowState, url: yarl.URL) -> str:
    # Compared as parsed URLs, because yarl quotes spaces and non-ASCII characters of image_src.
    # A redirect back to the first URL ends as redirect_loop, so equal means not redirected.
    if url == row.target:
        return f"GET {url}"
    return f"GET {url} (redirected from {row.url})"


def _describe_oversized_body(response: aiohttp.ClientResponse, max_bytes: int) -> str:
    # Content-Length counts the encoded bytes, so a decoded body can outgrow it.
    encoding = response.headers.get(hdrs.CONTENT_ENCODING, "").strip()
    if encoding.lower() in DECODED_CONTENT_ENCODINGS:
        return f"sent more than max_bytes={max_bytes} bytes after decoding its Content-Encoding {encoding}"
    if response.content_length is None:
        return f"sent more than max_bytes={max_bytes} bytes without a Content-Length"
    return f"sent more than max_bytes={max_bytes} bytes"


def _status_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


async def _drain_small_body(response: aiohttp.ClientResponse) -> None:
    length = response.content_length
    if length is None or length > MAX_DRAINED_BODY:
        return
    # The status already decides the outcome, so a failure here only costs the connection.
    try:
        await response.read()
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
        logger.debug("Dropped the connection after an unreadable body from %s", response.url)


def _redirect_outcome(url: yarl.URL, key: str, location: str) -> _Outcome:
    try:
        target = url.join(yarl.URL(location)).with_fragment(None)
    except (TypeError, ValueError) as exc:
        detail = f"GET {url} redirected to {location!r}, which is not a valid URL ({exc})"
        return _Outcome(host=key, error=RowError("invalid_url", detail))

    if target.scheme not in ("http", "https") or not target.raw_host:
        detail = (
            f"GET {url} redirected to {location!r}, which is not an http or https URL; it was not followed"
        )
        return _Outcome(host=key, error=RowError("invalid_url", detail))
    return _Outcome(host=key, redirect_to=target)


def _classify_client_error(url: yarl.URL, key: str, exc: BaseException) -> _Outcome:
    # aiohttp 3.11 added ClientConnectorDNSError; the gaierror check covers resolvers that
    # raise it inside a plain ClientConnectorError.
    if isinstance(exc, aiohttp.ClientConnectorDNSError) or (
        isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, socket.gaierror)
    ):
        os_error = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
        # Only a temporary lookup failure is worth a retry within the run.
        temporary = getattr(os_error, "errno", None) == socket.EAI_AGAIN
        detail = f"GET {url} failed: could not resolve host {url.raw_host!r} ({os_error})"
        return _Outcome(host=key, error=RowError("dns_error", detail), retryable=temporary, transient=True)

    if isinstance(exc, (aiohttp.ClientSSLError, aiohttp.ServerFingerprintMismatch)):
        detail = f"GET {url} failed: TLS handshake or certificate check with {key} failed ({exc})"
        return _Outcome(host=key, error=RowError("tls_error", detail))

    if isinstance(exc, aiohttp.InvalidURL):
        detail = f"GET {url} failed: aiohttp rejected the URL ({exc})"
        return _Outcome(host=key, error=RowError("invalid_url", detail))

    if isinstance(exc, aiohttp.ClientResponseError):
        # A response that aiohttp cannot parse: the server is broken, not busy.
        detail = f"GET {url} failed: invalid HTTP response ({exc.message or exc})"
        return _Outcome(host=key, error=RowError("connection_error", detail))

    detail = f"GET {url} failed: {_describe_exception(exc)}"
    return _Outcome(host=key, error=RowError("connection_error", detail), retryable=True, transient=True)


def _describe_exception(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


__all__ = [
    "FetchResult",
    "FetchStats",
    "Fetcher",
    "HostStats",
    "backoff_delay",
    "describe_non_image",
    "find_disallowed_directive",
    "parse_retry_after",
    "sniff_image_format",
    "user_agent_token",
]
