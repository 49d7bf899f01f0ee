"""The segment-wise CPU LoRA ops plugin (serving/cpu_lora.py, a vllm.general_plugins entry point)
inside the real engine: with LCSERVE_CPU_LORA_OPS=segmented (the shared `engine`) vLLM's processes
install it and its ops run; with =stock they are neither installed nor run, and vLLM's own ops serve.
The proof is read from the engine's log, where the plugin writes through vLLM's own logger."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from lcserve import embedded as emb
from lcserve.engine import EngineProcess, EngineSpec, free_port
from lcserve.serving.cpu_lora import ENV_VAR, FIRST_USE, INSTALLED

pytestmark = pytest.mark.integration


def complete(url: str, model: str) -> str:
    body = {"model": model, "prompt": "The lighthouse keeper wrote in his log that", "max_tokens": 8, "temperature": 0}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    response.raise_for_status()
    return response.json()["choices"][0]["text"]


def log_lines(process: EngineProcess, needle: str, wait_s: float = 0.0) -> list[str]:
    """Lines of the engine log holding `needle`, waiting up to `wait_s` for the first (logs are flushed late)."""
    deadline = time.monotonic() + wait_s
    while True:
        lines = [line for line in process.log_path.read_text(errors="replace").splitlines() if needle in line]
        if lines or time.monotonic() >= deadline:
            return lines
        time.sleep(0.5)


def test_segmented_ops_run_inside_the_engine(engine):
    """An adapter request is served, and the engine's log shows the plugin installed in vLLM's
    processes and its ops run there."""
    assert complete(engine.url, engine.adapter_model)
    installed = log_lines(engine.process, INSTALLED)
    ran = log_lines(engine.process, FIRST_USE, wait_s=30)
    assert installed and f"{ENV_VAR}=segmented" in installed[0], engine.process.log_tail()
    assert ran, engine.process.log_tail()
    print(f"\n{len(installed)} process(es) installed the segmented ops; first use: {ran[0]}")


def test_stock_leaves_vllms_own_ops(embedded_model_dir, demo_adapter, tmp_path):
    """A second engine with LCSERVE_CPU_LORA_OPS=stock serves the same adapter request without
    the plugin: neither line appears, though vLLM's LoRA path runs (it loads the adapter)."""
    lora = {"name": "writer", "path": str(demo_adapter), "base_model_name": emb.SERVED_NAME}
    spec = EngineSpec(
        model=str(embedded_model_dir),
        served_model_name=emb.SERVED_NAME,
        port=free_port(),
        args=[
            "--max-model-len",
            "1024",
            "--enable-lora",
            "--max-lora-rank",
            "8",
            "--lora-modules",
            json.dumps(lora),
            "--enforce-eager",
        ],
        env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", ENV_VAR: "stock"},
    )
    process = EngineProcess(spec, tmp_path / "vllm.log")
    process.start()
    try:
        process.wait_ready(600)
        assert complete(spec.url, "writer")
    finally:
        process.stop()
    assert log_lines(process, "Loaded new LoRA adapter: name 'writer'"), process.log_tail()
    assert log_lines(process, INSTALLED) == [] and log_lines(process, FIRST_USE) == []
