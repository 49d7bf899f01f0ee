"""The segment-wise CPU LoRA ops plugin (serving/cpu_lora.py, a vllm.general_plugins entry point)
inside the real engine: with LCSERVE_CPU_LORA_OPS=segmented (the shared `engine`) vLLM's processes
install it and its ops run. The proof is read from the engine's log, where the plugin writes through
vLLM's own logger. With =stock they are neither installed nor run, and vLLM's own ops serve: that is
checked on the engine that `./serve_vllm.sh` starts (tests/integration/test_serve_script.py)."""

from __future__ import annotations

import time

import httpx
import pytest

from lcserve.engine import EngineProcess
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
