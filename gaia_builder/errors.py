"""Exceptions raised by gaia and the stable error classes written to a row's ``error`` column.

Two kinds of failure exist. A problem with the whole run (an unreadable metadata file, an
invalid option) raises a :class:`GaiaError` subclass. A problem with one row (its image is
gone, is not an image, is too large) never raises: the row is kept with ``image=None`` and an
``error`` string of the form ``"<class>: <detail>"``, where ``<class>`` is one of
:data:`ERROR_CLASSES`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import yarl

# The stable list of row error classes. Renaming or removing one is a breaking change: users
# filter on these strings. Classes of the form ``http_<status>`` (for example ``http_404``) are
# matched by HTTP_STATUS_CLASS instead of being listed one by one.
ERROR_CLASSES: dict[str, str] = {
    "invalid_metadata": "a metadata value has the wrong type, or image_src is missing",
    "invalid_url": "image_src is not an http or https URL; no request is sent",
    "dns_error": "the host name could not be resolved",
    "connection_error": "the connection was refused, reset or closed early",
    "tls_error": "the TLS handshake or certificate check failed",
    "timeout": "a connect, read or total deadline passed",
    "rate_limited": "the host asked for a pause (Retry-After) longer than max_retry_after",
    "too_many_redirects": "more redirects than max_redirects",
    "redirect_loop": "a redirect pointed back to a URL already visited",
    "too_large": "the body is larger than max_bytes",
    "robots_disallowed": "X-Robots-Tag carries a directive listed in disallowed_header_directives",
    "not_an_image": "the body is not an image (for example an HTML page served with 200)",
    "unsupported_format": (
        "an image format or pixel type that gaia cannot decode or convert (SVG, HEIC, float samples, unknown)"
    ),
    "decode_error": "the image is truncated or corrupt",
    "too_many_pixels": (
        "the pixels to decode (after JPEG DCT reduction) or of the resized image exceed max_pixels, "
        "or Pillow's Image.MAX_IMAGE_PIXELS in GIF and TIFF, or the stored image would be too large "
        "for Image.open (twice Image.MAX_IMAGE_PIXELS)"
    ),
}

# Any status from 100 to 999. RFC 9110 section 15 calls statuses outside 100-599 invalid but
# notes that 600-999 are used in practice, and aiohttp 3.14 passes on any three digits.
HTTP_STATUS_CLASS = re.compile(r"http_[1-9][0-9]{2}")

# Row errors that an option causes (max_bytes, disallowed_header_directives, max_redirects), so
# a run with other options may fetch the image. The fetch cache does not store them.
OPTION_DEPENDENT_ERRORS = frozenset({"too_large", "robots_disallowed", "too_many_redirects"})


def is_error_class(name: str) -> bool:
    """Tell whether ``name`` is one of the documented row error classes."""
    return name in ERROR_CLASSES or HTTP_STATUS_CLASS.fullmatch(name) is not None


@dataclass(frozen=True)
class RowError:
    """The reason one row has no image: a stable class and a human-readable detail."""

    error_class: str
    detail: str

    def __post_init__(self) -> None:
        if not is_error_class(self.error_class):
            raise ValueError(f"unknown row error class {self.error_class!r}")

    def __str__(self) -> str:
        return f"{self.error_class}: {self.detail}"

    @classmethod
    def parse(cls, text: str) -> RowError:
        """Split an ``error`` column value back into its class and detail."""
        error_class, _, detail = text.partition(": ")
        return cls(error_class, detail)


class GaiaError(Exception):
    """Base class of every exception that gaia raises."""


class ConfigError(GaiaError, ValueError):
    """An option passed to the builder or the CLI is invalid."""


class MetadataError(GaiaError, ValueError):
    """A metadata file cannot be read: bad JSON, an unknown layout or columns of unequal length."""


class MetadataSourceError(GaiaError, ConnectionError):
    """The metadata files could not be downloaded from the Hub."""


class ImageError(GaiaError):
    """Image bytes could not be turned into an output image; carries the row error."""

    def __init__(self, error_class: str, detail: str) -> None:
        super().__init__(f"{error_class}: {detail}")
        self.row_error = RowError(error_class, detail)


class ExportError(GaiaError, ValueError):
    """An export cannot run as requested, for example because the output folder is not empty."""


# The user information of a URL inside a message: what follows "scheme://" up to the last "@"
# before the end of the authority, which is the first "/", "?", "#" or whitespace.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s]*@")


def redact_url(text: str, url: str | None = None) -> str:
    """Replace the user name and password of every URL in ``text`` with ``***``.

    Requests still send them (aiohttp turns them into Basic authentication), but error details,
    ``final_url``, log lines and the failures file, which users share, do not show them. The
    ``image_src`` column keeps the URL as the metadata gives it. When ``url`` is given, its user
    information is also replaced wherever it follows "://" verbatim, as written or as yarl quotes
    it, which catches what the pattern stops at, such as a raw space.
    """
    if url is not None:
        for userinfo in _userinfo_forms(url):
            text = text.replace(f"://{userinfo}@", "://***@")
    return _USERINFO.sub(r"\g<scheme>***@", text)


def redact_credentials(url: str) -> str:
    """Return ``url`` with its user name and password replaced by ``***``."""
    return redact_url(url, url)


def _userinfo_forms(url: str) -> set[str]:
    _, separator, rest = url.partition("://")
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    userinfo, at, _ = authority.rpartition("@")
    forms = {userinfo} if separator and at and userinfo else set()
    try:
        parsed = yarl.URL(url)
    except (TypeError, ValueError):
        return forms
    if parsed.raw_user is not None:
        password = f":{parsed.raw_password}" if parsed.raw_password is not None else ""
        forms.add(parsed.raw_user + password)
    return forms
