"""Forwarding admitted requests to vLLM, and reading each one's `usage` on the way back.

Streams pass through event by event, unbuffered. To read `usage` from a stream the relay asks
vLLM for it (`stream_options.include_usage`) and drops that extra chunk again when the client
did not ask for it, so clients see exactly what vLLM would have sent them. When the engine
connection breaks, the client gets a 502 (or, mid-stream, an error event in vLLM's format), not a
hang or a truncated body that looks complete. When the client goes away, or accepts nothing for
`send_timeout_s`, the engine connection is closed, and vLLM aborts the request.
"""

from __future__ import annotations

import asyncio
import json
import socket

import aiohttp
from aiohttp import web

from .admission import engine_down_response, error_body, error_response, tokenize
from .embeddings import (
    MAX_WINDOWS,
    POLICY_HEADER,
    chunk_windows,
    decide,
    encode_vector,
    pool,
    special_wrap,
    window_len,
)
from .engine_http import EngineCall, EngineLost, EngineRefused
from .metrics import GatewayMetrics, ModelLimits
from .upstream import UPSTREAM_FAILURES, Upstream

# The kernel's send buffer for a stream's client (it doubles the value). Autotuned, it grows to
# megabytes, and a client that stopped reading is only noticed once they are full; a stream is a
# trickle of small events, so this much never slows one down.
STREAM_SEND_BUFFER = 128 * 1024
FORWARD_HEADERS = ("Content-Type", "Accept", "X-Request-Id")
RETURN_HEADERS = ("Content-Type", "X-Request-Id")


def with_stream_usage(body: dict) -> dict | None:
    """For a stream whose client did not ask for `usage`: the body asking vLLM for it. None when
    the body can go as it is (not a stream, or the client asked)."""
    if body.get("stream") is not True:
        return None
    options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
    if options.get("include_usage"):
        return None
    return {**body, "stream_options": {**options, "include_usage": True}}


def take_usage(block: bytes, strip: bool) -> tuple[bytes, dict | None]:
    """From a block of complete SSE events, the last `usage` object seen, and the block without
    the usage-only chunk (`"choices": []`) when `strip` (the gateway asked for it, not the client)."""
    usage = None
    kept = []
    for event in block.split(b"\n\n"):
        if b'"usage"' in event and event.startswith(b"data: {"):
            try:
                chunk = json.loads(event[6:])
            except ValueError:
                chunk = None
            if isinstance(chunk, dict) and isinstance(chunk.get("usage"), dict):
                usage = chunk["usage"]
                if strip and chunk.get("choices") == []:
                    continue
        kept.append(event)
    return b"\n\n".join(kept), usage


class EventRelay:
    """A stream's events from the engine to the client, written in the engine connection's own callback
    (serving/engine_http.py): each complete SSE event goes out as one HTTP chunk at once, and `usage` is
    read on the way (the chunk the gateway asked for is dropped). A client that reads nothing while its
    socket buffer is full pauses the engine connection; after `send_timeout_s` of that it is `stalled`,
    and the engine connection is closed (vLLM aborts the request)."""

    HIGH, LOW = 64 * 1024, 16 * 1024  # bytes waiting in the client's transport: pause above, resume below

    def __init__(self, transport, call: EngineCall, accounted: bool, strip_usage: bool, send_timeout_s: float):
        self.transport, self.call = transport, call
        self.accounted, self.strip_usage, self.send_timeout_s = accounted, strip_usage, send_timeout_s
        self.pending = b""
        self.usage: dict | None = None
        self.stalled = False
        self._paused_at: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    def receive(self, piece: bytes) -> None:
        self.pending += piece
        end = self.pending.rfind(b"\n\n")
        if end < 0:
            return
        block, self.pending = self.pending[: end + 2], self.pending[end + 2 :]
        if self.accounted and b'"usage"' in block:
            block, found = take_usage(block, self.strip_usage)
            self.usage = found or self.usage
        if block.strip():
            self.write(block)

    def finish(self) -> None:
        if self.pending:
            self.write(self.pending)
            self.pending = b""

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            self.call.abort()  # the client went away
            return
        transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        if self._paused_at is None and transport.get_write_buffer_size() > self.HIGH:
            self.call.pause()
            self._paused_at = asyncio.get_running_loop().time()
            self._check()

    def _check(self) -> None:
        """While paused: resume once the client has read, give up after `send_timeout_s`."""
        self._timer = None
        loop = asyncio.get_running_loop()
        if self.transport.is_closing():
            self.call.abort()
        elif self.transport.get_write_buffer_size() < self.LOW:
            self._paused_at = None
            self.call.resume()
        elif loop.time() - self._paused_at > self.send_timeout_s:
            self.stalled = True
            self.call.abort()
        else:
            self._timer = loop.call_later(min(0.05, self.send_timeout_s), self._check)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


