"""What the gateway refuses before a request reaches the engine, and how it says so.

vLLM leaves its runtime adapter routes unauthenticated and answers nothing useful while it
restarts; a prompt that cannot fit max_model_len is cheaper to refuse here, with a message that
says by how much, than to send. So: 401 without the API key, 403 for adapter load/unload when no
key is configured, 503 with Retry-After while the engine is down, 400 when prompt + requested
output exceeds max_model_len, and 400 for a request vLLM would refuse anyway (an empty body, a
Content-Type other than JSON, no messages or prompt, max_tokens below 1). Every refusal has vLLM's
(OpenAI's) error shape, so clients parse it like an engine error, and the engine-side ones count in
`lcserve_gateway_errors_total`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging

from aiohttp import web

from .metrics import EngineStatus, GatewayMetrics, ModelLimits
from .upstream import UPSTREAM_FAILURES, Upstream

# A token covers at least one byte of UTF-8 text (byte-level BPE, SentencePiece byte fallback),
# and the JSON body holds every prompt byte (escapes only add). So a prompt has at most
# len(body) + this many tokens: the allowance covers BOS, the chat template's markers and
# system text. Below that bound no /tokenize round trip is needed.
TEMPLATE_ALLOWANCE = 512
# The chat request fields vLLM's /tokenize takes to render the prompt exactly as it will be served.
CHAT_TOKENIZE_KEYS = (
    "messages",
    "tools",
    "chat_template",
    "chat_template_kwargs",
    "add_generation_prompt",
    "continue_final_message",
    "add_special_tokens",
)


def error_body(status: int, message: str, err_type: str, param: str | None = None) -> dict:
    """vLLM's (and OpenAI's) error shape, so clients parse gateway errors like engine errors."""
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


def error_response(
    status: int, message: str, err_type: str, param: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(error_body(status, message, err_type, param), status=status, headers=headers)


def engine_down_response(retry_after_s: int) -> web.Response:
    """The 503 while the engine is down or restarting (also when it refuses the connection)."""
    return error_response(
        503,
        f"the engine is down or restarting; retry in {retry_after_s} s",
        "ServiceUnavailableError",
        headers={"Retry-After": str(retry_after_s)},
    )


# Far deeper than any OpenAI request (tool schemas included) nests; deeper bodies are refused
# before they reach code that recurses over them (json.dumps here, pydantic in vLLM).
MAX_JSON_DEPTH = 128


class BadBody(ValueError):
    """A request body that is not one JSON object; the message says what is wrong and the fix."""


def json_object(raw: bytes) -> dict:
    """The request body as a JSON object; BadBody naming the problem otherwise (invalid UTF-8,
    invalid JSON, nesting deeper than Python's parser goes, another JSON type)."""
    if not raw.strip():
        raise BadBody('the request body is empty; send one JSON object such as {"model": ..., "prompt": ...}')
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadBody(
            f"the request body is not valid UTF-8 (byte {e.start}: {raw[e.start : e.start + 1]!r}); "
            "send JSON encoded as UTF-8"
        ) from None
    try:
        body = json.loads(text)
        too_deep = nesting_exceeds(body, MAX_JSON_DEPTH)
    except RecursionError:
        too_deep = True
    except ValueError as e:
        raise BadBody(f"the request body is not valid JSON ({e}); send one JSON object") from None
    if too_deep:
        raise BadBody(
            f"the request body nests JSON arrays or objects more than {MAX_JSON_DEPTH} levels deep; "
            "send a flatter JSON object"
        ) from None
    if not isinstance(body, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(body), "a number")
        raise BadBody(
            f"the request body is {kind}, not a JSON object; "
            'send one JSON object such as {"model": ..., "prompt": ...}'
        )
    return body


def content_type_problem(content_type: str | None) -> str | None:
    """Why a declared Content-Type is refused (vLLM takes application/json only), or None. A request
    that declares none is left to the engine, which answers it in its own words."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if not media_type or media_type == "application/json":
        return None
    return (
        f"Content-Type {media_type} is not accepted: vLLM reads application/json only; "
        "send the body as JSON with the header 'Content-Type: application/json'"
    )


def request_problem(body: dict, chat: bool) -> str | None:
    """What a generation request lacks or gets wrong that vLLM would refuse anyway (no messages or
    prompt, no room for one output token), said with the fix; None when it may go on. Fields of the
    wrong type are the engine's to judge: its message quotes its own schema."""
    if chat and "messages" not in body:
        return 'the chat request has no `messages`; send "messages": [{"role": "user", "content": "..."}]'
    if chat and not isinstance(body["messages"], list):
        return f'`messages` is {json.dumps(body["messages"])[:60]}; send a list such as [{{"role": "user", "content": "..."}}]'
    if not chat and body.get("prompt") is None and body.get("prompt_embeds") is None:
        return (
            'the completion request has no `prompt`; send "prompt": "..." (or token ids), or use /v1/chat/completions'
        )
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            return f"`{key}` is {value}; it must be at least 1 (the most tokens to generate), or left out"
    return None


def nesting_exceeds(value, limit: int) -> bool:
    """Whether JSON arrays/objects nest more than `limit` levels (walked without recursion)."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            pending.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def requested_output_tokens(body: dict, chat: bool) -> int:
    """Output tokens the request asks room for (at least the one token any generation needs)."""
    value = body.get("max_completion_tokens") if chat else None
    if value is None:
        value = body.get("max_tokens")
    return value if isinstance(value, int) and value > 0 else 1


def may_overflow(model: ModelLimits, body_bytes: int, output_tokens: int) -> bool:
    """Whether the prompt could be too long for max_model_len: only then is it worth counting
    its tokens (see TEMPLATE_ALLOWANCE)."""
    limit = model.max_model_len
    return limit is not None and body_bytes + TEMPLATE_ALLOWANCE + output_tokens > limit


def overflow_message(model: ModelLimits, prompt_tokens: int, output_tokens: int) -> str | None:
    """The 400 message when prompt + requested output exceeds the engine's max_model_len, else None."""
    limit = model.max_model_len
    if limit is None or prompt_tokens + output_tokens <= limit:
        return None
    return (
        f"model '{model.name}' serves at most max_model_len={limit} tokens, but the prompt has "
        f"{prompt_tokens} tokens and {output_tokens} output tokens are requested "
        f"({prompt_tokens + output_tokens} in total): shorten the prompt by at least "
        f"{prompt_tokens + output_tokens - limit} tokens, lower max_tokens, or serve with a larger --max-model-len"
    )


def tokenize_bodies(body: dict, chat: bool, model: str) -> tuple[list[dict], list[int]] | None:
    """The vLLM /tokenize requests that count a request's prompts (one per prompt of a batch),
    and the counts already known (prompts given as token ids). None when a prompt has a shape
    only the engine can judge."""
    if chat:
        return [{"model": model, **{k: body[k] for k in CHAT_TOKENIZE_KEYS if k in body}}], []
    prompt = body.get("prompt")
    single = isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int))
    special = {"add_special_tokens": body["add_special_tokens"]} if "add_special_tokens" in body else {}
    requests: list[dict] = []
    counts: list[int] = []
    for p in [prompt] if single else prompt if isinstance(prompt, list) else []:
        if isinstance(p, str):
            requests.append({"model": model, "prompt": p, **special})
        elif isinstance(p, list):
            counts.append(len(p))  # token ids
        else:
            return None
    return requests, counts


