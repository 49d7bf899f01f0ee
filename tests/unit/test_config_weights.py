"""Weights from config.json alone, checked against real headers, transformers and vLLM's loaders."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from lcserve import config_weights as cw
from lcserve.errors import ModelError
from lcserve.model_config import read_model
from lcserve.model_weights import WEIGHTS_FROM_CONFIG, WEIGHTS_FROM_HEADERS
from lcserve.safetensors_header import TensorInfo, read_model_tensors
from tests.support.tiny_models import BUILDERS, WEIGHT_LAYOUT_BUILDERS, build_tiny_model

DATA = Path(__file__).resolve().parents[1] / "data"
TINY = [*BUILDERS, *WEIGHT_LAYOUT_BUILDERS]


def layout(tensors: dict[str, TensorInfo]) -> dict[str, tuple]:
    return {name: (t.dtype, t.shape) for name, t in tensors.items()}


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def config_only(folder: Path, target: Path) -> Path:
    """The folder as seen before a download: config.json alone."""
    target.mkdir(parents=True)
    shutil.copy(folder / "config.json", target / "config.json")
    return target


# Real headers: tiny random models saved by transformers, and the embedded pretrained Gemma 3 270M.


@pytest.mark.parametrize("name", TINY)
def test_every_tensor_of_each_tiny_architecture_is_computed_exactly(name):
    folder = build_tiny_model(name)
    assert layout(cw.checkpoint_tensors(config_of(folder))) == layout(read_model_tensors(folder))


@pytest.mark.parametrize("name", TINY)
def test_config_only_folder_plans_with_the_headers_figures(name, tmp_path):
    folder = build_tiny_model(name)
    with_headers, without = read_model(folder), read_model(config_only(folder, tmp_path / name))
    assert (with_headers.weights_source, without.weights_source) == (WEIGHTS_FROM_HEADERS, WEIGHTS_FROM_CONFIG)
    assert without.param_bytes_by_dtype == with_headers.param_bytes_by_dtype
    assert without.param_count == with_headers.param_count
    assert without.linear_shapes == with_headers.linear_shapes
    assert (
        without.tie_word_embeddings == with_headers.tie_word_embeddings == ("lm_head" not in with_headers.linear_shapes)
    )


def test_the_embedded_pretrained_gemma3_is_computed_exactly(embedded_model_dir):
    tensors = read_model_tensors(embedded_model_dir)
    assert layout(cw.checkpoint_tensors(config_of(embedded_model_dir))) == layout(tensors)
    assert cw.param_count(tensors) == 268_098_176


# One quantity at a time.

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "torch_dtype": "bfloat16",
    "tie_word_embeddings": False,
}


def test_gqa_attention_shapes_and_biases():
    t = layout(cw.attention_tensors(LLAMA, "a", "BF16"))
    assert t == {
        "a.q_proj.weight": ("BF16", (4096, 4096)),
        "a.k_proj.weight": ("BF16", (1024, 4096)),
        "a.v_proj.weight": ("BF16", (1024, 4096)),
        "a.o_proj.weight": ("BF16", (4096, 4096)),
    }
    qwen2 = layout(cw.attention_tensors({**LLAMA, "model_type": "qwen2"}, "a", "BF16"))
    assert {n for n in qwen2 if n.endswith(".bias")} == {"a.q_proj.bias", "a.k_proj.bias", "a.v_proj.bias"}
    biased = layout(cw.attention_tensors({**LLAMA, "attention_bias": True}, "a", "BF16"))
    assert biased["a.o_proj.bias"] == ("BF16", (4096,))


@pytest.mark.parametrize("q_lora_rank,q_names", [(None, {"q_proj"}), (1536, {"q_a_proj", "q_a_layernorm", "q_b_proj"})])
def test_mla_tensors(q_lora_rank, q_names):
    c = {
        "hidden_size": 7168,
        "num_attention_heads": 128,
        "kv_lora_rank": 512,
        "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 128,
        "v_head_dim": 128,
        "q_lora_rank": q_lora_rank,
    }
    t = layout(cw.mla_tensors(c, "a", "BF16"))
    assert {n.split(".")[1] for n in t} == q_names | {"kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"}
    assert t["a.kv_a_proj_with_mqa.weight"][1] == (512 + 64, 7168)  # the latent and the RoPE key
    assert t["a.kv_b_proj.weight"][1] == (128 * (128 + 128), 512)
    assert t["a.o_proj.weight"][1] == (7168, 128 * 128)


def test_which_layers_have_experts():
    deepseek = {"model_type": "deepseek_v2", "n_routed_experts": 64, "first_k_dense_replace": 1, "moe_layer_freq": 2}
    assert [cw.is_moe_layer(deepseek, i) for i in range(5)] == [False, False, True, False, True]
    qwen = {"model_type": "qwen2_moe", "num_experts": 60, "decoder_sparse_step": 2, "mlp_only_layers": [3]}
    assert [cw.is_moe_layer(qwen, i) for i in range(6)] == [False, True, False, False, False, True]
    assert not cw.is_moe_layer({"model_type": "llama"}, 0)


def test_shared_experts_of_deepseek_are_one_wider_mlp():
    c = {
        "model_type": "deepseek_v3",
        "hidden_size": 8,
        "moe_intermediate_size": 4,
        "n_routed_experts": 2,
        "n_shared_experts": 2,
    }
    t = layout(cw.moe_tensors(c, "l", "BF16"))
    assert t["l.mlp.shared_experts.gate_proj.weight"][1] == (8, 8)  # 2 shared x 4
    assert t["l.mlp.gate.e_score_correction_bias"][1] == (2,)
    assert sum(n.startswith("l.mlp.experts.") for n in t) == 2 * 3


@pytest.mark.parametrize("model_type", cw.KNOWN_MODEL_TYPES)
def test_tied_embeddings_default_is_the_transformers_class_default(model_type):
    from transformers import AutoConfig

    assert cw.tied_embeddings({"model_type": model_type}) == AutoConfig.for_model(model_type).tie_word_embeddings


def test_llama_3_1_8b_arithmetic():
    tensors = cw.checkpoint_tensors(json.loads((DATA / "llama-3.1-8b" / "config.json").read_text()))
    assert cw.param_count(tensors) == 8_030_261_248
    assert cw.bytes_by_dtype(tensors) == {"BF16": 16_060_522_496}  # the published index's total_size


def test_deepseek_v3_main_model_is_671b():
    """DeepSeek-R1/V3's config.json (FP8): 671B parameters in the main model, as published (its MTP
    layer, loaded by vLLM only for speculative decoding, is not counted)."""
    config = json.loads((DATA / "deepseek-r1" / "config.json").read_text())
    assert cw.param_count(cw.unquantized_tensors(config)) == 671_026_419_200
    stored = cw.bytes_by_dtype(cw.checkpoint_tensors(config))
    assert stored["F8_E4M3"] == 669_065_609_216 and stored["BF16"] == 3_921_619_968  # embeddings, head, norms, routers


def test_mixtral_8x7b_is_46_7b():
    mixtral = {
        **LLAMA,
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "vocab_size": 32000,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
    }
    assert cw.param_count(cw.checkpoint_tensors(mixtral)) == 46_702_792_704


# Quantized checkpoints.


@pytest.mark.parametrize(
    "quant,expected",
    [
        (
            {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True},
            {"qweight": ("I32", (4096, 1792)), "qzeros": ("I32", (32, 1792)), "scales": ("F16", (32, 14336))},
        ),
        (
            {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True},
            {
                "qweight": ("I32", (512, 14336)),
                "qzeros": ("I32", (32, 1792)),
                "scales": ("F16", (32, 14336)),
                "g_idx": ("I32", (4096,)),
            },
        ),
        (
            {"quant_method": "gptq", "bits": 8, "group_size": -1, "desc_act": False, "sym": True},
            {
                "qweight": ("I32", (1024, 14336)),
                "qzeros": ("I32", (1, 3584)),
                "scales": ("F16", (1, 14336)),
                "g_idx": ("I32", (4096,)),
            },
        ),
        (
            {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
            {"weight": ("F8_E4M3", (14336, 4096)), "weight_scale_inv": ("F32", (112, 32))},
        ),
        (
            {"quant_method": "fp8", "activation_scheme": "static"},
            {"weight": ("F8_E4M3", (14336, 4096)), "weight_scale": ("F32", ()), "input_scale": ("F32", ())},
        ),
    ],
)
def test_quantized_linear_tensors(quant, expected):
    t = layout(cw.checkpoint_tensors({**LLAMA, "quantization_config": quant}))
    up = {n.removeprefix("model.layers.0.mlp.up_proj."): v for n, v in t.items() if ".layers.0.mlp.up_proj." in n}
    assert up == expected
    assert t["model.embed_tokens.weight"] == t["lm_head.weight"] == ("BF16", (128256, 4096))
    assert t["model.layers.0.input_layernorm.weight"] == ("BF16", (4096,))


def test_unquantized_modules_and_routers_stay_in_the_model_dtype():
    quant = {"quant_method": "awq", "bits": 4, "group_size": 64, "modules_to_not_convert": ["self_attn.o_proj"]}
    folder = build_tiny_model("mixtral-moe")
    t = layout(cw.checkpoint_tensors({**config_of(folder), "quantization_config": quant}))
    assert t["model.layers.0.block_sparse_moe.gate.weight"] == ("BF16", (4, 128))
    assert t["model.layers.0.self_attn.o_proj.weight"] == ("BF16", (128, 128))
    assert "model.layers.0.block_sparse_moe.experts.3.w2.qweight" in t


def test_gptq_dynamic_rules_skip_or_override_modules():
    quant = {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": 128,
        "dynamic": {r"-:.*\.layers\.0\..*": {}, r"+:.*\.layers\.1\..*": {"bits": 8}},
    }
    t = layout(cw.checkpoint_tensors({**LLAMA, "num_hidden_layers": 3, "quantization_config": quant}))
    assert t["model.layers.0.mlp.up_proj.weight"] == ("BF16", (14336, 4096))
    assert t["model.layers.1.mlp.up_proj.qweight"][1] == (1024, 14336)  # 8-bit: 4 per int32
    assert t["model.layers.2.mlp.up_proj.qweight"][1] == (512, 14336)


@pytest.fixture(scope="module")
def vllm_linear():
    """vLLM's own weight creation for one quantized linear at TP=1 (the tensors its loader fills):
    AutoAWQ/AutoGPTQ create_weights, and the FP8 helpers Fp8LinearMethod.create_weights calls."""
    pytest.importorskip("vllm")
    import torch
    import vllm.model_executor.parameter as vp

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vp, "get_tensor_model_parallel_rank", lambda: 0)
        mp.setattr(vp, "get_tensor_model_parallel_world_size", lambda: 1)
        from vllm.model_executor.layers.quantization.auto_awq import AutoAWQConfig, AutoAWQLinearMethod
        from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig, AutoGPTQLinearMethod
        from vllm.model_executor.layers.quantization.utils import fp8_utils as f8
        from vllm.model_executor.parameter import BlockQuantScaleParameter, PerTensorScaleParameter

        names = {torch.int32: "I32", torch.float16: "F16", torch.float32: "F32", torch.float8_e4m3fn: "F8_E4M3"}

        def create(module: str, out: int, inp: int, quant: dict) -> dict[str, TensorInfo]:
            layer, load = torch.nn.Module(), (lambda *a: None)
            if quant["quant_method"] == "fp8":
                layer.register_parameter("weight", f8.create_fp8_weight_parameter(out, inp, load))
                block = quant.get("weight_block_size")
                kind = BlockQuantScaleParameter if block else PerTensorScaleParameter
                layer.register_parameter(
                    "weight_scale_inv" if block else "weight_scale",
                    f8.create_fp8_scale_parameter(kind, [out], inp, block, load),
                )
                if quant.get("activation_scheme") == "static":
                    layer.register_parameter("input_scale", f8.create_fp8_input_scale([out], load))
            else:
                method = (
                    AutoAWQLinearMethod(AutoAWQConfig.from_config(quant))
                    if quant["quant_method"] == "awq"
                    else AutoGPTQLinearMethod(AutoGPTQConfig.from_config(quant))
                )
                method.create_weights(layer, inp, [out], inp, out, torch.float16, weight_loader=load)
            return {
                f"{module}.{n}": TensorInfo(f"{module}.{n}", names[p.dtype], tuple(p.shape))
                for n, p in layer.named_parameters()
            }

        yield create


def quantized_folder(tiny: str, quant: dict, target: Path, vllm_linear) -> Path:
    """A tiny model re-stored as a quantized checkpoint: its real unquantized tensors, and each
    quantized linear (every 2-D weight in the decoder layers except routers) replaced by the tensors
    vLLM's loader creates, plus GPTQ's g_idx (the checkpoints carry it, vLLM drops it). Headers only."""
    folder = build_tiny_model(tiny)
    tensors = {}
    for name, t in read_model_tensors(folder).items():
        module = name.removesuffix(".weight")
        if not (
            name.startswith("model.layers.")
            and len(t.shape) == 2
            and name.endswith(".weight")
            and module.rsplit(".", 1)[-1] not in ("gate", "shared_expert_gate")
        ):
            tensors[name] = t
            continue
        tensors.update(vllm_linear(module, t.shape[0], t.shape[1], quant))
        if quant["quant_method"] == "gptq":
            tensors[f"{module}.g_idx"] = TensorInfo(f"{module}.g_idx", "I32", (t.shape[1],))
    target.mkdir(parents=True)
    (target / "config.json").write_text(json.dumps({**config_of(folder), "quantization_config": quant}))
    header, offset = {}, 0
    for name, t in sorted(tensors.items()):
        header[name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header).encode()
    with (target / "model.safetensors").open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return target


@pytest.mark.parametrize(
    "tiny,quant",
    [
        ("llama-gqa", {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}),
        ("qwen2-tied", {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"}),
        ("mixtral-moe", {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": False, "sym": True}),
        # per-channel scales; vLLM's CPU build has no 8-bit GPTQ kernel to create weights for
        ("qwen3", {"quant_method": "gptq", "bits": 4, "group_size": -1, "desc_act": False, "sym": True}),
        (
            "deepseek-v3-moe",
            {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128]},
        ),
        ("llama-gqa", {"quant_method": "fp8", "activation_scheme": "static"}),
    ],
)
def test_quantized_config_matches_a_checkpoint_with_vllm_loader_shapes(tiny, quant, tmp_path, vllm_linear):
    folder = quantized_folder(tiny, quant, tmp_path / "q", vllm_linear)
    stored = read_model_tensors(folder)
    computed = cw.checkpoint_tensors(config_of(folder))
    # vLLM holds a per-tensor FP8 scale as shape (1,) where the checkpoints write a scalar: compare sizes.
    assert {n: (t.dtype, t.numel) for n, t in computed.items()} == {n: (t.dtype, t.numel) for n, t in stored.items()}
    assert {n: t.shape for n, t in computed.items() if t.numel > 1} == {
        n: t.shape for n, t in stored.items() if t.numel > 1
    }
    with_headers, without = read_model(folder), read_model(config_only(folder, tmp_path / "c"))
    assert without.weight_bytes == with_headers.weight_bytes and without.param_count == with_headers.param_count
    assert (
        without.quantization
        == with_headers.quantization
        == {"method": quant["quant_method"], "bits": quant.get("bits")}
    )


def test_block_fp8_matches_transformers_fp8_linear():
    """transformers' own FP8 layout (the one that loads DeepSeek V3 and Qwen3 FP8 checkpoints), on a dense MLA model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import replace_with_fp8_linear

    folder = build_tiny_model("deepseek-v2-mla")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.bfloat16)
    replace_with_fp8_linear(model, ["lm_head"], FineGrainedFP8Config(weight_block_size=(128, 128)))
    names = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float8_e4m3fn: "F8_E4M3"}
    expected = {n: (names[t.dtype], tuple(t.shape)) for n, t in model.state_dict().items()}
    quant = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    assert layout(cw.checkpoint_tensors({**config_of(folder), "quantization_config": quant})) == expected


# What cannot be computed says so, naming the field and the fix.


@pytest.mark.parametrize(
    "change,message",
    [
        ({"model_type": "phi3"}, "model_type 'phi3' is not one lcserve can size"),
        ({"intermediate_size": None}, "field 'intermediate_size' is missing"),
        ({"torch_dtype": "int4"}, "dtype 'int4'"),
        ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quant_method 'bitsandbytes'"),
        ({"quantization_config": {"quant_method": "gptq", "bits": 3, "group_size": 128}}, "bits=3"),
        (
            {"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 100}},
            "not a multiple of group_size 100",
        ),
        ({"architectures": ["LlamaForSequenceClassification"]}, "not a causal LM"),
        ({"vision_config": {}}, "multimodal"),
    ],
)
def test_what_config_json_cannot_size_is_a_model_error(change, message):
    with pytest.raises(ModelError, match=message) as e:
        cw.checkpoint_tensors({**LLAMA, **change})
    assert str(e.value).startswith("config.json: ") and "model.safetensors.index.json" in str(e.value)
