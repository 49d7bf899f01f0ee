"""The KV-memory claim: "attention memory is batch x L^2 x heads x head_dim, so long contexts need
quadratic memory", against lcserve's planner and vLLM's own accounting, for the embedded model.

For each max_model_len the planner plans a CPU deployment with a fixed VLLM_CPU_KVCACHE_SPACE
and the real vLLM CPU build is started with the plan's arguments and stopped as soon as it
logs its KV cache size and maximum concurrency (`deploy/measure.py`; no request is sent).
Batch sizes need no engine of their own: vLLM pages the cache per request, so b requests of
length L take b times one request's blocks. Per (L, batch), in bytes:

    quadratic formula        batch x L^2 x num_attention_heads x head_dim x num_layers x dtype bytes
    all layers full, linear  batch x L x num_layers x 2 (K,V) x num_kv_heads x head_dim x dtype bytes
    planner                  batch x blocks per request x bytes per block     (deploy/kv.py)
    vLLM                     batch x VLLM_CPU_KVCACHE_SPACE / vLLM's logged maximum concurrency

    python -m benchmarks.bench_kv_claim [--lengths 4096 8192 16384 32768] [--batches 1 8] [--kv-gib 1]

Writes docs/findings/kv_claim.json (override with --out) and prints the table that
docs/findings.md shows (rendered by benchmarks/findings.py). Four engine starts, about a
minute each on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

from benchmarks.findings import RESULTS, kv_claim_table, run_conditions
from lcserve.deploy.hardware import GIB, resolve_profile
from lcserve.deploy.measure import measure_capacity
from lcserve.deploy.plan import PlanRequest, plan_deployment
from lcserve.embedded import prepare
from lcserve.model_config import ModelInfo, read_model
from lcserve.model_facts import DTYPE_BYTES, dtype_code

FORMULAS = {
    "quadratic_bytes": "batch x L^2 x num_attention_heads x head_dim x num_layers x dtype bytes (the claim)",
    "linear_full_bytes": "batch x L x num_layers x 2 x num_kv_heads x head_dim x dtype bytes (every layer full attention)",
    "planner_bytes": "batch x blocks per request x bytes per block (lcserve deploy/kv.py, vLLM's hybrid groups)",
    "vllm_bytes": "batch x VLLM_CPU_KVCACHE_SPACE / vLLM's logged 'Maximum concurrency' at max_model_len",
}


def formula_bytes(model: ModelInfo, length: int, batch: int) -> dict[str, int]:
    """The two closed-form figures, quadratic and linear (pure)."""
    elem = DTYPE_BYTES[dtype_code(model.dtype)]
    return {
        "quadratic_bytes": batch * length**2 * model.num_attention_heads * model.head_dim * model.num_layers * elem,
        "linear_full_bytes": batch * length * model.num_layers * 2 * model.num_kv_heads * model.head_dim * elem,
    }


def rows_for(model: ModelInfo, plan, measured, batches: list[int], kv_bytes: int) -> list[dict]:
    """One row per batch size at the plan's max_model_len (pure)."""
    per_request = plan.capacity.blocks_per_request * plan.layout.bytes_per_block
    return [
        {
            "max_model_len": plan.max_model_len,
            "batch": batch,
            **formula_bytes(model, plan.max_model_len, batch),
            "planner_bytes": batch * per_request,
            "vllm_bytes": round(batch * kv_bytes / measured.max_concurrency),
            "planner_max_concurrency": round(plan.max_concurrency, 2),
            "vllm_max_concurrency": measured.max_concurrency,
            "planner_kv_tokens": plan.kv_tokens,
            "vllm_kv_tokens": measured.kv_tokens,
        }
        for batch in batches
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--kv-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE for every engine")
    parser.add_argument("--out", type=Path, default=RESULTS / "kv_claim.json")
    args = parser.parse_args()
    path = prepare()
    model = read_model(path)
    # This machine's CPU profile with a fixed RAM figure, so the plan does not follow other processes.
    profile = dataclasses.replace(resolve_profile("cpu"), memory_bytes=32 * GIB)
    logs = Path(tempfile.mkdtemp(prefix="bench-kv-claim-"))
    rows = []
    for length in args.lengths:
        plan = plan_deployment(profile, model, (), PlanRequest(max_model_len=length, kv_cache_gib=args.kv_gib))
        measured = measure_capacity(path, plan, log_path=logs / f"vllm-{length}.log")
        rows += rows_for(model, plan, measured, args.batches, args.kv_gib * GIB)
        print(f"max_model_len {length}: vLLM {measured.kv_tokens:,} tokens, {measured.max_concurrency}x", flush=True)
    doc = {
        "model": f"Gemma 3 270M (embedded, {model.dtype}): {model.num_layers} layers "
        f"({', '.join(f'{n} x {kind}' for kind, n in model.attention_summary.items())}), "
        f"{model.num_attention_heads} attention heads, {model.num_kv_heads} KV head(s) of {model.head_dim}",
        "kv_cache_space_gib": args.kv_gib,
        "block_size": plan.block_size,
        "max_num_batched_tokens": plan.max_num_batched_tokens,
        "formulas": FORMULAS,
        "conditions": run_conditions(" ".join(["python -m benchmarks.bench_kv_claim", *sys.argv[1:]])),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(kv_claim_table(doc))
    print(f"results: {args.out}; engine logs: {logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