log = logging.getLogger("lcserve.serving")
# /tokenize calls in flight for one embeddings request (one per input: vLLM's takes one prompt).
TOKENIZE_CONCURRENCY = 8


async def tokenize(upstream: Upstream, model: str, text: str, special: bool = True) -> list[int] | None:
    """A text's token ids by the served tokenizer (vLLM /tokenize, which has no length limit); None
    when the engine cannot answer."""
    body = {"model": model, "prompt": text, "add_special_tokens": special}
    try:
        async with upstream.session.post(upstream.url("/tokenize"), json=body) as r:
            if r.status != 200:
                log.warning("/tokenize answered %s: %s", r.status, (await r.text())[:300])
                return None
            return list((await r.json())["tokens"])
    except (*UPSTREAM_FAILURES, ValueError, KeyError, TypeError) as e:
        log.warning("/tokenize failed: %r", e)
        return None


async def tokenize_all(upstream: Upstream, model: str, inputs: list, special: bool = True) -> list[list[int]] | None:
    """Token ids of every embeddings input (token-id inputs as they are); None when one cannot be counted."""
    gate = asyncio.Semaphore(TOKENIZE_CONCURRENCY)

    async def one(item):
        if isinstance(item, list):
            return item
        async with gate:
            return await tokenize(upstream, model, item, special)

    ids = await asyncio.gather(*(one(item) for item in inputs))
    return None if any(i is None for i in ids) else ids


