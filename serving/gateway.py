"""OpenAI-compatible gateway in front of vLLM, with the `lcserve_*` exporter at `/metrics`.

Why a gateway: vLLM alone cannot say how many requests run past the length an adapter was
trained at, answers nothing useful while it restarts, and leaves its adapter load/unload
routes unauthenticated. The gateway knows each served model's training length (adapter
metadata, or the base's max_position_embeddings) and the engine's max_model_len, counts every
request against them from vLLM's own `usage`, rejects a prompt that cannot fit with a clear 400
before it reaches the engine, and answers 503 with Retry-After while the engine is down.

Streams pass through event by event, unbuffered. To read `usage` from a stream the gateway
asks vLLM for it (`stream_options.include_usage`) and drops that extra chunk again when the
client did not ask for it, so clients see exactly what vLLM would have sent them.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
from pathlib import Path

import aiohttp
from aiohttp import web

from lcserve.adapters.training_length import training_seq_len
from lcserve.errors import LcserveError

from .metrics import EngineStatus, GatewayMetrics, ModelLimits, parse_engine_metrics, set_probe_results

# A token covers at least one byte of UTF-8 text (byte-level BPE, SentencePiece byte fallback),
# and the JSON body holds every prompt byte (escapes only add). So a prompt has at most
# len(body) + this many tokens: the allowance covers BOS, the chat template's markers and
# system text. Below that bound no /tokenize round trip is needed.
TEMPLATE_ALLOWANCE = 512
METRICS_TTL_S = 1.0  # scrapes within a second reuse the engine's last /metrics
MAX_BODY_BYTES = 256 * 1024**2
FORWARD_HEADERS = ("Content-Type", "Accept", "X-Request-Id")
RETURN_HEADERS = ("Content-Type", "X-Request-Id")
CHAT_TOKENIZE_KEYS = ("messages", "tools", "chat_template", "chat_template_kwargs", "add_generation_prompt",
                      "continue_final_message", "add_special_tokens")
UPSTREAM_FAILURES = (aiohttp.ClientError, asyncio.TimeoutError)


class GatewayError(LcserveError):
    """The gateway cannot listen where it was told to."""


def base_training_len(model_dir: Path) -> int | None:
    """A base model's training length: max_position_embeddings of its config.json (text_config
    for multimodal configs); None when the folder has no readable config."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    value = text.get("max_position_embeddings") or config.get("max_position_embeddings")
    return value if isinstance(value, int) else None


def model_limits(entry: dict, overrides: dict[str, int]) -> ModelLimits:
    """Limits of one `/v1/models` entry. vLLM sets `root` to the base's folder, or for an adapter
    (`parent` set) to the adapter's folder; an explicit override wins over both."""
    name = entry["id"]
    training = overrides.get(name)
    root = Path(entry["root"]) if entry.get("root") else None
    if training is None and root is not None and root.is_dir():
        training = training_seq_len(root) if entry.get("parent") else base_training_len(root)
    max_len = entry.get("max_model_len")
    return ModelLimits(name, training, max_len if isinstance(max_len, int) else None)


def requested_output_tokens(body: dict, chat: bool) -> int:
    """Output tokens the request asks room for (at least the one token any generation needs)."""
    value = body.get("max_completion_tokens") if chat else None
    if value is None:
        value = body.get("max_tokens")
    return value if isinstance(value, int) and value > 0 else 1


def overflow_message(model: ModelLimits, prompt_tokens: int, output_tokens: int) -> str | None:
    """The 400 message when prompt + requested output exceeds the engine's max_model_len, else None."""
    limit = model.max_model_len
    if limit is None or prompt_tokens + output_tokens <= limit:
        return None
    return (f"model '{model.name}' serves at most max_model_len={limit} tokens, but the prompt has "
            f"{prompt_tokens} tokens and {output_tokens} output tokens are requested "
            f"({prompt_tokens + output_tokens} in total): shorten the prompt by at least "
            f"{prompt_tokens + output_tokens - limit} tokens, lower max_tokens, or serve with a larger --max-model-len")


def error_body(status: int, message: str, err_type: str, param: str | None = None) -> dict:
    """vLLM's (and OpenAI's) error shape, so clients parse gateway errors like engine errors."""
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


