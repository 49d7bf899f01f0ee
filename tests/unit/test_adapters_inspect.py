"""inspect: tensor-name parsing, the fit check and the mount/merge verdict (pure), plus real PEFT folders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lcserve.adapters import reader
from lcserve.adapters.inspection import Verdict, check_fit, decide_verdict, inspect_adapter
from lcserve.adapters.reader import AdapterTensor, parse_key, read_adapter
from lcserve.errors import AdapterError
from lcserve.vllm_rules import VllmRules, installed_vllm_rules, round_max_lora_rank

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


@pytest.mark.parametrize(
    "key, expected",
    [
        (f"{Q}.lora_A.weight", ("model.layers.0.self_attn.q_proj", "lora_A")),
        (f"{Q}.lora_B.weight", ("model.layers.0.self_attn.q_proj", "lora_B")),
        (f"{Q}.lora_B.bias", ("model.layers.0.self_attn.q_proj", "lora_B_bias")),
        (f"{Q}.lora_magnitude_vector", ("model.layers.0.self_attn.q_proj", "magnitude")),
        (f"{Q}.lora_magnitude_vector.weight", ("model.layers.0.self_attn.q_proj", "magnitude")),
        ("base_model.model.model.embed_tokens.lora_embedding_A", ("model.embed_tokens", "lora_embedding_A")),
        ("base_model.model.model.embed_tokens.base_layer.weight", ("model.embed_tokens.weight", "full")),
        (
            "base_model.model.model.layers.0.post_attention_layernorm.weight",
            ("model.layers.0.post_attention_layernorm.weight", "full"),
        ),
        ("model.layers.0.self_attn.q_proj.lora_A.weight", ("model.layers.0.self_attn.q_proj", "lora_A")),
        (
            "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta",
            ("model.embed_tokens", "trainable_tokens_delta"),
        ),
        ("base_model.model.lm_head.token_adapter.trainable_tokens_delta", ("lm_head", "trainable_tokens_delta")),
    ],
)
def test_parse_key(key, expected):
    assert parse_key(key) == expected


def test_parse_key_rejects_unknown_lora_names():
    with pytest.raises(AdapterError, match="unknown LoRA tensor"):
        parse_key(f"{Q}.lora_C.weight")


def _report(tmp_path, config=None, tensors=None, rules=NEW):
    adapter = write_adapter(tmp_path / "a", config or {}, tensors or PLAIN)
    return inspect_adapter(read_adapter(adapter), rules=rules)


def test_plain_lora_mounts_with_rounded_rank(tmp_path):
    report = _report(tmp_path, {"r": 12}, {f"{Q}.lora_A.weight": (12, 64), f"{Q}.lora_B.weight": (128, 12)})
    assert (report.verdict, report.reasons, report.max_lora_rank) == (Verdict.MOUNT, [], 16)


@pytest.mark.parametrize(
    "config, reason",
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "bias='all'"),
        ({"bias": "lora_only"}, "bias='lora_only'"),
        ({"lora_bias": True}, "lora_bias"),
    ],
)
def test_features_vllm_rejects_mean_merge(tmp_path, config, reason):
    report = _report(tmp_path, config)
    assert report.verdict == Verdict.MERGE and any(reason in r for r in report.reasons)


def test_rank_alpha_patterns_follow_the_installed_reader(tmp_path):
    config = {"rank_pattern": {"q_proj": 4}, "alpha_pattern": {"q_proj": 64}}
    tensors = {f"{Q}.lora_A.weight": (4, 64), f"{Q}.lora_B.weight": (128, 4)}
    assert _report(tmp_path / "new", config, tensors, NEW).verdict == Verdict.MOUNT
    old = _report(tmp_path / "old", config, tensors, OLD)
    assert old.verdict == Verdict.MERGE and "mis-scaled" in old.reasons[0]


def test_rslora_mounts(tmp_path):
    report = _report(tmp_path, {"use_rslora": True})
    assert report.verdict == Verdict.MOUNT and report.adapter.use_rslora


def test_rank_above_vllm_maximum_means_merge(tmp_path):
    report = _report(tmp_path, {"r": 1024}, {f"{Q}.lora_A.weight": (1024, 64), f"{Q}.lora_B.weight": (128, 1024)})
    assert report.verdict == Verdict.MERGE and report.max_lora_rank is None


def test_embedding_lora_means_merge(tmp_path):
    emb = "base_model.model.model.embed_tokens"
    report = _report(
        tmp_path,
        {"target_modules": ["embed_tokens"]},
        {f"{emb}.lora_embedding_A": (8, 1000), f"{emb}.lora_embedding_B": (64, 8)},
    )
    assert report.embedding_lora and report.verdict == Verdict.MERGE


@pytest.mark.parametrize(
    "config",
    [
        {"init_lora_weights": "pissa"},
        {"layer_replication": [[0, 1]]},
        {"alora_invocation_tokens": [5]},
        {"use_qalora": True},
    ],
)
def test_features_nobody_can_serve_are_unusable(tmp_path, config):
    assert _report(tmp_path, config).verdict == Verdict.UNUSABLE


def test_supported_init_is_fine(tmp_path):
    assert _report(tmp_path, {"init_lora_weights": "gaussian"}).verdict == Verdict.MOUNT


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
    gpt2 = {
        "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": (8, 64),
        "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": (192, 8),
    }
    problems, _, _ = check_fit(_tensors(gpt2), BASE, {}, False)
    assert "another architecture" in problems[0]


def test_fit_detects_vocabulary_mismatch():
    emb = "base_model.model.model.embed_tokens"
    resized = {
        f"{emb}.lora_embedding_A": (8, 1024),
        f"{emb}.lora_embedding_B": (64, 8),
        f"{emb}.base_layer.weight": (1024, 64),
    }
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


@pytest.mark.parametrize(
    "rank, expected", [(1, 1), (2, 8), (8, 8), (9, 16), (64, 64), (300, 320), (512, 512), (513, None)]
)
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
        inspect_adapter(read_adapter(folder), rules=NEW)
    assert inspect_adapter(read_adapter(folder), allow_pickle=True, rules=NEW).weights_file == "adapter_model.bin"


def test_missing_folder_and_wrong_peft_type(tmp_path):
    with pytest.raises(AdapterError, match="adapter folder not found"):
        reader.read_adapter(tmp_path / "nope")
    folder = write_adapter(tmp_path / "ia3", {"peft_type": "IA3"}, PLAIN)
    with pytest.raises(AdapterError, match="LoRA adapters only"):
        reader.read_adapter(folder)


def test_cli_json_and_exit_codes(tmp_path):
    from lcserve.cli import cli

    runner = CliRunner()
    good = write_adapter(tmp_path / "good", {"use_dora": True}, PLAIN)
    result = runner.invoke(cli, ["adapters", "inspect", str(good), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["verdict"] == Verdict.MERGE
    unusable = write_adapter(tmp_path / "bad", {"init_lora_weights": "olora"}, PLAIN)
    assert runner.invoke(cli, ["adapters", "inspect", str(unusable)]).exit_code == 1
    (good / "adapter_config.json").unlink()
    missing = runner.invoke(cli, ["adapters", "inspect", str(good)])
    assert (
        missing.exit_code == 2
        and missing.output.strip().startswith("error: ")
        and len(missing.output.strip().splitlines()) == 1
    )


# ---------------------------------------------------------------- NaN/inf: inspect reads the values


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_or_inf_weights_are_unusable(tmp_path, value):
    """Headers look fine; only the values tell. vLLM would mount this adapter and serve garbage."""
    folder = write_adapter(tmp_path / "a", {}, PLAIN)
    path, key = folder / "adapter_model.safetensors", f"{Q}.lora_B.weight"
    tensors = load_file(path)
    tensors[key][5, 1] = value
    save_file(tensors, path)
    report = inspect_adapter(read_adapter(folder), rules=NEW)
    assert report.verdict == Verdict.UNUSABLE and report.nonfinite_tensors == [key]
    assert report.reasons[0].startswith(f"tensor {key} holds NaN/inf") and "re-train" in report.reasons[0]
    assert report.to_json()["nonfinite_tensors"] == [key]


def test_cli_inspect_refuses_a_nan_adapter(tmp_path):
    from lcserve.cli import cli

    folder = write_adapter(tmp_path / "a", {}, PLAIN)
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors[f"{Q}.lora_A.weight"][0, 0] = math.nan
    save_file(tensors, path)
    result = CliRunner().invoke(cli, ["adapters", "inspect", str(folder)])
    assert result.exit_code == 1, result.output
    assert "unusable" in result.output and f"{Q}.lora_A.weight" in result.output and "Traceback" not in result.output


# ---------------------------------------------------------------- TrainableTokens (trainable_token_indices)

EMBED_ROWS = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
HEAD_ROWS = "base_model.model.lm_head.token_adapter.trainable_tokens_delta"


def test_trainable_tokens_mean_merge(tmp_path):
    """vLLM's PEFTHelper ignores trainable_token_indices and its loader refuses the delta tensor
    (parse_fine_tuned_lora_name: "... is unsupported LoRA weight"); lcserve merges the rows."""
    report = _report(tmp_path, {"trainable_token_indices": [3, 5]}, {**PLAIN, EMBED_ROWS: (2, 64)})
    assert report.verdict == Verdict.MERGE and report.trainable_tokens == {"model.embed_tokens": 2}
    assert any("trainable_tokens_delta is unsupported LoRA weight" in r for r in report.reasons)
    assert report.lora_modules == 1 and not report.embedding_lora


def _fit(spec, base=BASE, config=None, rows=None):
    tensors = _tensors(spec)
    return check_fit(tensors, base, config or {}, False, None, rows)[0]


@pytest.mark.parametrize(
    "spec, rows, problem",
    [
        ({EMBED_ROWS: (2, 64)}, {"model.embed_tokens": (3, 5)}, None),
        ({EMBED_ROWS: (3, 64)}, {"model.embed_tokens": (3, 5)}, "do not fit 2 rows of base [1000, 64]"),
        ({EMBED_ROWS: (2, 32)}, {"model.embed_tokens": (3, 5)}, "do not fit 2 rows"),
        ({EMBED_ROWS: (2, 64)}, {"model.embed_tokens": (3, 1000)}, "token id 1000 is past the base's 1000"),
        ({EMBED_ROWS: (2, 64)}, {"model.embed_tokens": None}, "names none for it"),
        (
            {EMBED_ROWS: (2, 64), "base_model.model.model.embed_tokens.lora_embedding_A": (8, 1000)},
            {"model.embed_tokens": (3, 5)},
            "both trainable tokens and LoRA",
        ),
        ({HEAD_ROWS: (1, 64)}, {"lm_head": (9,)}, "no counterpart in the base: lm_head.weight"),
    ],
)
def test_fit_of_token_rows(spec, rows, problem):
    problems = _fit(spec, rows=rows)
    assert problems == [] if problem is None else any(problem in p for p in problems), problems


def test_token_rows_of_a_tied_lm_head_land_in_the_shared_embedding():
    """A tied base has no lm_head tensor: its rows are the input embedding's (PEFT wraps the same matrix)."""
    assert _fit({HEAD_ROWS: (1, 64)}, config={"tie_word_embeddings": True}, rows={"lm_head": (9,)}) == []
    assert (
        _fit({HEAD_ROWS: (1, 64)}, config={"text_config": {"tie_word_embeddings": True}}, rows={"lm_head": (1000,)})
        != []
    )
