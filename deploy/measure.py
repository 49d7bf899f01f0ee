"""Ask the real engine: start vLLM with a plan's arguments and read its own KV accounting.

vLLM logs `<DEVICE> KV cache size: N tokens, Maximum concurrency for L tokens per request: Xx`
once the cache is sized, before warm-up and before the server is ready, so the engine is
stopped as soon as that line appears. No request is sent.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lcserve.errors import EngineError
from lcserve.serving.engine import free_port

from .plan import ServePlan

CAPACITY_RE = re.compile(r"(\w+) KV cache size: ([\d,]+) tokens, "
                         r"Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x")
FAILURE_RE = re.compile(r"(ValueError|RuntimeError|Error): (.+)")


@dataclass(frozen=True)
class Measured:
    kv_tokens: int
    max_concurrency: float  # as logged, two decimals
    max_model_len: int
    seconds: float


def parse_capacity(log_text: str) -> Measured | None:
    m = CAPACITY_RE.search(log_text)
    if not m:
        return None
    return Measured(int(m.group(2).replace(",", "")), float(m.group(4)), int(m.group(3).replace(",", "")), 0.0)


def measure_capacity(model_dir: Path, plan: ServePlan, timeout_s: float = 900, log_path: Path | None = None,
                     python: str = sys.executable) -> Measured:
    """Start vLLM with `plan` on `model_dir`, return its logged KV capacity, stop it."""
    log_path = Path(log_path or tempfile.mkstemp(prefix="lcserve-measure-", suffix=".log")[1])
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--host", "127.0.0.1", "--port", str(free_port()), "--enforce-eager", "--skip-tokenizer-init",
           *plan.vllm_args()]
    # Another engine on this machine may hold the cores vLLM would bind; binding only affects speed.
    env = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", **os.environ, **plan.env}
    start = time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        while time.monotonic() - start < timeout_s:
            text = log_path.read_text(errors="replace")
            found = parse_capacity(text)
            if found:
                return Measured(found.kv_tokens, found.max_concurrency, found.max_model_len, time.monotonic() - start)
            if proc.poll() is not None:
                errors = FAILURE_RE.findall(text)
                lines = text.strip().splitlines()
                detail = errors[-1][1] if errors else (lines[-1] if lines else "no output")
                raise EngineError(f"vLLM exited ({proc.returncode}) before sizing the KV cache: {detail}; log: {log_path}")
            time.sleep(0.5)
        raise EngineError(f"vLLM did not report its KV cache size within {timeout_s:.0f} s; log: {log_path}")
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the engine's whole process group (its workers included)."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue
