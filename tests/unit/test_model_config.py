"""The model reader: attention kinds per layer, derived max length, weights, from files only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from lcserve.errors import ModelError
from lcserve.model_config import LayerAttention, read_model, require_weights
from lcserve.model_weights import MIXED_DTYPES, WEIGHTS_FROM_CONFIG, WEIGHTS_FROM_HEADERS, WEIGHTS_FROM_INDEX
from tests.support.tiny_models import LLAMA_3_1_8B_DATA, build_llama_3_1_8b

BASE = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
    "max_position_embeddings": 4096,
    "dtype": "bfloat16",
}


def write_model(folder: Path, config: dict, tokenizer_max: int | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    tensors = {
        "model.embed_tokens.weight": np.zeros((config["vocab_size"], config["hidden_size"]), np.float16),
        "model.layers.0.self_attn.q_proj.weight": np.zeros((64, 64), np.float16),
        "model.layers.0.input_layernorm.weight": np.zeros((64,), np.float32),
    }
    save_file(tensors, str(folder / "model.safetensors"))
    if tokenizer_max is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": tokenizer_max}))
    return folder


def test_gqa_full_attention_and_weights(tmp_path):
    m = read_model(write_model(tmp_path / "m", BASE))
    assert m.layers == (LayerAttention("full"),) * 4
    assert (m.num_kv_heads, m.head_dim) == (2, 16)  # head_dim = hidden 64 / 4 heads
    assert m.param_bytes_by_dtype == {"F16": 100 * 64 * 2 + 64 * 64 * 2, "F32": 64 * 4}
    assert m.param_count == 100 * 64 + 64 * 64 + 64
    assert m.linear_shapes["model.layers.0.self_attn.q_proj"] == (64, 64)
    assert "model.layers.0.input_layernorm" not in m.linear_shapes
    assert (m.derived_max_len, m.derived_max_len_reason) == (4096, "max_position_embeddings=4096 in config.json")
    assert not m.is_hybrid and m.mla is None


def test_model_level_sliding_window_applies_to_every_layer(tmp_path):
    m = read_model(write_model(tmp_path / "m", {**BASE, "model_type": "mistral", "sliding_window": 1024}))
    assert m.layers == (LayerAttention("sliding", 1024),) * 4


def test_sliding_window_zero_means_full(tmp_path):
    m = read_model(write_model(tmp_path / "m", {**BASE, "sliding_window": 0}))
    assert {layer.kind for layer in m.layers} == {"full"}


def test_layer_types_hybrid(tmp_path):
    types = ["sliding_attention", "full_attention"] * 2
    m = read_model(write_model(tmp_path / "m", {**BASE, "sliding_window": 512, "layer_types": types}))
    assert m.layers == (LayerAttention("sliding", 512), LayerAttention("full")) * 2
    assert m.is_hybrid and m.attention_summary == {"sliding(512)": 2, "full": 2}


def test_old_gemma3_config_without_layer_types_uses_the_pattern(tmp_path):
    config = {
        **BASE,
        "model_type": "gemma3_text",
        "num_hidden_layers": 12,
        "sliding_window": 512,
        "sliding_window_pattern": 6,
    }
    m = read_model(write_model(tmp_path / "m", config))
    assert m.attention_summary == {"sliding(512)": 10, "full": 2}
    assert m.layers[5] == LayerAttention("full") and m.layers[11] == LayerAttention("full")


def test_qwen2_sliding_window_only_when_enabled(tmp_path):
    off = {**BASE, "model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False, "max_window_layers": 2}
    assert {layer.kind for layer in read_model(write_model(tmp_path / "off", off)).layers} == {"full"}
    on = {**off, "use_sliding_window": True, "sliding_window": 1024}
    m = read_model(write_model(tmp_path / "on", on))
    assert m.layers == (LayerAttention("full"),) * 2 + (LayerAttention("sliding", 1024),) * 2


def test_mla(tmp_path):
    config = {**BASE, "model_type": "deepseek_v2", "kv_lora_rank": 512, "qk_rope_head_dim": 64}
    m = read_model(write_model(tmp_path / "m", config))
    assert {layer.kind for layer in m.layers} == {"mla"}
    assert m.mla.latent_dim == 576


def test_unknown_layer_type_is_kept_for_the_planner_to_refuse(tmp_path):
    types = ["linear_attention", "full_attention"] * 2
    m = read_model(write_model(tmp_path / "m", {**BASE, "layer_types": types}))
    assert m.layers[0] == LayerAttention("linear_attention")


@pytest.mark.parametrize(
    "rope,expected",
    [
        ({"rope_type": "linear", "factor": 4.0}, 16384),  # vLLM multiplies by the factor
        ({"rope_type": "dynamic", "factor": 2.0}, 8192),
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}, 4096),  # already scaled
        ({"rope_type": "llama3", "factor": 8.0}, 4096),
    ],
)
def test_derived_max_len_with_rope_scaling(tmp_path, rope, expected):
    m = read_model(write_model(tmp_path / "m", {**BASE, "rope_parameters": {"rope_theta": 1e4, **rope}}))
    assert m.derived_max_len == expected
    assert m.rope_scaling == {"default": {"rope_theta": 1e4, **rope}}


def test_old_rope_scaling_key_is_normalised(tmp_path):
    config = {**BASE, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}}
    m = read_model(write_model(tmp_path / "m", config))
    assert m.rope_parameters == {"default": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}}
    assert m.derived_max_len == 8192


def test_gemma3_rope_factor_is_not_applied_again(tmp_path):
    rope = {"full_attention": {"rope_type": "linear", "factor": 8.0}, "sliding_attention": {"rope_type": "default"}}
    config = {**BASE, "model_type": "gemma3_text", "rope_parameters": rope, "max_position_embeddings": 131072}
    assert read_model(write_model(tmp_path / "m", config)).derived_max_len == 131072


def test_tokenizer_model_max_length_caps_the_derived_length(tmp_path):
    m = read_model(write_model(tmp_path / "m", BASE, tokenizer_max=2048))
    assert (m.derived_max_len, m.derived_max_len_reason) == (2048, "model_max_length=2048 in tokenizer_config.json")
    huge = read_model(write_model(tmp_path / "h", BASE, tokenizer_max=int(1e30)))  # HF's "unknown"
    assert huge.derived_max_len == 4096


def test_smallest_length_key_wins_and_default_when_none(tmp_path):
    assert read_model(write_model(tmp_path / "a", {**BASE, "seq_length": 1024})).derived_max_len == 1024
    none = {k: v for k, v in BASE.items() if k != "max_position_embeddings"}
    m = read_model(write_model(tmp_path / "b", none))
    assert m.derived_max_len == 2048 and "assumes" in m.derived_max_len_reason


def test_text_config_of_a_multimodal_model(tmp_path):
    config = {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "text_config": {
            **BASE,
            "model_type": "gemma3_text",
            "sliding_window": 512,
            "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
        },
    }
    m = read_model(write_model(tmp_path / "m", {**config, "vocab_size": 100, "hidden_size": 64}))
    assert m.architecture == "Gemma3ForConditionalGeneration" and m.model_type == "gemma3_text"
    assert m.attention_summary == {"sliding(512)": 3, "full": 1}


def test_quantization_is_reported(tmp_path):
    config = {**BASE, "quantization_config": {"quant_method": "awq", "bits": 4}}
    assert read_model(write_model(tmp_path / "m", config)).quantization == {"method": "awq", "bits": 4}


@pytest.mark.parametrize(
    "break_it,message",
    [
        (lambda d: (d / "config.json").unlink(), "config.json: missing"),
        (lambda d: (d / "config.json").write_text("{not json"), "unreadable JSON"),
        (
            lambda d: (
                (d / "model.safetensors").unlink(),
                (d / "config.json").write_text(json.dumps({**BASE, "model_type": "phi3"})),
            ),
            "no *.safetensors weights; config.json: model_type 'phi3' is not one lcserve can size",
        ),
        (
            lambda d: (d / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": "big"}, "weight_map": {}})
            ),
            "metadata.total_size is 'big'",
        ),
        (
            lambda d: (d / "config.json").write_text(
                json.dumps({k: v for k, v in BASE.items() if k != "num_hidden_layers"})
            ),
            "'num_hidden_layers' is missing",
        ),
        (
            lambda d: (d / "config.json").write_text(json.dumps({**BASE, "layer_types": ["full_attention"]})),
            "layer_types has 1 entries for 4 layers",
        ),
    ],
)
def test_user_errors_name_the_file_and_field(tmp_path, break_it, message):
    folder = write_model(tmp_path / "m", BASE)
    break_it(folder)
    with pytest.raises(ModelError, match=message.replace("*", r"\*").replace("(", r"\(")):
        read_model(folder)


def test_a_folder_with_weights_reads_the_headers_and_may_serve(tmp_path):
    m = read_model(write_model(tmp_path / "m", BASE))
    assert (m.weights_source, m.has_weights) == (WEIGHTS_FROM_HEADERS, True)
    assert m.weights_source_reason == "read from the headers of 1 safetensors file(s)"
    require_weights(m)


def test_config_only_folder_plans_from_config_arithmetic_but_cannot_serve(tmp_path):
    folder = write_model(tmp_path / "m", BASE)
    (folder / "model.safetensors").unlink()
    m = read_model(folder)
    assert (m.weights_source, m.has_weights) == (WEIGHTS_FROM_CONFIG, False)
    per_layer = 64 * 64 * 2 + 2 * 32 * 64 + 3 * 64 * 128 + 2 * 64  # q, o; k, v (2 KV heads of 16); MLP; 2 norms
    assert m.param_count == 2 * 100 * 64 + 64 + 4 * per_layer  # embeddings + lm_head, final norm, 4 layers
    assert m.param_bytes_by_dtype == {"BF16": 2 * m.param_count}
    assert m.linear_shapes["model.layers.3.self_attn.k_proj"] == (32, 64)
    assert "computed from config.json (llama, BF16)" in m.weights_source_reason
    with pytest.raises(
        ModelError, match=r"no \*\.safetensors weights \(sized from config.json arithmetic only\); download"
    ):
        require_weights(m)


def test_index_of_an_unknown_architecture_gives_bytes_but_no_linear_shapes(tmp_path):
    folder = write_model(tmp_path / "m", {**BASE, "model_type": "phi3"})
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps(
            {"metadata": {"total_size": 7_000_000}, "weight_map": {"model.embed_tokens.weight": "model.safetensors"}}
        )
    )
    m = read_model(folder)
    assert (m.weights_source, m.weight_bytes, m.param_count, m.linear_shapes) == (
        WEIGHTS_FROM_INDEX,
        7_000_000,
        3_500_000,
        {},
    )
    assert "no linear shapes for LoRA sizing (config.json: model_type 'phi3'" in m.weights_source_reason
    quantized = {
        **BASE,
        "model_type": "phi3",
        "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 32},
    }
    (folder / "config.json").write_text(json.dumps(quantized))
    with pytest.raises(ModelError, match="no \\*.safetensors weights; config.json: model_type 'phi3'"):
        read_model(folder)


def test_index_of_a_quantized_model_gives_its_total_and_the_config_count(tmp_path):
    quant = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True}
    folder = write_model(tmp_path / "m", {**BASE, "quantization_config": quant})
    (folder / "model.safetensors").unlink()
    config_only = read_model(folder)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 123_456}, "weight_map": {}})
    )
    m = read_model(folder)
    assert (m.weights_source, m.param_bytes_by_dtype) == (WEIGHTS_FROM_INDEX, {MIXED_DTYPES: 123_456})
    assert m.param_count == config_only.param_count and m.linear_shapes == config_only.linear_shapes
    assert config_only.param_bytes_by_dtype.keys() == {"BF16", "I32", "F16"}


def test_an_index_without_total_size_falls_back_to_config_arithmetic(tmp_path):
    folder = write_model(tmp_path / "m", BASE)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    m = read_model(folder)
    assert m.weights_source == WEIGHTS_FROM_CONFIG
    assert m.weights_source_reason.startswith("no *.safetensors, and no metadata.total_size in the index; computed")


def test_a_partial_download_names_the_missing_shard(tmp_path):
    folder = write_model(tmp_path / "m", BASE)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "metadata": {"total_size": 1},
                "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
            }
        )
    )
    with pytest.raises(ModelError, match="model-00002-of-00002.safetensors: file not found"):
        read_model(folder)


@pytest.fixture(scope="module")
def llama_8b(tmp_path_factory):
    """Llama-3.1-8B's real config.json with, by source: real-size sparse safetensors (+ index),
    the index only, or config.json only."""
    root = tmp_path_factory.mktemp("llama-3.1-8b")
    return {w: build_llama_3_1_8b(root / w, w) for w in ("safetensors", "index", "config")}


def test_llama_3_1_8b_folder_has_the_real_checkpoint_files(llama_8b):
    folder = llama_8b["safetensors"]
    real_index = json.loads((LLAMA_3_1_8B_DATA / "model.safetensors.index.json").read_text())
    assert json.loads((folder / "model.safetensors.index.json").read_text()) == real_index
    # sizes of meta-llama's published shards, and the header length its first shard starts with
    sizes = [(folder / f"model-0000{i}-of-00004.safetensors").stat().st_size for i in range(1, 5)]
    assert sizes == [4_976_698_672, 4_999_802_720, 4_915_916_176, 1_168_138_808]
    with (folder / "model-00001-of-00004.safetensors").open("rb") as f:
        assert f.read(8) == bytes.fromhex("2825000000000000")


def test_llama_3_1_8b_weights_from_each_source(llama_8b):
    headers, index, config = (read_model(llama_8b[w]) for w in ("safetensors", "index", "config"))
    assert (headers.weights_source, index.weights_source, config.weights_source) == (
        WEIGHTS_FROM_HEADERS,
        WEIGHTS_FROM_INDEX,
        WEIGHTS_FROM_CONFIG,
    )
    assert headers.param_bytes_by_dtype == {"BF16": 16_060_522_496} and headers.param_count == 8_030_261_248
    assert index.param_bytes_by_dtype == headers.param_bytes_by_dtype and index.param_count == headers.param_count
    assert abs(config.weight_bytes - headers.weight_bytes) <= 0.01 * headers.weight_bytes  # the issue's bar
    assert config.param_bytes_by_dtype == headers.param_bytes_by_dtype  # in fact exact
    assert config.linear_shapes == index.linear_shapes == headers.linear_shapes
    assert headers.linear_shapes["model.layers.31.self_attn.k_proj"] == (1024, 4096)
    assert (headers.derived_max_len, headers.num_kv_heads, headers.head_dim) == (131072, 8, 128)


def test_missing_folder(tmp_path):
    with pytest.raises(ModelError, match="not a folder"):
        read_model(tmp_path / "nope")


def test_embedded_gemma3_270m(embedded_model_dir):
    m = read_model(embedded_model_dir)
    assert (m.architecture, m.num_layers, m.num_kv_heads, m.head_dim, m.vocab_size) == (
        "Gemma3ForCausalLM",
        18,
        1,
        256,
        262144,
    )
    assert m.attention_summary == {"sliding(512)": 15, "full": 3}
    assert m.derived_max_len == 32768
    assert m.tie_word_embeddings and "lm_head" not in m.linear_shapes
    assert m.param_bytes_by_dtype["BF16"] == 2 * m.param_count
