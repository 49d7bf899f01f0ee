"""Gateway behaviour under faults a real engine cannot produce on demand (dying mid-stream,
mid-body, a closed port behind an "up" engine), its auth, its pre-check and its pure helpers.
The same paths against the real vLLM are in tests/integration/test_serving_gateway.py."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections import Counter
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from lcserve.serving import gateway as gw
from lcserve.serving.metrics import ModelLimits
from tests.unit.test_metrics import VLLM_032_METRICS, value

MAX_MODEL_LEN = 1000


class FakeEngineForFaultInjection:
    """Speaks just enough of vLLM's API (same JSON and SSE shapes) to break on demand:
    `die_after_events` drops the connection in the middle of a stream, `die_mid_body` in the
    middle of a JSON body. Its tokenizer counts words (+1 for BOS)."""

    def __init__(self):
        self.calls: Counter[str] = Counter()
        self.bodies: list[dict] = []
        self.die_after_events: int | None = None
        self.die_mid_body = False
        self.models = [{"id": "base", "object": "model", "root": None, "parent": None, "max_model_len": MAX_MODEL_LEN}]
        self._loop = asyncio.new_event_loop()
        self._runner = None
        self.port = None

    def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._ok)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_post("/v1/completions", self._complete)
        app.router.add_post("/v1/chat/completions", self._complete)
        app.router.add_post("/v1/load_lora_adapter", self._load)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, handle_signals=False)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = self._runner.addresses[0][1]
        threading.Thread(target=self._loop.run_forever, daemon=True).start()

    def stop(self) -> None:
        async def shutdown():
            await self._runner.cleanup()
            asyncio.get_running_loop().stop()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _ok(self, request):
        self.calls["health"] += 1
        return web.Response(text="")

    async def _models(self, request):
        self.calls["models"] += 1
        return web.json_response({"object": "list", "data": self.models})

    async def _tokenize(self, request):
        self.calls["tokenize"] += 1
        body = await request.json()
        text = body.get("prompt") or " ".join(msg["content"] for msg in body["messages"])
        return web.json_response({"count": len(text.split()) + 1, "max_model_len": MAX_MODEL_LEN, "tokens": []})

    async def _load(self, request):
        self.calls["load"] += 1
        return web.Response(text="Success: LoRA adapter 'writer' added successfully.")

    async def _metrics(self, request):
        self.calls["metrics"] += 1
        return web.Response(text=VLLM_032_METRICS)

    async def _complete(self, request):
        self.calls["complete"] += 1
        body = await request.json()
        self.bodies.append(body)
        n = body.get("max_tokens", 4)
        prompt_tokens = len(str(body.get("prompt", "")).split()) + 1
        usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + n, "completion_tokens": n}
        if not body.get("stream"):
            payload = json.dumps({"id": "cmpl-1", "object": "text_completion", "model": body["model"],
                                  "choices": [{"index": 0, "text": " w" * n, "finish_reason": "length"}],
                                  "usage": usage}).encode()
            if self.die_mid_body:
                response = web.StreamResponse(headers={"Content-Type": "application/json",
                                                       "Content-Length": str(len(payload))})
                await response.prepare(request)
                await response.write(payload[:20])
                request.transport.abort()
                return response
            return web.Response(body=payload, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        for i in range(n):
            if self.die_after_events is not None and i == self.die_after_events:
                request.transport.abort()
                return response
            chunk = {"id": "cmpl-1", "object": "text_completion", "model": body["model"],
                     "choices": [{"index": 0, "text": f" w{i}", "finish_reason": "length" if i == n - 1 else None}]}
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            await response.write(b"data: " + json.dumps({"id": "cmpl-1", "choices": [], "usage": usage}).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response


class Status:
    """The engine state the gateway reads (what Supervisor / ExternalEngine provide)."""

    def __init__(self, url: str):
        self.url, self.up, self.restarts, self.generation = url, True, 0, 1


@pytest.fixture
def engine():
    fake = FakeEngineForFaultInjection()
    fake.start()
    yield fake
    fake.stop()


def start_gateway(status, **kwargs) -> gw.Gateway:
    gateway = gw.Gateway(status, **kwargs)
    gateway.start("127.0.0.1", 0)
    return gateway


@pytest.fixture
def gateway(engine):
    status = Status(engine.url)
    g = start_gateway(status, training_lengths={"base": 8})
    yield g
    g.stop()


def events(text: str) -> list[str]:
    return [e[len("data: "):] for e in text.split("\n\n") if e.startswith("data: ")]


def test_engine_down_answers_503_with_retry_after(engine, gateway):
    gateway.engine.up = False
    for method, path, body in [("POST", "/v1/completions", {"model": "base", "prompt": "hi"}),
                               ("POST", "/v1/chat/completions", {"model": "base", "messages": []}),
                               ("POST", "/tokenize", {"model": "base", "prompt": "hi"}),
                               ("GET", "/v1/models", None), ("GET", "/health", None)]:
        r = httpx.request(method, gateway.url + path, json=body, timeout=5)
        assert r.status_code == 503, path
        assert r.headers["Retry-After"] == "5"
        assert "down or restarting" in r.json()["error"]["message"]
    assert engine.calls["complete"] == 0
    assert value(httpx.get(gateway.url + "/metrics").text, "lcserve_gateway_errors_total",
                 reason="engine_unavailable") == 4  # /health is not a request


def test_closed_engine_port_answers_503(engine):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{s.getsockname()[1]}"
    g = start_gateway(Status(dead_url))  # the supervisor still believes the engine is up
    try:
        r = httpx.post(g.url + "/v1/completions", json={"model": "base", "prompt": "hi"}, timeout=5)
        assert r.status_code == 503 and r.headers["Retry-After"]
    finally:
        g.stop()


def test_engine_dying_mid_stream_ends_with_an_error_event(engine, gateway):
    engine.die_after_events = 3
    r = httpx.post(gateway.url + "/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 10,
                                                          "stream": True}, timeout=10)
    assert r.status_code == 200
    data = events(r.text)
    assert [json.loads(d)["choices"][0]["text"] for d in data[:3]] == [" w0", " w1", " w2"]
    error = json.loads(data[3])["error"]
    assert error["code"] == 502 and "broke mid-stream" in error["message"]
    assert data[4:] == ["[DONE]"]
    assert value(httpx.get(gateway.url + "/metrics").text, "lcserve_gateway_errors_total", reason="engine_lost") == 1


def test_engine_dying_mid_body_answers_502(engine, gateway):
    engine.die_mid_body = True
    r = httpx.post(gateway.url + "/v1/completions", json={"model": "base", "prompt": "hi"}, timeout=10)
    assert r.status_code == 502
    assert "broke before the response was complete" in r.json()["error"]["message"]


def test_stream_usage_is_read_but_not_shown_unless_asked(engine, gateway):
    body = {"model": "base", "prompt": "one two three", "max_tokens": 3, "stream": True}
    r = httpx.post(gateway.url + "/v1/completions", json=body, timeout=10)
    assert engine.bodies[-1]["stream_options"] == {"include_usage": True}  # the gateway asked vLLM
    assert all("usage" not in d for d in events(r.text))  # ... and hid it from the client
    assert events(r.text)[-1] == "[DONE]" and len(events(r.text)) == 4

    r = httpx.post(gateway.url + "/v1/completions", json={**body, "stream_options": {"include_usage": True}}, timeout=10)
    assert json.loads(events(r.text)[-2])["usage"]["prompt_tokens"] == 4

    text = httpx.get(gateway.url + "/metrics").text
    assert value(text, "lcserve_prompt_tokens_total", model="base") == 8
    assert value(text, "lcserve_requests_beyond_training_length_total", model="base") == 0  # 7 tokens <= 8
    assert value(text, "lcserve_longest_context_tokens", model="base") == 7


def test_precheck_tokenizes_only_near_the_limit(engine, gateway):
    ok = httpx.post(gateway.url + "/v1/completions", json={"model": "base", "prompt": "short", "max_tokens": 4})
    assert ok.status_code == 200 and engine.calls["tokenize"] == 0

    fits = httpx.post(gateway.url + "/v1/completions", json={"model": "base", "prompt": "w " * 600, "max_tokens": 4})
    assert fits.status_code == 200 and engine.calls["tokenize"] == 1

    calls_before = engine.calls["complete"]
    too_long = httpx.post(gateway.url + "/v1/completions", json={"model": "base", "prompt": "w " * 996, "max_tokens": 4})
    assert too_long.status_code == 400
    error = too_long.json()["error"]
    assert error["param"] == "prompt"
    assert "max_model_len=1000" in error["message"] and "997 tokens" in error["message"]
    assert engine.calls["complete"] == calls_before  # never reached the engine

    chat = httpx.post(gateway.url + "/v1/chat/completions",
                      json={"model": "base", "messages": [{"role": "user", "content": "w " * 990}], "max_tokens": 20})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"
    text = httpx.get(gateway.url + "/metrics").text
    assert value(text, "lcserve_gateway_errors_total", reason="context_overflow") == 2


def test_unknown_model_is_passed_through_unlabelled(engine, gateway):
    r = httpx.post(gateway.url + "/v1/completions", json={"model": "other", "prompt": "hi"})
    assert r.status_code == 200  # the fake accepts it; vLLM would answer its own 404
    assert 'model="other"' not in httpx.get(gateway.url + "/metrics").text


def test_api_key(engine):
    g = start_gateway(Status(engine.url), api_key="s3cret")
    try:
        body = {"model": "base", "prompt": "hi"}
        assert httpx.post(g.url + "/v1/completions", json=body).status_code == 401
        wrong = httpx.post(g.url + "/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "--api-key" in wrong.json()["error"]["message"]
        auth = {"Authorization": "Bearer s3cret"}
        assert httpx.post(g.url + "/v1/completions", json=body, headers=auth).status_code == 200
        assert httpx.get(g.url + "/v1/models").status_code == 401
        assert httpx.get(g.url + "/health").status_code == 200  # probes and scrapes need no key
        assert httpx.get(g.url + "/metrics").status_code == 200

        load = {"lora_name": "writer", "lora_path": "/adapters/writer"}
        assert httpx.post(g.url + "/v1/load_lora_adapter", json=load).status_code == 401
        models_before = engine.calls["models"]
        assert httpx.post(g.url + "/v1/load_lora_adapter", json=load, headers=auth).status_code == 200
        assert engine.calls["load"] == 1
        httpx.post(g.url + "/v1/completions", json=body, headers=auth)
        assert engine.calls["models"] == models_before + 1  # the model table is re-read after a load
    finally:
        g.stop()


def test_adapter_routes_need_a_configured_key(engine, gateway):
    r = httpx.post(gateway.url + "/v1/load_lora_adapter", json={"lora_name": "w", "lora_path": "/x"})
    assert r.status_code == 403 and "--api-key" in r.json()["error"]["message"]
    assert engine.calls["load"] == 0


def test_engine_metrics_are_cached_for_a_second(engine, gateway):
    for _ in range(5):
        text = httpx.get(gateway.url + "/metrics").text
    assert engine.calls["metrics"] == 1
    assert value(text, "lcserve_kv_cache_usage_ratio") == 0.25


def test_probe_results_route(engine, gateway):
    samples = [["lcserve_probe_effective_length", {"model": "routed"}, 2048]]
    r = httpx.post(gateway.url + "/lcserve/probe_results", json={"samples": samples})
    assert r.status_code == 200
    assert value(httpx.get(gateway.url + "/metrics").text, "lcserve_probe_effective_length", model="routed") == 2048
    bad = httpx.post(gateway.url + "/lcserve/probe_results", json={"samples": [["nope", {}, 1]]})
    assert bad.status_code == 400


def test_port_in_use_is_a_clear_error(engine):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(gw.GatewayError, match=f"127.0.0.1:{port}.*--gateway-port"):
            gw.Gateway(Status(engine.url)).start("127.0.0.1", port)


def test_take_usage_strips_only_the_usage_chunk():
    block = (b'data: {"choices":[{"text":"a"}]}\n\n'
             b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":3,"total_tokens":5}}\n\n')
    kept, usage = gw.take_usage(block, strip=True)
    assert usage == {"prompt_tokens": 3, "total_tokens": 5}
    assert kept == b'data: {"choices":[{"text":"a"}]}\n\n'
    kept, _ = gw.take_usage(block, strip=False)
    assert kept == block


def test_requested_output_tokens():
    assert gw.requested_output_tokens({"max_tokens": 50}, chat=False) == 50
    assert gw.requested_output_tokens({"max_completion_tokens": 7, "max_tokens": 50}, chat=True) == 7
    assert gw.requested_output_tokens({}, chat=True) == 1


def test_overflow_message():
    model = ModelLimits("m", 256, 8192)
    assert gw.overflow_message(model, 8000, 192) is None
    message = gw.overflow_message(model, 8000, 200)
    assert "max_model_len=8192" in message and "by at least 8 tokens" in message


def test_model_limits_from_folders(tmp_path: Path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 32768}}))
    adapter = tmp_path / "writer"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}))
    (adapter / "lcserve_adapter.json").write_text(json.dumps({"training_seq_len": 256}))
    entries = [{"id": "base", "root": str(base), "parent": None, "max_model_len": 8192},
               {"id": "writer", "root": str(adapter), "parent": "base", "max_model_len": 8192}]
    assert [gw.model_limits(e, {}) for e in entries] == [ModelLimits("base", 32768, 8192),
                                                          ModelLimits("writer", 256, 8192)]
    assert gw.model_limits(entries[1], {"writer": 512}).training_len == 512
    assert gw.model_limits({"id": "hub/model", "root": "hub/model", "max_model_len": 4096}, {}).training_len is None
