"""The gateway's connections to the engine: one aiohttp session shared by the catalog, admission, the
exporter's engine scrape and the relay's other routes, and the pool of kept-alive connections that
generations take (serving/engine_http.py).

The engine's address is `http://host:port`, or `unix:/path/vllm.sock` for vLLM's `--uds` (how
`lcserve serve` runs it: no TCP port, so the gateway is the one door). A remote vLLM started with
`--api-key` gets that key on every request (`api_key`); clients' own keys are the gateway's and
never go upstream.

An aiohttp session belongs to the event loop it was opened on, and the gateway's loop runs on its
own thread; so the session is opened and closed with the gateway's app, not when it is built.
"""

from __future__ import annotations

import asyncio

import aiohttp

from lcserve.engine import bearer, engine_address

from .engine_http import EnginePool
from .metrics import EngineStatus

# What a broken or vanished engine connection raises. A refused connection
# (aiohttp.ClientConnectorError, a subclass) means the engine is not listening at all.
UPSTREAM_FAILURES = (aiohttp.ClientError, asyncio.TimeoutError)


class Upstream:
    """The engine's address (read at each call: the supervisor owns it) and the session to it."""

    def __init__(self, engine: EngineStatus, read_timeout_s: float = 3600.0, api_key: str | None = None):
        self.engine = engine
        self.read_timeout_s = read_timeout_s
        self.api_key = api_key
        self.session: aiohttp.ClientSession | None = None
        self.pool = EnginePool(lambda: self.engine.url, api_key, read_timeout_s)  # generations: the hot path

    def url(self, path: str) -> str:
        return engine_address(self.engine.url)[0] + path

    async def open(self) -> None:
        uds = engine_address(self.engine.url)[1]
        connector = aiohttp.UnixConnector(path=uds, limit=0) if uds else aiohttp.TCPConnector(limit=0)
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=self.read_timeout_s),
            headers=bearer(self.api_key),
        )

    async def close(self) -> None:
        self.pool.close()
        await self.session.close()
