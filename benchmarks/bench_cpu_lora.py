"""LoRA prefill on vLLM's CPU build: vLLM's stock torch ops vs lcserve's segment-wise ops.

    python benchmarks/bench_cpu_lora.py [--tokens 2048] [--decode 32]

Starts the embedded model with the demo adapter mounted, once per op set
(LCSERVE_CPU_LORA_OPS=stock, then =segmented), and times the same greedy requests on the base
and on the adapter: wall time of a prompt of --tokens tokens with 1 output token (prefill), and
per output token over --decode tokens. Prints the figures side by side, the speed-up, and
whether the adapter's greedy output is identical under both op sets.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

from lcserve import embedded
from lcserve.engine import EngineProcess, EngineSpec, free_port
from lcserve.paths import demo_adapter_dir
from lcserve.serving.cpu_lora import ENV_VAR

FILLER = "The lighthouse keeper wrote the weather in his log every evening. "


def prompt_of(url: str, model: str, tokens: int) -> str:
    """Filler text cut to exactly `tokens` tokens by the server's tokenizer."""
    ids = httpx.post(f"{url}/tokenize", json={"model": model, "prompt": FILLER * (tokens // 8)}, timeout=60).json()[
        "tokens"
    ]
    text = httpx.post(f"{url}/detokenize", json={"model": model, "tokens": ids[1:tokens]}, timeout=60).json()["prompt"]
    return text


def timed_completion(url: str, model: str, prompt: str, max_tokens: int) -> tuple[float, str]:
    start = time.perf_counter()
    response = httpx.post(
        f"{url}/v1/completions",
        timeout=1800,
        json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True},
    )
    response.raise_for_status()
    return time.perf_counter() - start, response.json()["choices"][0]["text"]


def measure(ops: str, tokens: int, decode: int, log_dir: Path) -> dict:
    adapter = demo_adapter_dir()
    spec = EngineSpec(
        model=str(embedded.prepare()),
        served_model_name=embedded.SERVED_NAME,
        port=free_port(),
        args=[
            "--max-model-len",
            str(max(8192, tokens + decode + 64)),
            "--enable-lora",
            "--max-lora-rank",
            "16",
            "--lora-modules",
            json.dumps({"name": "writer", "path": str(adapter), "base_model_name": embedded.SERVED_NAME}),
            "--enforce-eager",
        ],
        env={"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind", ENV_VAR: ops},
    )
    engine = EngineProcess(spec, log_dir / f"vllm-{ops}.log")
    engine.start()
    try:
        engine.wait_ready(900)
        prompt = prompt_of(engine.url, embedded.SERVED_NAME, tokens)
        short = "Write two sentences about the sea at night."
        figures = {}
        for model in (embedded.SERVED_NAME, "writer"):
            timed_completion(engine.url, model, short, 2)  # warm-up: loads the adapter into its slot
            prefill_s, _ = timed_completion(engine.url, model, prompt, 1)
            decode_s, text = timed_completion(engine.url, model, short, decode)
            figures[model] = {
                "prefill_ms_per_token": 1000 * prefill_s / tokens,
                "decode_ms_per_token": 1000 * decode_s / decode,
                "text": text,
            }
        return figures
    finally:
        engine.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048, help="prompt length for the prefill timing")
    parser.add_argument("--decode", type=int, default=32, help="output tokens for the decode timing")
    args = parser.parse_args()
    if not (demo_adapter_dir() / "adapter_config.json").exists():
        print("error: the demo adapter is missing; run `lcserve embedded train-adapter` first", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        results = {ops: measure(ops, args.tokens, args.decode, Path(tmp)) for ops in ("stock", "segmented")}
    print(f"\nprompt {args.tokens} tokens, {args.decode} output tokens; ms per token")
    print(f"{'model':<14}{'op set':<11}{'prefill':>10}{'decode':>10}")
    for model in (embedded.SERVED_NAME, "writer"):
        for ops in ("stock", "segmented"):
            row = results[ops][model]
            print(f"{model:<14}{ops:<11}{row['prefill_ms_per_token']:>10.2f}{row['decode_ms_per_token']:>10.1f}")
    stock, fast = results["stock"]["writer"], results["segmented"]["writer"]
    print(
        f"adapter prefill speed-up: {stock['prefill_ms_per_token'] / fast['prefill_ms_per_token']:.1f}x; "
        f"decode: {stock['decode_ms_per_token'] / fast['decode_ms_per_token']:.2f}x"
    )
    same = stock["text"] == fast["text"]
    print(f"adapter greedy output identical under both op sets: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
