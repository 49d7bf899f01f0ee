"""The engine's `/metrics`, read for the gateway's exporter at most once a second.

Prometheus may scrape often, and several Prometheus servers may scrape one gateway; the engine's
text is ~60 kB of histograms. So one read serves every scrape within METRICS_TTL_S, and a read
that fails leaves no snapshot (no stale figures) rather than an error on the gateway's /metrics.
"""

from __future__ import annotations

import asyncio

import aiohttp

from .metrics import EngineSnapshot, parse_engine_metrics
from .upstream import UPSTREAM_FAILURES, Upstream

METRICS_TTL_S = 1.0  # scrapes within a second reuse the engine's last /metrics


class EngineScrape:
    """The latest EngineSnapshot, or None while the engine is down or does not answer."""

    def __init__(self, upstream: Upstream):
        self.upstream = upstream
        self._snapshot: EngineSnapshot | None = None
        self._read_at = float("-inf")
        self._lock = asyncio.Lock()

    async def latest(self) -> EngineSnapshot | None:
        loop = asyncio.get_running_loop()
        if loop.time() - self._read_at < METRICS_TTL_S:
            return self._snapshot
        async with self._lock:
            if loop.time() - self._read_at >= METRICS_TTL_S:
                self._snapshot = await self._read() if self.upstream.engine.up else None
                self._read_at = loop.time()
            return self._snapshot

    async def _read(self) -> EngineSnapshot | None:
        try:
            async with self.upstream.session.get(
                self.upstream.url("/metrics"), timeout=aiohttp.ClientTimeout(total=2)
            ) as r:
                return parse_engine_metrics(await r.text()) if r.status == 200 else None
        except UPSTREAM_FAILURES:
            return None
