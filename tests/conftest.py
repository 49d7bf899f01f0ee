"""Shared fixtures. `engine`: ONE real vLLM CPU server (embedded Gemma 3 270M) for the whole session."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

from lcserve import embedded as emb
from lcserve.paths import demo_adapter_dir
from lcserve.serving.engine import EngineProcess, EngineSpec

ENGINE_MAX_MODEL_LEN = 8192
ADAPTER_NAME = "writer"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Engine:
    url: str
    base_model: str
    adapter_model: str | None
    max_model_len: int
    model_dir: Path
    adapter_dir: Path | None
    process: EngineProcess


def demo_adapter() -> Path | None:
    path = demo_adapter_dir()
    return path if (path / "adapter_config.json").exists() else None


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    return emb.prepare()


@pytest.fixture(scope="session")
def engine(embedded_model_dir, tmp_path_factory) -> Engine:
    adapter_dir = demo_adapter()
    lora_args: list[str] = []
    if adapter_dir is not None:
        lora_args = ["--enable-lora", "--max-lora-rank", "16", "--max-loras", "2",
                     "--lora-modules", json.dumps({"name": ADAPTER_NAME, "path": str(adapter_dir),
                                                   "base_model_name": emb.SERVED_NAME})]
    spec = EngineSpec(
        model=str(embedded_model_dir), served_model_name=emb.SERVED_NAME, port=free_port(),
        max_model_len=ENGINE_MAX_MODEL_LEN, extra_args=["--enforce-eager"], lora_args=lora_args,
        env={"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
             # tests may run a second engine; "auto" would pin every engine to core 0
             "VLLM_CPU_OMP_THREADS_BIND": "nobind"},
    )
    process = EngineProcess(spec, tmp_path_factory.mktemp("engine") / "vllm.log")
    process.start()
    try:
        process.wait_ready(600)
        yield Engine(url=spec.url, base_model=spec.served_model_name,
                     adapter_model=ADAPTER_NAME if adapter_dir else None,
                     max_model_len=ENGINE_MAX_MODEL_LEN, model_dir=embedded_model_dir,
                     adapter_dir=adapter_dir, process=process)
    finally:
        process.stop()