class Admission:
    """The checks, each returning the refusal to send back, or None to go on."""

    def __init__(
        self, upstream: Upstream, metrics: GatewayMetrics, *, api_key: str | None = None, retry_after_s: int = 5
    ):
        self.upstream = upstream
        self.metrics = metrics
        self.api_key = api_key or None
        self.retry_after_s = retry_after_s

    @property
    def engine(self) -> EngineStatus:
        return self.upstream.engine

    def check_key(self, request: web.Request) -> web.Response | None:
        """The 401 when a key is configured and the request does not carry it."""
        if self.api_key is None:
            return None
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            return None
        return error_response(
            401,
            "missing or wrong API key: send the header 'Authorization: Bearer <key>' with "
            "the key the gateway was started with (LCSERVE_API_KEY, --api-key-file or --api-key)",
            "AuthenticationError",
            headers={"WWW-Authenticate": "Bearer"},
        )

    def check_adapter_route(self, request: web.Request) -> web.Response | None:
        """vLLM's runtime adapter load/unload, which it leaves unauthenticated: 403 unless the
        gateway has a key, then the key check."""
        if self.api_key is None:
            return error_response(
                403,
                f"{request.path} needs an API key: vLLM does not authenticate adapter "
                "load/unload, so the gateway only exposes it when started with a key "
                "(LCSERVE_API_KEY, --api-key-file or --api-key)",
                "PermissionDeniedError",
            )
        return self.check_key(request)

    def check_request(self, request: web.Request, body: dict) -> web.Response | None:
        """The 400 for a generation request vLLM would refuse (see `request_problem`)."""
        problem = request_problem(body, chat=request.path == "/v1/chat/completions")
        if problem is None:
            return None
        self.metrics.errors.labels("bad_input").inc()
        return error_response(400, problem, "BadRequestError")

    def check_engine(self, count: bool = True) -> web.Response | None:
        """The 503 while the engine is down; `count=False` for health checks, which are not requests."""
        return None if self.engine.up else self.engine_down(count)

    def engine_down(self, count: bool = True) -> web.Response:
        if count:
            self.metrics.errors.labels("engine_unavailable").inc()
        return engine_down_response(self.retry_after_s)

    async def check_context(self, model: ModelLimits, body: dict, body_bytes: int, chat: bool) -> web.Response | None:
        """The 400 when prompt + requested output exceeds the model's max_model_len. None when it
        fits, when vLLM truncates the prompt itself, or when only the engine can count it."""
        output = requested_output_tokens(body, chat)
        if not may_overflow(model, body_bytes, output) or body.get("truncate_prompt_tokens") is not None:
            return None
        prompt_tokens = await self.count_prompt(body, chat, model.name)
        message = None if prompt_tokens is None else overflow_message(model, prompt_tokens, output)
        if message is None:
            return None
        self.metrics.errors.labels("context_overflow").inc()
        return error_response(400, message, "BadRequestError", "messages" if chat else "prompt")

    async def count_prompt(self, body: dict, chat: bool, model: str) -> int | None:
        """Exact prompt tokens with the served tokenizer (vLLM /tokenize); the longest prompt of a
        batch. None when the engine cannot count it (vLLM then answers the request itself)."""
        planned = tokenize_bodies(body, chat, model)
        if planned is None:
            return None
        requests, counts = planned
        for tokenize_body in requests:
            try:
                async with self.upstream.session.post(self.upstream.url("/tokenize"), json=tokenize_body) as r:
                    if r.status != 200:
                        return None
                    counts.append(int((await r.json())["count"]))
            except (*UPSTREAM_FAILURES, ValueError, KeyError, TypeError):
                return None
        return max(counts, default=None)
