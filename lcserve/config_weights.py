"""The tensors a checkpoint holds, computed from config.json alone: names, dtypes, shapes.

People size hardware before they download 16 to 140 GB, so the planner must work from
config.json. The table has the form of the safetensors headers (`TensorInfo` by name), so both
sources are summed by the same three functions at the end. Layouts follow the transformers
modeling code (names and shapes as `save_pretrained` writes them, MoE experts one linear each)
and, for quantized checkpoints, the tensors vLLM's loaders take (`auto_awq.py`, `auto_gptq.py`,
`fp8.py`). tests/unit/test_config_weights.py checks them against real headers and vLLM.
"""

from __future__ import annotations

import re

from .config_weights_hybrid import HYBRID_MODEL_TYPES, hybrid_layer_tensors
from .errors import ModelError
from .model_facts import DTYPE_NAMES, cdiv, config_dtype, text_config, tied_embeddings
from .safetensors_header import TensorInfo

FIX = "put the *.safetensors files (their headers suffice) or model.safetensors.index.json in the model folder"
KNOWN_MODEL_TYPES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "deepseek_v2",
    "deepseek_v3",
    *HYBRID_MODEL_TYPES,
)
FOUR_NORMS = ("gemma2", "gemma3_text")  # pre/post feed-forward norms besides the usual two
PER_HEAD_QK_NORM = ("qwen3", "qwen3_moe", "gemma3_text")
MLA = ("deepseek_v2", "deepseek_v3")
ROUTERS = ("gate", "shared_expert_gate")  # MoE routing linears: never quantized
QUANT_SCALE_DTYPE = "F16"  # AutoAWQ and AutoGPTQ/GPTQModel store scales as float16


def checkpoint_tensors(config: dict) -> dict[str, TensorInfo]:
    """Every tensor a checkpoint of this config holds, quantized as its quantization_config says."""
    tensors = unquantized_tensors(config)
    quant = config.get("quantization_config")
    return quantize(tensors, quant) if quant else tensors


def unquantized_tensors(config: dict) -> dict[str, TensorInfo]:
    """Every tensor of the model in its checkpoint dtype, linears as (out, in) weights."""
    c = text_config(config)
    _check_supported(config, c)
    dtype = checkpoint_dtype(c)
    out = embedding_tensors(c, dtype)
    for i in range(_need(c, "num_hidden_layers")):
        out.update(decoder_layer_tensors(c, i, dtype))
    return out


def checkpoint_dtype(c: dict) -> str:
    """Safetensors dtype of the unquantized tensors (config `dtype`/`torch_dtype`, else bfloat16)."""
    name = config_dtype(c)
    if name not in DTYPE_NAMES:
        raise ModelError(
            f"config.json: dtype {name!r} is not a checkpoint dtype lcserve knows ({', '.join(sorted(DTYPE_NAMES))}); {FIX}"
        )
    return DTYPE_NAMES[name]


def expert_count(c: dict) -> int:
    """Routed experts per MoE layer, under any of the names configs use for it (0: dense)."""
    return int(next((c[k] for k in ("num_local_experts", "num_experts", "n_routed_experts") if c.get(k)), 0))


