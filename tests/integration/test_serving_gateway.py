"""The gateway in front of the real vLLM CPU server (the session engine)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from lcserve.serving.stack import Stack
from tests.unit.test_metrics import value

pytestmark = pytest.mark.integration

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
CONCURRENT_STREAMS = 64


@pytest.fixture(scope="module")
def gateway(engine):
    stack = Stack(upstream_url=engine.url, gateway_port=0)
    stack.start()
    yield stack
    stack.stop()


def scrape(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=30).text


def count_tokens(engine, text: str) -> int:
    r = httpx.post(f"{engine.url}/tokenize", json={"model": engine.base_model, "prompt": text}, timeout=60)
    return r.json()["count"]


def sse_data(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.split("\n\n") if line.startswith("data: ")]


def test_models_health_and_limits(engine, gateway):
    assert httpx.get(f"{gateway.url}/health", timeout=10).status_code == 200
    direct = httpx.get(f"{engine.url}/v1/models", timeout=10).json()
    through = httpx.get(f"{gateway.url}/v1/models", timeout=10).json()
    assert [m["id"] for m in through["data"]] == [m["id"] for m in direct["data"]]
    config = json.loads((engine.model_dir / "config.json").read_text())
    positions = (config.get("text_config") or config)["max_position_embeddings"]
    text = scrape(gateway.url)
    # the base's training length is read from its folder, which vLLM names in /v1/models
    assert value(text, "lcserve_model_training_length_tokens", model=engine.base_model) == positions
    assert value(text, "lcserve_model_max_model_len_tokens", model=engine.base_model) == engine.max_model_len
    # the mounted adapter's training length comes from the lcserve_adapter.json vLLM's `root` points at
    assert value(text, "lcserve_model_training_length_tokens", model=engine.adapter_model) == 256


def test_completion_matches_vllm_and_is_counted(engine, gateway):
    before = value(scrape(gateway.url), "lcserve_prompt_tokens_total", model=engine.base_model) or 0
    body = {"model": engine.base_model, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    direct = httpx.post(f"{engine.url}/v1/completions", json=body, timeout=120).json()
    through = httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=120)
    assert through.status_code == 200
    assert through.json()["choices"][0]["text"] == direct["choices"][0]["text"]
    prompt_tokens = through.json()["usage"]["prompt_tokens"]
    assert prompt_tokens == count_tokens(engine, body["prompt"])
    assert value(scrape(gateway.url), "lcserve_prompt_tokens_total", model=engine.base_model) == before + prompt_tokens


def test_chat_stream_passes_through_unchanged(engine, gateway):
    body = {
        "model": engine.base_model,
        "messages": [{"role": "user", "content": "Name three colours."}],
        "max_tokens": 12,
        "temperature": 0,
        "stream": True,
    }
    direct = sse_data(httpx.post(f"{engine.url}/v1/chat/completions", json=body, timeout=120).text)
    r = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    through = sse_data(r.text)

    def deltas(events):
        return "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])

    assert len(through) == len(direct) and through[-1] == "[DONE]"
    assert deltas(through) == deltas(direct)
    assert all('"usage"' not in e for e in through)  # the client did not ask for usage

    asked = sse_data(
        httpx.post(
            f"{gateway.url}/v1/chat/completions", json={**body, "stream_options": {"include_usage": True}}, timeout=120
        ).text
    )
    assert json.loads(asked[-2])["usage"]["completion_tokens"] == 12


def test_tokenize_passes_through(engine, gateway):
    body = {"model": engine.base_model, "prompt": FILLER}
    through = httpx.post(f"{gateway.url}/tokenize", json=body, timeout=30).json()
    assert through["count"] == count_tokens(engine, FILLER)


def test_context_limit_is_exact(engine, gateway):
    prompt = FILLER * 40
    prompt_tokens = count_tokens(engine, prompt)
    room = engine.max_model_len - prompt_tokens
    body = {"model": engine.base_model, "prompt": prompt, "temperature": 0}

    over = httpx.post(f"{gateway.url}/v1/completions", json={**body, "max_tokens": room + 1}, timeout=60)
    assert over.status_code == 400
    message = over.json()["error"]["message"]
    assert f"max_model_len={engine.max_model_len}" in message and f"{prompt_tokens} tokens" in message

    too_long = httpx.post(f"{gateway.url}/v1/completions", json={**body, "prompt": FILLER * 400}, timeout=60)
    assert too_long.status_code == 400 and "shorten the prompt" in too_long.json()["error"]["message"]

    # exactly at the limit: accepted. Read the first event, then hang up: the gateway must close
    # the engine request too, or the engine would generate the remaining ~7000 tokens.
    with httpx.stream(
        "POST", f"{gateway.url}/v1/completions", json={**body, "max_tokens": room, "stream": True}, timeout=120
    ) as r:
        assert r.status_code == 200
        first = next(r.iter_lines())
        assert json.loads(first[len("data: ") :])["choices"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        running = value(
            httpx.get(f"{engine.url}/metrics", timeout=10).text,
            "vllm:num_requests_running",
            engine="0",
            model_name=engine.base_model,
        )
        if running == 0:
            break
        time.sleep(0.5)
    assert running == 0


async def _one_stream(client: httpx.AsyncClient, url: str, model: str, i: int) -> str:
    """'completed', 'error' (a clear HTTP error or error event) or raises (lost/hung)."""
    body = {
        "model": model,
        "prompt": f"Request {i}: write a short list of fruits.",
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
    }
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            assert "error" in r.json()
            return "error"
        events = [line[len("data: ") :] async for line in r.aiter_lines() if line.startswith("data: ")]
    if any('"error"' in e for e in events):
        return "error"
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] is not None
    return "completed"


def test_64_concurrent_streams_all_complete(engine, gateway):
    before = value(scrape(gateway.url), "lcserve_requests_total", model=engine.base_model) or 0

    async def run():
        limits = httpx.Limits(max_connections=CONCURRENT_STREAMS)
        async with httpx.AsyncClient(timeout=httpx.Timeout(300, connect=10), limits=limits) as client:
            tasks = [_one_stream(client, gateway.url, engine.base_model, i) for i in range(CONCURRENT_STREAMS)]
            return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 600)

    outcomes = asyncio.run(run())
    lost = [o for o in outcomes if isinstance(o, BaseException)]
    assert not lost, f"{len(lost)} of {CONCURRENT_STREAMS} streams lost or hung: {lost[:3]}"
    assert outcomes.count("completed") + outcomes.count("error") == CONCURRENT_STREAMS
    assert outcomes.count("completed") == CONCURRENT_STREAMS  # a healthy engine serves them all
    assert value(scrape(gateway.url), "lcserve_requests_total", model=engine.base_model) == before + CONCURRENT_STREAMS


def test_engine_state_is_exported(engine, gateway):
    direct = httpx.get(f"{engine.url}/metrics", timeout=10).text
    capacity = next(line for line in direct.splitlines() if line.startswith("vllm:cache_config_info"))
    tokens = int(capacity.split('kv_cache_size_tokens="')[1].split('"')[0])
    time.sleep(1.1)  # past the exporter's one-second cache
    text = scrape(gateway.url)
    assert value(text, "lcserve_engine_up") == 1
    assert value(text, "lcserve_kv_cache_capacity_tokens") == tokens
    usage = value(text, "lcserve_kv_cache_usage_ratio")
    assert 0 <= usage <= 1
    assert value(text, "lcserve_kv_cache_free_tokens") == pytest.approx(tokens * (1 - usage))
    assert value(text, "lcserve_requests_running") is not None
    assert value(text, "lcserve_preemptions_total") is not None
    assert "vllm:time_to_first_token_seconds_bucket" in text
