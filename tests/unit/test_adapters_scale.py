"""`adapters/scale.py`, `adapters scale` and `adapters merge --scale`: an adapter at LoRA scale x s,
checked against real PEFT on a tiny base."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import Gemma3ForCausalLM

from lcserve.adapters.merge import PROVENANCE, merge_adapter
from lcserve.adapters.reader import read_adapter
from lcserve.adapters.scale import LORA_SCALE, scaled_config, scaled_metadata, write_scaled_adapter
from lcserve.adapters.verify import verify_merge
from lcserve.errors import AdapterError, LcserveError

from .test_adapters_merge import LONG, _gemma, make_adapter


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return _gemma(tmp_path_factory.mktemp("base") / "gemma")


def test_scaled_config_multiplies_alpha_and_its_patterns_only():
    config = {"lora_alpha": 16, "r": 8, "alpha_pattern": {"up_proj": 4}, "rank_pattern": {"v_proj": 2}}
    out = scaled_config(config, 0.5)
    assert (out["lora_alpha"], out["alpha_pattern"], out["rank_pattern"], out["r"]) == (
        8,
        {"up_proj": 2},
        {"v_proj": 2},
        8,
    )
    assert scaled_metadata(scaled_metadata({"training_seq_len": 256}, 0.5), 0.5) == {
        "training_seq_len": 256,
        LORA_SCALE: 0.25,
    }
    assert config == {"lora_alpha": 16, "r": 8, "alpha_pattern": {"up_proj": 4}, "rank_pattern": {"v_proj": 2}}


def _peft_deltas(base, adapter) -> dict[str, torch.Tensor]:
    """Each LoRA layer's weight delta (scale x B A) as PEFT loads the folder."""
    model = PeftModel.from_pretrained(Gemma3ForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    return {
        name: m.get_delta_weight("default")
        for name, m in model.named_modules()
        if hasattr(m, "lora_A") and "default" in m.lora_A
    }


@pytest.mark.parametrize(
    "lora",
    [
        dict(target_modules=["q_proj", "up_proj"], alpha_pattern={"up_proj": 3}),
        dict(target_modules=["v_proj"], use_rslora=True),
    ],
)
def test_peft_reads_the_scaled_copy_as_s_times_every_layer_delta(base, tmp_path, lora):
    adapter = make_adapter(base, tmp_path / "adapter", **lora)
    scaled = write_scaled_adapter(adapter, tmp_path / "scaled", 0.5)
    original, halved = _peft_deltas(base, adapter), _peft_deltas(base, scaled)
    assert original.keys() == halved.keys() and original
    for name, delta in original.items():
        assert delta.abs().max() > 1e-3, name  # the adapter does something here
        torch.testing.assert_close(halved[name], 0.5 * delta, rtol=1e-6, atol=0, msg=name)
    metadata = json.loads((scaled / "lcserve_adapter.json").read_text())
    assert metadata == {"training_seq_len": 128, LORA_SCALE: 0.5}  # the training length travels with the copy
    assert read_adapter(scaled).lora_alpha == read_adapter(adapter).lora_alpha * 0.5


def test_refuses_a_bad_scale_an_existing_out_and_dora_and_leaves_no_folder(base, tmp_path):
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    dora = make_adapter(base, tmp_path / "dora", target_modules=["q_proj"], use_dora=True)
    for scale in (0, -1, 1.5):
        with pytest.raises(AdapterError, match="must be in"):
            write_scaled_adapter(adapter, tmp_path / "bad", scale)
    assert not (tmp_path / "bad").exists()
    for force in (False, True):  # an adapter folder lcserve did not write is never replaced
        with pytest.raises(LcserveError, match="holds files lcserve did not write"):
            write_scaled_adapter(adapter, tmp_path / "dora", 0.5, force=force)
    for out in (adapter, adapter / "scaled"):  # --force never replaces or writes into the source
        with pytest.raises(AdapterError, match="inside the adapter folder"):
            write_scaled_adapter(adapter, out, 0.5, force=True)
    with pytest.raises(AdapterError, match="DoRA magnitudes do not scale with lora_alpha"):
        write_scaled_adapter(dora, tmp_path / "dora-scaled", 0.5)
    assert json.loads((adapter / "adapter_config.json").read_text())["lora_alpha"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "dora"]


def test_merge_at_a_scale_equals_merging_the_scaled_copy_and_verify_compares_at_that_scale(base, tmp_path):
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj", "down_proj"])
    copy = write_scaled_adapter(adapter, tmp_path / "copy", 0.5)
    direct = merge_adapter(read_adapter(adapter), base, tmp_path / "direct", dtype="fp32", scale=0.5)
    via_copy = merge_adapter(read_adapter(copy), base, tmp_path / "via-copy", dtype="fp32")
    assert direct.provenance[LORA_SCALE] == 0.5 and via_copy.provenance[LORA_SCALE] == 1
    weights = [load_file(d / "model.safetensors") for d in (direct.out_dir, via_copy.out_dir)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

    assert verify_merge(direct.out_dir, read_adapter(adapter), base, long_tokens=LONG).passed
    # the check can fail: the same merge without its recorded scale is compared with the full adapter
    provenance = direct.out_dir / PROVENANCE
    provenance.write_text(json.dumps({**json.loads(provenance.read_text()), LORA_SCALE: 1}))
    assert not verify_merge(direct.out_dir, read_adapter(adapter), base, long_tokens=LONG).passed


def test_merge_refuses_a_scale_that_would_not_scale_every_part(base, tmp_path):
    adapter = make_adapter(
        base, tmp_path / "adapter", target_modules=["k_proj"], modules_to_save=["post_attention_layernorm"]
    )
    with pytest.raises(AdapterError, match="modules_to_save do not scale with lora_alpha"):
        merge_adapter(read_adapter(adapter), base, tmp_path / "merged", scale=0.5)
    assert not (tmp_path / "merged").exists()
