"""inspect: tensor-name parsing, the fit check and the mount/merge verdict (pure), plus real PEFT folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import save_file

from lcserve.adapters import reader
from lcserve.adapters.inspection import MERGE, MOUNT, UNUSABLE, check_fit, decide_verdict, inspect_adapter
from lcserve.adapters.reader import AdapterTensor, parse_key
from lcserve.adapters.vllm_rules import VllmRules, installed_vllm_rules, round_max_lora_rank
from lcserve.errors import AdapterError

NEW = VllmRules(version="0.32.0", honors_rank_alpha_patterns=True)
OLD = VllmRules(version="0.8.0", honors_rank_alpha_patterns=False)


def write_adapter(folder: Path, config: dict, tensors: dict[str, tuple[int, ...]]) -> Path:
    """A PEFT-shaped adapter folder with zero tensors of the given shapes (header-level tests)."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    full = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "bias": "none", **config}
    (folder / "adapter_config.json").write_text(json.dumps(full))
    save_file({k: torch.zeros(shape) for k, shape in tensors.items()}, folder / "adapter_model.safetensors")
    return folder


Q = "base_model.model.model.layers.0.self_attn.q_proj"
PLAIN = {f"{Q}.lora_A.weight": (8, 64), f"{Q}.lora_B.weight": (128, 8)}
BASE = {"model.embed_tokens.weight": (1000, 64), "model.layers.0.self_attn.q_proj.weight": (128, 64)}


@pytest.mark.parametrize("key, expected", [
    (f"{Q}.lora_A.weight", ("model.layers.0.self_attn.q_proj", "lora_A")),
    (f"{Q}.lora_B.weight", ("model.layers.0.self_attn.q_proj", "lora_B")),
    (f"{Q}.lora_B.bias", ("model.layers.0.self_attn.q_proj", "lora_B_bias")),
    (f"{Q}.lora_magnitude_vector", ("model.layers.0.self_attn.q_proj", "magnitude")),
    (f"{Q}.lora_magnitude_vector.weight", ("model.layers.0.self_attn.q_proj", "magnitude")),
    ("base_model.model.model.embed_tokens.lora_embedding_A", ("model.embed_tokens", "lora_embedding_A")),
    ("base_model.model.model.embed_tokens.base_layer.weight", ("model.embed_tokens.weight", "full")),
    ("base_model.model.model.layers.0.post_attention_layernorm.weight", ("model.layers.0.post_attention_layernorm.weight", "full")),
    ("model.layers.0.self_attn.q_proj.lora_A.weight", ("model.layers.0.self_attn.q_proj", "lora_A")),
])
def test_parse_key(key, expected):
    assert parse_key(key) == expected


def test_parse_key_rejects_unknown_lora_names():
    with pytest.raises(AdapterError, match="unknown LoRA tensor"):
        parse_key(f"{Q}.lora_C.weight")


def _report(tmp_path, config=None, tensors=None, rules=NEW):
    adapter = write_adapter(tmp_path / "a", config or {}, tensors or PLAIN)
    return inspect_adapter(adapter, rules=rules)


def test_plain_lora_mounts_with_rounded_rank(tmp_path):
    report = _report(tmp_path, {"r": 12}, {f"{Q}.lora_A.weight": (12, 64), f"{Q}.lora_B.weight": (128, 12)})
    assert (report.verdict, report.reasons, report.max_lora_rank) == (MOUNT, [], 16)


@pytest.mark.parametrize("config, reason", [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "all"}, "bias='all'"),
    ({"bias": "lora_only"}, "bias='lora_only'"),
    ({"lora_bias": True}, "lora_bias"),
])
def test_features_vllm_rejects_mean_merge(tmp_path, config, reason):
    report = _report(tmp_path, config)
    assert report.verdict == MERGE and any(reason in r for r in report.reasons)


def test_rank_alpha_patterns_follow_the_installed_reader(tmp_path):
    config = {"rank_pattern": {"q_proj": 4}, "alpha_pattern": {"q_proj": 64}}
    tensors = {f"{Q}.lora_A.weight": (4, 64), f"{Q}.lora_B.weight": (128, 4)}
    assert _report(tmp_path / "new", config, tensors, NEW).verdict == MOUNT
    old = _report(tmp_path / "old", config, tensors, OLD)
    assert old.verdict == MERGE and "mis-scaled" in old.reasons[0]


def test_rslora_mounts(tmp_path):
    report = _report(tmp_path, {"use_rslora": True})
    assert report.verdict == MOUNT and report.use_rslora


def test_rank_above_vllm_maximum_means_merge(tmp_path):
    report = _report(tmp_path, {"r": 1024}, {f"{Q}.lora_A.weight": (1024, 64), f"{Q}.lora_B.weight": (128, 1024)})
    assert report.verdict == MERGE and report.max_lora_rank is None


def test_embedding_lora_means_merge(tmp_path):
    emb = "base_model.model.model.embed_tokens"
    report = _report(tmp_path, {"target_modules": ["embed_tokens"]},
                     {f"{emb}.lora_embedding_A": (8, 1000), f"{emb}.lora_embedding_B": (64, 8)})
    assert report.embedding_lora and report.verdict == MERGE


