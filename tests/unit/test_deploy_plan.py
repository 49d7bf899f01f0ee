"""The planner, with hand-computed expectations for each attention kind.

Figures marked "vLLM reported" were read from the real vLLM CPU build (its startup log or
`vllm:cache_config_info`) for the same layout and KV memory; the benchmark
`benchmarks/bench_planner_vs_vllm.py` re-measures them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from lcserve.adapters.reader import read_adapter
from lcserve.deploy.hardware import GIB, Profile, resolve_profile
from lcserve.deploy.kv import kv_layout
from lcserve.deploy.plan import PlanRequest, plan_deployment
from lcserve.errors import AdapterError, PlanError
from lcserve.model_config import read_model

CPU = Profile(
    name="test-cpu",
    kind="cpu",
    memory_bytes=16 * GIB,
    count=1,
    block_size=128,
    mla_block_size=16,
    default_concurrency=4,
    source="test",
)
LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": 512,
    "max_position_embeddings": 8192,
    "dtype": "bfloat16",
}


def write_model(folder: Path, config: dict) -> Path:
    """config.json + a safetensors file with the linear layers of every decoder layer (zeros)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    h, q = config["hidden_size"], config["num_attention_heads"] * config.get("head_dim", 32)
    kv, inter = config["num_key_value_heads"] * config.get("head_dim", 32), config["intermediate_size"]
    shapes = {"model.embed_tokens": (config["vocab_size"], h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.self_attn.q_proj": (q, h),
            f"{p}.self_attn.k_proj": (kv, h),
            f"{p}.self_attn.v_proj": (kv, h),
            f"{p}.self_attn.o_proj": (h, q),
            f"{p}.mlp.gate_proj": (inter, h),
            f"{p}.mlp.up_proj": (inter, h),
            f"{p}.mlp.down_proj": (h, inter),
        }
    save_file({f"{k}.weight": np.zeros(v, np.float16) for k, v in shapes.items()}, str(folder / "model.safetensors"))
    return folder


@pytest.fixture
def llama(tmp_path):
    return read_model(write_model(tmp_path / "llama", LLAMA))


def model(tmp_path, **changes):
    return read_model(write_model(tmp_path / "m", {**LLAMA, **changes}))


# --- one test per attention kind ------------------------------------------------------------


def test_full_attention_gqa(llama):
    plan = plan_deployment(CPU, llama, (), PlanRequest(kv_cache_gib=1))
    # 2 (K,V) x 2 KV heads x 32 x 2 B = 256 B/token/layer; block = 4 layers x 128 x 256 B = 131072 B
    assert plan.layout.bytes_per_token_layer == 256 and plan.layout.bytes_per_block == 131072
    assert plan.capacity.num_blocks == GIB // 131072 == 8192
    assert plan.capacity.blocks_per_request == 8192 // 128 == 64
    assert plan.max_concurrency == 128.0 and plan.kv_tokens == 1_048_576


def test_fp8_kv_halves_the_page(llama):
    plan = plan_deployment(CPU, llama, (), PlanRequest(kv_cache_gib=1, kv_cache_dtype="fp8"))
    assert plan.layout.bytes_per_token_layer == 128
    assert plan.kv_tokens == 2_097_152 and "--kv-cache-dtype" in plan.vllm_args()


def test_sliding_window_counts_only_window_plus_in_flight(tmp_path):
    m = model(tmp_path, model_type="mistral", sliding_window=1024, max_position_embeddings=16384)
    plan = plan_deployment(CPU, m, (), PlanRequest(kv_cache_gib=1))
    # cdiv(min(1024 - 1 + 1 x 2048, 16384), 128) + 1 = 25 blocks per request, 8192 blocks
    assert plan.capacity.blocks_per_request == 25
    assert plan.kv_tokens == int(8192 / 25 * 16384) == 5_368_709


def test_sliding_window_on_gpu_keeps_two_batches_in_flight(tmp_path):
    m = model(tmp_path, model_type="mistral", sliding_window=1024, max_position_embeddings=16384)
    plan = plan_deployment(resolve_profile("h100-80gb"), m)
    # async scheduling: 2 x 8192 in flight -> min(1023 + 16384, 16384) = 16384 tokens -> 1024 + 1 blocks
    assert plan.max_num_batched_tokens == 8192 and plan.block_size == 16
    assert plan.capacity.blocks_per_request == 1025


def test_hybrid_gemma3_270m_layout_matches_vllm(tmp_path):
    types = (["sliding_attention"] * 5 + ["full_attention"]) * 3
    m = model(
        tmp_path,
        model_type="gemma3_text",
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        hidden_size=640,
        sliding_window=512,
        layer_types=types,
        max_position_embeddings=32768,
    )
    plan = plan_deployment(CPU, m, (), PlanRequest(kv_cache_gib=2))
    # 15 sliding + 3 full -> 6 groups of 3 layers; block = 3 x 128 x 1024 B = 393216 B
    assert plan.layout.describe_groups() == "5 x sliding(512) group(s) of 3 layers, 1 x full group(s) of 3 layers"
    assert plan.capacity.num_blocks == 2 * GIB // 393216 == 5461
    # 5 x (cdiv(511 + 2048, 128) + 1 = 21) + cdiv(32768, 128) = 361
    assert plan.capacity.blocks_per_request == 361
    # vLLM reported (cache_config_info): num_gpu_blocks=5461, kv_cache_size_tokens=495695
    assert plan.kv_tokens == 495_695 and f"{plan.max_concurrency:.2f}" == "15.13"


def test_hybrid_uneven_pattern_pads_the_last_group(tmp_path):
    types = ["sliding_attention", "sliding_attention", "full_attention"] * 2 + ["sliding_attention"]
    m = model(
        tmp_path,
        num_hidden_layers=7,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=64,
        sliding_window=256,
        layer_types=types,
    )
    plan = plan_deployment(CPU, m, (), PlanRequest(kv_cache_gib=1))
    # 5 sliding, 2 full: group size 2 -> sliding groups of 2, 2, 1 (padded) and one full group of 2
    assert [g.layers for g in plan.layout.groups] == [2, 2, 1, 2]
    assert plan.layout.bytes_per_block == 2 * 128 * 256
    # 3 x (cdiv(255 + 2048, 128) + 1 = 19) + 64 = 121 blocks; 16384 blocks
    assert plan.capacity.blocks_per_request == 121
    assert plan.kv_tokens == int(16384 / 121 * 8192) == 1_109_237


def test_hybrid_close_counts_pad_to_the_larger_bucket(tmp_path):
    types = ["sliding_attention", "full_attention"] * 3 + ["sliding_attention"]
    m = model(tmp_path, num_hidden_layers=7, sliding_window=256, layer_types=types)
    layout = kv_layout(m, 2, 128, 1)
    # 4 sliding, 3 full: 4 < 1.5 x 3, so one group of each, the full one padded to 4 layers
    assert [(g.kind, g.layers) for g in layout.groups] == [("sliding", 4), ("full", 3)]
    assert layout.bytes_per_block == 4 * 128 * 256


def test_mla_latent_not_split_by_tp(tmp_path):
    m = model(tmp_path, model_type="deepseek_v2", num_hidden_layers=2, kv_lora_rank=128, qk_rope_head_dim=32)
    plan = plan_deployment(CPU, m, (), PlanRequest(kv_cache_gib=1))
    # (128 + 32) x 2 B = 320 B; CPU MLA block 16; 2 layers -> 10240 B per block; 104857 blocks; 512 per request
    assert plan.block_size == 16 and plan.layout.bytes_per_block == 10240
    # vLLM reported: "CPU KV cache size: 1,677,712 tokens, Maximum concurrency for 8,192 tokens per request: 204.80x"
    assert plan.kv_tokens == 1_677_712 and f"{plan.max_concurrency:.2f}" == "204.80"
    # CPU MLA without AMX: vLLM disables chunked prefill and batches whole prompts
    assert plan.max_num_batched_tokens == 8192
    assert kv_layout(m, 2, 64, tp=2).bytes_per_token_layer == 320


def test_tensor_parallel_splits_kv_heads_and_replicates_below_one(tmp_path):
    m = model(tmp_path, num_key_value_heads=8, num_attention_heads=8)
    assert kv_layout(m, 2, 16, tp=2).bytes_per_token_layer == 2 * 4 * 32 * 2
    assert kv_layout(m, 2, 16, tp=16).bytes_per_token_layer == 2 * 1 * 32 * 2


# --- settings and their reasons -------------------------------------------------------------


def test_cpu_kv_space_is_sized_for_the_full_context_target(llama):
    plan = plan_deployment(CPU, llama, (), PlanRequest(full_context_requests=100))
    # (100 x 64 + 1) x 131072 B = 0.78 GiB -> 1 GiB
    assert plan.env == {"VLLM_CPU_KVCACHE_SPACE": "1"}
    plan = plan_deployment(CPU, llama, (), PlanRequest(full_context_requests=200))
    assert plan.env == {"VLLM_CPU_KVCACHE_SPACE": "2"}
    assert "--gpu-memory-utilization" not in plan.vllm_args()


def test_max_num_seqs_is_vllms_cap_and_reaches_vllm_unchanged(llama):
    """max_num_seqs is how many sequences vLLM batches, not how many must fit at full length."""
    plan = plan_deployment(CPU, llama, (), PlanRequest(max_num_seqs=200))
    assert plan.max_num_seqs == 200 and plan.vllm_args()[plan.vllm_args().index("--max-num-seqs") + 1] == "200"
    assert plan.max_model_len == 8192 and plan.env == {"VLLM_CPU_KVCACHE_SPACE": "1"}  # sized for 4, not 200
    # 8191 usable blocks / 200 sequences = 40 blocks each -> 40 x 128 = 5120 tokens
    assert plan.max_num_seqs_fit_len == 5120
    assert any("max_num_seqs 200 is vLLM's cap" in w and "5,120 tokens" in w for w in plan.warnings)


def test_cpu_kv_space_is_capped_by_ram_not_refused(llama):
    """The CPU profile's default target (4 full-length requests) is a sizing wish: RAM caps it."""
    tight = dataclasses.replace(CPU, memory_bytes=6 * GIB)  # 6 GiB - 4 GiB overhead - weights -> 1 GiB
    m = dataclasses.replace(llama, derived_max_len=8192 * 64)
    plan = plan_deployment(tight, m, (), PlanRequest(max_model_len=8192 * 64))
    assert plan.env == {"VLLM_CPU_KVCACHE_SPACE": "1"} and plan.max_concurrency == 2.0
    assert "capped at what RAM allows" in next(r.why for r in plan.reasons if r.setting == "VLLM_CPU_KVCACHE_SPACE")


def test_every_number_has_its_reason(llama):
    plan = plan_deployment(CPU, llama)
    settings = {r.setting: r for r in plan.reasons}
    for name in (
        "max_model_len",
        "VLLM_CPU_KVCACHE_SPACE",
        "max_num_seqs",
        "max_num_batched_tokens",
        "tensor_parallel_size",
        "KV bytes per token per layer",
        "num_blocks",
        "blocks per request",
        "KV cache capacity (tokens)",
        "max concurrency at full context",
        "block_size",
    ):
        assert settings[name].why, name
    assert settings["num_blocks"].value == str(plan.capacity.num_blocks)
    assert "2 (K,V) x 2" in settings["KV bytes per token per layer"].why


def test_gpu_plan_memory_equation(tmp_path, llama):
    h100 = resolve_profile("h100-80gb")
    plan = plan_deployment(h100, llama, (), PlanRequest(max_model_len=8192))
    assert plan.gpu_memory_utilization == 0.90 and plan.env == {}
    others = sum(v for k, v in plan.memory.items() if k != "kv_cache")
    assert plan.kv_bytes == int(0.90 * h100.memory_bytes) - others
    assert plan.memory["weights"] == llama.param_count * 2
    assert plan.max_num_seqs == 1024 and plan.max_num_batched_tokens == 8192  # vLLM's H100 API-server defaults
    assert "--gpu-memory-utilization" in plan.vllm_args() and "--block-size" in plan.vllm_args()


def test_detected_free_memory_lowers_utilization(llama):
    busy = dataclasses.replace(resolve_profile("l4"), free_bytes=10 * GIB)
    plan = plan_deployment(busy, llama)
    assert plan.gpu_memory_utilization == int(100 * (9.5 * GIB) / busy.memory_bytes) / 100


def test_json_has_the_same_numbers(llama):
    plan = plan_deployment(CPU, llama, (), PlanRequest(max_num_seqs=8))
    data = json.loads(json.dumps(plan.to_json()))
    assert (data["max_model_len"], data["kv_cache_tokens"], data["max_num_seqs"], data["num_blocks"]) == (
        plan.max_model_len,
        plan.kv_tokens,
        plan.max_num_seqs,
        plan.capacity.num_blocks,
    )
    assert data["max_concurrency"] == plan.max_concurrency and data["vllm_args"] == plan.vllm_args()
    assert data["env"] == plan.env and len(data["reasons"]) == len(plan.reasons)


# --- impossible requests fail with the largest feasible value -------------------------------


def test_context_above_derived_maximum(llama):
    with pytest.raises(
        PlanError,
        match="--max-model-len 16384 is above the derived maximum 8192.*largest feasible: --max-model-len 8192.*--rope-scaling yarn",
    ):
        plan_deployment(CPU, llama, (), PlanRequest(max_model_len=16384))


def test_rope_override_allows_a_longer_context_and_prints_hf_overrides(llama):
    plan = plan_deployment(CPU, llama, (), PlanRequest(max_model_len=32768, rope_scaling="yarn"))
    assert plan.max_model_len == 32768
    rope = plan.hf_overrides["rope_parameters"]
    assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"]) == ("yarn", 4.0, 8192)
    args = plan.vllm_args()
    assert json.loads(args[args.index("--hf-overrides") + 1]) == plan.hf_overrides
    assert any("YaRN" in w for w in plan.warnings)


def test_yarn_on_per_layer_rope_scales_full_attention_only(tmp_path):
    rope = {
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
    }
    m = model(
        tmp_path,
        model_type="gemma3_text",
        sliding_window=512,
        rope_parameters=rope,
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
    )
    plan = plan_deployment(CPU, m, (), PlanRequest(max_model_len=16384, rope_scaling="yarn"))
    overrides = plan.hf_overrides["rope_parameters"]
    assert overrides["full_attention"]["rope_type"] == "yarn" and overrides["full_attention"]["rope_theta"] == 1e6
    assert overrides["sliding_attention"] == {"rope_type": "default", "rope_theta": 1e4}


def test_model_that_fits_at_no_context(llama):
    big = dataclasses.replace(llama, param_count=30_000_000_000)  # 60 GB of bf16 weights
    with pytest.raises(
        PlanError, match="does not fit 1 x l4 at any context.*fits from --gpus 4 --tensor-parallel-size 4"
    ):
        plan_deployment(resolve_profile("l4"), big)
    plan = plan_deployment(resolve_profile("l4", gpus=4), big)
    assert plan.tensor_parallel_size == 4


def test_tp_that_does_not_divide_the_heads(llama):
    with pytest.raises(
        PlanError,
        match="--tensor-parallel-size 3: 8 attention heads / 2 KV heads are not divisible.*largest feasible: --tensor-parallel-size 4",
    ):
        plan_deployment(resolve_profile("h100-80gb", gpus=4), llama, (), PlanRequest(tensor_parallel_size=3))
    with pytest.raises(
        PlanError, match="--tensor-parallel-size 8: the profile has 4 GPU.*largest feasible: --tensor-parallel-size 4"
    ):
        plan_deployment(resolve_profile("h100-80gb", gpus=4), llama, (), PlanRequest(tensor_parallel_size=8))


def test_context_that_does_not_fit_the_kv_memory(llama):
    expected = (
        r"--max-model-len 8192 x 200 request\(s\) at full length \(--full-context-requests 200\).*"
        r"largest feasible: --max-model-len \d+ at 200 request\(s\), or 127 request\(s\) at --max-model-len 8192"
    )
    request = PlanRequest(max_model_len=8192, full_context_requests=200, kv_cache_gib=1)
    with pytest.raises(PlanError, match=expected) as e:
        plan_deployment(CPU, llama, (), request)
    assert e.value.setting == "max_model_len"
    assert "MAX_MODEL_LEN 8192 x 200" in e.value.worded({"max_model_len": "MAX_MODEL_LEN"})
    # the same length with 200 sequences allowed (vLLM's cap) is served: they queue past the cache
    assert plan_deployment(CPU, llama, (), PlanRequest(max_model_len=8192, max_num_seqs=200, kv_cache_gib=1))


def test_without_context_the_length_shrinks_to_what_fits(llama):
    plan = plan_deployment(CPU, llama, (), PlanRequest(full_context_requests=200, kv_cache_gib=1))
    # 200 requests x cdiv(L, 128) <= 8191 blocks -> 40 blocks -> 5120 tokens
    assert plan.max_model_len == 5120
    assert "largest length" in next(r.why for r in plan.reasons if r.setting == "max_model_len")


def test_bad_inputs(llama):
    for kwargs, message in (
        ({"max_model_len": 0}, "--max-model-len 0"),
        ({"max_num_seqs": 0}, "--max-num-seqs 0"),
        ({"full_context_requests": 0}, "--full-context-requests 0"),
        ({"kv_cache_dtype": "int3"}, "--kv-cache-dtype int3"),
        ({"kv_cache_gib": 99}, "largest feasible: 11"),
        ({"max_model_len": 9000, "rope_scaling": "linear"}, "--rope-scaling linear: choose one of yarn"),
    ):
        with pytest.raises(PlanError, match=message):
            plan_deployment(CPU, llama, (), PlanRequest(**kwargs))
    with pytest.raises(PlanError, match="--kv-cache-gib sets VLLM_CPU_KVCACHE_SPACE"):
        plan_deployment(resolve_profile("l4"), llama, (), PlanRequest(kv_cache_gib=1))


def test_unsupported_layer_kind(tmp_path):
    m = model(tmp_path, layer_types=["linear_attention", "full_attention"] * 2)
    with pytest.raises(PlanError, match="linear_attention"):
        plan_deployment(CPU, m)


# --- adapters ---------------------------------------------------------------------------------


def write_adapter(folder: Path, r: int, targets, training_len: int | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": 2 * r, "target_modules": targets}))
    if training_len:
        (folder / "lcserve_adapter.json").write_text(json.dumps({"training_seq_len": training_len}))
    return folder


def test_lora_rank_rounding_and_buffers(tmp_path, llama):
    adapter = read_adapter(write_adapter(tmp_path / "a", 12, ["q_proj", "v_proj"]))
    plan = plan_deployment(CPU, llama, [adapter])
    assert plan.lora.max_lora_rank == 16 and plan.lora.max_loras == 1
    # q, v targeted -> vLLM wraps qkv_proj: per layer (256 + 256) + 2 x (256 + 64) = 1152; 4 layers; 16 x 2 B
    assert plan.lora.target_modules == ("k_proj", "q_proj", "v_proj")
    assert plan.memory["lora_buffers"] == 1 * 16 * 4 * 1152 * 2
    args = plan.vllm_args()
    assert args[args.index("--max-lora-rank") + 1] == "16" and "--enable-lora" in args


def test_lora_buffers_shard_with_tp(tmp_path, llama):
    adapters = [read_adapter(write_adapter(tmp_path / n, 8, ["q_proj", "o_proj"])) for n in ("a", "b")]
    plan = plan_deployment(resolve_profile("h100-80gb", gpus=2), llama, adapters, PlanRequest(tensor_parallel_size=2))
    # column-parallel q, k, v: in + out / 2; row-parallel o: in / 2 + out; 2 adapters x rank 8
    per_layer = (256 + 128) + 2 * (256 + 32) + (128 + 256)
    assert plan.memory["lora_buffers"] == 2 * 8 * 4 * per_layer * 2


@pytest.mark.parametrize("rank,expected", [(1, 1), (8, 8), (9, 16), (300, 320), (512, 512)])
def test_allowed_lora_ranks(tmp_path, llama, rank, expected):
    plan = plan_deployment(CPU, llama, [read_adapter(write_adapter(tmp_path / "a", rank, "all-linear"))])
    assert plan.lora.max_lora_rank == expected


def test_lora_rank_above_vllm_maximum(tmp_path, llama):
    with pytest.raises(PlanError, match="largest feasible: 512"):
        plan_deployment(CPU, llama, [read_adapter(write_adapter(tmp_path / "a", 600, ["q_proj"]))])


def test_adapter_for_another_base(tmp_path, llama):
    with pytest.raises(PlanError, match="no module .* matches"):
        plan_deployment(CPU, llama, [read_adapter(write_adapter(tmp_path / "a", 8, ["query_key_value"]))])


def test_broken_adapter_folder(tmp_path):
    with pytest.raises(AdapterError, match="adapter_config.json: missing"):
        read_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8}))
    with pytest.raises(AdapterError, match="target_modules"):
        read_adapter(tmp_path)


def test_training_length_ratio_warns_and_points_at_the_probes(tmp_path, llama):
    adapter = read_adapter(write_adapter(tmp_path / "a", 8, ["q_proj"], training_len=256))
    plan = plan_deployment(CPU, llama, [adapter])
    assert plan.training_ratio == 8192 / 256
    assert any("32x the training length 256" in w and "lcserve probe" in w for w in plan.warnings)
    quiet = plan_deployment(CPU, llama, [adapter], PlanRequest(training_ratio_warn=64))
    assert not any("training length" in w for w in quiet.warnings)


def test_training_length_flag_and_unknown(tmp_path, llama):
    folder = write_adapter(tmp_path / "a", 8, ["q_proj"])
    plan = plan_deployment(CPU, llama, [read_adapter(folder)])
    assert plan.training_ratio is None and any(r.setting == "training length" for r in plan.reasons)
    plan = plan_deployment(CPU, llama, [read_adapter(folder, training_seq_len=4096)])
    assert plan.training_ratio == 2.0 and not plan.warnings
