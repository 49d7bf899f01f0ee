"""Recurrent state against KV cache for real hybrid configs, computed by the planner from config.json alone.

Writes docs/findings/hybrid_state.json (rendered into docs/findings.md by benchmarks.findings): for the
published Granite-4.0-H-Tiny and Qwen3-Next-80B-A3B configs (tests/data/hybrid_configs) on H100 80GB
at 32k and 128k tokens, what one sequence holds as vLLM 0.32 allocates it: the attention layers' KV
blocks, the state layers' blocks (their state, in align mode 2 copies + a checkpoint, padded to the
attention page), and, for scale, the KV cache the same model would need if every layer were attention.
The figures are the planner's (deploy/kv.py, deploy/state.py), which tests/unit/test_hybrid_plan.py
holds to vLLM's own KV code on the CPU build.

    python -m benchmarks.bench_hybrid_state
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.findings import RESULTS, run_conditions
from lcserve.deploy.hardware import resolve_profile
from lcserve.deploy.plan import PlanRequest, plan_deployment
from lcserve.model_config import read_model
from lcserve.state_layers import STATE_KINDS

CONFIGS = Path(__file__).resolve().parents[1] / "tests" / "data" / "hybrid_configs"
MODELS = (("granite-4.0-h-tiny", 1), ("qwen3-next-80b-a3b-instruct", 4))  # (folder, GPUs)
LENGTHS = (32768, 131072)


def row(folder: str, gpus: int, length: int) -> dict:
    plan = plan_deployment(
        resolve_profile("h100-80gb", gpus), read_model(CONFIGS / folder), (), PlanRequest(max_model_len=length)
    )
    layout, block = plan.layout, plan.layout.bytes_per_block
    state_blocks = sum(g.state_blocks for g in layout.groups if g.kind in STATE_KINDS)
    kv_blocks = plan.capacity.blocks_per_request - state_blocks
    return {
        "model": folder,
        "tensor_parallel_size": plan.tensor_parallel_size,
        "max_model_len": length,
        "layers": plan.model.attention_summary,
        "block_size": plan.block_size,
        "kv_bytes": kv_blocks * block,
        "state_bytes": plan.state_bytes_per_sequence,
        "state_allocated_bytes": state_blocks * block,
        "all_attention_kv_bytes": len(plan.model.layers) * layout.bytes_per_token_layer * length,
        "max_concurrency": round(plan.max_concurrency, 2),
        "state_pool": plan.state_pool,
        "max_num_seqs": plan.max_num_seqs,
    }


def main() -> None:
    doc = {
        "profile": "h100-80gb (gpu_memory_utilization 0.9, the planner's default)",
        "per": "one sequence, per GPU (tensor-parallel rank)",
        "conditions": run_conditions("python -m benchmarks.bench_hybrid_state"),
        "rows": [row(folder, gpus, length) for folder, gpus in MODELS for length in LENGTHS],
    }
    path = RESULTS / "hybrid_state.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