@pytest.mark.parametrize("config", [{"init_lora_weights": "pissa"}, {"layer_replication": [[0, 1]]},
                                    {"alora_invocation_tokens": [5]}, {"use_qalora": True}])
def test_features_nobody_can_serve_are_unusable(tmp_path, config):
    assert _report(tmp_path, config).verdict == UNUSABLE


def test_supported_init_is_fine(tmp_path):
    assert _report(tmp_path, {"init_lora_weights": "gaussian"}).verdict == MOUNT


def _tensors(spec: dict[str, tuple[int, ...]]) -> list[AdapterTensor]:
    return [AdapterTensor(k, *parse_key(k), shape, "F32") for k, shape in spec.items()]


def test_fit_accepts_matching_shapes():
    assert check_fit(_tensors(PLAIN), BASE, {"vocab_size": 1000}, False) == ([], 1000, None)


def test_fit_reports_shape_mismatch():
    wrong = {f"{Q}.lora_A.weight": (8, 96), f"{Q}.lora_B.weight": (128, 8)}
    problems, _, _ = check_fit(_tensors(wrong), BASE, {}, False)
    assert len(problems) == 1 and "do not fit base weight [128, 64]" in problems[0]


def test_fit_fan_in_fan_out_reads_transposed_base():
    conv1d = {"model.layers.0.self_attn.q_proj.weight": (64, 128)}  # (in, out), as GPT-2 stores it
    assert check_fit(_tensors(PLAIN), conv1d, {}, True)[0] == []
    assert check_fit(_tensors(PLAIN), conv1d, {}, False)[0] != []


def test_fit_detects_another_architecture():
    gpt2 = {"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": (8, 64),
            "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": (192, 8)}
    problems, _, _ = check_fit(_tensors(gpt2), BASE, {}, False)
    assert "another architecture" in problems[0]


def test_fit_detects_vocabulary_mismatch():
    emb = "base_model.model.model.embed_tokens"
    resized = {f"{emb}.lora_embedding_A": (8, 1024), f"{emb}.lora_embedding_B": (64, 8),
               f"{emb}.base_layer.weight": (1024, 64)}
    problems, base_vocab, adapter_vocab = check_fit(_tensors(resized), BASE, {}, False)
    assert (base_vocab, adapter_vocab) == (1000, 1024)
    assert any("vocabularies differ" in p for p in problems)


def test_fit_flags_a_larger_adapter_tokenizer():
    problems, _, _ = check_fit(_tensors(PLAIN), BASE, {}, False, adapter_tokenizer_size=1003)
    assert any("added tokens" in p for p in problems)


def test_decide_verdict_is_pure(tmp_path):
    report = _report(tmp_path, {"use_dora": True})
    decide_verdict(report, NEW)
    first = (report.verdict, list(report.reasons))
    decide_verdict(report, NEW)
    assert (report.verdict, report.reasons) == first


@pytest.mark.parametrize("rank, expected", [(1, 1), (2, 8), (8, 8), (9, 16), (64, 64), (300, 320), (512, 512), (513, None)])
def test_round_max_lora_rank(rank, expected):
    assert round_max_lora_rank(rank) == expected


def test_installed_rules_match_the_installed_vllm_reader():
    """The source sniff agrees with vLLM's actual PEFTHelper (imported here, once)."""
    from vllm.lora.peft_helper import PEFTHelper

    assert installed_vllm_rules().honors_rank_alpha_patterns == hasattr(PEFTHelper, "get_rank_and_scaling")


def test_pickle_needs_the_flag(tmp_path):
    import torch

    folder = write_adapter(tmp_path / "a", {}, PLAIN)
    (folder / "adapter_model.safetensors").unlink()
    torch.save({k: torch.zeros(s) for k, s in PLAIN.items()}, folder / "adapter_model.bin")
    with pytest.raises(AdapterError, match="--allow-pickle"):
        inspect_adapter(folder, rules=NEW)
    assert inspect_adapter(folder, allow_pickle=True, rules=NEW).weights_file == "adapter_model.bin"


def test_missing_folder_and_wrong_peft_type(tmp_path):
    with pytest.raises(AdapterError, match="adapter folder not found"):
        reader.read_config(tmp_path / "nope")
    folder = write_adapter(tmp_path / "ia3", {"peft_type": "IA3"}, PLAIN)
    with pytest.raises(AdapterError, match="LoRA adapters only"):
        reader.read_config(folder)


def test_cli_json_and_exit_codes(tmp_path):
    from lcserve.cli import cli

    runner = CliRunner()
    good = write_adapter(tmp_path / "good", {"use_dora": True}, PLAIN)
    result = runner.invoke(cli, ["adapters", "inspect", str(good), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["verdict"] == MERGE
    unusable = write_adapter(tmp_path / "bad", {"init_lora_weights": "olora"}, PLAIN)
    assert runner.invoke(cli, ["adapters", "inspect", str(unusable)]).exit_code == 1
    (good / "adapter_config.json").unlink()
    missing = runner.invoke(cli, ["adapters", "inspect", str(good)])
    assert missing.exit_code == 2 and missing.output.strip().startswith("error: ") and len(missing.output.strip().splitlines()) == 1
