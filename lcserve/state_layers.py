"""The recurrent-state layers of hybrid models (Mamba, Mamba2, gated delta net), read from config.json.

A hybrid keeps a fixed-size state per sequence in its state layers and a growing KV cache in its
few attention layers. Which layer is which, and the dimensions of the state, come from config.json
as vLLM 0.32's model classes read them; each `StateDims.dims` holds the keyword arguments of the
`MambaStateShapeCalculator` method (model_executor/layers/mamba/mamba_utils.py) that the model
class's `get_mamba_state_shape_from_config` calls, so the planner computes the very shapes vLLM does.

Families whose layers vLLM builds some other way (Falcon-H1 runs attention and Mamba2 in every
layer, Zamba2 shares attention blocks) get a layer kind the planner does not model, and it refuses
them in one line naming that kind.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ModelError

# Layer kinds with a recurrent state (MambaSpec in vLLM); "none" is a layer without any cache
# (NemotronH's MLP and MoE layers).
STATE_KINDS = ("mamba2", "mamba1", "gated_delta_net")
NO_CACHE = "none"


@dataclass(frozen=True)
class StateDims:
    """One model's state-layer dimensions, as vLLM's shape calculator takes them."""

    kind: str  # the MambaStateShapeCalculator method: mamba2 / mamba1 / gated_delta_net (+ "_state_shape")
    dims: tuple[tuple[str, int], ...]  # its keyword arguments besides the TP size
    source: str  # the vLLM function and the config.json fields, for the reasons
    ssm_cache_dtype: str = "auto"  # the model's own default for --mamba-ssm-cache-dtype (NemotronH: float32)
    prefill_checkpoint_blocks: int = 0  # MambaMixer2.get_kv_cache_spec: 1 (a state checkpoint in align mode)

    def get(self, name: str) -> int:
        return dict(self.dims)[name]


def _int(text: dict, key: str, default: int | None = None) -> int:
    value = text.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelError(
            f"config.json: field {key!r} is {value!r}; a hybrid model needs it as a positive integer: fix config.json"
        )
    return value


def _granite(text: dict, num_layers: int) -> tuple[list[str], StateDims]:
    # vllm/model_executor/models/granitemoehybrid.py get_mamba_state_shape_from_config
    intermediate = _int(text, "mamba_expand", 2) * _int(text, "hidden_size")
    heads = _int(text, "mamba_n_heads", 128)
    head_dim = text.get("mamba_d_head", "auto")
    head_dim = intermediate // heads if head_dim == "auto" else _int(text, "mamba_d_head")
    dims = StateDims(
        "mamba2",
        (
            ("intermediate_size", intermediate),
            ("n_groups", _int(text, "mamba_n_groups", 1)),
            ("num_heads", heads),
            ("head_dim", head_dim),
            ("state_size", _int(text, "mamba_d_state", 256)),
            ("conv_kernel", _int(text, "mamba_d_conv", 4)),
        ),
        "GraniteMoeHybridForCausalLM.get_mamba_state_shape_from_config: mamba2_state_shape(mamba_expand x "
        "hidden_size, mamba_n_groups, mamba_n_heads, mamba_d_head, mamba_d_state, mamba_d_conv)",
        prefill_checkpoint_blocks=1,
    )
    # published configs say mamba/attention; transformers 5 writes linear_attention/full_attention
    types = text.get("layer_types") or text.get("layers_block_type") or ["mamba"] * num_layers
    kinds = {"mamba": "mamba2", "linear_attention": "mamba2", "attention": "full", "full_attention": "full"}
    return [kinds.get(t, str(t)) for t in types], dims


def _qwen3_next(text: dict, num_layers: int) -> tuple[list[str], StateDims]:
    # vllm/model_executor/models/qwen3_next.py get_mamba_state_shape_from_config
    dims = StateDims(
        "gated_delta_net",
        (
            ("num_k_heads", _int(text, "linear_num_key_heads")),
            ("num_v_heads", _int(text, "linear_num_value_heads")),
            ("head_k_dim", _int(text, "linear_key_head_dim")),
            ("head_v_dim", _int(text, "linear_value_head_dim")),
            ("conv_kernel_size", _int(text, "linear_conv_kernel_dim")),
        ),
        "Qwen3NextForCausalLM.get_mamba_state_shape_from_config: gated_delta_net_state_shape(linear_num_key_heads, "
        "linear_num_value_heads, linear_key_head_dim, linear_value_head_dim, linear_conv_kernel_dim)",
    )
    types = text.get("layer_types")
    if not types:  # transformers' Qwen3NextConfig default: every full_attention_interval-th layer is attention
        interval = _int(text, "full_attention_interval", 4)
        types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(num_layers)]
    kinds = {"full_attention": "full", "linear_attention": "gated_delta_net"}
    return [kinds.get(t, str(t)) for t in types], dims


def _nemotron_h(text: dict, num_layers: int) -> tuple[list[str], StateDims]:
    # vllm/model_executor/models/nemotron_h.py get_mamba_state_shape_from_config (without ReplaySSM)
    heads, head_dim = _int(text, "mamba_num_heads"), _int(text, "mamba_head_dim")
    dims = StateDims(
        "mamba2",
        (
            ("intermediate_size", heads * head_dim),
            ("n_groups", _int(text, "n_groups")),
            ("num_heads", heads),
            ("head_dim", head_dim),
            ("state_size", _int(text, "ssm_state_size")),
            ("conv_kernel", _int(text, "conv_kernel")),
        ),
        "NemotronHForCausalLM.get_mamba_state_shape_from_config: mamba2_state_shape(mamba_num_heads x "
        "mamba_head_dim, n_groups, mamba_num_heads, mamba_head_dim, ssm_state_size, conv_kernel)",
        # NemotronHForCausalLMConfig.update_mamba_ssm_cache_dtype: the config's value, else float32
        ssm_cache_dtype=str(text.get("mamba_ssm_cache_dtype") or "float32"),
        prefill_checkpoint_blocks=1,
    )
    # published configs: hybrid_override_pattern "M-M*..."; transformers 5 writes layers_block_type
    kinds = {"M": "mamba2", "*": "full", "-": NO_CACHE, "E": NO_CACHE, "mamba": "mamba2", "linear_attention": "mamba2"}
    kinds |= {"attention": "full", "full_attention": "full", "mlp": NO_CACHE, "moe": NO_CACHE}
    types = text.get("layers_block_type") or list(str(text.get("hybrid_override_pattern") or ""))
    return [kinds.get(t, f"pattern {t!r}") for t in types], dims


def _jamba(text: dict, num_layers: int) -> tuple[list[str], StateDims]:
    # vllm/model_executor/models/jamba.py get_mamba_state_shape_from_config
    dims = StateDims(
        "mamba1",
        (
            ("intermediate_size", _int(text, "mamba_expand", 2) * _int(text, "hidden_size")),
            ("state_size", _int(text, "mamba_d_state", 16)),
            ("conv_kernel", _int(text, "mamba_d_conv", 4)),
        ),
        "JambaForCausalLM.get_mamba_state_shape_from_config: mamba1_state_shape(mamba_expand x hidden_size, "
        "mamba_d_state, mamba_d_conv)",
    )
    period, offset = _int(text, "attn_layer_period", 8), int(text.get("attn_layer_offset", 4))
    return ["full" if i % period == offset else "mamba1" for i in range(num_layers)], dims


READERS = {"granitemoehybrid": _granite, "qwen3_next": _qwen3_next, "nemotron_h": _nemotron_h, "jamba": _jamba}
# Hybrids whose layers vLLM 0.32 builds otherwise: the planner names them and refuses.
UNMODELLED = {
    "falcon_h1": "mamba2+attention (Falcon-H1: both in every layer)",
    "zamba2": "mamba2+shared attention (Zamba2)",
    "bamba": "mamba2 (Bamba: removed from vLLM in 0.23.0)",
}


def hybrid_layers(text: dict, num_layers: int) -> tuple[tuple[str, ...], StateDims] | None:
    """Each layer's kind ("full", a STATE_KINDS kind, "none", or one the planner refuses) and the state
    dimensions, for a hybrid family; None for any other model."""
    model_type = str(text.get("model_type", ""))
    if model_type in UNMODELLED:
        return (UNMODELLED[model_type],) * num_layers, StateDims(model_type, (), "")
    if model_type not in READERS:
        return None
    kinds, dims = READERS[model_type](text, num_layers)
    if len(kinds) != num_layers:
        raise ModelError(
            f"config.json: {len(kinds)} layer types for {num_layers} layers (num_hidden_layers); fix the config"
        )
    return tuple(kinds), dims
