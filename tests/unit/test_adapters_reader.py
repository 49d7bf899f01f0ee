"""The one reader of adapter_config.json: the typed value, its checks, and the facts derived from it
(the largest rank, the scale of a module) checked against vLLM's own PEFTHelper."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from lcserve.adapters.inspection import Verdict, inspect_adapter
from lcserve.adapters.reader import STATED, LoraAdapter, read_adapter
from lcserve.errors import AdapterError
from lcserve.vllm_rules import VllmRules
from tests.unit.test_adapters_inspect import PLAIN, write_adapter

RULES = VllmRules(version="0.32.0", honors_rank_alpha_patterns=True)


def config_only(folder: Path, config: dict) -> Path:
    """An adapter folder with adapter_config.json alone (what the planner reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_every_field_lcserve_uses_is_read_once_into_a_frozen_value(tmp_path):
    folder = config_only(
        tmp_path / "a",
        {
            "peft_type": "LORA",
            "r": 8,
            "lora_alpha": 16,
            "target_modules": ["v_proj", "q_proj"],
            "rank_pattern": {"v_proj": 32},
            "alpha_pattern": {"q_proj": 4.5},
            "use_rslora": True,
            "use_dora": True,
            "modules_to_save": ["score"],
            "bias": "lora_only",
            "lora_bias": True,
            "fan_in_fan_out": True,
            "init_lora_weights": "gaussian",
            "ensure_weight_tying": True,
            "base_model_name_or_path": "google/gemma-3-270m",
            "layer_replication": [[0, 2]],
            "use_qalora": True,
            "target_parameters": ["experts.down_proj"],
            "trainable_token_indices": {"embed_tokens": [3, 4]},
            "lora_dropout": 0.1,
        },
    )
    (folder / "lcserve_adapter.json").write_text(json.dumps({"training_seq_len": 512}))
    adapter = read_adapter(folder)
    assert adapter == LoraAdapter(
        path=folder,
        r=8,
        lora_alpha=16,
        target_modules=("v_proj", "q_proj"),
        rank_pattern={"v_proj": 32},
        alpha_pattern={"q_proj": 4.5},
        use_rslora=True,
        use_dora=True,
        modules_to_save=("score",),
        bias="lora_only",
        lora_bias=True,
        fan_in_fan_out=True,
        init_lora_weights="gaussian",
        ensure_weight_tying=True,
        base_model_name_or_path="google/gemma-3-270m",
        layer_replication=([0, 2],),
        use_qalora=True,
        target_parameters=("experts.down_proj",),
        trainable_token_indices={"embed_tokens": (3, 4)},
        training_seq_len=512,
        training_seq_len_source="lcserve_adapter.json",
    )
    assert adapter.max_rank == 32
    with pytest.raises(dataclasses.FrozenInstanceError):
        adapter.r = 16


def test_what_the_planner_needs_comes_from_the_config_alone(tmp_path):
    """No weights file needed: the rank, the targets (a regex stays a string) and the training length."""
    folder = config_only(tmp_path / "a", {"r": 12, "lora_alpha": 24, "target_modules": "all-linear"})
    adapter = read_adapter(folder)
    assert (adapter.max_rank, adapter.target_modules, adapter.training_seq_len) == (12, "all-linear", None)
    stated = read_adapter(folder, training_seq_len=4096)
    assert (stated.training_seq_len, stated.training_seq_len_source) == (4096, STATED)


MODULES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.0.mlp.up_proj",
]


@pytest.mark.parametrize(
    "config",
    [
        {"r": 8, "lora_alpha": 16},
        {"r": 8, "lora_alpha": 16, "use_rslora": True},
        {
            "r": 8,
            "lora_alpha": 16,
            "rank_pattern": {"v_proj": 2, "layers.1.self_attn.q_proj": 4},
            "alpha_pattern": {"up_proj": 3},
        },
        {"r": 4, "lora_alpha": 8, "rank_pattern": {"q_proj": 16}, "alpha_pattern": {"q_proj": 64}, "use_rslora": True},
    ],
)
def test_rank_and_scaling_match_vllms_reader(tmp_path, config):
    from vllm.lora.peft_helper import PEFTHelper

    full = {"target_modules": ["q_proj", "v_proj", "up_proj"], **config}
    adapter = read_adapter(config_only(tmp_path / "a", full))
    helper = PEFTHelper.from_dict(full)
    for module in MODULES:
        assert adapter.rank_and_scaling(module) == pytest.approx(helper.get_rank_and_scaling(module)), module
    assert adapter.max_rank == max([helper.r, *helper.rank_pattern.values()])