def _error(status: int, message: str, err_type: str, param: str | None = None,
           headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(error_body(status, message, err_type, param), status=status, headers=headers)


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


class Gateway:
    """The proxy. Runs on its own thread and event loop (`start`/`stop`), so the supervisor and
    the CLI stay plain blocking code."""

    def __init__(self, engine: EngineStatus, *, api_key: str | None = None,
                 training_lengths: dict[str, int] | None = None, retry_after_s: int = 5,
                 read_timeout_s: float = 3600.0):
        self.engine = engine
        self.api_key = api_key or None
        self.training_lengths = dict(training_lengths or {})
        self.retry_after_s = retry_after_s
        self.read_timeout_s = read_timeout_s
        self.metrics = GatewayMetrics(engine)
        self.host: str | None = None
        self.port: int | None = None
        self._session: aiohttp.ClientSession | None = None
        self._models: dict[str, ModelLimits] = {}
        self._models_generation = -1
        self._models_stale = False
        self._models_lock: asyncio.Lock | None = None
        self._snapshot_at = float("-inf")
        self._snapshot_lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ---- lifecycle -------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_get("/v1/models", self._proxy)
        app.router.add_post("/tokenize", self._proxy)
        app.router.add_post("/v1/load_lora_adapter", self._adapter_route)
        app.router.add_post("/v1/unload_lora_adapter", self._adapter_route)
        app.router.add_post("/lcserve/probe_results", self._probe_results)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    async def _open(self, _app: web.Application) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=self.read_timeout_s))
        self._models_lock = asyncio.Lock()
        self._snapshot_lock = asyncio.Lock()

    async def _close(self, _app: web.Application) -> None:
        await self._session.close()

    def start(self, host: str = "127.0.0.1", port: int = 8080) -> None:
        """Listen on host:port (port 0: any free port) on a background thread; GatewayError when
        the address cannot be bound."""
        started = threading.Event()
        failure: list[OSError] = []

        def run() -> None:
            loop = _new_event_loop()
            asyncio.set_event_loop(loop)
            runner = web.AppRunner(self.app(), access_log=None, handle_signals=False,
                                   handler_cancellation=True, shutdown_timeout=5.0)
            loop.run_until_complete(runner.setup())
            try:
                loop.run_until_complete(web.TCPSite(runner, host, port, backlog=1024).start())
            except OSError as e:
                failure.append(e)
                loop.run_until_complete(runner.cleanup())
                loop.close()
                started.set()
                return
            self.host, self.port = host, runner.addresses[0][1]
            self._loop = loop
            started.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="lcserve-gateway", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            raise GatewayError(f"the gateway cannot listen on {host}:{port} ({failure[0].strerror or failure[0]}); "
                               "choose another --gateway-port or stop what uses it")

    def stop(self) -> None:
        """Close the listening socket and open connections (streams get 5 s to finish)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop = None

    # ---- routes ----------------------------------------------------------------------

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        """/v1/completions and /v1/chat/completions."""
        if not self._authorized(request):
            return self._unauthorized()
        if not self.engine.up:
            return self._unavailable()
        chat = request.path == "/v1/chat/completions"
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return _error(400, "the request body is not a JSON object", "BadRequestError")
        model = await self._model(body.get("model"))
        if model is not None:
            output = requested_output_tokens(body, chat)
            could_overflow = model.max_model_len is not None and len(raw) + TEMPLATE_ALLOWANCE + output > model.max_model_len
            if could_overflow and body.get("truncate_prompt_tokens") is None:
                prompt_tokens = await self._count_prompt(body, chat, model.name)
                message = None if prompt_tokens is None else overflow_message(model, prompt_tokens, output)
                if message:
                    self.metrics.errors.labels("context_overflow").inc()
                    return _error(400, message, "BadRequestError", "messages" if chat else "prompt")
            self.metrics.requests.labels(model.name).inc()
        strip_usage = False
        if body.get("stream") is True and model is not None:
            options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
            if not options.get("include_usage"):
                body["stream_options"] = {**options, "include_usage": True}
                raw = json.dumps(body).encode()
                strip_usage = True
        try:
            upstream = await self._session.post(self.engine.url + request.path, data=raw,
                                                headers=_pick(request.headers, FORWARD_HEADERS))
        except aiohttp.ClientConnectorError:
            return self._unavailable()
        except UPSTREAM_FAILURES:
            return self._lost()
        async with upstream:
            if upstream.status == 200 and upstream.content_type == "text/event-stream":
                return await self._relay_stream(request, upstream, model, strip_usage)
            try:
                data = await upstream.read()
            except UPSTREAM_FAILURES:
                return self._lost()
            if upstream.status == 200 and model is not None:
                try:
                    self._record(model, json.loads(data).get("usage"))
                except (ValueError, AttributeError):
                    pass
            return web.Response(body=data, status=upstream.status, headers=_pick(upstream.headers, RETURN_HEADERS))

    async def _relay_stream(self, request: web.Request, upstream: aiohttp.ClientResponse,
                            model: ModelLimits | None, strip_usage: bool) -> web.StreamResponse:
        """Forward SSE events as soon as each is complete; on a broken engine connection, end the
        stream with an error event in vLLM's format, then `[DONE]`."""
        response = web.StreamResponse(headers={**_pick(upstream.headers, RETURN_HEADERS), "Cache-Control": "no-cache"})
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
                    block, pending = pending[:end + 2], pending[end + 2:]
                    if model is not None and b'"usage"' in block:
                        block, found = take_usage(block, strip_usage)
                        usage = found or usage
                    if block.strip():
                        await response.write(block)
                if pending:
                    await response.write(pending)
            except UPSTREAM_FAILURES:
                self.metrics.errors.labels("engine_lost").inc()
                event = error_body(502, "the engine connection broke mid-stream (the engine died or is restarting); "
                                   "the output is incomplete: retry the request", "EngineUnavailableError")
                await response.write(b"data: " + json.dumps(event).encode() + b"\n\ndata: [DONE]\n\n")
                return response
            await response.write_eof()
        except ConnectionResetError:  # the client went away; leaving closes the engine request too
            return response
        if model is not None:
            self._record(model, usage)
        return response

    async def _proxy(self, request: web.Request) -> web.Response:
        """/v1/models, /tokenize: forwarded as they are."""
        if not self._authorized(request):
            return self._unauthorized()
        return await self._forward(request)

    async def _adapter_route(self, request: web.Request) -> web.Response:
        """vLLM's runtime adapter load/unload, which it leaves unauthenticated: only with a key."""
        if self.api_key is None:
            return _error(403, f"{request.path} needs an API key: vLLM does not authenticate adapter "
                          "load/unload, so the gateway only exposes it when started with --api-key",
                          "PermissionDeniedError")
        if not self._authorized(request):
            return self._unauthorized()
        response = await self._forward(request)
        if response.status == 200:
            self._models_stale = True
        return response

    async def _probe_results(self, request: web.Request) -> web.Response:
        """Publish probe results from another process: {"samples": [[name, {labels}, value], ...]}."""
        if not self._authorized(request):
            return self._unauthorized()
        try:
            samples = [(name, labels, value) for name, labels, value in (await request.json())["samples"]]
            set_probe_results(samples)
        except (ValueError, KeyError, TypeError) as e:
            return _error(400, f"probe results must be {{\"samples\": [[name, {{labels}}, value], ...]}}: {e}",
                          "BadRequestError", "samples")
        return web.json_response({"published": len(samples)})

    async def _health(self, request: web.Request) -> web.Response:
        if not self.engine.up:
            return self._unavailable(count=False)
        return await self._forward(request)

    async def _metrics(self, request: web.Request) -> web.Response:
        await self._model(None)  # model gauges exist from the first scrape on
        await self._refresh_snapshot()
        return web.Response(body=self.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    # ---- helpers ---------------------------------------------------------------------

    async def _forward(self, request: web.Request) -> web.Response:
        if not self.engine.up:
            return self._unavailable()
        try:
            async with self._session.request(request.method, self.engine.url + request.path,
                                             data=await request.read(),
                                             headers=_pick(request.headers, FORWARD_HEADERS)) as upstream:
                data = await upstream.read()
                return web.Response(body=data, status=upstream.status, headers=_pick(upstream.headers, RETURN_HEADERS))
        except aiohttp.ClientConnectorError:
            return self._unavailable()
        except UPSTREAM_FAILURES:
            return self._lost()

    def _authorized(self, request: web.Request) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    def _unauthorized(self) -> web.Response:
        return _error(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with the key "
                      "the gateway was started with (--api-key)", "AuthenticationError",
                      headers={"WWW-Authenticate": "Bearer"})

    def _unavailable(self, count: bool = True) -> web.Response:
        if count:
            self.metrics.errors.labels("engine_unavailable").inc()
        return _error(503, f"the engine is down or restarting; retry in {self.retry_after_s} s",
                      "ServiceUnavailableError", headers={"Retry-After": str(self.retry_after_s)})

    def _lost(self) -> web.Response:
        self.metrics.errors.labels("engine_lost").inc()
        return _error(502, "the engine connection broke before the response was complete (the engine died or "
                      "is restarting); retry the request", "EngineUnavailableError",
                      headers={"Retry-After": str(self.retry_after_s)})

    def _record(self, model: ModelLimits, usage: dict | None) -> None:
        if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
            prompt = usage["prompt_tokens"]
            total = usage.get("total_tokens")
            self.metrics.record(model, prompt, total if isinstance(total, int) else prompt)

    async def _model(self, name: str | None) -> ModelLimits | None:
        """The served model a request names (vLLM's default when none: the first, the base)."""
        models = await self._served_models()
        if name is None:
            return next(iter(models.values()), None)
        return models.get(name)

    async def _served_models(self) -> dict[str, ModelLimits]:
        """`/v1/models`, re-read after each engine (re)start and adapter load/unload."""
        if self._models_generation == self.engine.generation and not self._models_stale:
            return self._models
        async with self._models_lock:
            generation = self.engine.generation
            if self._models_generation == generation and not self._models_stale:
                return self._models
            try:
                async with self._session.get(self.engine.url + "/v1/models",
                                             timeout=aiohttp.ClientTimeout(total=10)) as r:
                    entries = (await r.json())["data"] if r.status == 200 else None
            except (*UPSTREAM_FAILURES, ValueError, KeyError):
                entries = None
            if entries is None:
                return self._models
            self._models_stale = False
            self._models = {e["id"]: model_limits(e, self.training_lengths) for e in entries if "id" in e}
            self._models_generation = generation
            self.metrics.set_models(list(self._models.values()))
            return self._models

    async def _count_prompt(self, body: dict, chat: bool, model: str) -> int | None:
        """Exact prompt tokens with the served tokenizer (vLLM /tokenize); the longest prompt of a
        batch. None when the engine cannot count it (vLLM then answers the request itself)."""
        counts: list[int] = []
        requests: list[dict] = []
        if chat:
            requests.append({"model": model, **{k: body[k] for k in CHAT_TOKENIZE_KEYS if k in body}})
        else:
            prompt = body.get("prompt")
            single = isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int))
            special = {"add_special_tokens": body["add_special_tokens"]} if "add_special_tokens" in body else {}
            for p in [prompt] if single else prompt if isinstance(prompt, list) else []:
                if isinstance(p, str):
                    requests.append({"model": model, "prompt": p, **special})
                elif isinstance(p, list):
                    counts.append(len(p))  # token ids
                else:
                    return None
        for tokenize_body in requests:
            try:
                async with self._session.post(self.engine.url + "/tokenize", json=tokenize_body) as r:
                    if r.status != 200:
                        return None
                    counts.append(int((await r.json())["count"]))
            except (*UPSTREAM_FAILURES, ValueError, KeyError, TypeError):
                return None
        return max(counts, default=None)

    async def _refresh_snapshot(self) -> None:
        """Read the engine's /metrics at most once per METRICS_TTL_S, however often Prometheus scrapes."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._snapshot_at < METRICS_TTL_S:
            return
        async with self._snapshot_lock:
            if loop.time() - self._snapshot_at < METRICS_TTL_S:
                return
            snapshot = None
            if self.engine.up:
                try:
                    async with self._session.get(self.engine.url + "/metrics",
                                                 timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status == 200:
                            snapshot = parse_engine_metrics(await r.text())
                except UPSTREAM_FAILURES:
                    pass
            self.metrics.snapshot = snapshot
            self._snapshot_at = loop.time()


def _pick(headers, names: tuple[str, ...]) -> dict[str, str]:
    return {name: headers[name] for name in names if name in headers}


def _new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (vLLM depends on it), the standard loop otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
