"""Saturation that KV usage alone misses, on the real engine: long prompts arrive at once, the engine
prefills them a chunk per step and queues the rest while its KV cache stays mostly empty. The
gateway's lcserve_saturation_ratio must cross its alert threshold (serving/capacity.py SATURATED)
through its queue term, and the observed latency quantiles appear."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from lcserve.serving.capacity import SATURATED
from lcserve.serving.stack import Stack
from tests.unit.test_metrics import value

pytestmark = pytest.mark.integration

USERS = 16
FILLER = "The keeper trimmed the wick and wrote the weather in his log. " * 150  # about 2,000 tokens


def test_saturation_rises_on_queued_long_prompts_while_kv_stays_low(engine):
    stack = Stack(upstream_url=engine.url, gateway_port=0)
    stack.start()
    try:

        async def run() -> list[tuple[float, float, float]]:
            seen: list[tuple[float, float, float]] = []  # (saturation, kv usage, queue term) per scrape
            async with httpx.AsyncClient(timeout=600) as client:

                async def ask(i: int) -> None:
                    body = {"model": engine.base_model, "prompt": f"Log {i}. {FILLER}", "max_tokens": 2}
                    r = await client.post(f"{stack.url}/v1/completions", json=body)
                    assert r.status_code == 200, r.text

                load = asyncio.gather(*(ask(i) for i in range(USERS)))
                while not load.done():
                    text = (await client.get(f"{stack.url}/metrics")).text
                    saturation = value(text, "lcserve_saturation_ratio")
                    if saturation is not None:
                        seen.append(
                            (
                                saturation,
                                value(text, "lcserve_kv_cache_usage_ratio"),
                                value(text, "lcserve_saturation_term", term="queue"),
                            )
                        )
                    await asyncio.sleep(0.2)
                await load
            return seen

        seen = asyncio.run(run())
        text = httpx.get(f"{stack.url}/metrics", timeout=30).text
    finally:
        stack.stop()
    peak = max(seen)
    print(f"\n{len(seen)} scrapes under {USERS} long prompts; peak saturation {peak[0]:.2f} at KV usage {peak[1]:.3f}")
    assert peak[0] >= SATURATED, seen
    assert peak[1] < 0.5  # the KV cache was far from full: KV usage alone would not have said it
    assert peak[2] == peak[0]  # the queue term carried it
    assert value(text, "lcserve_observed_ttft_seconds", quantile="0.5") > 0
