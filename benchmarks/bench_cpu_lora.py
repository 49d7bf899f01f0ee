"""LoRA on vLLM's CPU build: the adapter against the base, with vLLM's stock torch ops and lcserve's
segment-wise ops, alone and under load.

    python benchmarks/bench_cpu_lora.py [--tokens 2048] [--decode 32] [--ops stock,segmented]
                                        [--load 1,4,16] [--load-tokens 2048] [--load-output 16]

Starts the embedded model with the demo adapter mounted, once per op set, bound to cores as `lcserve
serve` starts it (vLLM's own binding: compute threads on all cores but one),
(LCSERVE_CPU_LORA_OPS=stock, then =segmented), and times the same greedy requests on the base
and on the adapter:
- alone: wall time of a prompt of --tokens tokens with 1 output token (prefill), and per output
  token over --decode tokens (decode); medians of 3 rounds, base and adapter taking turns;
- under load (segmented ops only: the stock ops take minutes per loaded round): --load-tokens
  distinct prompts (no shared prefix-cache block), N sent at once for each N in --load, streamed;
  p50 time to first token (TTFT), the last request's (max: all prompts prefilled, the steadier
  figure: the p50 moves with how vLLM's scheduler splits the first steps among requests that
  arrive together), and the mean and p50 inter-token latency (ITL) over the gaps of all requests. Under load the gaps mix pure decode steps with steps that also prefill another
  request's chunk, so the p50 can land on either kind; the mean is the steadier figure.
Prints the figures, the adapter/base ratios, and whether the adapter's greedy output is identical
under both op sets. About 4 minutes on 2 cores with the defaults (two engine starts included).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from lcserve import embedded
from lcserve.engine import EngineProcess, EngineSpec, free_port
from lcserve.paths import demo_adapter_dir
from lcserve.serving.cpu_lora import ENV_VAR, SEGMENTED

FILLER = "The lighthouse keeper wrote the weather in his log every evening. "
MODELS = (embedded.SERVED_NAME, "writer")


def prompt_ids(url: str, model: str, tokens: int, tag: str = "") -> list[int]:
    """Exactly `tokens` token ids (BOS first) of `tag` then filler text, by the server's tokenizer: a
    distinct tag gives a distinct first block, so no request reads another's prefix-cache blocks."""
    text = f"{tag} {FILLER * (tokens // 8)}" if tag else FILLER * (tokens // 8)
    ids = httpx.post(f"{url}/tokenize", json={"model": model, "prompt": text}, timeout=60).json()["tokens"]
    return ids[:tokens]


def timed_completion(url: str, model: str, prompt, max_tokens: int) -> tuple[float, str]:
    start = time.perf_counter()
    response = httpx.post(
        f"{url}/v1/completions",
        timeout=1800,
        json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True},
    )
    response.raise_for_status()
    return time.perf_counter() - start, response.json()["choices"][0]["text"]


