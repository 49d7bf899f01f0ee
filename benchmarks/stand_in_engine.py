"""A stand-in for vLLM's OpenAI server that answers at once, for `bench_gateway.py --stand-in` only.

On a machine where vLLM's processes and the gateway share a few cores, the gateway's measured cost
includes waiting for the cores vLLM holds. Against this stand-in (no model, no compute) the same
benchmark measures the gateway's own cost. It is a measuring tool, not a test double: no test uses it.

    python benchmarks/stand_in_engine.py /PATH/engine.sock [SECONDS_BETWEEN_STREAMED_EVENTS]
"""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web

MODEL = "stand-in"


def chunk(choices: list, usage: dict | None = None) -> bytes:
    body = {"id": "cmpl-0", "object": "text_completion", "created": 0, "model": MODEL, "choices": choices}
    return b"data: " + json.dumps({**body, "usage": usage}).encode() + b"\n\n"


async def models(_: web.Request) -> web.Response:
    entry = {"id": MODEL, "object": "model", "root": MODEL, "parent": None, "max_model_len": 8192}
    return web.json_response({"object": "list", "data": [entry]})


async def health(_: web.Request) -> web.Response:
    return web.Response()


async def tokenize(request: web.Request) -> web.Response:
    words = str((await request.json()).get("prompt", "")).split()
    return web.json_response({"count": len(words), "max_model_len": 8192, "tokens": list(range(len(words)))})


async def completions(request: web.Request) -> web.StreamResponse:
    """One token per requested token (" tok"), streamed event by event when asked, with usage when asked."""
    body = await request.json()
    n = int(body.get("max_tokens") or 1)
    usage = {"prompt_tokens": 6, "completion_tokens": n, "total_tokens": 6 + n}
    if not body.get("stream"):
        text = {"index": 0, "text": " tok" * n, "logprobs": None, "finish_reason": "length"}
        return web.json_response(json.loads(chunk([text], usage)[6:]))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i in range(n):
        finish = "length" if i == n - 1 else None
        await response.write(chunk([{"index": 0, "text": " tok", "logprobs": None, "finish_reason": finish}]))
        await asyncio.sleep(DELAY)
    if (body.get("stream_options") or {}).get("include_usage"):
        await response.write(chunk([], usage))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


if __name__ == "__main__":
    DELAY = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/v1/completions", completions)
    web.run_app(app, path=sys.argv[1], access_log=None, print=None)
