"""The planner's KV capacity against vLLM 0.32's own KV-cache code: in-process, no engine started.

For each case the planner plans a deployment from config.json alone; the oracle
(`tests/support/vllm_kv_oracle.py`) hands the plan's vLLM arguments and environment to vLLM's own
argument parser and `create_engine_config()`, builds every rank's model on the meta device, collects
its attention layers' KV cache specs, and runs the engine core's KV sizing (`get_kv_cache_configs`,
the scheduler's config, `get_kv_cache_capacity`) at the plan's byte budget: VLLM_CPU_KVCACHE_SPACE as
vLLM reads it on the CPU build, the planner's `kv_bytes` per GPU for a GPU profile. The expected block
count, block size, KV tokens and full-length concurrency are vLLM's; none is worked out with lcserve's
formula or pasted from a log.

Distributed state: one real gloo world of one process (vLLM's own CPU-test set-up) is initialised
once; a TP or PP rank is built with vLLM's group coordinators reporting that rank's place (see the
oracle's docstring). GPU-profile cases use full-attention models only: the CPU build runs the CPU
attention backend, and vLLM turns async scheduling off on CPU, which changes a sliding window's
in-flight tokens but not a full-attention layer's blocks; and without AMX the CPU build forces MLA
to 16-token blocks, where a GPU profile plans 64.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest

from lcserve.deploy.hardware import GIB, resolve_profile
from lcserve.deploy.plan import PlanRequest, plan_deployment
from lcserve.model_config import read_model
from tests.support.tiny_models import BUILDERS, write_config_only


@dataclass(frozen=True)
class Case:
    id: str
    model: str  # a tiny model of tiny_models.BUILDERS
    profile: str = "cpu"
    request: dict = field(default_factory=dict)  # PlanRequest fields
    gpus: int | None = None


CPU = {"kv_cache_gib": 1}
CASES = [
    Case("llama-gqa", "llama-gqa", request=CPU),
    Case("qwen3", "qwen3", request=CPU),
    Case("qwen3 max-model-len 3000", "qwen3", request=CPU | {"max_model_len": 3000}),
    Case("mistral sliding window", "mistral-swa", request=CPU),
    Case("gemma2 hybrid", "gemma2-hybrid", request=CPU),
    Case("gemma3 hybrid, padded groups", "gemma3-uneven", request=CPU),
    Case("deepseek-v2 MLA", "deepseek-v2-mla", request=CPU),
    Case("llama-gqa fp8 KV", "llama-gqa", request=CPU | {"kv_cache_dtype": "fp8"}),
    Case("gemma3 hybrid fp8 KV", "gemma3-uneven", request=CPU | {"kv_cache_dtype": "fp8"}),
    Case("deepseek-v2 MLA fp8 KV", "deepseek-v2-mla", request=CPU | {"kv_cache_dtype": "fp8"}),
    Case("llama-gqa TP 2", "llama-gqa", request=CPU | {"tensor_parallel_size": 2}),
    Case("gemma3 TP 2, KV head replicated", "gemma3-uneven", request=CPU | {"tensor_parallel_size": 2}),
    Case("qwen3 PP 2, 2 + 1 layers", "qwen3", request=CPU | {"pipeline_parallel_size": 2}),
    Case("gemma3 hybrid PP 2", "gemma3-uneven", request=CPU | {"pipeline_parallel_size": 2}),
    Case("gemma2 batched tokens 512", "gemma2-hybrid", request=CPU | {"max_num_batched_tokens": 512}),
    Case("mistral batched tokens 8192", "mistral-swa", request=CPU | {"max_num_batched_tokens": 8192}),
    Case("llama-gqa on h100-80gb", "llama-gqa", profile="h100-80gb"),
    Case("qwen3 on l40s", "qwen3", profile="l40s"),
    Case("llama-gqa on 2 x l40s, TP 2", "llama-gqa", profile="l40s", gpus=2, request={"tensor_parallel_size": 2}),
]


@pytest.fixture(scope="module")
def oracle():
    """vLLM imported (the slow part, about 4 s) and its one-process gloo world set up once for the
    module, torn down after it."""
    import vllm.engine.arg_utils  # noqa: F401

    from tests.support import vllm_kv_oracle

    yield vllm_kv_oracle
    vllm_kv_oracle.shutdown_distributed()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A config-only folder per tiny architecture (the oracle builds on the meta device: no weights)."""

    root = tmp_path_factory.mktemp("tiny-configs")
    dirs = {}
    for name, builder in BUILDERS.items():
        dirs[name] = write_config_only(builder, root / name)
    return dirs


def plan_for(case: Case, model_dir):
    profile = resolve_profile(case.profile, case.gpus)
    if profile.is_cpu:  # a fixed RAM figure: the plan must not follow what this machine has free
        profile = dataclasses.replace(profile, memory_bytes=32 * GIB)
    return plan_deployment(profile, read_model(model_dir), (), PlanRequest(**case.request))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_plan_kv_capacity_is_vllms(case, oracle, model_dirs):
    model_dir = model_dirs[case.model]
    plan = plan_for(case, model_dir)
    budget = None if plan.profile.is_cpu else plan.kv_bytes  # CPU: vLLM reads the plan's env itself
    vllm = oracle.vllm_kv_capacity(model_dir, plan.vllm_args(), kv_bytes=budget, env=plan.env)
    got = {
        "kv_bytes": plan.kv_bytes,
        "max_model_len": plan.max_model_len,
        "block_size": plan.block_size,
        "num_blocks": plan.capacity.num_blocks,
        "kv_tokens": plan.kv_tokens,
        "max_concurrency": plan.max_concurrency,
    }
    want = {k: getattr(vllm, k) for k in got}
    assert got == want, f"{case.id}: planner {got} != vLLM {want}; vLLM's groups: {vllm.groups}"
