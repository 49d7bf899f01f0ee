"""The model reader: attention kinds per layer, derived max length, weights, from files only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from lcserve.errors import ModelError
from lcserve.model_config import LayerAttention, read_model

BASE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
        "max_position_embeddings": 4096, "dtype": "bfloat16"}


def write_model(folder: Path, config: dict, tokenizer_max: int | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    tensors = {"model.embed_tokens.weight": np.zeros((config["vocab_size"], config["hidden_size"]), np.float16),
               "model.layers.0.self_attn.q_proj.weight": np.zeros((64, 64), np.float16),
               "model.layers.0.input_layernorm.weight": np.zeros((64,), np.float32)}
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
    config = {**BASE, "model_type": "gemma3_text", "num_hidden_layers": 12, "sliding_window": 512,
              "sliding_window_pattern": 6}
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


@pytest.mark.parametrize("rope,expected", [
    ({"rope_type": "linear", "factor": 4.0}, 16384),  # vLLM multiplies by the factor
    ({"rope_type": "dynamic", "factor": 2.0}, 8192),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}, 4096),  # already scaled
    ({"rope_type": "llama3", "factor": 8.0}, 4096),
])
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
    config = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
              "text_config": {**BASE, "model_type": "gemma3_text", "sliding_window": 512,
                              "layer_types": ["sliding_attention"] * 3 + ["full_attention"]}}
    m = read_model(write_model(tmp_path / "m", {**config, "vocab_size": 100, "hidden_size": 64}))
    assert m.architecture == "Gemma3ForConditionalGeneration" and m.model_type == "gemma3_text"
    assert m.attention_summary == {"sliding(512)": 3, "full": 1}


def test_quantization_is_reported(tmp_path):
    config = {**BASE, "quantization_config": {"quant_method": "awq", "bits": 4}}
    assert read_model(write_model(tmp_path / "m", config)).quantization == {"method": "awq", "bits": 4}


@pytest.mark.parametrize("break_it,message", [
    (lambda d: (d / "config.json").unlink(), "config.json: missing"),
    (lambda d: (d / "config.json").write_text("{not json"), "unreadable JSON"),
    (lambda d: (d / "model.safetensors").unlink(), "no *.safetensors"),
    (lambda d: (d / "config.json").write_text(json.dumps({k: v for k, v in BASE.items() if k != "num_hidden_layers"})),
     "'num_hidden_layers' is missing"),
    (lambda d: (d / "config.json").write_text(json.dumps({**BASE, "layer_types": ["full_attention"]})),
     "layer_types has 1 entries for 4 layers"),
])
def test_user_errors_name_the_file_and_field(tmp_path, break_it, message):
    folder = write_model(tmp_path / "m", BASE)
    break_it(folder)
    with pytest.raises(ModelError, match=message.replace("*", r"\*").replace("(", r"\(")):
        read_model(folder)


def test_missing_folder(tmp_path):
    with pytest.raises(ModelError, match="not a folder"):
        read_model(tmp_path / "nope")


def test_embedded_gemma3_270m(embedded_model_dir):
    m = read_model(embedded_model_dir)
    assert (m.architecture, m.num_layers, m.num_kv_heads, m.head_dim, m.vocab_size) == ("Gemma3ForCausalLM", 18, 1, 256, 262144)
    assert m.attention_summary == {"sliding(512)": 15, "full": 3}
    assert m.derived_max_len == 32768
    assert m.tie_word_embeddings and "lm_head" not in m.linear_shapes
    assert m.param_bytes_by_dtype["BF16"] == 2 * m.param_count
