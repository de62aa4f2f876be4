"""Fail loudly when a test opens a connection or resolves a name outside the loopback range.

pytest-socket guards only the pytest process, so this small guard is applied both by conftest.py
and, through ``tests/guard/sitecustomize.py`` on PYTHONPATH, by every Python subprocess a test
starts (builds killed halfway, CLI runs, num_proc workers).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
_installed = False


class NonLoopbackConnectionError(OSError):
    """A test tried to reach a host outside 127.0.0.0/8 and ::1."""


def _is_loopback(host: object) -> bool:
    if not isinstance(host, (str, bytes)):
        return False
    text = host.decode() if isinstance(host, bytes) else host
    if text.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(text.split("%")[0]).is_loopback
    except ValueError:
        return False


def _check_address(address: Any) -> None:
    if isinstance(address, (str, bytes)):  # AF_UNIX paths stay on this machine
        return
    if isinstance(address, tuple) and address and _is_loopback(address[0]):
        return
    raise NonLoopbackConnectionError(f"tests may only connect to loopback addresses, not {address!r}")


def install() -> None:
    """Patch socket connect and name resolution; calling it twice changes nothing."""
    global _installed
    if _installed:
        return
    _installed = True

    original_connect = socket.socket.connect
    original_connect_ex = socket.socket.connect_ex
    original_getaddrinfo = socket.getaddrinfo

    def connect(self: socket.socket, address: Any) -> None:
        _check_address(address)
        return original_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        _check_address(address)
        return original_connect_ex(self, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host is not None and not _is_loopback(host):
            raise NonLoopbackConnectionError(
                f"tests may only resolve loopback names, not {host!r}; inject a resolver instead"
            )
        return original_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
    socket.getaddrinfo = getaddrinfo
