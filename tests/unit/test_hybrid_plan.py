"""Hybrid attention + state-space models planned against vLLM 0.32's own code, in-process, no engine.

Expected figures come from vLLM: the oracle (tests/support/vllm_kv_oracle.py) builds each model on the
meta device under the plan's arguments, lets the platform raise the attention block size and pad the
Mamba page (`update_block_size_for_backend`), collects every layer's spec (`MambaSpec` for the state
layers) and runs the engine core's KV sizing; the state shapes and dtypes are what the model class's
own `get_mamba_state_shape_from_config` / `get_mamba_state_dtype_from_config` return for a config
built by vLLM from the same config.json. Weights for the config-only folders come from config.json
(lcserve/config_weights_hybrid.py), checked here against the headers transformers writes.

The CPU build runs the CPU attention backend and resets the SSM state to float32 on AVX512-BF16
CPUs, so every oracle case is a CPU plan; the GPU rules (16-token kernel blocks, the model dtype)
differ only in those two constants.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lcserve.config_weights import unquantized_tensors
from lcserve.config_weights_hybrid import HYBRID_MODEL_TYPES
from lcserve.deploy.hardware import GIB, resolve_profile
from lcserve.deploy.plan import PlanRequest, plan_deployment
from lcserve.deploy.state import state_dtypes, state_shapes
from lcserve.errors import PlanError
from lcserve.model_config import read_model
from lcserve.model_weights import WEIGHTS_FROM_CONFIG
from lcserve.safetensors_header import read_model_tensors
from tests.support.tiny_models import HYBRID_BUILDERS, build_tiny_model, write_config_only

REAL = Path(__file__).resolve().parents[1] / "data" / "hybrid_configs"
GRANITE_H_TINY, QWEN3_NEXT = REAL / "granite-4.0-h-tiny", REAL / "qwen3-next-80b-a3b-instruct"


@dataclass(frozen=True)
class Case:
    id: str
    model: str  # a HYBRID_BUILDERS name, or a folder under tests/data/hybrid_configs
    request: dict = field(default_factory=dict)
    ram_gib: int = 32


CPU = {"kv_cache_gib": 1}
CASES = [
    Case("granite hybrid, block raised to 384", "granite-hybrid", CPU),
    Case("granite hybrid max-model-len 3000", "granite-hybrid", CPU | {"max_model_len": 3000}),
    Case("granite hybrid TP 2 (groups extended)", "granite-hybrid", CPU | {"tensor_parallel_size": 2}),
    Case("granite hybrid 8 MiB state, 127 blocks", "granite-hybrid-bigstate", CPU | {"max_model_len": 4096}),
    Case("granite hybrid fp8 KV: a smaller page, a larger block", "granite-hybrid", CPU | {"kv_cache_dtype": "fp8"}),
    Case("qwen3-next gated delta net", "qwen3-next", CPU),
    Case("qwen3-next TP 2", "qwen3-next", CPU | {"tensor_parallel_size": 2, "max_model_len": 3000}),
    Case("nemotron-h: mamba2, attention, mlp (no cache), mamba2", "nemotron-h", CPU),
    Case("nemotron-h TP 2", "nemotron-h", CPU | {"tensor_parallel_size": 2, "max_model_len": 3000}),
    Case("jamba mamba1", "jamba", CPU | {"max_model_len": 3000}),
    Case("granite-4.0-h-tiny 32k", "granite-4.0-h-tiny", {"kv_cache_gib": 4, "max_model_len": 32768}),
    Case("qwen3-next-80b 128k", "qwen3-next-80b-a3b-instruct", {"kv_cache_gib": 8, "max_model_len": 131072}, 512),
]


@pytest.fixture(scope="module")
def oracle():
    import vllm.engine.arg_utils  # noqa: F401

    from tests.support import vllm_kv_oracle

    yield vllm_kv_oracle
    vllm_kv_oracle.shutdown_distributed()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A config-only folder per tiny hybrid whose weights config.json gives (else the built model),
    and the real configs' folders."""

    root = tmp_path_factory.mktemp("hybrid-configs")
    dirs = {p.name: p for p in REAL.iterdir()}
    for name, builder in HYBRID_BUILDERS.items():
        config = builder()
        if config.model_type not in HYBRID_MODEL_TYPES:
            dirs[name] = build_tiny_model(name)
            continue
        dirs[name] = write_config_only(builder, root / name)
    return dirs


