"""Gateway behaviour under faults a real engine cannot produce on demand (dying mid-stream,
mid-body, a closed port behind an "up" engine), its auth and its pre-check, end to end through
its routes. The pure helpers of its parts are tested in test_catalog.py, test_admission.py and
test_relay.py; the same paths against the real vLLM are in tests/integration/test_serving_gateway.py."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from collections import Counter

import httpx
import pytest
from aiohttp import web

from lcserve.errors import LcserveError
from lcserve.serving import gateway as gw
from lcserve.serving import security
from tests.unit.test_adapters_inspect import PLAIN, write_adapter
from tests.unit.test_metrics import VLLM_032_METRICS, value

MAX_MODEL_LEN = 1000


class FakeEngineForFaultInjection:
    """Speaks just enough of vLLM's API (same JSON and SSE shapes) to break on demand:
    `die_after_events` drops the connection in the middle of a stream, `die_mid_body` in the
    middle of a JSON body. Its tokenizer counts words (+1 for BOS)."""

    def __init__(self):
        self.calls: Counter[str] = Counter()
        self.bodies: list[dict] = []
        self.loads: list[dict] = []
        self.die_after_events: int | None = None
        self.die_mid_body = False
        self.slow_s = 0.0  # answer /v1/models and /metrics this much later
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
        await asyncio.sleep(self.slow_s)
        return web.json_response({"object": "list", "data": self.models})

    async def _tokenize(self, request):
        self.calls["tokenize"] += 1
        body = await request.json()
        text = body.get("prompt") or " ".join(msg["content"] for msg in body["messages"])
        return web.json_response({"count": len(text.split()) + 1, "max_model_len": MAX_MODEL_LEN, "tokens": []})

    async def _load(self, request):
        self.calls["load"] += 1
        self.loads.append(await request.json())
        return web.Response(text="Success: LoRA adapter 'writer' added successfully.")

    async def _metrics(self, request):
        self.calls["metrics"] += 1
        await asyncio.sleep(self.slow_s)
        return web.Response(text=VLLM_032_METRICS)

    async def _complete(self, request):
        self.calls["complete"] += 1
        body = await request.json()
        self.bodies.append(body)
        n = body.get("max_tokens", 4)
        prompt_tokens = len(str(body.get("prompt", "")).split()) + 1
        usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + n, "completion_tokens": n}
        if not body.get("stream"):
            payload = json.dumps(
                {
                    "id": "cmpl-1",
                    "object": "text_completion",
                    "model": body["model"],
                    "choices": [{"index": 0, "text": " w" * n, "finish_reason": "length"}],
                    "usage": usage,
                }
            ).encode()
            if self.die_mid_body:
                response = web.StreamResponse(
                    headers={"Content-Type": "application/json", "Content-Length": str(len(payload))}
                )
                await response.prepare(request)
                await response.write(payload[:20])
                request.transport.abort()
                return response
            return web.Response(body=payload, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        if body.get("endless"):  # large events until the gateway hangs up, as vLLM streams until aborted
            try:
                while True:
                    await response.write(b"data: " + json.dumps({"choices": [{"text": "w" * 4096}]}).encode() + b"\n\n")
                    await asyncio.sleep(0.001)
            except ConnectionError:
                self.calls["aborted"] += 1
                return response
        for i in range(n):
            if self.die_after_events is not None and i == self.die_after_events:
                request.transport.abort()
                return response
            chunk = {
                "id": "cmpl-1",
                "object": "text_completion",
                "model": body["model"],
                "choices": [{"index": 0, "text": f" w{i}", "finish_reason": "length" if i == n - 1 else None}],
            }
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            await response.write(
                b"data: " + json.dumps({"id": "cmpl-1", "choices": [], "usage": usage}).encode() + b"\n\n"
            )
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
    return [e[len("data: ") :] for e in text.split("\n\n") if e.startswith("data: ")]


def test_engine_down_answers_503_with_retry_after(engine, gateway):
    gateway.engine.up = False
    for method, path, body in [
        ("POST", "/v1/completions", {"model": "base", "prompt": "hi"}),
        ("POST", "/v1/chat/completions", {"model": "base", "messages": []}),
        ("POST", "/tokenize", {"model": "base", "prompt": "hi"}),
        ("GET", "/v1/models", None),
        ("GET", "/health", None),
    ]:
        r = httpx.request(method, gateway.url + path, json=body, timeout=5)
        assert r.status_code == 503, path
        assert r.headers["Retry-After"] == "5"
        assert "down or restarting" in r.json()["error"]["message"]
    assert engine.calls["complete"] == 0
    assert (
        value(httpx.get(gateway.url + "/metrics").text, "lcserve_gateway_errors_total", reason="engine_unavailable")
        == 4
    )  # /health is not a request


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
    r = httpx.post(
        gateway.url + "/v1/completions",
        json={"model": "base", "prompt": "hi", "max_tokens": 10, "stream": True},
        timeout=10,
    )
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

    r = httpx.post(
        gateway.url + "/v1/completions", json={**body, "stream_options": {"include_usage": True}}, timeout=10
    )
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
    too_long = httpx.post(
        gateway.url + "/v1/completions", json={"model": "base", "prompt": "w " * 996, "max_tokens": 4}
    )
    assert too_long.status_code == 400
    error = too_long.json()["error"]
    assert error["param"] == "prompt"
    assert "max_model_len=1000" in error["message"] and "997 tokens" in error["message"]
    assert engine.calls["complete"] == calls_before  # never reached the engine

    chat = httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"model": "base", "messages": [{"role": "user", "content": "w " * 990}], "max_tokens": 20},
    )
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"
    text = httpx.get(gateway.url + "/metrics").text
    assert value(text, "lcserve_gateway_errors_total", reason="context_overflow") == 2


def test_unknown_model_is_passed_through_unlabelled(engine, gateway):
    r = httpx.post(gateway.url + "/v1/completions", json={"model": "other", "prompt": "hi"})
    assert r.status_code == 200  # the fake accepts it; vLLM would answer its own 404
    assert 'model="other"' not in httpx.get(gateway.url + "/metrics").text


def test_api_key(engine, tmp_path):
    adapter = write_adapter(tmp_path / "writer", {}, PLAIN)
    g = start_gateway(Status(engine.url), api_key="s3cret", allowed_adapter_dirs=(tmp_path,))
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

        load = {"lora_name": "writer", "lora_path": str(adapter)}
        assert httpx.post(g.url + "/v1/load_lora_adapter", json=load).status_code == 401
        httpx.post(g.url + "/v1/completions", json=body, headers=auth)
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


def test_engine_metrics_are_cached_for_a_second(engine, gateway, monkeypatch):
    """Scrapes within the TTL reuse the engine's last /metrics. The TTL is set far apart for each
    half, so the test does not depend on how fast this machine answers five requests."""
    from lcserve.serving import engine_scrape

    monkeypatch.setattr(engine_scrape, "METRICS_TTL_S", 3600.0)
    for _ in range(5):
        text = httpx.get(gateway.url + "/metrics").text
    assert engine.calls["metrics"] == 1
    assert value(text, "lcserve_kv_cache_usage_ratio") == 0.25
    monkeypatch.setattr(engine_scrape, "METRICS_TTL_S", 0.0)  # no cache: every scrape reads the engine
    for _ in range(3):
        httpx.get(gateway.url + "/metrics")
    assert engine.calls["metrics"] == 4


def test_a_stopped_gateway_starts_again(engine):
    """Scrapes that wait on each other (a slow engine) on the first event loop must not break the
    next start, which runs on a new loop."""
    engine.slow_s = 0.2
    g = gw.Gateway(Status(engine.url))

    async def scrapes(url: str) -> list[int]:
        async with httpx.AsyncClient(timeout=10) as client:
            return [r.status_code for r in await asyncio.gather(*[client.get(url + "/metrics") for _ in range(8)])]

    for _ in range(2):
        g.start("127.0.0.1", 0)
        try:
            assert asyncio.run(scrapes(g.url)) == [200] * 8
        finally:
            g.stop()
        g.engine.generation += 1  # the next start re-reads /v1/models: its scrapes wait on each other again


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
        with pytest.raises(gw.GatewayError, match=f"127.0.0.1:{port}.*choose another --port"):
            gw.Gateway(Status(engine.url)).start("127.0.0.1", port)


def test_runtime_loading_only_from_allowed_folders_after_inspection(engine, tmp_path):
    """The same paths against the real vLLM: tests/integration/test_security.py."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    good = write_adapter(allowed / "good", {}, PLAIN)
    away = write_adapter(outside / "away", {}, PLAIN)
    (allowed / "link").symlink_to(away)
    sneaky = allowed / "sneaky"
    sneaky.mkdir()
    (sneaky / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    (sneaky / "adapter_model.safetensors").symlink_to(away / "adapter_model.safetensors")
    write_adapter(allowed / "dora", {"use_dora": True}, PLAIN)
    (allowed / "empty").mkdir()
    g = start_gateway(Status(engine.url), api_key="k", allowed_adapter_dirs=(allowed,))
    auth = {"Authorization": "Bearer k"}

    def load(path, name="x"):
        return httpx.post(g.url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}, headers=auth)

    try:
        for path, status, words in [
            (str(allowed / "good" / ".." / ".." / "outside" / "away"), 403, "resolves outside"),
            (str(allowed / "link"), 403, "resolves outside"),
            (str(sneaky), 403, "adapter_model.safetensors links to"),
            ("/etc", 403, "resolves outside"),
            ("good", 400, "must be an absolute path"),
            (str(allowed / "missing"), 404, "no such adapter folder"),
            (str(allowed / "dora"), 400, "says merge, not mount"),
            (str(allowed / "empty"), 400, "adapter_config.json"),
        ]:
            r = load(path)
            error = r.json()["error"]
            assert (r.status_code, error["code"]) == (status, status) and words in error["message"], (path, error)
            assert "\n" not in error["message"]
        assert load(str(good), name="").status_code == 400
        assert engine.calls["load"] == 0  # none of them reached the engine

        assert load(str(allowed / "dora" / ".." / "good"), name="good").status_code == 200
        assert engine.loads == [{"lora_name": "good", "lora_path": str(good.resolve())}]  # what was inspected
    finally:
        g.stop()

    off = start_gateway(Status(engine.url), api_key="k")
    try:
        r = httpx.post(off.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(good)}, headers=auth)
        assert r.status_code == 403 and "--allow-adapter-dir" in r.json()["error"]["message"]
    finally:
        off.stop()
    assert engine.calls["load"] == 1


