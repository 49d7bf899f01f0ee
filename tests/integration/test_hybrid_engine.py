"""Hybrid attention + state-space models planned and started on the real vLLM CPU build.

1. A tiny random GraniteMoeHybrid (mamba, attention, mamba, mamba) and a tiny Qwen3Next (three
   gated-delta-net layers, then attention), built here with transformers' `from_config`, each at two
   max_model_len values: the engine's own log ("KV cache size: N tokens", "Maximum concurrency")
   against the plan, within 1%. vLLM raises GraniteMoeHybrid's attention block size to 384 and pads
   the Mamba page; the plan passes the raised size.
2. The same family with an 8 MiB state per layer: at 1 GiB of KV cache vLLM has 127 blocks, below
   its default max_num_seqs 128 (a GPU build, with full CUDA graphs, refuses to start so: "max_num_seqs
   (128) exceeds available Mamba cache blocks (127)"). The plan caps max_num_seqs at the state pool;
   vLLM starts with the plan's arguments, logs the planned capacity and answers a completion.

The in-process comparison over more cases (TP 2, Qwen3Next, the real Granite 4.0-H and Qwen3-Next
configs) is tests/unit/test_hybrid_plan.py. Five engine starts, four stopped once the KV cache is sized
(about 3.5 minutes on 2 cores).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import httpx
import pytest

from lcserve.deploy.hardware import GIB, resolve_profile
from lcserve.deploy.measure import measure_capacity, parse_capacity
from lcserve.deploy.plan import PlanRequest, plan_deployment
from lcserve.engine import EngineProcess, EngineSpec, free_port
from lcserve.model_config import read_model
from tests.support.tiny_models import build_tiny_model

pytestmark = pytest.mark.integration


def cpu_profile():
    """This machine's CPU profile with a fixed RAM figure (the KV cache is fixed at 1 GiB here)."""
    return dataclasses.replace(resolve_profile("cpu"), memory_bytes=32 * GIB)


def _within(predicted: float, measured: float, pct: float = 1.0) -> bool:
    return abs(predicted - measured) <= pct / 100 * measured


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "name,max_model_len,block_size",
    [
        ("granite-hybrid", 3000, 384),
        ("granite-hybrid", 16384, 384),
        ("qwen3-next", 4096, 128),
        ("qwen3-next", 16384, 128),
    ],
)
def test_hybrid_capacity_is_what_vllm_logs(name, max_model_len, block_size, tmp_path):
    path = build_tiny_model(name)
    plan = plan_deployment(
        cpu_profile(), read_model(path), (), PlanRequest(max_model_len=max_model_len, kv_cache_gib=1)
    )
    assert plan.block_size == block_size and plan.layout.state is not None  # granite: raised from the CPU's 128
    measured = measure_capacity(path, plan, timeout_s=540, log_path=tmp_path / "vllm.log")
    print(
        f"\n{name} at {max_model_len}: plan {plan.kv_tokens} tokens, {plan.max_concurrency:.2f}x; "
        f"vLLM {measured.kv_tokens} tokens, {measured.max_concurrency:.2f}x"
    )
    assert measured.max_model_len == max_model_len
    assert _within(plan.kv_tokens, measured.kv_tokens), (plan.kv_tokens, measured)
    assert _within(plan.max_concurrency, measured.max_concurrency), (plan.max_concurrency, measured)


@pytest.mark.timeout(600)
def test_state_pool_caps_max_num_seqs_and_vllm_starts_with_it(tmp_path):
    path = build_tiny_model("granite-hybrid-bigstate")
    plan = plan_deployment(cpu_profile(), read_model(path), (), PlanRequest(max_model_len=4096, kv_cache_gib=1))
    # vLLM's own count is checked below from its log (blocks = tokens / concurrency / blocks per request)
    assert plan.capacity.num_blocks < 128 and plan.max_num_seqs == plan.state_pool < plan.capacity.num_blocks
    spec = EngineSpec(
        model=str(path),
        served_model_name="hybrid",
        port=free_port(),
        args=["--enforce-eager", "--skip-tokenizer-init", *plan.vllm_args()],
        env={"VLLM_CPU_OMP_THREADS_BIND": "nobind", **plan.env},
    )
    process = EngineProcess(spec, tmp_path / "vllm.log")
    process.start()
    try:
        process.wait_ready(540)
        body = {"model": "hybrid", "prompt": [1, 2, 3, 4, 5], "max_tokens": 4, "temperature": 0}
        reply = httpx.post(f"{spec.url}/v1/completions", json=body, timeout=120).json()
        measured = parse_capacity(Path(process.log_path).read_text(errors="replace"))
    finally:
        process.stop()
    assert reply["usage"]["completion_tokens"] == 4, reply
    assert measured is not None and _within(plan.kv_tokens, measured.kv_tokens), (plan.kv_tokens, measured)
    vllm_blocks = round(measured.max_concurrency * plan.capacity.blocks_per_request)
    print(f"\nstate pool {plan.state_pool}, max_num_seqs {plan.max_num_seqs}, vLLM's blocks {vllm_blocks}")
    assert vllm_blocks == plan.capacity.num_blocks < 128
