"""The supervisor's process handling, with a stand-in process that fails on demand (crash at
start, never ready, die after N seconds). The real vLLM is killed and restarted in
tests/integration/test_serving_restart.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lcserve.errors import EngineError
from lcserve.serving.engine import EngineProcess, EngineSpec, free_port
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
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Health)
if mode == "flaky":
    threading.Timer(float(os.environ["FAKE_DIE_AFTER"]), lambda: os._exit(1)).start()
server.serve_forever()
"""


class FakeEngineForFaultInjection(EngineProcess):
    """EngineProcess whose child is FAKE_SERVER instead of vLLM (same process-group handling)."""

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", FAKE_SERVER, str(self.spec.port)],
                                         env={**os.environ, **self.spec.env}, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)


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
        first = sup.process.proc.pid
        os.kill(first, signal.SIGKILL)  # the server dies; its worker is left behind in the group
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
    sup = make(tmp_path, mode="flaky", env={"FAKE_DIE_AFTER": "1.5"}, max_failures=2)
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
    os.kill(sup.process.proc.pid, signal.SIGKILL)
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
