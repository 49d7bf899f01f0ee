"""A tensor-parallel plan run for real: the embedded Gemma 3 270M with TP=2 on vLLM's CPU build.

The planner's own arguments and environment start the engine (multiprocessing executor, one core
per rank through VLLM_CPU_OMP_THREADS_BIND). Gemma 3 270M has one KV head, so each rank holds a
replica of it: vLLM's logged KV capacity must equal the plan's (a planner that divided the KV heads
by TP would be off by 2x), and short greedy continuations must equal the single-process session
engine's (longer ones may part at a near-tie: bf16 sums in another order; the benchmark shows it).
PP=2 runs compiled only on the CPU build, a minute more of warm-up: `benchmarks/bench_parallel_cpu.py`
measures it beside TP=1 and TP=2.
"""

from __future__ import annotations

import dataclasses

import httpx
import pytest

from lcserve.deploy.hardware import GIB, resolve_profile
from lcserve.deploy.measure import parse_capacity
from lcserve.deploy.plan import PlanRequest, plan_deployment
from lcserve.engine import EngineProcess, EngineSpec, free_port
from lcserve.model_config import read_model

pytestmark = pytest.mark.integration

PROMPTS = ["The lighthouse keeper wrote in his log that", "Water boils at"]


def greedy(url: str, model: str, prompt: str) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


def test_tp2_plan_runs_on_the_cpu_build_with_the_planned_kv_capacity(engine, embedded_model_dir, tmp_path):
    profile = dataclasses.replace(resolve_profile("cpu"), memory_bytes=32 * GIB)
    if len(profile.cpu_ids) < 2:
        pytest.skip("tensor parallelism on the CPU build needs a core per rank")
    profile = dataclasses.replace(profile, cores=2)
    plan = plan_deployment(
        profile,
        read_model(embedded_model_dir),
        request=PlanRequest(max_model_len=4096, tensor_parallel_size=2, kv_cache_gib=1),
    )
    assert plan.distributed_executor_backend == "mp" and plan.env["VLLM_CPU_OMP_THREADS_BIND"].count("|") == 1
    spec = EngineSpec(
        model=str(embedded_model_dir),
        served_model_name=engine.base_model,
        port=free_port(),
        args=[*plan.vllm_args(), "--enforce-eager"],
        env=plan.env,
    )
    process = EngineProcess(spec, tmp_path / "vllm-tp2.log")
    process.start()
    try:
        process.wait_ready(600)
        measured = parse_capacity(process.log_path.read_text(errors="replace"))
        texts = [greedy(spec.url, spec.served_model_name, p) for p in PROMPTS]
    finally:
        process.stop()
    assert measured is not None, "vLLM logged no KV cache size"
    assert abs(plan.kv_tokens - measured.kv_tokens) <= 0.01 * measured.kv_tokens, (plan.kv_tokens, measured)
    assert texts == [greedy(engine.url, engine.base_model, p) for p in PROMPTS]  # TP=1: the session engine
