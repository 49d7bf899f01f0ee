"""The foundation on the real engine: the embedded model served by the vLLM CPU build."""

import random

import httpx
import pytest

pytestmark = pytest.mark.integration

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def complete(engine, prompt: str, max_tokens: int = 16, **extra) -> httpx.Response:
    body = {"model": engine.base_model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    return httpx.post(f"{engine.url}/v1/completions", json=body, timeout=300)


def count_tokens(engine, text: str) -> int:
    r = httpx.post(f"{engine.url}/tokenize", json={"model": engine.base_model, "prompt": text}, timeout=60)
    r.raise_for_status()
    return r.json()["count"]


def test_health_and_models(engine):
    assert httpx.get(f"{engine.url}/health", timeout=10).status_code == 200
    models = httpx.get(f"{engine.url}/v1/models", timeout=10).json()["data"]
    base = next(m for m in models if m["id"] == engine.base_model)
    assert base["max_model_len"] == engine.max_model_len


def test_greedy_completion_matches_transformers(engine):
    """vLLM's greedy tokens equal transformers' on the prepared folder: the conversion is faithful."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = "The capital of France is"
    r = complete(engine, prompt, max_tokens=8, return_token_ids=True)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"].strip()

    tokenizer = AutoTokenizer.from_pretrained(engine.model_dir)
    model = AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=torch.float32)
    ids = tokenizer(prompt, return_tensors="pt")
    assert ids["input_ids"][0, 0].item() == tokenizer.bos_token_id
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    expected = tokenizer.decode(out[0, ids["input_ids"].shape[1] :])
    # bf16 (vLLM) vs fp32 (reference) may part ways late; the first words must agree.
    assert choice["text"].split()[:3] == expected.split()[:3]


def test_passkey_retrieval_at_4k_tokens(engine):
    rng = random.Random(1234)
    passkey = rng.randint(10000, 99999)
    needle = f" The pass key is {passkey}. Remember it. {passkey} is the pass key. "
    question = "\nWhat is the pass key? The pass key is"
    half = FILLER * 78
    prompt = (
        "There is important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        + half
        + needle
        + half
        + question
    )
    n = count_tokens(engine, prompt)
    assert 3600 <= n <= 4400, n
    r = complete(engine, prompt, max_tokens=8)
    assert r.status_code == 200, r.text
    assert str(passkey) in r.json()["choices"][0]["text"]


def test_over_long_prompt_rejected_with_clear_error(engine):
    prompt = FILLER * 700  # ~14k tokens, over the 8192 context
    assert count_tokens(engine, prompt) > engine.max_model_len
    r = complete(engine, prompt, max_tokens=8)
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "maximum context length" in message and str(engine.max_model_len) in message
