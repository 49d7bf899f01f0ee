"""Tiny random models of several attention layouts, for checking the planner against vLLM.

Each model is built from a transformers config class with small sizes (random weights,
bf16 safetensors), saved once under `$LCSERVE_HOME/tiny-models/<name>` and reused. The
KV layout (layers, KV heads, head size, sliding windows, MLA ranks) is what matters for
the KV accounting; the weights are noise. vLLM is started on them with
`--skip-tokenizer-init`, so no tokenizer is written.

This module does not import lcserve, so benchmarks and tests can build models without it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

VOCAB = 512
MARKER = "tiny_model.json"


def _home() -> Path:
    return Path(os.environ.get("LCSERVE_HOME") or Path.home() / ".cache" / "lcserve")


def _llama_gqa():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=2, head_dim=32, vocab_size=VOCAB, max_position_embeddings=8192)


def _qwen3():
    from transformers import Qwen3Config

    return Qwen3Config(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=64, vocab_size=VOCAB, max_position_embeddings=16384)


def _mistral_swa():
    from transformers import MistralConfig

    return MistralConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, head_dim=32, vocab_size=VOCAB, max_position_embeddings=16384,
                         sliding_window=1024)


def _gemma2_hybrid():
    from transformers import Gemma2Config

    return Gemma2Config(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=64, vocab_size=VOCAB, max_position_embeddings=8192,
                        sliding_window=512)


def _gemma3_uneven():
    """7 layers, 5 sliding : 2 full: vLLM must pad the sliding groups (3 groups of 2)."""
    from transformers import Gemma3TextConfig

    layer_types = ["sliding_attention", "sliding_attention", "full_attention"] * 2 + ["sliding_attention"]
    return Gemma3TextConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=7, num_attention_heads=4,
                            num_key_value_heads=1, head_dim=64, vocab_size=VOCAB, max_position_embeddings=8192,
                            sliding_window=256, layer_types=layer_types)


def _deepseek_v2_mla():
    from transformers import DeepseekV2Config

    return DeepseekV2Config(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=128, q_lora_rank=None,
                            qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, n_routed_experts=4,
                            num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=2,
                            vocab_size=VOCAB, max_position_embeddings=8192)


BUILDERS = {
    "llama-gqa": _llama_gqa,
    "qwen3": _qwen3,
    "mistral-swa": _mistral_swa,
    "gemma2-hybrid": _gemma2_hybrid,
    "gemma3-uneven": _gemma3_uneven,
    "deepseek-v2-mla": _deepseek_v2_mla,
}


def tiny_model_dir(name: str) -> Path:
    return _home() / "tiny-models" / name


def build_tiny_model(name: str, force: bool = False) -> Path:
    """Build (or reuse) the tiny random model `name`; returns its folder."""
    target = tiny_model_dir(name)
    if (target / MARKER).exists() and not force:
        return target
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    config = BUILDERS[name]()
    config.dtype = torch.bfloat16
    torch.manual_seed(0)
    transformers.utils.logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / MARKER).write_text(json.dumps({"name": name, "architecture": type(model).__name__}) + "\n")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


if __name__ == "__main__":
    import sys

    for n in sys.argv[1:] or BUILDERS:
        print(n, build_tiny_model(n))
