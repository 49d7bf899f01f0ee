"""OpenAI-compatible gateway in front of vLLM, with the `lcserve_*` exporter at `/metrics`.

Why a gateway: vLLM alone cannot say how many requests run past the length an adapter was
trained at, answers nothing useful while it restarts, and leaves its adapter load/unload
routes unauthenticated. The gateway knows each served model's training length (adapter
metadata, or the base's max_position_embeddings) and the engine's max_model_len, counts every
request against them from vLLM's own `usage`, rejects a prompt that cannot fit with a clear 400
before it reaches the engine, and answers 503 with Retry-After while the engine is down.

Embedding models (vLLM's pooling runner) get `/v1/embeddings`: every input counted against the
training length, and inputs longer than the model holds handled by its long-input policy
(`embeddings.py`: reject, truncate, chunk); a request that names the wrong kind of model for its
route gets a 400 that says which route serves it.

This module holds the lifecycle (its own thread and event loop) and the route table; each route
delegates to the part that owns the job: `catalog` (the served models and their limits),
`admission` (key, engine up, body, prompt fits), `security` (which adapter folders a key holder
may load), `relay` (forwarding, streams, `usage`), and the exporter (`metrics`, fed by
`engine_scrape`). Every refusal, aiohttp's own included (an unknown route, a body over the
limit), has vLLM's error shape.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

from aiohttp import web

from lcserve.errors import LcserveError

from .adapter_metrics import LoadedAdapter
from .admission import Admission, BadBody, content_type_problem, error_response, json_object, tokenize_all
from .capacity import Predictions
from .catalog import ModelCatalog
from .embeddings import POLICY_HEADER, BadInput, choose_policy, embedding_inputs
from .engine_scrape import EngineScrape
from .metrics import EngineStatus, GatewayMetrics, set_probe_results
from .relay import Relay
from .security import AdapterGate, Refusal
from .upstream import Upstream

# Far above any text prompt a 128k-token context can hold (a few MB as JSON), far below what
# would let a few clients exhaust the gateway's memory: it buffers each body to check it.
MAX_BODY_BYTES = 32 * 1024**2
# A client that accepts no byte of its stream for this long is gone or stuck: drop it, which
# aborts its engine request (otherwise it holds a sequence and KV cache until max_tokens).
SEND_TIMEOUT_S = 60.0
HTTP_ERROR_TYPES = {404: "NotFoundError", 405: "MethodNotAllowedError", 413: "BadRequestError"}
EXPOSITION_HEADERS = {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}


class GatewayError(LcserveError):
    """The gateway cannot listen where it was told to."""


class Gateway:
    """The proxy. Runs on its own thread and event loop (`start`/`stop`), so the supervisor and
    the CLI stay plain blocking code."""

    def __init__(
        self,
        engine: EngineStatus,
        *,
        api_key: str | None = None,
        training_lengths: dict[str, int] | None = None,
        retry_after_s: int = 5,
        read_timeout_s: float = 3600.0,
        allowed_adapter_dirs: tuple[str | Path, ...] = (),
        max_body_bytes: int = MAX_BODY_BYTES,
        send_timeout_s: float = SEND_TIMEOUT_S,
        embedding_policies: dict[str, str] | None = None,
        predictions: Predictions | None = None,
        upstream_api_key: str | None = None,
        adapter_snapshots: Path | None = None,
        merged_adapters: dict[str, LoadedAdapter] | None = None,
    ):
        self.merged_adapters = dict(merged_adapters or {})  # served name -> the adapter merged into it
        self.engine = engine
        self.training_lengths = dict(training_lengths or {})
        self.embedding_policies = dict(embedding_policies or {})  # served name -> long-input policy
        self.max_body_bytes = max_body_bytes
        self.metrics = GatewayMetrics(engine)
        self.metrics.predictions = predictions  # the plan's speed, published beside the observed
        self.upstream = Upstream(engine, read_timeout_s, upstream_api_key)
        self.admission = Admission(self.upstream, self.metrics, api_key=api_key, retry_after_s=retry_after_s)
        self.adapter_gate = AdapterGate(allowed_adapter_dirs, adapter_snapshots)
        self.relay = Relay(self.upstream, self.metrics, retry_after_s, send_timeout_s)
        self.catalog: ModelCatalog | None = None  # built per start by `app`: its lock belongs to one event loop
        self.engine_scrape: EngineScrape | None = None  # likewise
        self.host: str | None = None
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ---- lifecycle -------------------------------------------------------------------

    def app(self) -> web.Application:
        """The route table, with the parts that hold asyncio locks built afresh: a stopped gateway
        can start again on a new event loop."""
        self.catalog = ModelCatalog(self.upstream, self.training_lengths, self.embedding_policies, self.merged_adapters)
        self.engine_scrape = EngineScrape(self.upstream)
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[self._errors_in_vllm_shape])
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_post("/v1/embeddings", self._embed)
        app.router.add_get("/v1/models", self._proxy)
        app.router.add_post("/tokenize", self._proxy)
        app.router.add_post("/v1/load_lora_adapter", self._load_adapter)
        app.router.add_post("/v1/unload_lora_adapter", self._unload_adapter)
        app.router.add_post("/lcserve/probe_results", self._probe_results)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    async def _open(self, _app: web.Application) -> None:
        await self.upstream.open()

    async def _close(self, _app: web.Application) -> None:
        await self.upstream.close()

    def start(self, host: str = "127.0.0.1", port: int = 8080) -> None:
        """Listen on host:port (port 0: any free port) on a background thread; GatewayError when
        the address cannot be bound."""
        started = threading.Event()
        failure: list[OSError] = []

        def run() -> None:
            loop = _new_event_loop()
            asyncio.set_event_loop(loop)
            runner = web.AppRunner(
                self.app(), access_log=None, handle_signals=False, handler_cancellation=True, shutdown_timeout=5.0
            )
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
            raise GatewayError(
                f"the gateway cannot listen on {host}:{port} ({failure[0].strerror or failure[0]}); "
                "choose another --port (or --host), or stop what uses the port"
            )

    def stop(self) -> None:
        """Close the listening socket and open connections (streams get 5 s to finish)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop = None

    # ---- routes ----------------------------------------------------------------------

    @web.middleware
    async def _errors_in_vllm_shape(self, request: web.Request, handler) -> web.StreamResponse:
        """Refuse a declared body over the limit before reading it, and give aiohttp's own
        refusals (unknown route, wrong method, a chunked body over the limit) vLLM's error shape."""
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            return self._too_large(request.content_length)
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return self._too_large(None)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            message = {
                404: f"{request.path}: no such route on the lcserve gateway",
                405: f"{request.method} {request.path}: method not allowed (allowed: {e.headers.get('Allow', 'none')})",
            }.get(e.status, e.reason)
            return error_response(e.status, message, HTTP_ERROR_TYPES.get(e.status, "BadRequestError"))

    def _too_large(self, size: int | None) -> web.Response:
        self.metrics.errors.labels("body_too_large").inc()
        said = f"is {size} bytes" if size is not None else "is larger than that"
        response = error_response(
            413,
            f"the request body {said}; the gateway accepts at most {self.max_body_bytes} bytes: send a shorter prompt",
            "BadRequestError",
        )
        response.force_close()  # do not read the rest of a body we will not use
        return response

    async def _json_body(self, request: web.Request) -> dict | web.Response:
        """The body as a JSON object, or the 400 that says what is wrong with it."""
        problem = content_type_problem(request.headers.get("Content-Type"))
        if problem:
            self.metrics.errors.labels("bad_body").inc()
            return error_response(400, problem, "BadRequestError")
        try:
            return json_object(await request.read())
        except BadBody as e:
            self.metrics.errors.labels("bad_body").inc()
            return error_response(400, str(e), "BadRequestError")

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        """/v1/completions and /v1/chat/completions."""
        refusal = self.admission.check_key(request) or self.admission.check_engine()
        if refusal:
            return refusal
        chat = request.path == "/v1/chat/completions"
        body = await self._json_body(request)
        if isinstance(body, web.Response):
            return body
        raw = await request.read()  # aiohttp keeps the body it read
        refusal = self.admission.check_request(request, body)
        if refusal:
            return refusal
        if not isinstance(body.get("model"), str | None):
            return error_response(
                400,
                f"`model` is {json.dumps(body['model'])[:100]}; it must be a string naming a "
                "served model (GET /v1/models lists them)",
                "BadRequestError",
                "model",
            )
        model = await self.catalog.model(body.get("model"))
        if model is not None and model.task == "embed":
            return self._bad_input(
                f"model '{model.name}' is an embedding model: it serves /v1/embeddings, not {request.path}; "
                "send the text to /v1/embeddings, or name a generative model (GET /v1/models lists them)",
                "model",
            )
        if model is not None:
            refusal = await self.admission.check_context(model, body, len(raw), chat)
            if refusal:
                return refusal
        return await self.relay.generate(request, body, raw, model)

    async def _embed(self, request: web.Request) -> web.Response:
        """/v1/embeddings: the inputs checked, counted and handled by the model's long-input policy."""
        refusal = self.admission.check_key(request) or self.admission.check_engine()
        if refusal:
            return refusal
        body = await self._json_body(request)
        if isinstance(body, web.Response):
            return body
        if not isinstance(body.get("model"), str | None):
            return self._bad_input(
                "`model` must be a string naming a served model (GET /v1/models lists them)", "model"
            )
        model = await self.catalog.model(body.get("model"))
        if model is None:
            return await self.relay.forward(request)  # vLLM answers its own 404 for an unknown model
        if model.task != "embed":
            return self._bad_input(
                f"model '{model.name}' is a generative model: it serves /v1/completions and /v1/chat/completions, "
                "not /v1/embeddings; name an embedding model (GET /v1/models lists them), or serve one with "
                "`lcserve serve $(lcserve embedded path --embedding)`",
                "model",
            )
        try:
            inputs = embedding_inputs(body)
            policy = choose_policy(model.policy, request.headers.get(POLICY_HEADER))
        except BadInput as e:
            return self._bad_input(str(e), "input")
        ids = await tokenize_all(self.upstream, model.name, inputs)
        if ids is None:  # the policy needs every count: answer plainly rather than skip it
            self.metrics.errors.labels("engine_lost").inc()
            return error_response(
                502,
                "the engine did not count the inputs' tokens (/tokenize failed; the gateway log says why), so "
                f"the long-input policy '{policy}' cannot be applied: retry the request",
                "EngineUnavailableError",
                headers={"Retry-After": str(self.admission.retry_after_s), POLICY_HEADER: policy},
            )
        return await self.relay.embed(request, body, model, inputs, ids, policy)

    def _bad_input(self, message: str, param: str) -> web.Response:
        self.metrics.errors.labels("bad_input").inc()
        return error_response(400, message, "BadRequestError", param)

    async def _proxy(self, request: web.Request) -> web.Response:
        """/v1/models, /tokenize: forwarded as they are, once a body is known to be a JSON object."""
        refusal = self.admission.check_key(request) or self.admission.check_engine()
        if refusal:
            return refusal
        if request.method == "POST":
            body = await self._json_body(request)
            if isinstance(body, web.Response):
                return body
        return await self.relay.forward(request)

    async def _load_adapter(self, request: web.Request) -> web.Response:
        """vLLM's runtime adapter load, for a folder the operator allows and lcserve's inspection
        passes (see security.py); vLLM gets the resolved path."""
        refusal = self.admission.check_adapter_route(request) or self.admission.check_engine()
        if refusal:
            return refusal
        body = await self._json_body(request)
        if isinstance(body, web.Response):
            return body
        await self.catalog.models()  # the base's folder, to inspect the adapter against
        try:
            admitted = await asyncio.get_running_loop().run_in_executor(
                None, self.adapter_gate.admit, body, self.catalog.base_dir
            )
        except Refusal as r:
            self.metrics.errors.labels("adapter_refused").inc()
            return error_response(r.status, r.message, r.err_type, r.param)
        return await self._adapter_change(request, json.dumps(admitted).encode())

    async def _unload_adapter(self, request: web.Request) -> web.Response:
        refusal = self.admission.check_adapter_route(request) or self.admission.check_engine()
        if refusal:
            return refusal
        body = await self._json_body(request)
        if isinstance(body, web.Response):
            return body
        return await self._adapter_change(request, await request.read())

    async def _adapter_change(self, request: web.Request, data: bytes) -> web.Response:
        """Forward a load or unload; the served models change with it."""
        response = await self.relay.forward(request, data)
        if response.status == 200:
            self.catalog.mark_stale()
        return response

    async def _probe_results(self, request: web.Request) -> web.Response:
        """Publish probe results from another process: {"samples": [[name, {labels}, value], ...]}."""
        refusal = self.admission.check_key(request)
        if refusal:
            return refusal
        body = await self._json_body(request)
        if isinstance(body, web.Response):
            return body
        try:
            samples = [(name, labels, value) for name, labels, value in body["samples"]]
            set_probe_results(samples)
        except (ValueError, KeyError, TypeError) as e:
            return error_response(
                400,
                f'probe results must be {{"samples": [[name, {{labels}}, value], ...]}}: {e}',
                "BadRequestError",
                "samples",
            )
        return web.json_response({"published": len(samples)})

    async def _health(self, request: web.Request) -> web.Response:
        """Not a request to count: a load balancer asks it every few seconds."""
        return self.admission.check_engine(count=False) or await self.relay.forward(request)

    async def _metrics(self, request: web.Request) -> web.Response:
        self.metrics.set_models(list((await self.catalog.models()).values()))  # model series from the first scrape on
        self.metrics.observe(await self.engine_scrape.latest())
        return web.Response(body=self.metrics.render(), headers=EXPOSITION_HEADERS)


def _new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (vLLM depends on it), the standard loop otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