def streamed(client: httpx.Client, model: str, prompt: list[int], max_tokens: int) -> list[float]:
    """Seconds from sending to each streamed token event of one greedy completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    start, times = time.perf_counter(), []
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}, timeout=1800) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                if json.loads(line[6:])["choices"][0]["text"]:
                    times.append(time.perf_counter() - start)
    return times


def loaded(url: str, model: str, at_once: int, tokens: int, output: int) -> dict:
    """TTFT p50 and max, ITL mean and p50 (ms) of `at_once` distinct prompts sent together (3 rounds when
    alone: one request is one sample)."""
    rounds = 3 if at_once == 1 else 1
    runs = []
    with httpx.Client(base_url=url, limits=httpx.Limits(max_connections=at_once)) as client:
        for r in range(rounds):
            prompts = [prompt_ids(url, model, tokens, f"{model} {at_once} {r} {i}:") for i in range(at_once)]
            with ThreadPoolExecutor(at_once) as pool:
                runs += pool.map(lambda p: streamed(client, model, p, output), prompts)
    gaps = [b - a for times in runs for a, b in zip(times, times[1:])]
    return {
        "ttft_ms": 1000 * statistics.median(times[0] for times in runs),
        "ttft_max_ms": 1000 * max(times[0] for times in runs),
        "itl_mean_ms": 1000 * statistics.fmean(gaps),
        "itl_p50_ms": 1000 * statistics.median(gaps),
    }


def alone(url: str, tokens: int, decode: int, rounds: int = 3) -> dict:
    """{model: prefill and decode ms per token} of one request at a time, base and adapter interleaved
    round by round (a busy neighbour then slows both alike), medians of `rounds` distinct prompts."""
    short = "Write two sentences about the sea at night."
    times: dict = {model: {"prefill": [], "decode": []} for model in MODELS}
    for model in MODELS:
        timed_completion(url, model, short, 2)  # warm-up: loads the adapter into its slot
    for r in range(rounds):
        for model in MODELS:
            prompt = prompt_ids(url, model, tokens, f"{model} alone {r}:")
            times[model]["prefill"].append(timed_completion(url, model, prompt, 1)[0])
            decode_s, text = timed_completion(url, model, short, decode)
            times[model]["decode"].append(decode_s)
            times[model]["text"] = text
    return {
        model: {
            "prefill_ms_per_token": 1000 * statistics.median(t["prefill"]) / tokens,
            "decode_ms_per_token": 1000 * statistics.median(t["decode"]) / decode,
            "text": t["text"],
        }
        for model, t in times.items()
    }


def measure(ops: str, args, log_dir: Path) -> dict:
    """{model: figures alone} and, for the segmented ops, {("load", model, n): figures under load}."""
    adapter = demo_adapter_dir()
    spec = EngineSpec(
        model=str(embedded.prepare()),
        served_model_name=embedded.SERVED_NAME,
        port=free_port(),
        args=[
            "--max-model-len",
            str(max(8192, args.tokens + args.decode + 64, args.load_tokens + args.load_output + 64)),
            "--enable-lora",
            "--max-lora-rank",
            "16",
            "--lora-modules",
            json.dumps({"name": "writer", "path": str(adapter), "base_model_name": embedded.SERVED_NAME}),
            "--enforce-eager",
        ],
        # vLLM's own thread binding, as `lcserve serve` leaves it: its compute threads on all cores but
        # one, that one kept for the API server and the scheduler (with "nobind" they share the cores,
        # and every small op's thread barrier waits on them: decode with the adapter 1.28x the base, 1.13x bound)
        env={"VLLM_CPU_KVCACHE_SPACE": "2", ENV_VAR: ops},
    )
    engine = EngineProcess(spec, log_dir / f"vllm-{ops}.log")
    engine.start()
    try:
        engine.wait_ready(900)
        figures: dict = alone(engine.url, args.tokens, args.decode)
        for n in args.load if ops == SEGMENTED else ():
            for model in MODELS:
                figures["load", model, n] = loaded(engine.url, model, n, args.load_tokens, args.load_output)
        return figures
    finally:
        engine.stop()


def report(results: dict, args) -> bool:
    """Print the tables; True when the adapter's greedy output is the same under both op sets."""
    base, writer = MODELS
    print(f"\nalone: prompt {args.tokens} tokens, {args.decode} output tokens; ms per token")
    print(f"{'model':<14}{'op set':<11}{'prefill':>10}{'decode':>10}")
    for model in MODELS:
        for ops, figures in results.items():
            row = figures[model]
            print(f"{model:<14}{ops:<11}{row['prefill_ms_per_token']:>10.2f}{row['decode_ms_per_token']:>10.1f}")
    for ops, figures in results.items():
        ratio = {k: figures[writer][k] / figures[base][k] for k in ("prefill_ms_per_token", "decode_ms_per_token")}
        print(
            f"{ops}: adapter/base prefill {ratio['prefill_ms_per_token']:.2f}x, "
            f"decode {ratio['decode_ms_per_token']:.2f}x"
        )
    if SEGMENTED in results and args.load:
        figures = results[SEGMENTED]
        print(
            f"\nunder load ({SEGMENTED}): {args.load_tokens}-token distinct prompts, {args.load_output} output "
            "tokens; ms, base / adapter (ratio)"
        )
        print(f"{'at once':<9}{'TTFT p50':>26}{'TTFT max':>26}{'ITL mean':>26}{'ITL p50':>26}")
        for n in args.load:
            b, w = figures["load", base, n], figures["load", writer, n]
            cells = [
                f"{b[k]:.1f} / {w[k]:.1f} ({w[k] / b[k]:.2f}x)"
                for k in ("ttft_ms", "ttft_max_ms", "itl_mean_ms", "itl_p50_ms")
            ]
            print(f"{n:<9}" + "".join(f"{c:>26}" for c in cells))
    if len(results) < 2:
        return True
    same = len({figures[writer]["text"] for figures in results.values()}) == 1
    print(f"adapter greedy output identical under both op sets: {same}")
    return same


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048, help="prompt length for the prefill timing")
    parser.add_argument("--decode", type=int, default=32, help="output tokens for the decode timing")
    parser.add_argument("--ops", default="stock,segmented", help="op sets to run, comma-separated")
    parser.add_argument("--load", default="1,4,16", help="requests at once under load, comma-separated ('' skips)")
    parser.add_argument("--load-tokens", type=int, default=2048, help="prompt length under load")
    parser.add_argument("--load-output", type=int, default=16, help="output tokens per request under load")
    args = parser.parse_args()
    args.load = [int(n) for n in args.load.split(",") if n.strip()]
    ops_sets = [ops.strip() for ops in args.ops.split(",") if ops.strip()]
    if not set(ops_sets) <= {"stock", SEGMENTED}:
        print(f"error: --ops {args.ops!r}: use stock, segmented or both (comma-separated)", file=sys.stderr)
        return 2
    if not (demo_adapter_dir() / "adapter_config.json").exists():
        print("error: the demo adapter is missing; run `lcserve embedded train-adapter` first", file=sys.stderr)
        return 2
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = {ops: measure(ops, args, Path(tmp)) for ops in ops_sets}
    same = report(results, args)
    print(f"run time {time.perf_counter() - started:.0f} s")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
