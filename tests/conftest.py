"""Shared fixtures. `engine`: ONE real vLLM CPU server (embedded Gemma 3 270M) for the whole session."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

from lcserve import embedded as emb
from lcserve.serving.engine import EngineProcess, EngineSpec

ENGINE_MAX_MODEL_LEN = 8192


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Engine:
    url: str
    base_model: str
    max_model_len: int
    model_dir: Path
    process: EngineProcess




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
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    out = tmp_path_factory.mktemp("lora") / "adapter"
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def engine(embedded_model_dir, tmp_path_factory) -> Engine:
    spec = EngineSpec(
        model=str(embedded_model_dir), served_model_name=emb.SERVED_NAME, port=free_port(),
        max_model_len=ENGINE_MAX_MODEL_LEN, extra_args=["--enforce-eager"],
        env={"VLLM_CPU_KVCACHE_SPACE": "2",
             # tests may run a second engine; "auto" would pin every engine to core 0
             "VLLM_CPU_OMP_THREADS_BIND": "nobind"},
    )
    process = EngineProcess(spec, tmp_path_factory.mktemp("engine") / "vllm.log")
    process.start()
    try:
        process.wait_ready(600)
        yield Engine(url=spec.url, base_model=spec.served_model_name, max_model_len=ENGINE_MAX_MODEL_LEN,
                     model_dir=embedded_model_dir, process=process)
    finally:
        process.stop()
