"""The engine's door (issue 23), against a real `lcserve serve` under --api-key-file and
--allow-adapter-dir: vLLM listens on a Unix socket in a 0700 folder and on no TCP port, so the
gateway (its key, its folder rules, its inspection) is the one way in; the gateway publishes which
adapters are loaded; and an adapter reloaded under an old name with new weights answers with the
new weights, not from the prefix cache of the old ones.

One serve for the module (the embedded default: Gemma 3 270M with `writer` mounted)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from lcserve.engine import engine_client
from tests.unit.test_metrics import samples
from tests.unit.test_supervisor import free_port

pytestmark = pytest.mark.integration

KEY = "door-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
# a prompt longer than one KV block (128 tokens on the CPU build), so the prefix cache holds a block of it
LONG_PROMPT = " ".join(f"Line {i}: the river keeps its own counsel and the stones remember." for i in range(30))


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants (Linux /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def socket_inodes(pids: list[int]) -> set[str]:
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def listening_tcp_ports(pid: int) -> set[int]:
    """TCP ports in LISTEN state (st 0A) whose socket an fd of `pid`'s process tree holds."""
    inodes = socket_inodes(tree(pid))
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def connect_as_nobody(sock: str) -> str:
    """What another user gets when opening the socket: OK or the errno's name."""
    code = (
        "import errno, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n    s.connect(sys.argv[1]); print('OK')\n"
        "except OSError as e:\n    print(errno.errorcode[e.errno])\n"
    )
    result = subprocess.run([*NOBODY, "/usr/bin/python3", "-c", code, sock], capture_output=True, text=True, timeout=30)
    return result.stdout.strip() or result.stderr.strip()


@pytest.fixture(scope="module")
def door(embedded_model_dir, demo_adapter, lora_adapter_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("door")
    allowed, outside = root / "allowed", root / "outside"
    shutil.copytree(lora_adapter_dir, allowed / "good")
    shutil.copytree(lora_adapter_dir, outside / "away")
    (root / "key").write_text(KEY + "\n")
    port = free_port()
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "LCSERVE_API_KEY": "",
        "LCSERVE_HOME": os.environ.get("LCSERVE_HOME", str(Path.home() / ".cache" / "lcserve")),
    }
    args = ["serve", "--port", str(port), "--api-key-file", str(root / "key"), "--allow-adapter-dir", str(allowed)]
    args += ["--max-model-len", "2048", "--max-num-seqs", "2", "--log-file", str(root / "vllm.log")]
    stderr = root / "stderr"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lcserve.cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=stderr.open("w"),
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert proc.poll() is None, stderr.read_text()[-3000:]
            if "ready in" in stderr.read_text():
                break
            time.sleep(1)
        sock = re.search(r"on the private socket (\S+) \(log", stderr.read_text()).group(1)
        yield {"url": url, "port": port, "pid": proc.pid, "sock": sock, "allowed": allowed, "outside": outside}
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def load(url: str, name: str, folder: Path, headers=AUTH) -> httpx.Response:
    body = {"lora_name": name, "lora_path": str(folder)}
    return httpx.post(f"{url}/v1/load_lora_adapter", json=body, headers=headers, timeout=120)


def unload(url: str, name: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": name}, headers=AUTH, timeout=60)


def served(url: str) -> set[str]:
    return {m["id"] for m in httpx.get(f"{url}/v1/models", headers=AUTH, timeout=30).json()["data"]}


def greedy(url: str, model: str, prompt: str = LONG_PROMPT) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}
    r = httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def loaded_adapters(url: str) -> dict[str, dict[str, str]]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {
        dict(labels)["adapter"]: dict(labels)
        for (name, labels), value in samples(text).items()
        if name == "lcserve_lora_adapter_loaded" and value == 1
    }


def test_no_tcp_port_but_the_gateways(door):
    """vLLM answers on its socket (the serve's own engine), and the serve's whole process tree
    (lcserve, the watchdog, vLLM's API server, engine core and worker) listens on the gateway's port
    only. torch.distributed's gloo groups still listen on TCP inside vLLM (about 15 ports), but in a
    network namespace of vLLM's own, which no other process can reach: not in this machine's tables."""
    with engine_client(f"unix:{door['sock']}", timeout=10) as client:
        assert client.get("/health").status_code == 200
        assert "writer" in {m["id"] for m in client.get("/v1/models").json()["data"]}
    pids = tree(door["pid"])
    engines = [p for p in pids if b"-m\0lcserve." not in Path(f"/proc/{p}/cmdline").read_bytes()]  # vLLM's own
    assert len(pids) >= 5 and len(engines) >= 3  # lcserve, its watchdog; vLLM's API server, engine core, worker
    assert all(os.readlink(f"/proc/{p}/ns/net") != os.readlink("/proc/self/ns/net") for p in engines)
    assert listening_tcp_ports(door["pid"]) == {door["port"]}