def cpu(ram_gib: int = 32):
    return dataclasses.replace(resolve_profile("cpu"), memory_bytes=ram_gib * GIB)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hybrid_plan_is_vllms(case, oracle, model_dirs):
    model_dir = model_dirs[case.model]
    plan = plan_deployment(cpu(case.ram_gib), read_model(model_dir), (), PlanRequest(**case.request))
    vllm = oracle.vllm_kv_capacity(model_dir, plan.vllm_args(), env=plan.env)
    got = {
        "max_model_len": plan.max_model_len,
        "block_size": plan.block_size,
        "num_blocks": plan.capacity.num_blocks,
        "kv_tokens": plan.kv_tokens,
        "max_concurrency": plan.max_concurrency,
        "groups": len(plan.layout.groups),
    }
    want = {k: getattr(vllm, k) for k in got if k != "groups"} | {"groups": len(vllm.groups)}
    assert got == want, f"{case.id}: planner {got} != vLLM {want}; vLLM's groups: {vllm.groups}"
    assert plan.max_num_seqs <= plan.state_pool < vllm.num_blocks  # a GPU build would start with it
    # vLLM raises the profile's block size itself: the plan's raised size is the one it picks
    args = plan.vllm_args()
    args[args.index("--block-size") + 1] = str(resolve_profile("cpu").block_size)
    assert oracle.vllm_kv_capacity(model_dir, args, env=plan.env).block_size == plan.block_size


@pytest.mark.parametrize("name", ["granite-4.0-h-tiny", "qwen3-next-80b-a3b-instruct", "nemotron-h", "jamba"])
@pytest.mark.parametrize("tp", [1, 2])
def test_state_shapes_and_dtypes_are_the_model_classes(name, tp, oracle, model_dirs):
    """Shapes from the model class's own get_mamba_state_shape_from_config on vLLM's config of the
    same config.json; dtypes from get_mamba_state_dtype_from_config after the CPU platform's reset."""
    from vllm.model_executor.models import ModelRegistry

    folder = model_dirs[name]
    config = oracle.engine_config(folder, ["--tensor-parallel-size", str(tp), "--max-model-len", "4096"])
    model_cls, _ = ModelRegistry.resolve_model_cls(config.model_config.architecture, model_config=config.model_config)
    want_shapes = tuple(tuple(s) for s in model_cls.get_mamba_state_shape_from_config(config))
    want_dtypes = tuple(str(d).removeprefix("torch.") for d in model_cls.get_mamba_state_dtype_from_config(config))
    model = read_model(folder)
    profile = resolve_profile("cpu")
    assert state_shapes(model.state, tp) == want_shapes
    assert state_dtypes(model.state, "bfloat16", True, profile.bf16)[0] == want_dtypes


def test_qwen3_next_block_size_at_tp1_is_the_published_544():
    """vLLM PR #32492 (ROCm aiter attention) reports Qwen3-Next-80B's "non-standard block size (544)": one
    attention page of 2 KV heads x 256 must hold a gated-delta-net state, in 16-token kernel blocks."""
    from lcserve.deploy.state import GPU_KERNEL_BLOCK, aligned_block_size, state_spec

    model = read_model(QWEN3_NEXT)
    spec = state_spec(model, 1, "bfloat16", is_cpu=False, cpu_bf16=False)
    assert aligned_block_size(2 * 2 * 256 * 2, spec.bytes, 16, GPU_KERNEL_BLOCK) == 544


def test_granite_4_h_small_block_size_on_gpu_is_the_published_528(tmp_path):
    """vllm-gaudi PR #1453: "528 is required for Granite 4.0-H (granitemoehybrid) ... (16-token FA
    alignment)". Granite-4.0-H-Small's shape (hidden 4096, 8 KV heads x 128, Mamba2 128 heads x 64,
    d_state 128) in the model dtype: 16-token kernel blocks give 528 (32-token ones would give 544)."""
    from lcserve.deploy.state import GPU_KERNEL_BLOCK, aligned_block_size, state_spec

    small = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "mamba_n_heads": 128}
    config = json.loads((GRANITE_H_TINY / "config.json").read_text()) | small
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = state_spec(read_model(tmp_path), 1, "bfloat16", is_cpu=False, cpu_bf16=False)
    assert aligned_block_size(2 * 8 * 128 * 2, spec.bytes, 16, GPU_KERNEL_BLOCK) == 528


def test_gpu_dtypes_follow_the_model():
    """On a GPU the SSM state stays in the model dtype (auto), unless the model says otherwise."""
    model = read_model(GRANITE_H_TINY)
    assert state_dtypes(model.state, "bfloat16", False, True)[0] == ("bfloat16", "bfloat16")
    nemotron = dataclasses.replace(model.state, ssm_cache_dtype="float32")
    assert state_dtypes(nemotron, "bfloat16", False, True)[0] == ("bfloat16", "float32")


@pytest.mark.parametrize("name", ["granite-hybrid", "granite-hybrid-bigstate", "qwen3-next"])
def test_config_weights_are_the_checkpoints(name):
    """config.json arithmetic gives the tensors transformers' save_pretrained writes (names, shapes, dtypes)."""
    path = build_tiny_model(name)
    computed = unquantized_tensors(json.loads((path / "config.json").read_text()))
    layout = {name: (t.dtype, t.shape) for name, t in computed.items()}
    assert layout == {name: (t.dtype, t.shape) for name, t in read_model_tensors(path).items()}


