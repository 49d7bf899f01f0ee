"""TrainableTokens (LoraConfig(trainable_token_indices=...)): real PEFT adapters on tiny Gemma 3
(tied embeddings) and Llama (untied) bases, merged by lcserve and compared with PEFT.

PEFT stores the trained rows whole (`...token_adapter.trainable_tokens_delta`) and its merge
writes them with index_copy. With tied embeddings, rows given to the input embedding reach
lm_head too (PEFT ties a token adapter to it), so the merge keeps the tie; rows given to lm_head
alone change the output side only, so the merge unties. The same check on the real Gemma 3
270M is an integration test (tests/integration/test_adapters_verify.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lcserve.adapters.inspection import Verdict, inspect_adapter
from lcserve.adapters.merge import merge_adapter
from lcserve.adapters.reader import read_adapter
from lcserve.adapters.verify import verify_merge
from tests.unit.test_adapters_merge import LONG, VOCAB, _gemma, _save_tokenizer

TURN_MARKERS = [4, 5]  # <start_of_turn>, <end_of_turn> in the tiny tokenizer: what people teach with it


def _llama(path: Path) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return _save_tokenizer(path)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {"gemma-tied": _gemma(root / "gemma-tied"), "llama-untied": _llama(root / "llama-untied")}


def token_adapter(base: Path, out: Path, indices) -> Path:
    """A real PEFT adapter: LoRA on q_proj plus trained token rows, all moved off their init."""
    torch.manual_seed(1)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False, trainable_token_indices=indices
        ),
    )
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(out)
    (out / "lcserve_adapter.json").write_text(json.dumps({"training_seq_len": 128}))
    return out


# base, trainable_token_indices, lm_head untied by the merge, PEFT's merge_and_unload equals its forward
CASES = {
    "tied, list": ("gemma-tied", [*TURN_MARKERS, 300], False, True),
    "tied, same rows for both": ("gemma-tied", {"embed_tokens": TURN_MARKERS, "lm_head": TURN_MARKERS}, False, True),
    "tied, other rows for lm_head": ("gemma-tied", {"embed_tokens": TURN_MARKERS, "lm_head": [9]}, True, False),
    "tied, lm_head only": ("gemma-tied", {"lm_head": [9, 11]}, True, False),
    "untied, list": ("llama-untied", [*TURN_MARKERS, 300], False, True),
    "untied, both": ("llama-untied", {"embed_tokens": TURN_MARKERS, "lm_head": [9, 11]}, False, True),
}


def peft_merged(base: Path, adapter: Path) -> dict:
    """PEFT's own merge (fp32), as a state dict with the tied lm_head spelled out."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    merged = model.merge_and_unload()
    state = {k: v.clone() for k, v in merged.state_dict().items()}
    state["lm_head.weight"] = merged.get_output_embeddings().weight.detach().clone()
    return state


def logits(model_dir_or_model, ids: list[int]) -> torch.Tensor:
    model = model_dir_or_model
    if isinstance(model, Path):
        model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("case", list(CASES))
def test_trainable_tokens_merge_equals_peft(case, bases, tmp_path):
    base_name, indices, untied, peft_merge_is_forward = CASES[case]
    base = bases[base_name]
    adapter = read_adapter(token_adapter(base, tmp_path / "adapter", indices))
    report = inspect_adapter(adapter, base)
    assert report.verdict == Verdict.MERGE and report.fit_problems == [], report.reasons
    assert any("trainable_token_indices" in r for r in report.reasons)

    exact = merge_adapter(adapter, base, tmp_path / "fp32", dtype="fp32")
    assert exact.provenance["untied_lm_head"] is untied and exact.provenance["replaced_token_rows"]
    result = verify_merge(exact.out_dir, adapter, base, long_tokens=LONG)  # PEFT's forward, fp32
    assert result.passed and result.max_abs_diff < 1e-4, result
    assert result.adapter_effect > 100 * max(result.max_abs_diff, 1e-6)

    weights = load_file(exact.out_dir / "model.safetensors")
    config = json.loads((exact.out_dir / "config.json").read_text())
    if base_name == "gemma-tied" and not untied:
        assert config["tie_word_embeddings"] is True and "lm_head.weight" not in weights
    peft = peft_merged(base, adapter.path)
    ours = {**weights}
    ours.setdefault("lm_head.weight", weights["model.embed_tokens.weight"])
    same = [torch.equal(ours[name], peft[name]) for name in ("model.embed_tokens.weight", "lm_head.weight")]
    assert all(same) is peft_merge_is_forward, same
    if not peft_merge_is_forward:
        # PEFT's merge writes both row sets into the one shared matrix; its forward (what was
        # trained, and what lcserve's merge computes) keeps each side's rows apart.
        merged_by_peft = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter.path
        ).merge_and_unload()
        ids = [2, 9, 11, *TURN_MARKERS, 40, 41]
        assert (logits(merged_by_peft, ids) - logits(exact.out_dir, ids)).abs().max() > 1e-2

    rounded = merge_adapter(adapter, base, tmp_path / "bf16")
    checked = verify_merge(rounded.out_dir, adapter, base, long_tokens=LONG)
    assert checked.merged_dtype == "BF16" and checked.passed, checked


def test_verify_sees_rows_missing_from_a_tied_lm_head(bases, tmp_path):
    """A merge that gave the rows to the input side only (an lm_head untied from the base) fails."""
    base = bases["gemma-tied"]
    adapter = read_adapter(token_adapter(base, tmp_path / "adapter", [*TURN_MARKERS, 300]))
    merged = merge_adapter(adapter, base, tmp_path / "merged", dtype="fp32").out_dir
    path = merged / "model.safetensors"
    weights = load_file(path)
    weights["lm_head.weight"] = load_file(base / "model.safetensors")["model.embed_tokens.weight"].float()
    save_file(weights, path, metadata={"format": "pt"})
    config = json.loads((merged / "config.json").read_text())
    (merged / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    result = verify_merge(merged, adapter, base, long_tokens=LONG)
    assert not result.passed and result.max_abs_diff > 100 * result.tolerance, result


def test_cli_inspect_merge_verify(bases, tmp_path):
    """The user's path: inspect says merge (exit 0), merge writes the rows, verify passes."""
    from lcserve.cli import cli

    base = bases["gemma-tied"]
    adapter = token_adapter(base, tmp_path / "adapter", TURN_MARKERS)
    runner = CliRunner()
    inspected = runner.invoke(cli, ["adapters", "inspect", str(adapter), "--base", str(base), "--json"])
    assert inspected.exit_code == 0, inspected.output
    doc = json.loads(inspected.stdout)
    assert doc["verdict"] == "merge" and doc["trainable_tokens"] == {"model.embed_tokens": 2}
    merged = tmp_path / "merged"
    assert (
        runner.invoke(cli, ["adapters", "merge", str(adapter), "--base", str(base), "--out", str(merged)]).exit_code
        == 0
    )
    verified = runner.invoke(
        cli,
        ["adapters", "verify", str(merged), "--adapter", str(adapter), "--base", str(base), "--long-tokens", str(LONG)],
    )
    assert verified.exit_code == 0 and "PASS: max |diff|" in verified.stdout, verified.output
