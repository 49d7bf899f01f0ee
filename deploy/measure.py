"""Ask the real engine: start vLLM with a plan's arguments and read its own KV accounting.

vLLM logs `<DEVICE> KV cache size: N tokens, Maximum concurrency for L tokens per request: Xx`
once the cache is sized, before warm-up and before the server is ready, so the engine is
stopped as soon as that line appears. No request is sent.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lcserve.engine import EngineProcess, EngineSpec, free_port
from lcserve.errors import EngineError

from .plan import ServePlan

CAPACITY_RE = re.compile(
    r"(\w+) KV cache size: ([\d,]+) tokens, "
    r"Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x"
)
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


def measure_capacity(
    model_dir: Path, plan: ServePlan, timeout_s: float = 900, log_path: Path | None = None
) -> Measured:
    """Start vLLM with `plan` on `model_dir`, return its logged KV capacity, stop it."""
    log_path = Path(log_path or tempfile.mkstemp(prefix="lcserve-measure-", suffix=".log")[1])
    # Another engine on this machine may hold the cores vLLM would bind; binding only affects speed.
    bind = {} if "VLLM_CPU_OMP_THREADS_BIND" in os.environ else {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    spec = EngineSpec(
        model=str(model_dir),
        served_model_name=Path(model_dir).name,
        port=free_port(),
        args=["--enforce-eager", "--skip-tokenizer-init", *plan.vllm_args()],
        env={**bind, **plan.env},
    )
    engine = EngineProcess(spec, log_path)
    start = time.monotonic()
    engine.start()
    try:
        while time.monotonic() - start < timeout_s:
            text = log_path.read_text(errors="replace")
            found = parse_capacity(text)
            if found:
                return Measured(found.kv_tokens, found.max_concurrency, found.max_model_len, time.monotonic() - start)
            if not engine.alive():
                errors = FAILURE_RE.findall(text)
                lines = text.strip().splitlines()
                detail = errors[-1][1] if errors else (lines[-1] if lines else "no output")
                raise EngineError(
                    f"vLLM exited ({engine.returncode}) before sizing the KV cache: {detail}; log: {log_path}"
                )
            time.sleep(0.5)
        raise EngineError(f"vLLM did not report its KV cache size within {timeout_s:.0f} s; log: {log_path}")
    finally:
        engine.stop(timeout_s=20)
