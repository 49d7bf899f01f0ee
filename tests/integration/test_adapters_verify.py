"""Merge + verify on the real Gemma 3 270M: the demo adapter and PEFT adapters with rsLoRA,
rank/alpha patterns, DoRA, modules_to_save and trainable tokens, each with the verdict inspect gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lcserve.adapters.inspection import Verdict, inspect_adapter
from lcserve.adapters.merge import merge_adapter
from lcserve.adapters.reader import read_adapter
from lcserve.adapters.verify import verify_merge

pytestmark = pytest.mark.integration

TRAINED_AT = 256  # recorded for the test adapters too, so verify's long prompt (600 tokens) goes past it
REAL_CASES = {
    "rslora": (dict(target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True), Verdict.MOUNT),
    "rank_pattern": (
        dict(target_modules=["q_proj", "v_proj", "up_proj"], rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 32}),
        Verdict.MOUNT,
    ),
    "dora": (dict(target_modules=["q_proj", "down_proj"], use_dora=True), Verdict.MERGE),
    "modules_to_save": (dict(target_modules=["q_proj"], modules_to_save=["post_attention_layernorm"]), Verdict.MERGE),
    # <start_of_turn>, <end_of_turn>: rows of the embedding that Gemma 3 ties to lm_head
    "trainable_tokens": (dict(target_modules=["q_proj"], trainable_token_indices=[105, 106]), Verdict.MERGE),
}


def real_adapter(case: str, base: Path, root: Path) -> Path:
    """A PEFT adapter on the real model: rank 4 on three layers (one full-attention), random
    non-zero weights; built once per session under `root`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = root / case
    if (out / "adapter_config.json").exists():
        return out
    lora, _ = REAL_CASES[case]
    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    layers = {"layers_to_transform": [0, 5, 17]}
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **layers, **lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.1)
            elif p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(out)
    (out / "lcserve_adapter.json").write_text(json.dumps({"training_seq_len": TRAINED_AT}))
    return out


def test_demo_adapter_merges_and_verifies(embedded_model_dir, demo_adapter, tmp_path):
    adapter = read_adapter(demo_adapter)
    report = inspect_adapter(adapter, embedded_model_dir)
    assert report.verdict == Verdict.MOUNT and adapter.training_seq_len == 256 and report.max_lora_rank == 8
    merged = merge_adapter(adapter, embedded_model_dir, tmp_path / "merged")
    assert merged.provenance["adapter_training_seq_len"] == 256
    result = verify_merge(merged.out_dir, adapter, embedded_model_dir)
    print(f"\ndemo: {_figures(result)}")
    assert result.passed, result
    assert result.long_prompt_tokens > 512 > 256  # past the training length and the sliding window
    assert result.adapter_effect > 3 * result.tolerance  # the check can tell the adapter from the base


# Merge equals PEFT for every LoRA variant on tiny models in the unit tier (tests/unit/test_adapters_merge.py);
# on the real model, the variants whose merge depends on its real shapes: DoRA's per-row magnitudes and the
# trainable tokens of Gemma 3's tied embedding (the demo adapter above is the rank-8 all-modules LoRA).
# rsLoRA, rank/alpha patterns and modules_to_save meet the real engine in tests/integration/test_adapters_vllm.py.
VERIFIED_ON_THE_REAL_MODEL = ["dora", "trainable_tokens"]


@pytest.mark.parametrize("case", VERIFIED_ON_THE_REAL_MODEL)
def test_real_adapter_verdict_merge_and_verify(case, embedded_model_dir, real_adapters_root, tmp_path):
    adapter = read_adapter(real_adapter(case, embedded_model_dir, real_adapters_root))
    report = inspect_adapter(adapter, embedded_model_dir)
    assert report.verdict == REAL_CASES[case][1], report.reasons
    assert report.fit_problems == []
    merged = merge_adapter(adapter, embedded_model_dir, tmp_path / "merged")
    result = verify_merge(merged.out_dir, adapter, embedded_model_dir)
    print(f"\n{case}: {_figures(result)}")
    assert result.passed, result
    assert result.adapter_effect > 3 * result.tolerance


def _figures(result) -> str:
    return (
        f"{result.merged_dtype} max |diff| {result.max_abs_diff:.4f}, rounding floor {result.rounding_floor:.4f}, "
        f"tolerance {result.tolerance:.4f}, adapter effect {result.adapter_effect:.3f}, "
        f"top-1 {result.top1_agreement:.1%}"
    )


def test_trainable_tokens_keep_gemma3_tied(embedded_model_dir, real_adapters_root, tmp_path):
    """Gemma 3 ties lm_head to embed_tokens: the merge keeps the tie, and its embedding is PEFT's
    merge_and_unload (fp32, rounded to the stored bf16), rows and all."""
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    adapter = read_adapter(real_adapter("trainable_tokens", embedded_model_dir, real_adapters_root))
    merged = merge_adapter(adapter, embedded_model_dir, tmp_path / "merged").out_dir
    config = json.loads((merged / "config.json").read_text())
    assert config.get("tie_word_embeddings", True) is True
    (weights,) = merged.glob("*.safetensors")
    with safe_open(weights, "pt") as f:
        assert "lm_head.weight" not in f.keys()
        ours = f.get_tensor("model.embed_tokens.weight")
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(embedded_model_dir, dtype=torch.float32), adapter.path
    ).merge_and_unload()
    peft = model.get_input_embeddings().weight.detach().to(torch.bfloat16)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    changed = (ours != peft).any(dim=1).nonzero().flatten().tolist()
    assert changed == [], changed
    base = AutoModelForCausalLM.from_pretrained(embedded_model_dir, dtype=torch.bfloat16).get_input_embeddings().weight
    assert (ours != base).any(dim=1).nonzero().flatten().tolist() == [105, 106]
