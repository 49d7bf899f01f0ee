"""Shared fixtures. `engine`: ONE real vLLM CPU server for the whole session: the embedded Gemma 3
270M with the demo adapter mounted as `writer` (the embedded default that ./serve_vllm.sh serves)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from lcserve import embedded as emb
from lcserve.engine import EngineProcess, EngineSpec, free_port
from lcserve.serving.cpu_lora import ENV_VAR as CPU_LORA_ENV
from lcserve.serving.cpu_lora import SEGMENTED

ENGINE_MAX_MODEL_LEN = 8192
ADAPTER_MODEL = "writer"


@dataclass
class Engine:
    url: str
    base_model: str
    max_model_len: int
    model_dir: Path
    process: EngineProcess
    adapter_model: str
    adapter_dir: Path


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    return emb.prepare()


@pytest.fixture(scope="session")
def lora_adapter_dir(embedded_model_dir, tmp_path_factory) -> Path:
    """A small real PEFT LoRA (rank 4, random non-zero B) on the embedded model, built once."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir, dtype=torch.bfloat16)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    out = tmp_path_factory.mktemp("lora") / "adapter"
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def demo_adapter(embedded_model_dir) -> Path:
    """The demo adapter, trained at 256 tokens (instant when the set-up already trained it)."""
    from lcserve.adapters.train import train_demo_adapter

    return train_demo_adapter()


@pytest.fixture(scope="session")
def real_adapters_root(tmp_path_factory) -> Path:
    """Where the integration tests build their PEFT adapters, once per session (both the merge and
    the vLLM tests use them)."""
    root = tmp_path_factory.getbasetemp() / "real-adapters"
    root.mkdir(exist_ok=True)
    return root


@pytest.fixture(scope="session")
def engine(embedded_model_dir, demo_adapter, tmp_path_factory) -> Engine:
    lora = {"name": ADAPTER_MODEL, "path": str(demo_adapter), "base_model_name": emb.SERVED_NAME}
    spec = EngineSpec(
        model=str(embedded_model_dir),
        served_model_name=emb.SERVED_NAME,
        port=free_port(),
        # rank 16 and two slots: tests load rank-4 adapters at run time beside `writer`
        args=[
            "--max-model-len",
            str(ENGINE_MAX_MODEL_LEN),
            "--enable-lora",
            "--max-lora-rank",
            "16",
            "--max-loras",
            "2",
            "--lora-modules",
            json.dumps(lora),
            "--enforce-eager",
        ],
        env={
            "VLLM_CPU_KVCACHE_SPACE": "2",
            # tests may run a second engine; "auto" would pin every engine to core 0
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            CPU_LORA_ENV: SEGMENTED,
        },
    )
    process = EngineProcess(spec, tmp_path_factory.mktemp("engine") / "vllm.log")
    process.start()
    try:
        process.wait_ready(600)
        yield Engine(
            url=spec.url,
            base_model=spec.served_model_name,
            max_model_len=ENGINE_MAX_MODEL_LEN,
            model_dir=embedded_model_dir,
            process=process,
            adapter_model=ADAPTER_MODEL,
            adapter_dir=demo_adapter,
        )
    finally:
        process.stop()