def head_dim(c: dict) -> int:
    return int(c.get("head_dim") or _need(c, "hidden_size") // _need(c, "num_attention_heads"))


def embedding_tensors(c: dict, dtype: str) -> dict[str, TensorInfo]:
    """Token embeddings, the final norm, and lm_head unless tied to the embeddings."""
    hidden, vocab = _need(c, "hidden_size"), _need(c, "vocab_size")
    out = {**_tensor("model.embed_tokens.weight", dtype, vocab, hidden), **_norm("model.norm", hidden, dtype)}
    if not tied_embeddings(c):
        out.update(_tensor("lm_head.weight", dtype, vocab, hidden))
    return out


def decoder_layer_tensors(c: dict, i: int, dtype: str) -> dict[str, TensorInfo]:
    """One decoder layer: attention (standard or MLA), its norms, and a dense or MoE MLP; a hybrid's
    state layers in config_weights_hybrid.py."""
    if c["model_type"] in HYBRID_MODEL_TYPES:
        return hybrid_layer_tensors(c, i, dtype)
    prefix = f"model.layers.{i}"
    attention = mla_tensors if c["model_type"] in MLA else attention_tensors
    out = {**attention(c, f"{prefix}.self_attn", dtype), **layer_norm_tensors(c, prefix, dtype)}
    if is_moe_layer(c, i):
        out.update(moe_tensors(c, prefix, dtype))
    else:
        out.update(
            dense_mlp_tensors(
                f"{prefix}.mlp",
                _need(c, "hidden_size"),
                _need(c, "intermediate_size"),
                dtype,
                bias=bool(c.get("mlp_bias")),
            )
        )
    return out


def attention_tensors(c: dict, prefix: str, dtype: str) -> dict[str, TensorInfo]:
    """q/k/v/o projections (k and v with num_key_value_heads: GQA), biases where the model has
    them (Qwen2: q/k/v always; others: `attention_bias`), per-head q/k norms (Qwen3, Gemma 3)."""
    hidden, heads, d = _need(c, "hidden_size"), _need(c, "num_attention_heads"), head_dim(c)
    kv_heads = int(c.get("num_key_value_heads") or heads)
    model_type = c["model_type"]
    if model_type == "qwen2":
        qkv_bias, o_bias = True, False
    elif model_type == "qwen2_moe":
        qkv_bias, o_bias = bool(c.get("qkv_bias", True)), False
    else:
        qkv_bias = o_bias = bool(c.get("attention_bias"))
    out = {
        **_linear(f"{prefix}.q_proj", heads * d, hidden, dtype, qkv_bias),
        **_linear(f"{prefix}.k_proj", kv_heads * d, hidden, dtype, qkv_bias),
        **_linear(f"{prefix}.v_proj", kv_heads * d, hidden, dtype, qkv_bias),
        **_linear(f"{prefix}.o_proj", hidden, heads * d, dtype, o_bias),
    }
    if model_type in PER_HEAD_QK_NORM:
        out.update({**_norm(f"{prefix}.q_norm", d, dtype), **_norm(f"{prefix}.k_norm", d, dtype)})
    return out


def mla_tensors(c: dict, prefix: str, dtype: str) -> dict[str, TensorInfo]:
    """DeepSeek multi-head latent attention: q directly or through a low-rank q_a -> norm -> q_b
    (`q_lora_rank`), one joint KV down-projection that also carries the RoPE key, its norm, the
    KV up-projection to nope keys and values per head, and o."""
    hidden, heads = _need(c, "hidden_size"), _need(c, "num_attention_heads")
    kv_rank, rope, nope, v = (
        _need(c, k) for k in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
    )
    bias = bool(c.get("attention_bias"))
    q_rank = c.get("q_lora_rank")
    if q_rank:
        q = {
            **_linear(f"{prefix}.q_a_proj", q_rank, hidden, dtype, bias),
            **_norm(f"{prefix}.q_a_layernorm", q_rank, dtype),
            **_linear(f"{prefix}.q_b_proj", heads * (nope + rope), q_rank, dtype),
        }
    else:
        q = _linear(f"{prefix}.q_proj", heads * (nope + rope), hidden, dtype)
    return {
        **q,
        **_linear(f"{prefix}.kv_a_proj_with_mqa", kv_rank + rope, hidden, dtype, bias),
        **_norm(f"{prefix}.kv_a_layernorm", kv_rank, dtype),
        **_linear(f"{prefix}.kv_b_proj", heads * (nope + v), kv_rank, dtype),
        **_linear(f"{prefix}.o_proj", hidden, heads * v, dtype, bias),
    }


def layer_norm_tensors(c: dict, prefix: str, dtype: str) -> dict[str, TensorInfo]:
    """The norms around attention and MLP: two, or four in Gemma 2 and 3."""
    names = ["input_layernorm", "post_attention_layernorm"]
    if c["model_type"] in FOUR_NORMS:
        names += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    hidden = _need(c, "hidden_size")
    return {k: t for name in names for k, t in _norm(f"{prefix}.{name}", hidden, dtype).items()}


def dense_mlp_tensors(
    prefix: str, hidden: int, intermediate: int, dtype: str, bias: bool = False
) -> dict[str, TensorInfo]:
    """Gated MLP: gate and up (hidden -> intermediate), down back."""
    return {
        **_linear(f"{prefix}.gate_proj", intermediate, hidden, dtype, bias),
        **_linear(f"{prefix}.up_proj", intermediate, hidden, dtype, bias),
        **_linear(f"{prefix}.down_proj", hidden, intermediate, dtype, bias),
    }


def is_moe_layer(c: dict, i: int) -> bool:
    """Whether layer i has routed experts: every Mixtral layer; Qwen MoE outside `mlp_only_layers`
    every `decoder_sparse_step` layers; DeepSeek from `first_k_dense_replace` on, every
    `moe_layer_freq` layers (vLLM's rule)."""
    model_type = c["model_type"]
    if model_type == "mixtral":
        return True
    if model_type in ("qwen2_moe", "qwen3_moe"):
        step = int(c.get("decoder_sparse_step") or 1)
        return expert_count(c) > 0 and i not in (c.get("mlp_only_layers") or []) and (i + 1) % step == 0
    if model_type in MLA:
        return (
            expert_count(c) > 0
            and i >= int(c.get("first_k_dense_replace") or 0)
            and i % int(c.get("moe_layer_freq") or 1) == 0
        )
    return False


def moe_tensors(c: dict, prefix: str, dtype: str) -> dict[str, TensorInfo]:
    """A MoE block: the router, one gated MLP per routed expert, and the shared experts (Qwen2 MoE:
    one gated shared expert; DeepSeek: n_shared_experts fused into one MLP)."""
    hidden, model_type = _need(c, "hidden_size"), c["model_type"]
    if model_type == "mixtral":
        experts, inter = expert_count(c) or _need(c, "num_local_experts"), _need(c, "intermediate_size")
        out = _linear(f"{prefix}.block_sparse_moe.gate", experts, hidden, dtype)
        for e in range(experts):
            p = f"{prefix}.block_sparse_moe.experts.{e}"
            out.update(
                {
                    **_linear(f"{p}.w1", inter, hidden, dtype),
                    **_linear(f"{p}.w2", hidden, inter, dtype),
                    **_linear(f"{p}.w3", inter, hidden, dtype),
                }
            )
        return out
    experts, inter = expert_count(c) or _need(c, "num_experts"), _need(c, "moe_intermediate_size")
    out = _linear(f"{prefix}.mlp.gate", experts, hidden, dtype)
    if model_type == "deepseek_v3" or c.get("topk_method") == "noaux_tc":
        out.update(_tensor(f"{prefix}.mlp.gate.e_score_correction_bias", dtype, experts))
    for e in range(experts):
        out.update(dense_mlp_tensors(f"{prefix}.mlp.experts.{e}", hidden, inter, dtype))
    if model_type == "qwen2_moe":
        out.update(
            dense_mlp_tensors(f"{prefix}.mlp.shared_expert", hidden, _need(c, "shared_expert_intermediate_size"), dtype)
        )
        out.update(_linear(f"{prefix}.mlp.shared_expert_gate", 1, hidden, dtype))
    elif model_type in MLA and c.get("n_shared_experts"):
        out.update(dense_mlp_tensors(f"{prefix}.mlp.shared_experts", hidden, inter * int(c["n_shared_experts"]), dtype))
    return out


# Quantization: each quantized linear's (out, in) weight is replaced by the tensors its format stores.


def quantize(tensors: dict[str, TensorInfo], quant: dict) -> dict[str, TensorInfo]:
    """The table with every quantized linear in its stored form. Embeddings, norms, routers and
    lm_head stay unquantized (lm_head only quantized when the config says `lm_head: true`)."""
    method = str(quant.get("quant_method", "")).lower()
    if method not in ("awq", "gptq", "fp8"):
        raise ModelError(
            f"config.json: quantization_config.quant_method {method or None!r} is not one lcserve "
            f"can size from config.json (awq, gptq, fp8); {FIX}"
        )
    skip = list(quant.get("modules_to_not_convert") or []) + list(quant.get("ignored_layers") or [])
    out = {}
    for name, t in tensors.items():
        module = name.removesuffix(".weight")
        if not _is_quantizable(name, t, quant, skip):
            out[name] = t
            continue
        out_features, in_features = t.shape
        if method == "fp8":
            out.update(fp8_linear_tensors(module, out_features, in_features, quant))
            continue
        bits, group = _bits_and_group(module, quant)
        if method == "awq":
            out.update(awq_linear_tensors(module, out_features, in_features, bits, group))
        else:
            out.update(gptq_linear_tensors(module, out_features, in_features, bits, group))
    return out


def awq_linear_tensors(
    module: str, out_features: int, in_features: int, bits: int, group_size: int
) -> dict[str, TensorInfo]:
    """AutoAWQ (GEMM): qweight (in, out/pack) int32 packed along out, qzeros (groups, out/pack)
    int32, scales (groups, out) float16; pack = 32/bits (vLLM auto_awq.py create_weights)."""
    pack, groups = _pack_factor(module, bits, out_features), _groups(module, in_features, group_size)
    return {
        **_tensor(f"{module}.qweight", "I32", in_features, out_features // pack),
        **_tensor(f"{module}.qzeros", "I32", groups, out_features // pack),
        **_tensor(f"{module}.scales", QUANT_SCALE_DTYPE, groups, out_features),
    }


def gptq_linear_tensors(
    module: str, out_features: int, in_features: int, bits: int, group_size: int
) -> dict[str, TensorInfo]:
    """GPTQ: qweight (in/pack, out) int32 packed along in, qzeros (groups, out/pack) int32, scales
    (groups, out) float16 (vLLM auto_gptq.py create_weights), and g_idx (in,) int32, the act-order
    map the checkpoints carry and vLLM discards (quantization/base_config.py)."""
    pack, groups = _pack_factor(module, bits, in_features), _groups(module, in_features, group_size)
    _pack_factor(module, bits, out_features)  # qzeros pack the outputs too
    return {
        **_tensor(f"{module}.qweight", "I32", in_features // pack, out_features),
        **_tensor(f"{module}.qzeros", "I32", groups, out_features // pack),
        **_tensor(f"{module}.scales", QUANT_SCALE_DTYPE, groups, out_features),
        **_tensor(f"{module}.g_idx", "I32", in_features),
    }


def fp8_linear_tensors(module: str, out_features: int, in_features: int, quant: dict) -> dict[str, TensorInfo]:
    """FP8 e4m3 weight (out, in) with float32 scales: per [bn, bk] block as `weight_scale_inv`
    (DeepSeek V3, Qwen3 FP8: `weight_block_size`), else one per tensor as `weight_scale`, plus one
    `input_scale` with static activations (vLLM fp8.py create_weights)."""
    out = _tensor(f"{module}.weight", "F8_E4M3", out_features, in_features)
    block = quant.get("weight_block_size")
    if block:
        bn, bk = (int(b) for b in block)
        out.update(_tensor(f"{module}.weight_scale_inv", "F32", cdiv(out_features, bn), cdiv(in_features, bk)))
    else:
        out.update(_tensor(f"{module}.weight_scale", "F32"))
    if quant.get("activation_scheme") == "static":
        out.update(_tensor(f"{module}.input_scale", "F32"))
    return out


# Sums over a table: the same for computed tables and for headers read from files.


def bytes_by_dtype(tensors: dict[str, TensorInfo]) -> dict[str, int]:
    """Bytes per safetensors dtype."""
    out: dict[str, int] = {}
    for t in tensors.values():
        out[t.dtype] = out.get(t.dtype, 0) + t.nbytes
    return out


def param_count(tensors: dict[str, TensorInfo]) -> int:
    """Stored elements (a packed int32 counts as one, as in the headers)."""
    return sum(t.numel for t in tensors.values())


def linear_shapes(tensors: dict[str, TensorInfo]) -> dict[str, tuple[int, int]]:
    """(out, in) of every 2-D `.weight`, keyed by module name (LoRA sizing needs them)."""
    return {
        name.removesuffix(".weight"): (t.shape[0], t.shape[1])
        for name, t in tensors.items()
        if len(t.shape) == 2 and name.endswith(".weight")
    }


def _check_supported(config: dict, c: dict) -> None:
    model_type = c.get("model_type")
    if model_type not in KNOWN_MODEL_TYPES:
        raise ModelError(
            f"config.json: model_type {model_type!r} is not one lcserve can size from config.json alone "
            f"({', '.join(KNOWN_MODEL_TYPES)}); {FIX}"
        )
    if any(key in config for key in ("vision_config", "audio_config")):
        raise ModelError(
            f"config.json: a multimodal model (model_type {config.get('model_type')!r}): lcserve sizes "
            f"only text decoders from config.json; {FIX}"
        )
    arch = (config.get("architectures") or ["ForCausalLM"])[0]
    if not str(arch).endswith("ForCausalLM"):
        raise ModelError(
            f"config.json: architecture {arch!r} is not a causal LM, the only head lcserve sizes "
            f"from config.json; {FIX}"
        )


def _is_quantizable(name: str, t: TensorInfo, quant: dict, skip: list[str]) -> bool:
    """A linear weight inside the decoder layers (or lm_head when the config quantizes it), not a
    router and not listed in modules_to_not_convert / ignored_layers / a GPTQ `-:` dynamic rule."""
    if not name.endswith(".weight") or len(t.shape) != 2:
        return False
    module = name.removesuffix(".weight")
    if module == "lm_head":
        return bool(quant.get("lm_head"))
    if not module.startswith("model.layers.") or module.rsplit(".", 1)[-1] in ROUTERS:
        return False
    if any(f".{s}." in f".{module}." for s in skip):
        return False
    return not any(p.startswith("-:") and re.match(p[2:], module) for p in quant.get("dynamic") or {})


def _bits_and_group(module: str, quant: dict) -> tuple[int, int]:
    """bits and group_size for one module: the config's, or a GPTQ `dynamic` rule's override."""
    bits = int(quant.get("bits") or quant.get("w_bit") or 0)
    group = int(quant.get("group_size") or quant.get("q_group_size") or -1)
    for pattern, override in (quant.get("dynamic") or {}).items():
        if not pattern.startswith("-:") and re.match(pattern.removeprefix("+:"), module):
            bits, group = int(override.get("bits", bits)), int(override.get("group_size", group))
            break
    if bits not in (4, 8):
        raise ModelError(
            f"config.json: quantization_config bits={bits or None} is not a width lcserve sizes (4 or 8); {FIX}"
        )
    return bits, group


def _pack_factor(module: str, bits: int, size: int) -> int:
    pack = 32 // bits
    if size % pack:
        raise ModelError(
            f"config.json: {module} has {size} features, not a multiple of {pack} as {bits}-bit packing needs; {FIX}"
        )
    return pack


def _groups(module: str, in_features: int, group_size: int) -> int:
    if group_size == -1:
        return 1
    if in_features % group_size:
        raise ModelError(
            f"config.json: {module} has {in_features} inputs, not a multiple of group_size {group_size}; {FIX}"
        )
    return in_features // group_size


def _need(c: dict, key: str) -> int:
    if c.get(key) is None:
        raise ModelError(
            f"config.json: field {key!r} is missing (needed to compute the weights of a "
            f"{c.get('model_type')} model); {FIX}"
        )
    return int(c[key])


def _tensor(name: str, dtype: str, *shape: int) -> dict[str, TensorInfo]:
    return {name: TensorInfo(name, dtype, tuple(int(d) for d in shape))}


def _linear(module: str, out_features: int, in_features: int, dtype: str, bias: bool = False) -> dict[str, TensorInfo]:
    out = _tensor(f"{module}.weight", dtype, out_features, in_features)
    if bias:
        out.update(_tensor(f"{module}.bias", dtype, out_features))
    return out


def _norm(module: str, size: int, dtype: str) -> dict[str, TensorInfo]:
    return _tensor(f"{module}.weight", dtype, size)
