"""SIGKILL `lcserve serve` (what the OOM killer does): nothing can clean up in lcserve, so the
engine's watchdog must stop vLLM, and both ports must be free again within 10 s."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.test_serving_restart import engine_server_pid, process_group
from tests.unit.test_supervisor import free_port, group_alive, port_free, wait_until

pytestmark = pytest.mark.integration

LIMIT_S = 10.0


def engine_port(server_pid: int) -> int:
    args = Path(f"/proc/{server_pid}/cmdline").read_bytes().split(b"\0")
    return int(args[args.index(b"--port") + 1])


def test_vllm_dies_with_a_sigkilled_lcserve(embedded_model_dir, tmp_path):
    gateway_port = free_port()
    out = tmp_path / "serve.out"
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    with out.open("wb") as sink:
        serve = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lcserve.cli",
                "serve",
                "--base-only",
                "--port",
                str(gateway_port),
                "--max-model-len",
                "2048",
                "--log-file",
                str(tmp_path / "vllm.log"),
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    group = None
    try:
        assert wait_until(lambda: serve.poll() is not None or "ready in " in out.read_text(), 900), out.read_text()
        assert serve.poll() is None, out.read_text()
        server = engine_server_pid(serve.pid)
        assert server is not None
        group, port = process_group(server), engine_port(server)
        assert not port_free(port) and not port_free(gateway_port)

        serve.kill()
        killed = time.monotonic()
        serve.wait(10)
        gone = wait_until(lambda: not group_alive(group) and port_free(port) and port_free(gateway_port), 30)
        elapsed = time.monotonic() - killed
        print(f"\nlcserve SIGKILLed: vLLM gone and both ports free after {elapsed:.1f} s")
        assert gone and elapsed <= LIMIT_S, (
            f"vLLM still running or a port still taken {elapsed:.1f} s after lcserve died\n"
            f"{(tmp_path / 'vllm.log').read_text()[-2000:]}"
        )
        assert "lcserve.watchdog: lcserve" in (tmp_path / "vllm.log").read_text()
    finally:
        if serve.poll() is None:
            serve.kill()
        if group is not None and group_alive(group):
            os.killpg(group, signal.SIGKILL)
