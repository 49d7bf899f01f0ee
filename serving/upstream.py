"""The gateway's one HTTP session to the engine, shared by the catalog, admission, the relay and
the exporter's engine scrape.

An aiohttp session belongs to the event loop it was opened on, and the gateway's loop runs on its
own thread; so the session is opened and closed with the gateway's app, not when it is built.
"""

from __future__ import annotations

import asyncio

import aiohttp

from .metrics import EngineStatus

# What a broken or vanished engine connection raises. A refused connection
# (aiohttp.ClientConnectorError, a subclass) means the engine is not listening at all.
UPSTREAM_FAILURES = (aiohttp.ClientError, asyncio.TimeoutError)


class Upstream:
    """The engine's address (read at each call: the supervisor owns it) and the session to it."""

    def __init__(self, engine: EngineStatus, read_timeout_s: float = 3600.0):
        self.engine = engine
        self.read_timeout_s = read_timeout_s
        self.session: aiohttp.ClientSession | None = None

    def url(self, path: str) -> str:
        return self.engine.url + path

    async def open(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=self.read_timeout_s),
        )

    async def close(self) -> None:
        await self.session.close()