def test_qwen3_next_without_layer_types_follows_full_attention_interval(tmp_path):
    """Older configs give only full_attention_interval: the layer kinds transformers' config derives."""
    from transformers import Qwen3NextConfig

    config = json.loads((QWEN3_NEXT / "config.json").read_text()) | {"full_attention_interval": 3}
    del config["layer_types"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    want = ["full" if t == "full_attention" else "gated_delta_net" for t in Qwen3NextConfig(**config).layer_types]
    assert [layer.kind for layer in read_model(tmp_path).layers] == want


def test_layer_kinds_of_the_real_configs():
    granite, qwen = read_model(GRANITE_H_TINY), read_model(QWEN3_NEXT)
    assert granite.attention_summary == {"mamba2": 36, "full": 4} and granite.head_dim == 128
    assert qwen.attention_summary == {"gated_delta_net": 36, "full": 12} and qwen.head_dim == 256


def test_plan_states_both_costs_from_config_json_alone():
    """`deploy plan --model FOLDER` with only config.json: the KV cost per token and the state cost per
    sequence, each with its reason, and a max_num_seqs within the state pool (GPU profile)."""
    plan = plan_deployment(
        resolve_profile("h100-80gb"), read_model(GRANITE_H_TINY), (), PlanRequest(max_model_len=32768)
    )
    reasons = {r.setting: r for r in plan.reasons}
    assert (
        plan.model.weights_source == WEIGHTS_FROM_CONFIG
        and plan.state_bytes_per_sequence == 36 * (3 * 3328 + 48 * 64 * 128) * 2
    )
    assert "36 mamba2 layers" in reasons["recurrent state per sequence"].why
    assert reasons["KV bytes per token per layer"].value == str(2 * 4 * 128 * 2)
    assert plan.max_num_seqs <= plan.state_pool and "state pool" in reasons["max_num_seqs"].why


def test_gpu_refuses_max_num_seqs_above_the_blocks(model_dirs):
    """vLLM refuses max_num_seqs > num_blocks under full CUDA graphs: one line, the setting, the largest value."""
    model = read_model(model_dirs["granite-hybrid-bigstate"])
    l4 = resolve_profile("l4")
    blocks = plan_deployment(l4, model, (), PlanRequest(max_model_len=4096)).capacity.num_blocks
    with pytest.raises(PlanError, match=r"--max-num-seqs \d+: .*Mamba cache blocks.*largest feasible: \d+ ") as e:
        plan_deployment(l4, model, (), PlanRequest(max_model_len=4096, max_num_seqs=blocks + 1))
    assert "\n" not in str(e.value)
    largest = int(re.search(r"largest feasible: (\d+)", str(e.value))[1])
    plan = plan_deployment(l4, model, (), PlanRequest(max_model_len=4096, max_num_seqs=largest))
    assert plan.max_num_seqs == largest <= plan.capacity.num_blocks  # vLLM's check passes there
    with pytest.raises(PlanError, match="Mamba cache blocks"):  # and fails one above
        plan_deployment(l4, model, (), PlanRequest(max_model_len=4096, max_num_seqs=largest + 1))


@pytest.mark.parametrize(
    "model_type,kind", [("falcon_h1", "mamba2+attention"), ("zamba2", "shared attention"), ("bamba", "Bamba")]
)
def test_unmodelled_hybrids_are_refused_in_one_line(tmp_path, model_type, kind):
    config = json.loads((GRANITE_H_TINY / "config.json").read_text()) | {"model_type": model_type}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 2 * GIB}, "weight_map": {"lm_head.weight": "absent.safetensors"}})
    )
    with pytest.raises(PlanError, match=rf"layer kind\(s\) .*{re.escape(kind)}.* not modelled by the planner") as e:
        plan_deployment(cpu(), read_model(tmp_path), (), PlanRequest(kv_cache_gib=1))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "architecture",
    [
        "GraniteMoeHybridForCausalLM",
        "Qwen3NextForCausalLM",
        "NemotronHForCausalLM",
        "JambaForCausalLM",
        "FalconH1ForCausalLM",
        "Zamba2ForCausalLM",
    ],
)
def test_lora_verdict_follows_vllms_model_class(architecture):
    """`adapters inspect --base` on a hybrid: a merge reason exactly where vLLM's class lacks SupportsLoRA."""
    from vllm.model_executor.models import ModelRegistry
    from vllm.model_executor.models.interfaces import supports_lora

    from lcserve.adapters.inspection import architecture_reasons

    model_cls = ModelRegistry._try_load_model_cls(architecture)
    assert model_cls is not None
    assert (architecture_reasons(architecture) == []) == supports_lora(model_cls)


def test_state_layers_without_attention_are_refused_in_one_line(tmp_path):
    """All-Mamba (attention-free) models size their cache otherwise in vLLM: refused, naming the kinds."""
    config = json.loads((GRANITE_H_TINY / "config.json").read_text()) | {"layer_types": ["mamba"] * 40}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(PlanError, match=r"state layers without attention.*\(layer kinds: mamba2\)") as e:
        plan_deployment(cpu(), read_model(tmp_path), (), PlanRequest(kv_cache_gib=1))
    assert "\n" not in str(e.value)
