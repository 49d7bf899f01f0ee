"""Parallel plans on vLLM's CPU build: TP=1, TP=2 and PP=2 on the embedded Gemma 3 270M, side by side.

Each run is planned by lcserve (multiprocessing executor, VLLM_CPU_OMP_THREADS_BIND with one core per
rank, VLLM_CPU_KVCACHE_SPACE per rank) and started with exactly the plan's arguments. The table shows
the planned and the logged KV capacity, the seconds until the server answered, and whether greedy text
equals TP=1's. TP and TP=1 run eager (lcserve's CPU default); PP=2 runs compiled, because the CPU
build dies with pipeline parallelism in eager mode, so its start time includes the compile warm-up.

    python benchmarks/bench_parallel_cpu.py [--only tp1 tp2 pp2] [--max-model-len 4096] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from lcserve.deploy.hardware import GIB, resolve_profile
from lcserve.deploy.measure import parse_capacity
from lcserve.deploy.plan import PlanRequest, plan_deployment
from lcserve.embedded import prepare
from lcserve.engine import EngineProcess, EngineSpec, free_port
from lcserve.model_config import read_model

PROMPTS = ["The lighthouse keeper wrote in his log that", "Water boils at", "The three primary colours are"]
RUNS = {"tp1": (1, 1, True), "tp2": (2, 1, True), "pp2": (1, 2, False)}  # name: (TP, PP, eager)


def run(name: str, tp: int, pp: int, eager: bool, model: Path, max_len: int, out: Path) -> dict:
    profile = dataclasses.replace(resolve_profile("cpu"), memory_bytes=32 * GIB, cores=2)
    request = PlanRequest(max_model_len=max_len, tensor_parallel_size=tp, pipeline_parallel_size=pp, kv_cache_gib=1)
    plan = plan_deployment(profile, read_model(model), request=request)
    args = plan.vllm_args() + (["--enforce-eager"] if eager else [])
    spec = EngineSpec(model=str(model), served_model_name="m", port=free_port(), args=args, env=plan.env)
    engine = EngineProcess(spec, out / f"vllm-{name}.log")
    start = time.monotonic()
    engine.start()
    try:
        engine.wait_ready(1800)
        ready = time.monotonic() - start
        measured = parse_capacity(engine.log_path.read_text(errors="replace"))
        texts = []
        for prompt in PROMPTS:
            body = {"model": "m", "prompt": prompt, "max_tokens": 12, "temperature": 0}
            texts.append(httpx.post(f"{spec.url}/v1/completions", json=body, timeout=300).json()["choices"][0]["text"])
    finally:
        engine.stop()
    return {
        "run": name,
        "args": args,
        "env": plan.env,
        "planned_kv_tokens": plan.kv_tokens,
        "measured_kv_tokens": measured.kv_tokens if measured else None,
        "ready_seconds": round(ready, 1),
        "texts": texts,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=list(RUNS), help="runs to make (default: all)")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=Path("out/bench-parallel-cpu"), help="logs and results.json")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = prepare()
    results = [run(n, *RUNS[n], model, args.max_model_len, args.out) for n in args.only or RUNS]
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    reference = next((r["texts"] for r in results if r["run"] == "tp1"), None)
    table = Table(title=f"Gemma 3 270M on vLLM's CPU build, max_model_len {args.max_model_len}, 1 GiB KV per rank")
    for col in ("run", "planned KV tokens", "vLLM KV tokens", "error", "ready (s)", "greedy = TP=1"):
        table.add_column(col, justify="right")
    for r in results:
        planned, measured = r["planned_kv_tokens"], r["measured_kv_tokens"]
        error = f"{100 * (planned - measured) / measured:+.2f}%" if measured else "-"
        same = "-" if reference is None else ("yes" if r["texts"] == reference else "NO")
        table.add_row(
            r["run"], f"{planned:,}", f"{measured:,}" if measured else "-", error, str(r["ready_seconds"]), same
        )
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
