"""A LoRA mounted on the embedded MiniLM by `lcserve serve --adapter NAME=DIR`: vLLM 0.32's
BertEmbeddingModel mounts it (SupportsLoRA), and through the gateway its vectors equal PEFT's."""

from __future__ import annotations

import dataclasses

import httpx
import numpy as np
import pytest
from rich.console import Console

from lcserve import embedded as emb
from lcserve.serving.cli import read_inputs
from lcserve.serving.launch import ServeOptions, describe_launch
from lcserve.serving.stack import Stack
from tests.unit.test_embedding_adapters import make_minilm_lora, peft_vectors

pytestmark = pytest.mark.integration


def test_a_mounted_adapter_embeds_as_peft_does(tmp_path):
    adapter = make_minilm_lora(tmp_path / "adapter")
    options = ServeOptions(model=str(emb.embedding_model_path()), adapters=(("tuned", adapter),), mode="mount", port=0)
    launch = describe_launch(options, read_inputs(options, Console(stderr=True)))
    assert "--enable-lora" in launch.spec.args and launch.embedding_policies == {
        emb.EMBEDDING_SERVED_NAME: "reject",
        "tuned": "reject",
    }
    spec = dataclasses.replace(launch.spec, env={**launch.spec.env, "VLLM_CPU_OMP_THREADS_BIND": "nobind"})
    texts = ["The keeper lit the lamp at dusk.", "Anne walked along the Cobb at Lyme in the wind."]
    with Stack(
        spec,
        gateway_port=0,
        training_lengths=launch.training_lengths,
        embedding_policies=launch.embedding_policies,
        log_path=tmp_path / "vllm.log",
        ready_timeout_s=600,
    ) as stack:

        def embed(model):
            r = httpx.post(f"{stack.url}/v1/embeddings", json={"model": model, "input": texts}, timeout=120)
            assert r.status_code == 200, r.text
            return np.array([d["embedding"] for d in r.json()["data"]])

        tuned, base = embed("tuned"), embed(emb.EMBEDDING_SERVED_NAME)
    want = peft_vectors(adapter, texts)
    cosines = (tuned * want).sum(axis=1)
    print(
        f"\nmounted LoRA vs PEFT: cosine min {cosines.min():.6f}; adapter vs base {(tuned * base).sum(axis=1).max():.4f}"
    )
    assert cosines.min() >= 0.999
    assert (tuned * base).sum(axis=1).max() < 0.99  # the adapter changes the vectors: the check can fail
