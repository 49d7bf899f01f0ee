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


class ClientStalled(Exception):
    """The client accepted no byte of its stream for `send_timeout_s`."""


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
            upstream = await self.upstream.session.post(
                self.upstream.url(request.path), data=raw, headers=_pick(request.headers, FORWARD_HEADERS)
            )
        except aiohttp.ClientConnectorError:
            return self._engine_down()
        except UPSTREAM_FAILURES:
            return self._engine_lost()
        async with upstream:
            if upstream.status == 200 and upstream.content_type == "text/event-stream":
                return await self._stream(request, upstream, model, strip_usage)
            try:
                data = await upstream.read()
            except UPSTREAM_FAILURES:
                return self._engine_lost()
            if upstream.status == 200 and model is not None:
                try:
                    self.metrics.record_usage(model, json.loads(data).get("usage"))
                except (ValueError, AttributeError):
                    pass
            return web.Response(body=data, status=upstream.status, headers=_pick(upstream.headers, RETURN_HEADERS))

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
        self, request: web.Request, upstream: aiohttp.ClientResponse, model: ModelLimits | None, strip_usage: bool
    ) -> web.StreamResponse:
        """Forward SSE events as soon as each is complete; on a broken engine connection, end the
        stream with an error event in vLLM's format, then `[DONE]`."""
        response = web.StreamResponse(headers={**_pick(upstream.headers, RETURN_HEADERS), "Cache-Control": "no-cache"})
        client = request.transport.get_extra_info("socket") if request.transport is not None else None
        if client is not None:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SEND_BUFFER)
        await response.prepare(request)
        pending = b""
        usage = None
        try:
            try:
                async for chunk in upstream.content.iter_any():
                    pending += chunk
                    end = pending.rfind(b"\n\n")
                    if end < 0:
                        continue
                    block, pending = pending[: end + 2], pending[end + 2 :]
                    if model is not None and b'"usage"' in block:
                        block, found = take_usage(block, strip_usage)
                        usage = found or usage
                    if block.strip():
                        await self._send(response, block)
                if pending:
                    await self._send(response, pending)
            except UPSTREAM_FAILURES:
                self.metrics.errors.labels("engine_lost").inc()
                event = error_body(
                    502,
                    "the engine connection broke mid-stream (the engine died or is restarting); "
                    "the output is incomplete: retry the request",
                    "EngineUnavailableError",
                )
                await self._send(response, b"data: " + json.dumps(event).encode() + b"\n\ndata: [DONE]\n\n")
                return response
            await response.write_eof()
        except ConnectionResetError:  # the client went away; leaving closes the engine request too
            return response
        except ClientStalled:  # the client stopped reading: drop it, and with it the engine request
            self.metrics.errors.labels("client_stalled").inc()
            if request.transport is not None:
                request.transport.abort()
            return response
        if model is not None:
            self.metrics.record_usage(model, usage)
        return response

    async def _send(self, response: web.StreamResponse, data: bytes) -> None:
        """Write to the client; ClientStalled when it accepts nothing for `send_timeout_s` (a write
        waits only once the socket and aiohttp's buffer are full)."""
        try:
            async with asyncio.timeout(self.send_timeout_s):
                await response.write(data)
        except TimeoutError:
            raise ClientStalled from None

    def _engine_down(self) -> web.Response:
        """The engine refused the connection: it is not listening (down, or not yet up)."""
        self.metrics.errors.labels("engine_unavailable").inc()
        return engine_down_response(self.retry_after_s)

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
