"""Probe overhead: the probe's wall time vs the engine's own prefill + decode time for the same
requests (vLLM's `vllm:request_prefill_time_seconds` and `vllm:request_decode_time_seconds`).

    python benchmarks/bench_probes.py                      # starts its own engine (embedded model + demo adapter)
    python benchmarks/bench_probes.py --url http://127.0.0.1:8000 --base-only
    python benchmarks/bench_probes.py --tier full --max-model-len 32768

Goal: overhead (wall / engine time - 1) under 30%. The engine figures come from /metrics
before and after the run, so the server must have no other traffic meanwhile; the script
checks that the engine finished exactly as many requests as the probe sent. The probe sends its
requests in waves (base and adapter side by side, several prompts at once), so the engine's
per-request times overlap and their sum can exceed the wall time: measure the overhead with
--concurrency 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console

from lcserve import embedded
from lcserve.engine import EngineProcess, EngineSpec, free_port
from lcserve.paths import demo_adapter_dir
from lcserve.serving.cpu_lora import ENV_VAR as CPU_LORA_ENV
from lcserve.serving.cpu_lora import SEGMENTED
from lcserve.serving.probes import ProbeConfig, run_probe
from lcserve.serving.probes.runner import CALIBRATION_REQUESTS

ENGINE_SUMS = {
    "prefill_s": "vllm:request_prefill_time_seconds_sum",
    "decode_s": "vllm:request_decode_time_seconds_sum",
    "queue_s": "vllm:request_queue_time_seconds_sum",
    "requests": "vllm:request_success_total",
    "prompt_tokens": "vllm:prompt_tokens_total",
    "generation_tokens": "vllm:generation_tokens_total",
    "prefix_cache_hits": "vllm:prefix_cache_hits_total",
}


def scrape(url: str) -> dict[str, float]:
    """Each metric of ENGINE_SUMS summed over its label sets."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    totals = dict.fromkeys(ENGINE_SUMS, 0.0)
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        for key, metric in ENGINE_SUMS.items():
            if name == metric:
                totals[key] += float(line.rsplit(" ", 1)[1])
    return totals


def start_engine(max_model_len: int, log_dir: Path) -> EngineProcess:
    """The embedded model, with the demo adapter mounted as `writer` when it has been trained."""
    adapter = demo_adapter_dir()
    lora_args = []
    if (adapter / "adapter_config.json").exists():
        lora_args = [
            "--enable-lora",
            "--max-lora-rank",
            "16",
            "--lora-modules",
            json.dumps({"name": "writer", "path": str(adapter), "base_model_name": embedded.SERVED_NAME}),
        ]
    spec = EngineSpec(
        model=str(embedded.prepare()),
        served_model_name=embedded.SERVED_NAME,
        port=free_port(),
        args=["--max-model-len", str(max_model_len), *lora_args, "--enforce-eager"],
        env={"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind", CPU_LORA_ENV: SEGMENTED},
    )  # as `lcserve serve` runs it
    process = EngineProcess(spec, log_dir / "vllm.log")
    process.start()
    try:
        process.wait_ready(600)
    except BaseException:
        process.stop()
        raise
    return process


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server with no other traffic (default: start one)")
    parser.add_argument("--base", default=embedded.SERVED_NAME)
    parser.add_argument("--base-only", action="store_true")
    parser.add_argument("--tier", default="quick", choices=("quick", "full"))
    parser.add_argument("--lengths", help="comma-separated token counts (default: the tier's ladder)")
    parser.add_argument(
        "--concurrency", type=int, help="requests in flight, in plan order (default: the probe's waves)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="another seed gives other needles (no prefix-cache hits from an earlier run)",
    )
    parser.add_argument("--max-model-len", type=int, default=8192, help="for the engine this script starts")
    parser.add_argument("--out", type=Path, help="keep the probe's files here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-probes-"))
    process = None
    url = args.url
    if url is None:
        print(f"starting vLLM (max_model_len {args.max_model_len}) ...", file=sys.stderr)
        started = time.time()
        process = start_engine(args.max_model_len, work)
        url = process.url
        print(f"engine ready in {time.time() - started:.0f} s", file=sys.stderr)
    try:
        before = scrape(url)
        summary = run_probe(
            ProbeConfig(
                url=url,
                base=args.base,
                adapters=() if args.base_only else None,
                tier=args.tier,
                lengths=tuple(int(x) for x in args.lengths.split(",")) if args.lengths else None,
                out_dir=args.out or work / "probe",
                concurrency=args.concurrency,
                seed=args.seed,
                console=Console(stderr=True),
            )
        )
        after = scrape(url)
    finally:
        if process:
            process.stop()

    engine = {k: after[k] - before[k] for k in ENGINE_SUMS}
    models = len(summary["models"])
    sent = summary["requests"] + CALIBRATION_REQUESTS * models
    busy = engine["prefill_s"] + engine["decode_s"]
    wall = summary["wall_s"]
    print(
        f"probe: tier {summary['tier']}, {models} model(s), lengths {summary['lengths'][0]}..{summary['lengths'][-1]}, "
        f"concurrency {args.concurrency or 'waves'}, {sent} requests ({summary['requests']} probe + {CALIBRATION_REQUESTS * models} calibration)"
    )
    print(
        f"engine finished {engine['requests']:.0f} requests, {engine['prompt_tokens']:.0f} prompt tokens "
        f"({engine['prefix_cache_hits']:.0f} from the prefix cache), {engine['generation_tokens']:.0f} generated"
    )
    if round(engine["requests"]) != sent:
        print("WARNING: the engine served other requests during the run; the figures below are not comparable")
    print(f"{'probe wall time':34s} {wall:8.1f} s")
    print(
        f"{'engine prefill + decode (sum)':34s} {busy:8.1f} s   (prefill {engine['prefill_s']:.1f} + decode {engine['decode_s']:.1f})"
    )
    print(f"{'engine queue time (sum)':34s} {engine['queue_s']:8.1f} s")
    print(f"{'overhead (wall / engine - 1)':34s} {100 * (wall / busy - 1):8.1f} %   (goal: under 30 %)")
    print("probe phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in summary["timings"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
