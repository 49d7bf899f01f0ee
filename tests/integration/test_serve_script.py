"""The main job end to end: `./serve_vllm.sh` plans, serves the embedded model behind the gateway,
answers, and stops cleanly on Ctrl-C (no orphaned engine, port and socket folder released). The running engine's own
KV figures (`vllm:cache_config_info`) equal the `--dry-run` plan for the same arguments and environment,
and with LCSERVE_CPU_LORA_OPS=stock vLLM's own LoRA ops serve the adapter (the plugin neither installed
nor run; the session engine shows the segmented ops, tests/integration/test_cpu_lora_engine.py)."""

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from lcserve.engine import engine_client
from lcserve.serving.cpu_lora import ENV_VAR, FIRST_USE, INSTALLED
from tests.conftest import free_port
from tests.unit.test_metrics import samples

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def wait_health(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"serve_vllm.sh exited with {proc.returncode}"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"not ready after {timeout_s} s")


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def cache_config(metrics_text: str) -> dict[str, str]:
    """The labels of vLLM's `vllm:cache_config_info` gauge (block size, KV blocks, ...)."""
    (labels,) = [dict(ls) for (name, ls) in samples(metrics_text) if name == "vllm:cache_config_info"]
    return labels


def test_serve_script_serves_the_embedded_default_and_stops_on_ctrl_c(embedded_model_dir, demo_adapter, tmp_path):
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", ENV_VAR: "stock"}
    args = [str(ROOT / "serve_vllm.sh"), "embedded", str(port), "2", "2048"]
    dry = subprocess.run([*args, "--dry-run"], env=env, capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)["plan"]
    proc = subprocess.Popen(
        args,
        env=env,
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "stderr").open("w"),
        text=True,
        start_new_session=True,
    )
    try:
        wait_health(f"http://127.0.0.1:{port}", proc, 600)
        url = f"http://127.0.0.1:{port}"
        served = {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]}
        assert served == {"gemma-3-270m", "writer"}  # the demo adapter is part of the embedded default
        for model in served:
            r = httpx.post(
                f"{url}/v1/completions",
                timeout=120,
                json={"model": model, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0},
            )
            assert r.status_code == 200 and r.json()["choices"][0]["text"].strip()
        assert "lcserve_engine_up" in httpx.get(f"{url}/metrics", timeout=30).text  # the gateway is in front
        stderr = (tmp_path / "stderr").read_text()
        sock, vllm_log = re.search(r"on the private socket (\S+) \(log: ([^)]+)\)", stderr).groups()
        vllm_log = Path(vllm_log)
        with engine_client(f"unix:{sock}", timeout=30) as engine:  # vLLM's one address: no TCP port
            running = cache_config(engine.get("/metrics").text)
        print(
            f"\nplanned {plan['num_blocks']} blocks of {plan['block_size']}, {plan['kv_cache_tokens']} tokens, "
            f"{plan['max_concurrency']:.3f} full-length requests; vLLM runs with {running['num_gpu_blocks']} blocks "
            f"of {running['block_size']}, {running['kv_cache_size_tokens']} tokens, {running['kv_cache_max_concurrency']}"
        )
        assert (int(running["num_gpu_blocks"]), int(running["block_size"])) == (plan["num_blocks"], plan["block_size"])
        assert int(running["kv_cache_size_tokens"]) == plan["kv_cache_tokens"]
        assert float(running["kv_cache_max_concurrency"]) == pytest.approx(plan["max_concurrency"], rel=1e-3)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stderr = (tmp_path / "stderr").read_text()
    assert "VLLM_CPU_KVCACHE_SPACE=1 GiB (from the environment)" in stderr
    assert "ready in" in stderr and "stopped" in stderr
    assert port_is_free(port) and not Path(sock).parent.exists()  # the private socket folder goes with it
    leftovers = subprocess.run(["pgrep", "-f", f"--uds {sock}"], capture_output=True, text=True).stdout.split()
    assert leftovers == [], f"orphaned engine processes: {leftovers}"
    log = vllm_log.read_text(errors="replace")
    assert "Loaded new LoRA adapter: name 'writer'" in log  # vLLM's own LoRA path served `writer`
    assert INSTALLED not in log and FIRST_USE not in log  # and lcserve's plugin stayed out