def test_another_user_cannot_open_the_socket(door):
    """The folder is the guard: 0700 and lcserve's user's, so another user cannot reach the socket
    even when the socket file itself would let anyone connect (a umask of 000)."""
    os.chmod(door["sock"], 0o777)
    assert connect_as_nobody(door["sock"]) == "EACCES"
    assert connect_as_nobody("/nonexistent/vllm.sock") == "ENOENT"  # the probe itself tells errors apart
    info = Path(door["sock"]).parent.stat()
    assert info.st_uid == os.geteuid() and info.st_mode & 0o777 == 0o700


def test_an_adapter_from_outside_the_allowed_folders_cannot_be_loaded_by_any_route(door):
    url = door["url"]
    away = door["outside"] / "away"
    assert load(url, "away", away).status_code == 403  # the gateway, with the key: outside its folders
    assert load(url, "away", away, headers={}).status_code == 401  # without the key
    assert load(url, "away", door["allowed"] / "good", headers={}).status_code == 401
    # vLLM has no TCP port to be reached on (test_no_tcp_port_but_the_gateways); its socket refuses others
    assert connect_as_nobody(door["sock"]) == "EACCES"
    assert "away" not in served(url)


def test_adapter_loaded_gauge_follows_load_and_unload(door):
    url = door["url"]
    assert loaded_adapters(url)["writer"] == {"adapter": "writer", "base": "gemma-3-270m", "mode": "mount", "rank": "8"}
    assert "extra" not in loaded_adapters(url)
    assert load(url, "extra", door["allowed"] / "good").status_code == 200
    # rank 4: the rank the fixture's PEFT LoraConfig(r=4) wrote
    assert loaded_adapters(url)["extra"] == {"adapter": "extra", "base": "gemma-3-270m", "mode": "mount", "rank": "4"}
    usage = greedy(url, "extra", "Hello")["usage"]
    text = httpx.get(f"{url}/metrics", timeout=30).text
    assert samples(text)[("lcserve_requests_total", (("model", "extra"),))] == 1
    assert samples(text)[("lcserve_prompt_tokens_total", (("model", "extra"),))] == usage["prompt_tokens"]
    assert samples(text)[("lcserve_generation_tokens_total", (("model", "extra"),))] == usage["completion_tokens"]
    assert unload(url, "extra").status_code == 200
    assert "extra" not in loaded_adapters(url) and "writer" in loaded_adapters(url)


def test_a_reload_under_an_old_name_answers_with_the_new_weights(door, demo_adapter, lora_adapter_dir):
    """A as `x`, then B as `x` from the same folder (the operator replaced the files): vLLM 0.32 keys
    its prefix cache by adapter name and path, so without the gateway's content-named copy the
    second answer would reuse the KV blocks A computed for the prompt."""
    url, x, fresh = door["url"], door["allowed"] / "x", door["allowed"] / "b"
    shutil.copytree(demo_adapter, x)
    shutil.copytree(lora_adapter_dir, fresh)
    assert load(url, "x", x).status_code == 200
    first = greedy(url, "x")["choices"][0]["text"]
    assert greedy(url, "x")["choices"][0]["text"] == first  # greedy and repeatable (the second from the cache)
    assert unload(url, "x").status_code == 200
    shutil.rmtree(x)
    shutil.copytree(lora_adapter_dir, x)
    assert load(url, "x", x).status_code == 200
    again = greedy(url, "x")["choices"][0]["text"]
    assert load(url, "b", fresh).status_code == 200
    expected = greedy(url, "b")["choices"][0]["text"]  # B under a name never used: nothing cached to confuse
    assert first != expected, "A and B answer alike; the test could not tell them apart"
    assert again == expected
    for name in ("x", "b"):
        assert unload(url, name).status_code == 200


def test_a_gateway_fronts_vllm_on_its_socket(door, tmp_path):
    """`lcserve gateway --upstream unix:/PATH/vllm.sock`: the spelling a pod's gateway container uses
    for the vLLM container's `--uds` socket in a shared folder."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lcserve.cli", "gateway", "--upstream", f"unix:{door['sock']}", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "stderr").open("w"),
        start_new_session=True,
        env={**os.environ, "LCSERVE_API_KEY": ""},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while "gateway ready" not in (tmp_path / "stderr").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr").read_text()
            time.sleep(0.5)
        assert {"gemma-3-270m", "writer"} <= {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]}
        body = {"model": "writer", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()["usage"]["completion_tokens"] == 4
        assert httpx.get(f"{url}/metrics", timeout=30).text.count("lcserve_engine_up 1.0") == 1
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(30)