@pytest.mark.parametrize(
    "config, message",
    [
        ({"lora_alpha": 8, "target_modules": ["q_proj"]}, "field `r` is None"),
        ({"r": 0, "lora_alpha": 8, "target_modules": ["q_proj"]}, "field `r` is 0"),
        ({"r": True, "lora_alpha": 8, "target_modules": ["q_proj"]}, "field `r` is True"),
        ({"r": 8}, "field `target_modules` is missing or empty"),
        ({"r": 8, "lora_alpha": 8, "target_modules": []}, "vLLM needs it to mount the adapter"),
        ({"r": 8, "lora_alpha": 8, "target_modules": {"q_proj": 1}}, "list of module names or one regex"),
        ({"r": 8, "target_modules": ["q_proj"]}, "field `lora_alpha` is None"),
        ({"r": 8, "lora_alpha": 8, "target_modules": ["q_proj"], "rank_pattern": {"q_proj": "4"}}, "`rank_pattern`"),
        (
            {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj"], "rank_pattern": {"q_proj": 2.5}},
            "positive integer ranks",
        ),
        ({"r": 8, "lora_alpha": 8, "target_modules": ["q_proj"], "alpha_pattern": [1]}, "`alpha_pattern`"),
        ({"peft_type": "IA3", "r": 8, "lora_alpha": 8, "target_modules": ["q_proj"]}, "LoRA adapters only"),
        (
            {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj"], "trainable_token_indices": [1, -2]},
            "`trainable_token_indices`",
        ),
        (
            {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj"], "trainable_token_indices": {"embed_tokens": "5"}},
            "lists of token ids",
        ),
        (
            {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj"], "trainable_token_indices": []},
            "`trainable_token_indices`",
        ),
    ],
)
def test_bad_config_is_one_line_naming_the_file_and_field(tmp_path, config, message):
    folder = config_only(tmp_path / "a", config)
    with pytest.raises(AdapterError, match="adapter_config.json") as err:
        read_adapter(folder)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda folder: (folder / "adapter_config.json").unlink(), "adapter_config.json: missing"),
        (lambda folder: (folder / "adapter_config.json").write_text("{not json"), "not valid JSON"),
        (lambda folder: (folder / "adapter_config.json").write_text("[1]"), "expected a JSON object"),
    ],
)
def test_missing_or_unreadable_config(tmp_path, damage, message):
    folder = config_only(tmp_path / "a", {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj"]})
    damage(folder)
    with pytest.raises(AdapterError, match=message):
        read_adapter(folder)


def test_raw_parameter_targets_are_read_and_refused_by_inspect(tmp_path):
    """target_parameters alone passes the reader (target_modules None, as PEFT has it); inspect refuses it."""
    folder = write_adapter(
        tmp_path / "a", {"target_modules": None, "target_parameters": ["experts.gate_up_proj"]}, PLAIN
    )
    adapter = read_adapter(folder)
    assert adapter.target_modules is None and adapter.target_parameters == ("experts.gate_up_proj",)
    report = inspect_adapter(adapter, rules=RULES)
    assert report.verdict == Verdict.UNUSABLE and report.to_json()["target_modules"] is None


def test_verdicts_print_as_plain_strings():
    assert json.dumps({"verdict": Verdict.MERGE}) == '{"verdict": "merge"}'
    assert f"{Verdict.MOUNT}" == "mount" and Verdict.UNUSABLE == "unusable"


def test_inspect_json_keeps_its_published_keys_in_order(tmp_path):
    report = inspect_adapter(read_adapter(write_adapter(tmp_path / "a", {}, PLAIN)), rules=RULES)
    assert list(report.to_json()) == [
        "adapter_dir",
        "weights_file",
        "rank",
        "alpha",
        "use_rslora",
        "use_dora",
        "target_modules",
        "modules_to_save",
        "bias",
        "lora_bias",
        "fan_in_fan_out",
        "rank_pattern",
        "alpha_pattern",
        "init_lora_weights",
        "unsupported_features",
        "embedding_lora",
        "lora_modules",
        "max_rank",
        "base_model_name",
        "training_seq_len",
        "training_seq_len_source",
        "base_dir",
        "base_architecture",
        "base_vocab_size",
        "adapter_vocab_size",
        "fit_problems",
        "verdict",
        "reasons",
        "notes",
        "max_lora_rank",
        "vllm",
        "trainable_token_indices",
        "trainable_tokens",
        "nonfinite_tensors",
    ]


@pytest.mark.parametrize(
    "indices, module, rows",
    [
        ([5, 7], "model.embed_tokens", (5, 7)),  # a list: the input embedding's rows
        ({"embed_tokens": [5, 7], "lm_head": [9]}, "model.embed_tokens", (5, 7)),
        ({"embed_tokens": [5, 7], "lm_head": [9]}, "lm_head", (9,)),
        ({"embed_tokens": [5, 7]}, "lm_head", None),
        (None, "model.embed_tokens", None),
    ],
)
def test_trainable_token_indices_per_module(tmp_path, indices, module, rows):
    """A dict key names its module by suffix, as PEFT's _set_trainable matches (`key.endswith(name)`)."""
    config = {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj"], "trainable_token_indices": indices}
    assert read_adapter(config_only(tmp_path / "a", config)).token_indices(module) == rows
