"""Tiny random models of several attention layouts, for checking the planner against vLLM.

Each model is built from a transformers config class with small sizes (random weights,
bf16 safetensors), saved once under `$LCSERVE_HOME/tiny-models/<name>` and reused. The
KV layout (layers, KV heads, head size, sliding windows, MLA ranks) is what matters for
the KV accounting; the weights are noise. vLLM is started on them with
`--skip-tokenizer-init`, so no tokenizer is written.

`WEIGHT_LAYOUT_BUILDERS` adds models whose weight layout (MoE experts, shared experts, tied
embeddings, biases) the config arithmetic is checked against; they are not in the vLLM
benchmark. `build_llama_3_1_8b` writes a real-size Llama-3.1-8B folder whose weights are holes.

The one home of the tiny test models: the tests and the benchmarks (run from the repository root
as `python -m benchmarks.NAME`) both import it; the wheel does not ship it.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

from lcserve.paths import atomic_dir, lcserve_home

VOCAB = 512
MARKER = "tiny_model.json"


def _llama_gqa():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=VOCAB,
        max_position_embeddings=8192,
    )


def _qwen3():
    from transformers import Qwen3Config

    return Qwen3Config(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=VOCAB,
        max_position_embeddings=16384,
    )


def _mistral_swa():
    from transformers import MistralConfig

    return MistralConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=VOCAB,
        max_position_embeddings=16384,
        sliding_window=1024,
    )


def _gemma2_hybrid():
    from transformers import Gemma2Config

    return Gemma2Config(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=VOCAB,
        max_position_embeddings=8192,
        sliding_window=512,
    )


def _gemma3_uneven():
    """7 layers, 5 sliding : 2 full: vLLM must pad the sliding groups (3 groups of 2)."""
    from transformers import Gemma3TextConfig

    layer_types = ["sliding_attention", "sliding_attention", "full_attention"] * 2 + ["sliding_attention"]
    return Gemma3TextConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=7,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=64,
        vocab_size=VOCAB,
        max_position_embeddings=8192,
        sliding_window=256,
        layer_types=layer_types,
    )


def _deepseek_v2_mla():
    from transformers import DeepseekV2Config

    return DeepseekV2Config(
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        kv_lora_rank=128,
        q_lora_rank=None,
        qk_rope_head_dim=32,
        qk_nope_head_dim=64,
        v_head_dim=64,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=2,
        vocab_size=VOCAB,
        max_position_embeddings=8192,
    )


def _mixtral_moe():
    from transformers import MixtralConfig

    return MixtralConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=VOCAB,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=8192,
    )


def _qwen2_moe_shared():
    """Shared expert with its gate, q/k/v biases, and one dense layer (mlp_only_layers)."""
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=192,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        num_experts=4,
        num_experts_per_tok=2,
        mlp_only_layers=[1],
        max_position_embeddings=8192,
    )


def _qwen3_moe():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=VOCAB,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=8192,
    )


def _deepseek_v3_moe():
    """MLA with a low-rank q (q_lora_rank), one dense layer, then routed + shared experts."""
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=96,
        kv_lora_rank=64,
        qk_rope_head_dim=16,
        qk_nope_head_dim=32,
        v_head_dim=32,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        vocab_size=VOCAB,
        max_position_embeddings=8192,
    )


def _qwen2_tied():
    """Tied embeddings (no lm_head tensor) and q/k/v biases."""
    from transformers import Qwen2Config

    return Qwen2Config(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
    )


def _gemma_tied():
    from transformers import GemmaConfig

    return GemmaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        vocab_size=VOCAB,
        max_position_embeddings=8192,
    )


def _granite_hybrid(d_state: int = 64):
    """GraniteMoeHybrid (Granite 4.0-H): mamba, attention, mamba, mamba. With d_state 64 one layer's state
    (3 x 640 bf16 conv + 8 x 64 x 64 fp32 SSM on the CPU build) outgrows a 128-token attention page, so vLLM
    raises the block size to 384 and pads the state page."""
    from transformers import GraniteMoeHybridConfig

    return GraniteMoeHybridConfig(
        hidden_size=256,
        intermediate_size=256,
        shared_intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=16384,
        layer_types=["mamba", "attention", "mamba", "mamba"],
        mamba_n_heads=8,
        mamba_d_head=64,
        mamba_d_state=d_state,
        mamba_n_groups=1,
        mamba_d_conv=4,
        mamba_expand=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )


def _granite_hybrid_bigstate():
    """The same with an 8 MiB SSM state per layer: at 1 GiB of KV cache vLLM has 127 blocks, fewer than its
    CPU default max_num_seqs 128 (a GPU build refuses to start so)."""
    return _granite_hybrid(d_state=4096)


def _qwen3_next():
    """Qwen3Next: three gated-delta-net layers, then full attention (full_attention_interval 4)."""
    from transformers import Qwen3NextConfig

    return Qwen3NextConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=VOCAB,
        max_position_embeddings=16384,
        layer_types=["linear_attention"] * 3 + ["full_attention"],
        linear_num_key_heads=4,
        linear_num_value_heads=8,
        linear_key_head_dim=32,
        linear_value_head_dim=32,
        linear_conv_kernel_dim=4,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=128,
        shared_expert_intermediate_size=128,
    )


BUILDERS = {
    "llama-gqa": _llama_gqa,
    "qwen3": _qwen3,
    "mistral-swa": _mistral_swa,
    "gemma2-hybrid": _gemma2_hybrid,
    "gemma3-uneven": _gemma3_uneven,
    "deepseek-v2-mla": _deepseek_v2_mla,
}
WEIGHT_LAYOUT_BUILDERS = {
    "mixtral-moe": _mixtral_moe,
    "qwen2-moe-shared": _qwen2_moe_shared,
    "qwen3-moe": _qwen3_moe,
    "deepseek-v3-moe": _deepseek_v3_moe,
    "qwen2-tied": _qwen2_tied,
    "gemma-tied": _gemma_tied,
}


def _nemotron_h():
    """NemotronH: Mamba2 (2 groups), attention, MLP (no cache), Mamba2; its SSM state float32 by default."""
    from transformers import NemotronHConfig

    return NemotronHConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        layers_block_type=["mamba", "attention", "mlp", "mamba"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        mamba_num_heads=8,
        mamba_head_dim=32,
        ssm_state_size=32,
        n_groups=2,
        vocab_size=VOCAB,
        max_position_embeddings=16384,
    )


def _jamba():
    """Jamba: Mamba1 layers with attention every 4th layer from layer 1 (attn_layer_period 4, offset 1)."""
    from transformers import JambaConfig

    return JambaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        attn_layer_period=4,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        num_experts=4,
        num_experts_per_tok=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mamba_d_state=16,
        mamba_expand=2,
        mamba_d_conv=4,
        vocab_size=VOCAB,
        max_position_embeddings=16384,
    )


# Hybrid attention + state-space models; config.json arithmetic covers GraniteMoeHybrid and Qwen3Next
# (config_weights_hybrid.py), the others are planned from the headers of the built model.
HYBRID_BUILDERS = {
    "granite-hybrid": _granite_hybrid,
    "granite-hybrid-bigstate": _granite_hybrid_bigstate,
    "qwen3-next": _qwen3_next,
    "nemotron-h": _nemotron_h,
    "jamba": _jamba,
}
LLAMA_3_1_8B_DATA = Path(__file__).resolve().parents[1] / "data" / "llama-3.1-8b"
SHARD_BYTES = 5_000_000_000  # transformers' default max_shard_size "5GB"


def tiny_model_dir(name: str) -> Path:
    return lcserve_home() / "tiny-models" / name


def build_tiny_model(name: str, force: bool = False) -> Path:
    """Build (or reuse) the tiny random model `name`; returns its folder."""
    target = tiny_model_dir(name)
    if (target / MARKER).exists() and not force:
        return target
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    config = {**BUILDERS, **WEIGHT_LAYOUT_BUILDERS, **HYBRID_BUILDERS}[name]()
    config.dtype = torch.bfloat16
    torch.manual_seed(0)
    transformers.utils.logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / MARKER).write_text(json.dumps({"name": name, "architecture": type(model).__name__}) + "\n")
    return target


def build_llama_3_1_8b(target: Path, weights: str = "safetensors") -> Path:
    """A Llama-3.1-8B folder: the real config.json plus, by `weights`, "safetensors" (4 real-size
    shards whose data is a hole, and their index), "index" (the real index only) or "config"
    (nothing else). Never reads or writes 16 GB: the data is never touched."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(LLAMA_3_1_8B_DATA / "config.json", target / "config.json")
    if weights == "safetensors":
        write_sparse_checkpoint(target)
    elif weights == "index":
        shutil.copy(LLAMA_3_1_8B_DATA / "model.safetensors.index.json", target / "model.safetensors.index.json")
    elif weights != "config":
        raise ValueError(f"weights={weights!r}: one of safetensors, index, config")
    return target