def test_bad_bodies_are_refused_in_vllms_error_shape(engine):
    g = start_gateway(Status(engine.url), max_body_bytes=1000)

    def chunks():
        for _ in range(10):
            yield b"x" * 500

    try:
        for path in ("/v1/completions", "/v1/chat/completions", "/tokenize"):
            for content, status, words in [
                (b'{"prompt": "' + b"w" * 2000 + b'"}', 413, "at most 1000 bytes"),
                (chunks(), 413, "at most 1000 bytes"),  # chunked: no Content-Length to refuse up front
                (b'{"model": "base", "prompt": "caf\xe9"}', 400, "not valid UTF-8"),
                (b'{"model": "base", "prompt": ' + b"[" * 200 + b"]" * 200 + b"}", 400, "levels deep"),
                (b"[" * 400 + b"]" * 400, 400, "levels deep"),
            ]:
                r = httpx.post(g.url + path, content=content, headers={"Content-Type": "application/json"}, timeout=10)
                assert r.status_code == status and words in r.json()["error"]["message"], (path, r.text)
                assert r.json()["error"]["code"] == status
        assert engine.calls["complete"] == engine.calls["tokenize"] == 0
        r = httpx.get(g.url + "/v1/nothing-here", timeout=10)
        assert r.status_code == 404 and "no such route" in r.json()["error"]["message"]
        r = httpx.get(g.url + "/v1/completions", timeout=10)
        assert r.status_code == 405 and "POST" in r.json()["error"]["message"]
        for model in (["base"], {"id": "base"}, 3):  # unhashable ones crashed the model lookup
            r = httpx.post(g.url + "/v1/completions", json={"model": model, "prompt": "hi"}, timeout=10)
            assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
        ok = httpx.post(g.url + "/v1/completions", json={"model": "base", "prompt": "hi"}, timeout=10)
        assert ok.status_code == 200  # a body within the limit still passes
    finally:
        g.stop()


