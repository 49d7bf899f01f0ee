"""The RoPE/positions check: each finding fed a config that must trigger it and one that must not,
then through `adapters inspect` and `deploy plan`, and the tiling plugin's table arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lcserve.adapters.inspection import inspect_adapter
from lcserve.adapters.reader import read_adapter
from lcserve.deploy.plan import PlanRequest, plan_deployment
from lcserve.model_config import read_model
from lcserve.model_facts import MERGE_PROVENANCE
from lcserve.rope_check import TILING_KEY, rope_findings, tiled_config
from lcserve.serving.rope_tiling import ENV_VAR, tile_length, tile_rows

from .test_adapters_inspect import BASE, PLAIN, write_adapter
from .test_deploy_plan import CPU

GEMMA3 = {
    "model_type": "gemma3_text",
    "max_position_embeddings": 32768,
    "rope_parameters": {
        "full_attention": {"rope_theta": 1000000.0, "rope_type": "default"},
        "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
    },
}
LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "vocab_size": 1000,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "dtype": "bfloat16",
}


def fields(config: dict, base: dict | None) -> list[str]:
    return [f.field for f in rope_findings(config, base, "m")]


def test_positions_finding():
    assert fields({**GEMMA3, "max_position_embeddings": 131072}, GEMMA3) == ["max_position_embeddings"]
    assert fields(dict(GEMMA3), GEMMA3) == []


def test_positions_message_names_both_values_and_the_fix():
    (finding,) = rope_findings({**LLAMA, "max_position_embeddings": 32768}, LLAMA, "merged", "its base /b")
    assert "max_position_embeddings 32768 differs from its base /b's 8192" in finding.message
    assert "restore the base's value in merged/config.json" in finding.message


@pytest.mark.parametrize(
    "config, base, expected",
    [
        (
            {**LLAMA, "rope_scaling": {"type": "linear", "factor": 4.0}},
            LLAMA,
            ["rope_parameters.factor", "rope_parameters.rope_type"],
        ),
        ({**LLAMA, "rope_theta": 10000.0}, LLAMA, ["rope_parameters.rope_theta"]),
        (
            {
                **GEMMA3,
                "rope_parameters": {
                    **GEMMA3["rope_parameters"],
                    "sliding_attention": {"rope_theta": 1e4, "factor": 8.0},
                },
            },
            GEMMA3,
            ["rope_parameters.sliding_attention.factor"],
        ),
        # An older transformers' single rope_theta describes the full-attention layers: the same RoPE.
        ({"max_position_embeddings": 32768, "rope_theta": 1000000.0, "rope_scaling": None}, GEMMA3, []),
        ({**LLAMA, "rope_scaling": None}, LLAMA, []),
        ({"max_position_embeddings": 8192}, LLAMA, []),  # a partial config states no RoPE to compare
    ],
)
def test_rope_parameter_findings(config, base, expected):
    assert fields(config, base) == expected


def test_adapter_findings_say_vllm_uses_the_base_config():
    (finding,) = rope_findings({**LLAMA, "rope_theta": 1e4}, LLAMA, "adapter a", "the base /b", served_as="adapter")
    assert "vLLM serves the adapter under the base's config.json" in finding.message
    assert "rope_theta is 10000.0, the base /b's is 500000.0" in finding.message


def test_tiling_finding_with_and_without_a_base():
    tiled = tiled_config(GEMMA3, 2048)
    assert fields(tiled, GEMMA3) == [TILING_KEY]
    assert fields(tiled, None) == [TILING_KEY]
    assert fields(GEMMA3, None) == []
    assert fields(tiled, tiled) == []  # the same variant on both sides: nothing differs
    (finding,) = rope_findings(tiled, None, "variant")
    assert "encoded as if at p mod 2048" in finding.message and "--max-model-len 2048 or less" in finding.message


# --- wired in: `adapters inspect` and `deploy plan` ---------------------------------------------------


def write_base(folder: Path, config: dict) -> Path:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: torch.zeros(shape) for k, shape in BASE.items()}, folder / "model.safetensors")
    return folder


@pytest.mark.parametrize(
    "adapter_config, flagged", [({**LLAMA, "max_position_embeddings": 65536}, True), (LLAMA, False)]
)
def test_inspect_notes_an_adapter_config_json_that_differs_from_the_base(tmp_path, adapter_config, flagged):
    base = write_base(tmp_path / "base", LLAMA)
    adapter = write_adapter(tmp_path / "a", {}, PLAIN)
    (adapter / "config.json").write_text(json.dumps(adapter_config))  # as axolotl and unsloth save it
    notes = inspect_adapter(read_adapter(adapter), base).notes
    assert any("max_position_embeddings 65536 differs from the base" in n for n in notes) == flagged


def config_only(folder: Path, config: dict, base: Path | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    if base:
        (folder / MERGE_PROVENANCE).write_text(json.dumps({"base_dir": str(base)}))
    return folder


def plan_warnings(model_dir: Path) -> list[str]:
    return plan_deployment(CPU, read_model(model_dir), (), PlanRequest(max_model_len=4096)).warnings


@pytest.mark.parametrize("merged_config, flagged", [({**LLAMA, "rope_theta": 1e6}, True), (LLAMA, False)])
def test_plan_warns_when_a_merged_model_differs_from_its_recorded_base(tmp_path, merged_config, flagged):
    base = config_only(tmp_path / "base", LLAMA)
    merged = config_only(tmp_path / "merged", merged_config, base)
    rope_warnings = [w for w in plan_warnings(merged) if "RoPE" in w]
    assert bool(rope_warnings) == flagged
    if flagged:
        assert f"its base {base}'s is 500000.0" in rope_warnings[0]


def test_plan_flags_the_repeated_table_variant(tmp_path):
    """The variant bench_rope_tiling.py builds (config.json + tiling record) is flagged by the planner."""
    variant = config_only(tmp_path / "variant", tiled_config(LLAMA, 2048))
    assert any(TILING_KEY in w for w in plan_warnings(variant))
    assert not any(TILING_KEY in w for w in plan_warnings(config_only(tmp_path / "plain", LLAMA)))


# --- the plugin's arithmetic (vLLM not started) ------------------------------------------------------


def test_tile_rows_repeats_the_first_rows():
    import torch

    table = torch.arange(10.0).unsqueeze(1).repeat(1, 3)
    assert tile_rows(table, 4)[:, 0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]


def test_tile_length_from_the_environment():
    assert tile_length({}) is None
    assert tile_length({ENV_VAR: "2048"}) == 2048
    with pytest.raises(ValueError, match=f"{ENV_VAR}='2k'"):
        tile_length({ENV_VAR: "2k"})


def test_the_plugin_tiles_the_table_vllm_builds(monkeypatch):
    """vLLM's own RotaryEmbedding, built after register(): rows past L0 repeat rows from 0; before, they differ."""
    import torch
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding, RotaryEmbeddingBase

    from lcserve.serving import rope_tiling

    def table():
        with set_current_vllm_config(VllmConfig()):  # vLLM's ops are built inside a config, as at model load
            return RotaryEmbedding(8, 8, 16, 10000.0, True, torch.float32).cos_sin_cache

    plain = table()
    assert not torch.equal(plain[8:], plain[:8])
    monkeypatch.setattr(RotaryEmbeddingBase, "__init__", RotaryEmbeddingBase.__init__)  # restored after the test
    monkeypatch.setenv(ENV_VAR, "8")
    rope_tiling.register()
    rope_tiling.register()  # vLLM may load a plugin more than once: it wraps once
    tiled = table()
    assert torch.equal(tiled[:8], plain[:8]) and torch.equal(tiled[8:], plain[:8])
