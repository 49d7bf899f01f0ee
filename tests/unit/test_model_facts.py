"""The shared model facts against their sources: safetensors' and torch's dtypes, transformers' config
classes, and the lcserve_merge.json that a real merge writes."""

import json
import math
from fractions import Fraction

import pytest

from lcserve import config_weights as cw
from lcserve.adapters.scale import LORA_SCALE
from lcserve.model_facts import (
    DTYPE_BYTES,
    DTYPE_NAMES,
    FLOAT_DTYPES,
    MERGE_PROVENANCE,
    TORCH_NAMES,
    MergeProvenance,
    cdiv,
    dtype_code,
    read_merge_provenance,
    text_config,
    tied_embeddings,
    untied_config,
    write_merge_provenance,
)


def test_dtype_sizes_and_torch_names_are_safetensors_own():
    """Every code safetensors and lcserve both know has safetensors' torch dtype and its element size."""
    import torch
    from safetensors.torch import _TYPES

    shared = set(DTYPE_BYTES) & set(_TYPES)
    assert shared >= set(TORCH_NAMES) | set(FLOAT_DTYPES)
    for code in shared:
        assert DTYPE_BYTES[code] == torch.empty(0, dtype=_TYPES[code]).element_size(), code
    for code, name in TORCH_NAMES.items():
        assert getattr(torch, name) == _TYPES[code], code
    assert {c for c in _TYPES if _TYPES[c].is_floating_point and DTYPE_BYTES.get(c, 0) > 1} == set(FLOAT_DTYPES)


def test_dtype_names_are_torch_names_or_their_short_forms():
    import torch
    from safetensors.torch import _TYPES

    for name, code in DTYPE_NAMES.items():
        if hasattr(torch, name):  # torch's names and aliases (half, float)
            assert getattr(torch, name) == _TYPES[code], name
        else:  # lcserve's short forms: bf16 -> bfloat16, fp16 -> float16, fp32 -> float32
            long = {"bf": "bfloat", "fp": "float"}[name[:2]] + name[2:]
            assert DTYPE_NAMES[long] == code, name
    assert dtype_code("fp32") == dtype_code("F32") == "F32" and dtype_code("int4") is None


@pytest.mark.parametrize("model_type", [*cw.KNOWN_MODEL_TYPES, "gemma3"])
def test_tied_default_is_the_transformers_class_default(model_type):
    from transformers import AutoConfig

    expected = AutoConfig.for_model(model_type).tie_word_embeddings
    assert tied_embeddings({"model_type": model_type}) == expected
    assert tied_embeddings({"model_type": model_type, "tie_word_embeddings": not expected}) == (not expected)


def test_tied_reads_the_top_level_first_then_text_config():
    """A multimodal config.json as transformers saves it: the top level decides, text_config stands in."""
    from transformers import Gemma3Config

    saved = Gemma3Config(tie_word_embeddings=False).to_diff_dict()
    assert tied_embeddings(saved) is False and tied_embeddings(Gemma3Config().to_diff_dict()) is True
    assert tied_embeddings({"model_type": "llava", "text_config": {"tie_word_embeddings": True}}) is True
    untied = untied_config({"model_type": "gemma3", "text_config": {"model_type": "gemma3_text"}})
    assert tied_embeddings(untied) is False and untied["text_config"]["tie_word_embeddings"] is False


def test_text_config_wins_over_the_top_level():
    config = {"model_type": "gemma3", "vocab_size": 1, "text_config": {"vocab_size": 2, "hidden_size": 8}}
    assert text_config(config)["vocab_size"] == 2 and text_config(config)["model_type"] == "gemma3"
    assert text_config({"vocab_size": 1}) == {"vocab_size": 1}


@pytest.mark.parametrize("a,b", [(0, 16), (1, 16), (16, 16), (17, 16), (10**30 + 1, 3), (2**61 - 1, 1024**3)])
def test_cdiv_is_exact(a, b):
    assert cdiv(a, b) == math.ceil(Fraction(a, b))


def test_merge_provenance_round_trips_and_reads_partial_files(tmp_path):
    written = MergeProvenance(base_dir="/b", adapter_sha256="0" * 64, lora_scale=0.5, replaced_token_rows={"x": 2})
    write_merge_provenance(tmp_path, written)
    assert read_merge_provenance(tmp_path) == written
    assert list(json.loads((tmp_path / MERGE_PROVENANCE).read_text()))[:2] == ["lcserve_version", "base_dir"]
    (tmp_path / MERGE_PROVENANCE).write_text(json.dumps({"base_dir": "/b", LORA_SCALE: 1, "merged_modules": "x"}))
    partial = read_merge_provenance(tmp_path)
    assert (partial.base_dir, partial.lora_scale, partial.merged_modules) == ("/b", 1, 0)
    for broken in ("[1, 2]", "{not json"):
        (tmp_path / MERGE_PROVENANCE).write_text(broken)
        assert read_merge_provenance(tmp_path) is None
    assert read_merge_provenance(tmp_path / "absent") is None