def stream_request(port: int) -> bytes:
    body = json.dumps({"model": "base", "prompt": "hi", "stream": True, "endless": True}).encode()
    return (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def test_a_client_that_stops_reading_is_dropped_and_its_engine_request_closed(engine):
    g = start_gateway(Status(engine.url), send_timeout_s=1.0)
    try:
        with socket.socket() as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.connect(("127.0.0.1", g.port))
            client.sendall(stream_request(g.port))
            # never read: the gateway's writes stall once the socket buffers are full
            assert wait_for(lambda: engine.calls["aborted"] == 1, 30), "the engine stream was never closed"
        text = httpx.get(g.url + "/metrics").text
        assert value(text, "lcserve_gateway_errors_total", reason="client_stalled") == 1
    finally:
        g.stop()


def test_a_client_that_hangs_up_mid_stream_closes_its_engine_request(engine, gateway):
    with socket.socket() as client:
        client.connect(("127.0.0.1", gateway.port))
        client.sendall(stream_request(gateway.port))
        received = b""
        while b"data: " not in received:
            received += client.recv(65536)
    assert wait_for(lambda: engine.calls["aborted"] == 1, 30)


def wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.mark.parametrize(
    "host, loopback",
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("gateway.example", False),
    ],
)
def test_exposure_warning_for_non_loopback_without_a_key(host, loopback):
    warning = security.exposure_warning(host, has_key=False)
    assert (warning is None) == loopback
    if warning:
        assert warning.startswith(f"WARNING: the gateway listens on {host}") and "LCSERVE_API_KEY" in warning
    assert security.exposure_warning(host, has_key=True) is None


def test_api_key_from_a_file(tmp_path):
    (tmp_path / "key").write_text("  s3cret  \nignored\n")
    assert security.read_api_key(None, tmp_path / "key") == "s3cret"
    assert security.read_api_key("env-key", None) == "env-key"
    assert security.read_api_key("", None) is None
    (tmp_path / "empty").write_text("\n")
    for key, path, words in [
        (None, tmp_path / "empty", "the file is empty"),
        (None, tmp_path / "missing", "cannot read it (No such file or directory)"),
        ("env-key", tmp_path / "key", "give the key one way only"),
    ]:
        with pytest.raises(LcserveError, match=re.escape(words)):
            security.read_api_key(key, path)