class Relay:
    """Sends requests to the engine and their answers back; accounts completed generations."""

    def __init__(
        self, upstream: Upstream, metrics: GatewayMetrics, retry_after_s: int = 5, send_timeout_s: float = 60.0
    ):
        self.upstream = upstream
        self.metrics = metrics
        self.retry_after_s = retry_after_s
        self.send_timeout_s = send_timeout_s

    async def forward(self, request: web.Request, data: bytes | None = None) -> web.Response:
        """The request as it is (or with the body `data`), and the engine's answer as it is."""
        try:
            async with self.upstream.session.request(
                request.method,
                self.upstream.url(request.path),
                data=await request.read() if data is None else data,
                headers=_pick(request.headers, FORWARD_HEADERS),
            ) as upstream:
                data = await upstream.read()
                if upstream.status == 401:
                    return self._key_refused()
                return web.Response(body=data, status=upstream.status, headers=_pick(upstream.headers, RETURN_HEADERS))
        except aiohttp.ClientConnectorError:
            return self._engine_down()
        except UPSTREAM_FAILURES:
            return self._engine_lost()

    async def generate(
        self, request: web.Request, body: dict, raw: bytes, model: ModelLimits | None
    ) -> web.StreamResponse:
        """/v1/completions and /v1/chat/completions, admitted. `model` None: a model the engine
        does not serve, forwarded unaccounted (vLLM answers its own 404)."""
        strip_usage = False
        if model is not None:
            self.metrics.requests.labels(model.name).inc()
            asking = with_stream_usage(body)
            if asking is not None:
                raw, strip_usage = json.dumps(asking).encode(), True
        try:
            call = await self.upstream.pool.call("POST", request.path, raw, _pick(request.headers, FORWARD_HEADERS))
        except EngineRefused:
            return self._engine_down()
        except EngineLost:
            return self._engine_lost()
        try:
            try:
                status, headers = await call.head()
            except EngineLost:
                return self._engine_lost()
            if status == 200 and headers.get("Content-Type", "").partition(";")[0].strip() == "text/event-stream":
                return await self._stream(request, call, headers, model, strip_usage)
            try:
                data = await call.read()
            except EngineLost:
                return self._engine_lost()
            if status == 401:
                return self._key_refused()
            if status == 200 and model is not None:
                try:
                    self.metrics.record_usage(model, json.loads(data).get("usage"))
                except (ValueError, AttributeError):
                    pass
            return web.Response(body=data, status=status, headers=_pick(headers, RETURN_HEADERS))
        finally:
            call.abort()  # nothing when the answer was complete; else vLLM aborts the request

    async def embed(
        self, request: web.Request, body: dict, model: ModelLimits, inputs: list, ids: list[list[int]], policy: str
    ) -> web.Response:
        """/v1/embeddings for an embedding model, admitted, with each input's token ids: the policy
        decides each input (serving/embeddings.py); chunked inputs go as windows in the same batch."""
        window = window_len(model.training_len, model.max_model_len)
        actions = [decide(policy, i, len(t), model.name, model.max_model_len, window) for i, t in enumerate(ids)]
        for action in actions:
            self.metrics.embedding_inputs.labels(model.name, policy, action.kind).inc()
        refused = next((a for a in actions if a.kind == "rejected"), None)
        if refused is not None:
            self.metrics.errors.labels("context_overflow").inc()
            return error_response(400, refused.message, "BadRequestError", "input", headers={POLICY_HEADER: policy})
        self.metrics.requests.labels(model.name).inc()
        plan = None
        if any(a.kind == "chunked" for a in actions):
            plan = await self._windows(model, inputs, ids, actions, window)
            if isinstance(plan, web.Response):
                return plan
            batch, spans = plan
            upstream_body = {**body, "input": batch, "encoding_format": "float"}
        elif any(a.kind == "truncated" for a in actions) and body.get("truncate_prompt_tokens") is None:
            upstream_body = {**body, "truncate_prompt_tokens": window}
        else:
            upstream_body = body
        try:
            async with self.upstream.session.post(
                self.upstream.url("/v1/embeddings"),
                json=upstream_body,
                headers=_pick(request.headers, ("X-Request-Id",)),
            ) as upstream:
                data = await upstream.read()
                status, headers = upstream.status, _pick(upstream.headers, RETURN_HEADERS)
        except aiohttp.ClientConnectorError:
            return self._engine_down()
        except UPSTREAM_FAILURES:
            return self._engine_lost()
        headers[POLICY_HEADER] = policy
        if status == 401:
            return self._key_refused()
        if status != 200:
            return web.Response(body=data, status=status, headers=headers)
        for t in ids:
            self.metrics.record(model, len(t), len(t))
        if plan is None:
            return web.Response(body=data, status=status, headers=headers)
        answer = json.loads(data)
        vectors = [d["embedding"] for d in sorted(answer["data"], key=lambda d: d["index"])]
        answer["data"] = [
            {
                "index": i,
                "object": "embedding",
                "embedding": encode_vector(
                    pool(vectors[a:b], [len(w) for w in batch[a:b]]) if b - a > 1 else vectors[a],
                    body.get("encoding_format"),
                ),
            }
            for i, (a, b) in enumerate(spans)
        ]
        headers.pop("Content-Length", None)
        return web.json_response(answer, headers={k: v for k, v in headers.items() if k != "Content-Type"})

    async def _windows(
        self, model, inputs, ids, actions, window
    ) -> tuple[list[list[int]], list[tuple[int, int]]] | web.Response:
        """The batch to embed (each input as token ids, a chunked one as its windows) and each
        input's span of it; the 400 when the windows are too many for one request."""
        batch: list[list[int]] = []
        spans: list[tuple[int, int]] = []
        for item, token_ids, action in zip(inputs, ids, actions):
            start = len(batch)
            if action.kind != "chunked":
                batch.append(token_ids)
            elif isinstance(item, list):  # token ids: the client chose every token, specials included
                batch += chunk_windows(token_ids, window)
            else:
                plain = await tokenize(self.upstream, model.name, item, special=False)
                if plain is None:
                    return self._engine_lost()
                prefix, suffix = special_wrap(token_ids, plain)
                batch += chunk_windows(plain, window, prefix, suffix)
            spans.append((start, len(batch)))
        if len(batch) > MAX_WINDOWS:
            self.metrics.errors.labels("bad_input").inc()
            return error_response(
                400,
                f"the inputs make {len(batch)} windows of {window} tokens under the chunk policy; one request "
                f"takes at most {MAX_WINDOWS}: send fewer or shorter inputs per request",
                "BadRequestError",
                "input",
            )
        return batch, spans

    async def _stream(
        self, request: web.Request, call: EngineCall, headers: dict, model: ModelLimits | None, strip_usage: bool
    ) -> web.StreamResponse:
        """Forward SSE events as soon as each is complete; on a broken engine connection, end the
        stream with an error event in vLLM's format, then `[DONE]`."""
        response = web.StreamResponse(headers={**_pick(headers, RETURN_HEADERS), "Cache-Control": "no-cache"})
        client = request.transport.get_extra_info("socket") if request.transport is not None else None
        if client is not None:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SEND_BUFFER)
        await response.prepare(request)
        await response.write(b"")  # the headers go now: the events follow straight onto the socket
        events = EventRelay(request.transport, call, model is not None, strip_usage, self.send_timeout_s)
        try:
            await call.stream(events.receive)
            events.finish()
        except EngineLost:
            if events.stalled:  # the client stopped reading: dropped, and with it the engine request
                self.metrics.errors.labels("client_stalled").inc()
                request.transport.abort()
                return response
            self.metrics.errors.labels("engine_lost").inc()
            event = error_body(
                502,
                "the engine connection broke mid-stream (the engine died or is restarting); "
                "the output is incomplete: retry the request",
                "EngineUnavailableError",
            )
            events.write(b"data: " + json.dumps(event).encode() + b"\n\ndata: [DONE]\n\n")
            return response
        finally:
            events.close()
        if request.transport is None or request.transport.is_closing():
            return response  # the client went away; leaving closes the engine request too
        try:
            await response.write_eof()
        except ConnectionResetError:
            return response
        if model is not None:
            self.metrics.record_usage(model, events.usage)
        return response

    def _engine_down(self) -> web.Response:
        """The engine refused the connection: it is not listening (down, or not yet up)."""
        self.metrics.errors.labels("engine_unavailable").inc()
        return engine_down_response(self.retry_after_s)

    def _key_refused(self) -> web.Response:
        """The engine answered 401: clients' keys never go upstream, so it refused the gateway's own (a remote
        vLLM started with --api-key); passing the 401 on would tell the client its key is wrong."""
        self.metrics.errors.labels("engine_key_refused").inc()
        where = "the key in --upstream-api-key-file" if self.upstream.api_key else "no key"
        return error_response(
            502,
            f"the engine refused the gateway: it sent {where}; start `lcserve gateway` with --upstream-api-key-file "
            "holding the key vLLM was started with (--api-key or VLLM_API_KEY)",
            "EngineAuthenticationError",
        )

    def _engine_lost(self) -> web.Response:
        self.metrics.errors.labels("engine_lost").inc()
        return error_response(
            502,
            "the engine connection broke before the response was complete (the engine died "
            "or is restarting); retry the request",
            "EngineUnavailableError",
            headers={"Retry-After": str(self.retry_after_s)},
        )


def _pick(headers, names: tuple[str, ...]) -> dict[str, str]:
    return {name: headers[name] for name in names if name in headers}