def write_sparse_checkpoint(model_dir: Path, max_shard_bytes: int = SHARD_BYTES) -> list[Path]:
    """Write real-size safetensors shards and their index beside a folder's config.json.

    Names, shapes and order come from transformers' model built on the meta device (nothing is
    allocated); shards are cut as save_pretrained cuts them (a new shard when the next tensor
    would pass `max_shard_bytes`); each file is its header then a hole (truncated to size). For
    dense models: save_pretrained rewrites fused MoE experts, the meta state_dict does not.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    raw_config = json.loads((Path(model_dir) / "config.json").read_text())
    dtype = getattr(torch, raw_config.get("torch_dtype") or raw_config.get("dtype") or "bfloat16")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    names = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
    seen: set[int] = set()
    tensors = []  # (name, safetensors dtype, shape, bytes), tied duplicates dropped
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            tensors.append((name, names[t.dtype], list(t.shape), t.numel() * t.element_size()))
    shards: list[list[tuple]] = [[]]
    shard_bytes = 0
    for t in tensors:
        if shards[-1] and shard_bytes + t[3] > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(t)
        shard_bytes += t[3]
    files, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        path = Path(model_dir) / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_sparse_safetensors(path, shard)
        weight_map.update({t[0]: path.name for t in shard})
        files.append(path)
    index = {"metadata": {"total_size": sum(t[3] for t in tensors)}, "weight_map": dict(sorted(weight_map.items()))}
    (Path(model_dir) / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def _write_sparse_safetensors(path: Path, tensors: list[tuple]) -> None:
    """Header as the safetensors library writes it (names sorted, offsets in that order, JSON padded
    with spaces to 8 bytes), then a hole the size of the data."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape, nbytes in sorted(tensors):
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


if __name__ == "__main__":
    import sys

    for n in sys.argv[1:] or [*BUILDERS, *WEIGHT_LAYOUT_BUILDERS]:
        print(n, build_tiny_model(n))


def write_config_only(builder, folder: Path) -> Path:
    """`folder`/config.json for a tiny builder, no weights (what vLLM's KV code and the planner read)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = builder()
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    config.dtype = "bfloat16"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    return folder
