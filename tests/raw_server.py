"""A raw TCP server on 127.0.0.1 that sends fixed bytes, for responses aiohttp.web cannot make."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

# Seconds the server waits for a request head before it closes the connection.
READ_TIMEOUT = 5.0


@contextlib.asynccontextmanager
async def raw_server(response: bytes) -> AsyncIterator[str]:
    """Send ``response`` verbatim after each request head, close, and yield the base URL."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            writer.write(response)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()
