"""The planner against the real vLLM CPU build.

1. vLLM's own argument parser and config builder accept a plan's arguments (and its YAML
   config) and arrive at the plan's numbers, YaRN override included; no engine start.
2. The shared test engine (embedded Gemma 3 270M) reports the KV capacity the plan predicts.
3. A tiny Gemma 2 hybrid with a passed-through `--max-num-batched-tokens` starts its own engine,
   stopped as soon as it has sized its KV cache; the capacity agrees within 1%.

Every architecture and setting is checked against vLLM's own KV-cache code in the unit tier
(tests/unit/test_vllm_kv_oracle.py, in-process, no engine); these few real engines check that the
in-process route and the running engine agree (so do test_serve_script.py and test_parallel_engine.py).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import httpx
import pytest

from lcserve.adapters.reader import read_adapter
from lcserve.deploy.hardware import GIB, resolve_profile
from lcserve.deploy.measure import measure_capacity
from lcserve.deploy.plan import PlanRequest, plan_deployment
from lcserve.deploy.render import vllm_config_yaml
from lcserve.model_config import read_model
from tests.support.tiny_models import build_tiny_model

pytestmark = pytest.mark.integration


def cpu_profile():
    """This machine's CPU profile with a fixed RAM figure: the KV size is fixed in these tests, and
    what is under test is the KV accounting, not how much RAM other processes use at the moment."""
    return dataclasses.replace(resolve_profile("cpu"), memory_bytes=32 * GIB)


def _within(predicted: float, measured: float, pct: float = 1.0) -> bool:
    return abs(predicted - measured) <= pct / 100 * measured


@pytest.mark.timeout(300)
def test_vllm_configures_what_the_plan_says(embedded_model_dir, tmp_path):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    cpu = cpu_profile()
    llama = build_tiny_model("llama-gqa")
    cases = [
        (embedded_model_dir, (), PlanRequest(max_model_len=131072, rope_scaling="yarn", max_num_seqs=2)),
        (build_tiny_model("deepseek-v2-mla"), (), PlanRequest()),
        (build_tiny_model("mistral-swa"), (), PlanRequest(kv_cache_dtype="fp8")),
        (llama, [read_adapter(_peft_adapter(llama, tmp_path / "adapter"))], PlanRequest()),
    ]
    for path, adapters, request in cases:
        plan = plan_deployment(cpu, read_model(path), adapters, request)
        args = parser.parse_args(["--model", str(path), *plan.vllm_args()])
        config_file = tmp_path / f"{path.name}.yaml"
        config_file.write_text(vllm_config_yaml(plan))
        assert vars(parser.parse_args(["--model", str(path), "--config", str(config_file)])) == vars(args)
        config = AsyncEngineArgs.from_cli_args(args).create_engine_config()
        assert config.model_config.max_model_len == plan.max_model_len, path.name
        assert config.cache_config.block_size == plan.block_size, path.name
        assert config.scheduler_config.max_num_batched_tokens == plan.max_num_batched_tokens, path.name
        assert config.scheduler_config.max_num_seqs == plan.max_num_seqs, path.name
        if plan.hf_overrides:
            rope = config.model_config.hf_text_config.rope_parameters["full_attention"]
            assert (rope["rope_type"], rope["factor"]) == ("yarn", 4.0)
        if plan.lora:
            lora = config.lora_config
            assert (lora.max_lora_rank, lora.max_loras) == (plan.lora.max_lora_rank, plan.lora.max_loras) == (16, 1)
            assert sorted(lora.target_modules) == ["k_proj", "q_proj", "v_proj"]


def _peft_adapter(base: Path, out: Path) -> Path:
    """A real PEFT LoRA (rank 12 on q/v) for the tiny Llama."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=12, lora_alpha=24, target_modules=["q_proj", "v_proj"])
    )
    model.save_pretrained(out)
    return out


@pytest.mark.timeout(120)
def test_shared_engine_reports_the_planned_capacity(engine):
    """The session engine runs the embedded model at 8192 tokens with VLLM_CPU_KVCACHE_SPACE=2."""
    plan = plan_deployment(
        cpu_profile(), read_model(engine.model_dir), (), PlanRequest(max_model_len=engine.max_model_len, kv_cache_gib=2)
    )
    metrics = httpx.get(f"{engine.url}/metrics", timeout=30).text
    info = re.search(r"vllm:cache_config_info\{([^}]*)\}", metrics).group(1)
    labels = dict(re.findall(r'(\w+)="([^"]*)"', info))
    assert int(labels["num_gpu_blocks"]) == plan.capacity.num_blocks
    assert int(labels["block_size"]) == plan.block_size
    assert _within(plan.kv_tokens, int(labels["kv_cache_size_tokens"]))
    assert _within(plan.max_concurrency, float(labels["kv_cache_max_concurrency"]))


@pytest.mark.timeout(900)
def test_passed_through_batch_tokens_are_planned_as_vllm_uses_them(tmp_path):
    """`lcserve serve ... -- --max-num-batched-tokens 4096` on a hybrid sliding-window model: the plan
    takes the passed-through value (sliding layers keep window - 1 + batched tokens) and agrees
    with the engine that receives it."""
    from lcserve.deploy.settings import take_vllm_args

    path = build_tiny_model("gemma2-hybrid")
    request, rest = take_vllm_args(
        PlanRequest(max_model_len=4096, kv_cache_gib=1), ("--max-num-batched-tokens", "4096")
    )
    plan = plan_deployment(cpu_profile(), read_model(path), (), request)
    assert plan.max_num_batched_tokens == 4096 and rest == ()
    measured = measure_capacity(path, plan, timeout_s=840, log_path=tmp_path / "vllm.log")
    assert _within(plan.kv_tokens, measured.kv_tokens), (plan.kv_tokens, measured.kv_tokens)
