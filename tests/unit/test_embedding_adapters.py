"""A PEFT LoRA on the embedded MiniLM: inspect, merge (the sentence-transformers modules travel with
it) and verify by cosine against PEFT; a merge at the wrong scale fails. No engine: MiniLM runs
in seconds with sentence-transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lcserve import embedded as emb
from lcserve.adapters.inspection import Verdict, inspect_adapter
from lcserve.adapters.merge import merge_adapter
from lcserve.adapters.reader import read_adapter
from lcserve.adapters.verify import EMBEDDING_TOLERANCE, verify_merge

MINILM = emb.embedding_model_path()


def make_minilm_lora(out: Path) -> Path:
    """Rank 4 on query and value of all 6 layers, random non-zero weights, recorded as trained at 128."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModel.from_pretrained(MINILM),
        LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False),
    )
    model.save_pretrained(out)
    (out / "lcserve_adapter.json").write_text(json.dumps({"training_seq_len": 128}))
    return out


def peft_vectors(adapter: Path, texts: list[str]):
    """What base + adapter embed in PEFT, pooled and normalized as sentence-transformers does (fp32)."""
    import torch
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(MINILM), device="cpu")
    slot = "model" if "model" in st[0]._modules else "auto_model"
    setattr(st[0], slot, PeftModel.from_pretrained(getattr(st[0], slot), adapter))
    with torch.inference_mode():
        return st.encode(texts, normalize_embeddings=True)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return make_minilm_lora(tmp_path_factory.mktemp("minilm-lora") / "adapter")


def test_merge_verifies_by_cosine_and_a_wrong_merge_fails(adapter, tmp_path):
    lora = read_adapter(adapter)
    report = inspect_adapter(lora, MINILM)
    # vLLM 0.32's BertEmbeddingModel declares SupportsLoRA; on the CPU build a mounted rank-4
    # query/value adapter gave PEFT's vector (measured while building this), so inspect says mount
    assert report.verdict == Verdict.MOUNT and report.fit_problems == []
    merged = merge_adapter(lora, MINILM, tmp_path / "merged").out_dir
    assert (merged / "1_Pooling" / "config.json").exists() and (merged / "modules.json").exists()
    result = verify_merge(merged, lora, MINILM)
    print(f"\n1 - cosine {result.max_abs_diff:.2e}; adapter effect {result.adapter_effect:.3f}")
    assert result.passed and result.compared == "cosine distance"
    assert result.long_prompt_tokens > 128  # past the training length
    assert result.adapter_effect > 100 * EMBEDDING_TOLERANCE  # the check can tell the adapter from the base

    doubled = tmp_path / "doubled"
    shutil.copytree(adapter, doubled)
    config = json.loads((doubled / "adapter_config.json").read_text())
    (doubled / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 2 * config["lora_alpha"]}))
    wrong = merge_adapter(read_adapter(doubled), MINILM, tmp_path / "wrong").out_dir
    assert not verify_merge(wrong, lora, MINILM).passed
