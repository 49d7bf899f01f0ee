"""Kill the real vLLM under load: in-flight requests fail clearly, new ones get 503, the
supervisor restarts it, the metrics show it; then SIGKILL the stack itself, and the engine's
watchdog stops vLLM (no orphan); SIGTERM while vLLM is still loading leaves nothing behind.

The stack runs in a subprocess (`run_stack`, what `lcserve serve` calls) with its own small
engine, so the session engine is never killed and the signal handling is the real one.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest

from tests.unit.test_metrics import value
from tests.unit.test_supervisor import free_port, group_alive, port_free, wait_until

pytestmark = pytest.mark.integration

IN_FLIGHT = 8
SERVED = "gemma-3-270m"

STACK = """
import logging, sys
from pathlib import Path
from lcserve.engine import EngineSpec
from lcserve.serving.stack import run_stack
logging.basicConfig(level=logging.INFO)
model, engine_port, gateway_port, log = sys.argv[1:5]
spec = EngineSpec(model=model, served_model_name="gemma-3-270m", port=int(engine_port),
                  args=["--max-model-len", "2048", "--enforce-eager"],
                  env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"})
run_stack(spec, "127.0.0.1", int(gateway_port), log_path=Path(log), ready_timeout_s=900,
          on_ready=lambda stack: print("READY", stack.url, flush=True))
"""


def engine_server_pid(stack_pid: int) -> int | None:
    """The vLLM API server among the stack process's descendants (under its watchdog, which leads
    the engine's process group)."""
    pending = [stack_pid]
    while pending:
        for children in Path(f"/proc/{pending.pop()}/task").glob("*/children"):
            try:
                pids = children.read_text().split()
            except OSError:
                continue
            for pid in pids:
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if b"vllm.entrypoints.openai.api_server" in cmdline and b"lcserve.watchdog" not in cmdline:
                    return int(pid)
                pending.append(int(pid))
    return None


def process_group(pid: int) -> int:
    """The process group of a live process (the engine's: its watchdog's pid)."""
    return os.getpgid(pid)


class StackProcess:
    def __init__(self, workdir: Path, model_dir: Path):
        self.engine_port, self.gateway_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.gateway_port}"
        self.output = workdir / "stack.out"
        self.vllm_log = workdir / "vllm.log"
        self.engine_groups: set[int] = set()
        with self.output.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    STACK,
                    str(model_dir),
                    str(self.engine_port),
                    str(self.gateway_port),
                    str(self.vllm_log),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    @property
    def socket(self) -> Path:
        """vLLM's socket: the stack's first private folder under the temporary folder (no TCP port)."""
        return Path(tempfile.gettempdir()) / f"lcserve-{self.proc.pid}-0" / "vllm.sock"

    def logs(self) -> str:
        return f"--- stack ---\n{self.output.read_text()[-3000:]}\n--- vllm ---\n{self.vllm_log.read_text()[-3000:]}"

    def engine_pid(self) -> int | None:
        pid = engine_server_pid(self.proc.pid)
        if pid is not None:
            try:
                self.engine_groups.add(process_group(pid))
            except ProcessLookupError:
                return None
        return pid

    def shutdown(self) -> None:
        """After a failed test: stop the stack, and kill any engine group it left behind."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for pgid in self.engine_groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def wait_ready(self, timeout_s: float = 900) -> None:
        ok = wait_until(lambda: self.proc.poll() is not None or "READY" in self.output.read_text(), timeout_s)
        assert ok and self.proc.poll() is None, self.logs()

    def metric(self, name: str) -> float | None:
        return value(httpx.get(f"{self.url}/metrics", timeout=10).text, name)


@pytest.fixture(scope="module")
def stack(embedded_model_dir, tmp_path_factory):
    s = StackProcess(tmp_path_factory.mktemp("stack"), embedded_model_dir)
    try:
        s.wait_ready()
        s.engine_pid()
        yield s
    finally:
        s.shutdown()


async def _stream(client: httpx.AsyncClient, url: str, i: int, first: asyncio.Event) -> tuple[int, list[str]]:
    body = {
        "model": SERVED,
        "prompt": f"Story {i}: once upon a time",
        "max_tokens": 1000,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    events = []
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, [r.text]
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: ") :])
                first.set()
    return r.status_code, events


def test_engine_killed_under_load_is_restarted(stack):
    assert stack.metric("lcserve_engine_up") == 1
    assert stack.metric("lcserve_engine_restarts_total") == 0
    server = stack.engine_pid()
    assert server is not None, stack.logs()
    group = process_group(server)

    async def load_then_kill():
        firsts = [asyncio.Event() for _ in range(IN_FLIGHT)]
        async with httpx.AsyncClient(timeout=httpx.Timeout(300, connect=10)) as client:
            tasks = [asyncio.create_task(_stream(client, stack.url, i, firsts[i])) for i in range(IN_FLIGHT)]
            await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), 300)  # all streaming
            os.kill(server, signal.SIGKILL)
            return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 120)

    outcomes = asyncio.run(load_then_kill())

    # in flight: every stream ends with vLLM-style error event then [DONE]; none lost or hung
    for outcome in outcomes:
        assert not isinstance(outcome, BaseException), outcome
        status, events = outcome
        assert status == 200 and events[-1] == "[DONE]", events[-3:]
        error = json.loads(events[-2])["error"]
        assert error["code"] == 502 and "retry" in error["message"]

    # new requests while the engine is down: 503 with Retry-After, at once
    down = httpx.post(
        f"{stack.url}/v1/completions", json={"model": SERVED, "prompt": "hi", "max_tokens": 4}, timeout=10
    )
    assert down.status_code == 503 and int(down.headers["Retry-After"]) > 0
    assert "restarting" in down.json()["error"]["message"]
    assert wait_until(lambda: stack.metric("lcserve_engine_up") == 0, 10)  # the supervisor saw it die
    assert wait_until(lambda: not group_alive(group), 30)  # the dead server's engine core went with it

    assert wait_until(lambda: stack.metric("lcserve_engine_up") == 1, 900), stack.logs()
    assert stack.metric("lcserve_engine_restarts_total") == 1
    assert stack.engine_pid() not in (None, server)
    after = httpx.post(
        f"{stack.url}/v1/completions", json={"model": SERVED, "prompt": "hi", "max_tokens": 4}, timeout=120
    )
    assert after.status_code == 200, after.text


def test_vllm_dies_with_a_sigkilled_stack(stack):
    """SIGKILL the stack (what the OOM killer does to `lcserve serve`): nothing in lcserve can clean up,
    so the engine's watchdog must stop vLLM and free the gateway's port. Waited for as events, not timed: a
    clean SIGINT/SIGTERM stop is tested on the engine `./serve_vllm.sh` starts (test_serve_script)."""
    server = stack.engine_pid()
    assert server is not None
    group = process_group(server)
    assert stack.socket.is_socket() and not port_free(stack.gateway_port) and port_free(stack.engine_port)
    stack.proc.kill()
    stack.proc.wait(60)
    gone = wait_until(lambda: not group_alive(group), 120)
    assert gone, f"vLLM outlived the SIGKILLed stack\n{stack.logs()}"
    assert port_free(stack.gateway_port)
    assert "lcserve.watchdog: lcserve" in stack.vllm_log.read_text()  # the watchdog, not luck, stopped it
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{stack.url}/health", timeout=5)


def test_sigterm_while_vllm_starts_leaves_nothing_behind(embedded_model_dir, tmp_path):
    starting = StackProcess(tmp_path, embedded_model_dir)
    try:
        assert wait_until(lambda: starting.engine_pid() is not None, 60), starting.logs()
        group = process_group(starting.engine_pid())
        assert wait_until(
            lambda: "Starting to load model" in starting.vllm_log.read_text() or starting.proc.poll() is not None, 120
        )
        assert starting.proc.poll() is None and "READY" not in starting.output.read_text()  # still starting
        # the gateway is already up: clear 503s while vLLM loads, not refused connections or hangs
        early = httpx.post(f"{starting.url}/v1/completions", json={"model": SERVED, "prompt": "hi"}, timeout=10)
        assert early.status_code == 503 and early.headers["Retry-After"]
        assert httpx.get(f"{starting.url}/health", timeout=10).status_code == 503
        starting.proc.send_signal(signal.SIGTERM)
        assert starting.proc.wait(90) == 0, starting.logs()
        assert wait_until(lambda: not group_alive(group), 30), starting.logs()
        assert not starting.socket.parent.exists() and port_free(starting.gateway_port)
    finally:
        starting.shutdown()
