"""The decoder layers of hybrid models (GraniteMoeHybrid, Qwen3Next), computed from config.json alone.

Names and shapes as transformers' `save_pretrained` writes them (config_weights.py sums the table;
tests/unit/test_hybrid_plan.py checks it against the headers of tiny models built by transformers):
a Mamba2 mixer (fused in_proj, depthwise conv1d, A_log, D, dt_bias, gated norm, out_proj) or a gated
delta net (fused in_proj_qkvz and in_proj_ba, conv1d, A_log, dt_bias, per-head norm, out_proj) where
the layer is not attention.
"""

from __future__ import annotations

from .safetensors_header import TensorInfo
from .state_layers import hybrid_layers

HYBRID_MODEL_TYPES = ("granitemoehybrid", "qwen3_next")


def _t(out: dict, name: str, dtype: str, *shape: int) -> None:
    out[name] = TensorInfo(name, dtype, tuple(int(d) for d in shape))


def _attention(out: dict, c: dict, prefix: str, dtype: str, gated: bool) -> None:
    """q/k/v/o; Qwen3Next's q_proj also carries the output gate, and it has per-head q/k norms."""
    hidden, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
    d = int(c.get("head_dim") or hidden // heads)
    kv = int(c.get("num_key_value_heads") or heads)
    _t(out, f"{prefix}.q_proj.weight", dtype, heads * d * (2 if gated else 1), hidden)
    _t(out, f"{prefix}.k_proj.weight", dtype, kv * d, hidden)
    _t(out, f"{prefix}.v_proj.weight", dtype, kv * d, hidden)
    _t(out, f"{prefix}.o_proj.weight", dtype, hidden, heads * d)
    if c.get("attention_bias"):
        for name, size in (("q", heads * d), ("k", kv * d), ("v", kv * d), ("o", hidden)):
            _t(out, f"{prefix}.{name}_proj.bias", dtype, size)
    if gated:
        _t(out, f"{prefix}.q_norm.weight", dtype, d)
        _t(out, f"{prefix}.k_norm.weight", dtype, d)


def _mamba2(out: dict, c: dict, prefix: str, dtype: str) -> None:
    hidden, inner = int(c["hidden_size"]), int(c.get("mamba_expand", 2)) * int(c["hidden_size"])
    heads, groups, state = int(c["mamba_n_heads"]), int(c.get("mamba_n_groups", 1)), int(c["mamba_d_state"])
    conv_dim = inner + 2 * groups * state
    _t(out, f"{prefix}.in_proj.weight", dtype, inner + conv_dim + heads, hidden)
    if c.get("mamba_proj_bias"):
        _t(out, f"{prefix}.in_proj.bias", dtype, inner + conv_dim + heads)
    _t(out, f"{prefix}.conv1d.weight", dtype, conv_dim, 1, int(c.get("mamba_d_conv", 4)))
    if c.get("mamba_conv_bias", True):
        _t(out, f"{prefix}.conv1d.bias", dtype, conv_dim)
    for name in ("A_log", "D", "dt_bias"):
        _t(out, f"{prefix}.{name}", dtype, heads)
    _t(out, f"{prefix}.norm.weight", dtype, inner)
    _t(out, f"{prefix}.out_proj.weight", dtype, hidden, inner)
    if c.get("mamba_proj_bias"):
        _t(out, f"{prefix}.out_proj.bias", dtype, hidden)


def _gated_delta_net(out: dict, c: dict, prefix: str, dtype: str) -> None:
    hidden, nk, nv = int(c["hidden_size"]), int(c["linear_num_key_heads"]), int(c["linear_num_value_heads"])
    key_dim, value_dim = nk * int(c["linear_key_head_dim"]), nv * int(c["linear_value_head_dim"])
    _t(out, f"{prefix}.in_proj_qkvz.weight", dtype, 2 * key_dim + 2 * value_dim, hidden)
    _t(out, f"{prefix}.in_proj_ba.weight", dtype, 2 * nv, hidden)
    _t(out, f"{prefix}.conv1d.weight", dtype, 2 * key_dim + value_dim, 1, int(c["linear_conv_kernel_dim"]))
    _t(out, f"{prefix}.A_log", dtype, nv)
    _t(out, f"{prefix}.dt_bias", dtype, nv)
    _t(out, f"{prefix}.norm.weight", dtype, int(c["linear_value_head_dim"]))
    _t(out, f"{prefix}.out_proj.weight", dtype, hidden, value_dim)


def _granite_mlp(out: dict, c: dict, prefix: str, dtype: str) -> None:
    """GraniteMoeHybrid: routed experts as two stacked tensors and a router, then a shared MLP."""
    hidden, experts = int(c["hidden_size"]), int(c.get("num_local_experts") or 0)
    if experts:
        inter = int(c["intermediate_size"])
        _t(out, f"{prefix}.block_sparse_moe.input_linear.weight", dtype, experts, 2 * inter, hidden)
        _t(out, f"{prefix}.block_sparse_moe.output_linear.weight", dtype, experts, hidden, inter)
        _t(out, f"{prefix}.block_sparse_moe.router.layer.weight", dtype, experts, hidden)
    shared = int(c.get("shared_intermediate_size") or 0)
    if shared:
        _t(out, f"{prefix}.shared_mlp.input_linear.weight", dtype, 2 * shared, hidden)
        _t(out, f"{prefix}.shared_mlp.output_linear.weight", dtype, hidden, shared)


def _qwen3_next_mlp(out: dict, c: dict, prefix: str, dtype: str) -> None:
    """Qwen3Next: routed experts (one gated MLP each), a router, a gated shared expert."""
    hidden, experts, inter = int(c["hidden_size"]), int(c["num_experts"]), int(c["moe_intermediate_size"])
    for e in range(experts):
        _gated_mlp(out, f"{prefix}.mlp.experts.{e}", hidden, inter, dtype)
    _t(out, f"{prefix}.mlp.gate.weight", dtype, experts, hidden)
    shared = int(c.get("shared_expert_intermediate_size") or 0)
    if shared:
        _gated_mlp(out, f"{prefix}.mlp.shared_expert", hidden, shared, dtype)
        _t(out, f"{prefix}.mlp.shared_expert_gate.weight", dtype, 1, hidden)


def _gated_mlp(out: dict, prefix: str, hidden: int, inter: int, dtype: str) -> None:
    _t(out, f"{prefix}.gate_proj.weight", dtype, inter, hidden)
    _t(out, f"{prefix}.up_proj.weight", dtype, inter, hidden)
    _t(out, f"{prefix}.down_proj.weight", dtype, hidden, inter)


def hybrid_layer_tensors(c: dict, i: int, dtype: str) -> dict[str, TensorInfo]:
    """Decoder layer i of a GraniteMoeHybrid or Qwen3Next checkpoint: norms, mixer, MLP."""
    kinds, _ = hybrid_layers(c, int(c["num_hidden_layers"]))
    prefix, out = f"model.layers.{i}", {}
    hidden = int(c["hidden_size"])
    _t(out, f"{prefix}.input_layernorm.weight", dtype, hidden)
    _t(out, f"{prefix}.post_attention_layernorm.weight", dtype, hidden)
    granite = c["model_type"] == "granitemoehybrid"
    if kinds[i] == "full":
        _attention(out, c, f"{prefix}.self_attn", dtype, gated=not granite)
    elif granite:
        _mamba2(out, c, f"{prefix}.mamba", dtype)
    else:
        _gated_delta_net(out, c, f"{prefix}.linear_attn", dtype)
    (_granite_mlp if granite else _qwen3_next_mlp)(out, c, prefix, dtype)
    return out
