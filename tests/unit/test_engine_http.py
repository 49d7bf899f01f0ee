"""The gateway's connection pool to the engine (serving/engine_http.py), against a real HTTP server on a Unix socket.

vLLM's own behaviour through the pool is tested in the integration tier (test_gateway_abuse, test_serving_restart,
test_serving_gateway); here an aiohttp server stands in for the engine's HTTP layer only, to produce on demand the
connection faults a healthy vLLM produces rarely: a kept-alive connection closed while idle, a body cut midway.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager

import pytest
from aiohttp import web

from lcserve.serving.engine_http import EngineLost, EnginePool, EngineRefused


async def echo(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    if body.get("hang"):  # a stream that stops sending, the connection left open
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: one\n\n")
        await asyncio.sleep(1.5)
        return response
    if body.get("cut"):  # half a stream, then the connection drops
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: half\n\n")
        request.transport.abort()
        return response
    if body.get("stream"):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(3):
            await response.write(f"data: {body['id']}-{i}\n\n".encode())
            await asyncio.sleep(0.001 * (body["id"] % 5))
        await response.write_eof()
        return response
    await asyncio.sleep(0.001 * (body["id"] % 7))
    return web.json_response({"id": body["id"], "forged": request.headers.get("X-Forged")})


@asynccontextmanager
async def engine_at(path: str, keepalive_timeout: float = 75.0, read_timeout_s: float = 3600.0):
    """A pool to an HTTP server on the Unix socket `path` that answers `echo`."""
    app = web.Application()
    app.router.add_post("/v1/completions", echo)
    runner = web.AppRunner(app, keepalive_timeout=keepalive_timeout)
    await runner.setup()
    await web.UnixSite(runner, path).start()
    pool = EnginePool(lambda: f"unix:{path}", read_timeout_s=read_timeout_s)
    try:
        yield pool
    finally:
        pool.close()
        await runner.cleanup()


async def ask(pool: EnginePool, body: dict, headers: dict | None = None, delay: float = 0.0) -> bytes:
    await asyncio.sleep(delay)  # calls that arrive while others complete take the connections those give back
    call = await pool.call("POST", "/v1/completions", json.dumps(body).encode(), headers or {})
    status, _ = await call.head()
    assert status == 200
    if not body.get("stream") and not body.get("cut"):
        return await call.read()
    pieces: list[bytes] = []
    await call.stream(pieces.append)
    return b"".join(pieces)


def test_each_call_gets_its_own_answer_on_shared_connections(tmp_path):
    """Many calls, streamed and whole, arriving while others complete, on kept-alive connections: every answer
    is its own request's (an answer is the call's, not the connection's, which serves the next call at once)."""
    sock = str(tmp_path / "engine.sock")

    async def run():
        async with engine_at(sock) as pool:
            for _ in range(3):  # later rounds run on the connections the first ones left
                bodies = [{"id": i, "stream": i % 2 == 0} for i in range(40)]
                answers = await asyncio.gather(*(ask(pool, b, delay=0.0005 * b["id"]) for b in bodies))
                for body, answer in zip(bodies, answers):
                    if body["stream"]:
                        assert answer == b"".join(f"data: {body['id']}-{i}\n\n".encode() for i in range(3))
                    else:
                        assert json.loads(answer)["id"] == body["id"]
            assert pool._idle, "no connection was kept alive"

    asyncio.run(run())


def test_a_connection_closed_while_idle_is_not_taken_for_an_answer(tmp_path):
    sock = str(tmp_path / "engine.sock")

    async def run():
        async with engine_at(sock, keepalive_timeout=0.05) as pool:
            assert json.loads(await ask(pool, {"id": 1}))["id"] == 1
            await asyncio.sleep(0.3)  # the server closes the idle connection
            assert json.loads(await ask(pool, {"id": 2}))["id"] == 2

    asyncio.run(run())


def test_a_body_cut_midway_is_engine_lost_and_no_engine_is_refused(tmp_path):
    sock = str(tmp_path / "engine.sock")

    async def run():
        async with engine_at(sock) as pool:
            with pytest.raises(EngineLost):
                await ask(pool, {"id": 1, "cut": True})
            assert json.loads(await ask(pool, {"id": 2}))["id"] == 2  # the pool goes on
        with pytest.raises(EngineRefused):
            await ask(EnginePool(lambda: f"unix:{tmp_path / 'nothing.sock'}"), {"id": 3})

    asyncio.run(run())


def test_a_header_value_cannot_forge_another_header(tmp_path):
    sock = str(tmp_path / "engine.sock")

    async def run():
        async with engine_at(sock) as pool:
            forged = await ask(pool, {"id": 1}, {"X-Request-Id": "abc\r\nX-Forged: yes"})
            plain = await ask(pool, {"id": 2}, {"X-Request-Id": "abc"})
        assert json.loads(forged)["forged"] is None and json.loads(plain)["id"] == 2

    asyncio.run(run())


def test_an_engine_that_goes_silent_loses_the_call(tmp_path):
    """The read timeout counts silence, not the whole answer: a stream that keeps sending outlives it."""
    sock = str(tmp_path / "engine.sock")

    async def run():
        async with engine_at(sock, read_timeout_s=0.3) as pool:
            started = asyncio.get_running_loop().time()
            with pytest.raises(EngineLost, match="sent nothing for 0.3 s"):
                await ask(pool, {"id": 1, "hang": True})
            assert asyncio.get_running_loop().time() - started < 5
            bodies = [{"id": i, "stream": True} for i in range(5, 10)]  # 3 events 4 ms apart: never silent 0.3 s
            assert all(await asyncio.gather(*(ask(pool, b) for b in bodies)))

    asyncio.run(run())
