"""Security against the real vLLM, through the gateway (the session engine, which runs with
VLLM_ALLOW_RUNTIME_LORA_UPDATING): runtime adapter loads only from the folders the operator
allows, after lcserve's inspection; the API key from the environment or a file, never needed in
argv; a loud warning for a non-loopback bind without a key.

Each refused load is also sent to vLLM directly, once, to show the refusal is the gateway's: vLLM
alone loads adapters from anywhere, NaN or not. The same paths against a stand-in upstream are in
tests/unit/test_gateway.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file, save_file

from lcserve.errors import ProbeError
from lcserve.options import API_KEY_ENV
from lcserve.serving.stack import Stack
from tests.integration.gateway_process import GatewayCommand
from tests.unit.test_supervisor import free_port

pytestmark = pytest.mark.integration

KEY = "security-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def folders(lora_adapter_dir, tmp_path_factory) -> dict[str, Path]:
    """An allowed folder with a good adapter, a NaN adapter, a symlink out and an adapter whose
    weights link out; the outside adapter they point at."""
    root = tmp_path_factory.mktemp("security")
    allowed, outside = root / "allowed", root / "outside"
    good = Path(shutil.copytree(lora_adapter_dir, allowed / "good"))
    away = Path(shutil.copytree(lora_adapter_dir, outside / "away"))
    nan = Path(shutil.copytree(lora_adapter_dir, allowed / "nan"))
    tensors = load_file(nan / "adapter_model.safetensors")
    name = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[name][0, 0] = float("nan")
    save_file(tensors, nan / "adapter_model.safetensors")
    (allowed / "link").symlink_to(away)
    sneaky = allowed / "sneaky"
    sneaky.mkdir()
    shutil.copy(good / "adapter_config.json", sneaky)
    (sneaky / "adapter_model.safetensors").symlink_to(away / "adapter_model.safetensors")
    return {
        "allowed": allowed,
        "outside": outside,
        "good": good,
        "away": away,
        "nan": nan,
        "link": allowed / "link",
        "sneaky": sneaky,
    }


@pytest.fixture(scope="module")
def gateway(engine, folders):
    stack = Stack(upstream_url=engine.url, gateway_port=0, api_key=KEY, allowed_adapter_dirs=(folders["allowed"],))
    stack.start()
    yield stack
    stack.stop()


def served(url: str, headers=None) -> dict[str, str]:
    """Served model -> the folder vLLM read it from."""
    models = httpx.get(f"{url}/v1/models", headers=headers or {}, timeout=30).json()["data"]
    return {m["id"]: m["root"] for m in models}


def load(url: str, name: str, path: str | Path, headers=AUTH) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}, headers=headers, timeout=300
    )


def unload(url: str, name: str, headers=AUTH) -> httpx.Response:
    return httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": name}, headers=headers, timeout=60)


def test_vllm_alone_loads_from_anywhere(engine, folders):
    """The threat: without the gateway, vLLM loads an adapter outside any allowed folder, and one
    holding NaN."""
    for name in ("away", "nan"):
        assert load(engine.url, f"direct-{name}", folders[name]).status_code == 200
        assert unload(engine.url, f"direct-{name}").status_code == 200


@pytest.mark.parametrize(
    "case, status, words",
    [
        ("dotdot", 403, "resolves outside"),
        ("link", 403, "resolves outside"),
        ("sneaky", 403, "adapter_model.safetensors links to"),
        ("etc", 403, "resolves outside"),
        ("relative", 400, "must be an absolute path"),
        ("nan", 400, "NaN"),
    ],
)
def test_loads_outside_the_allowed_folders_or_failing_inspection_are_refused(
    engine, gateway, folders, case, status, words
):
    path = {
        "dotdot": f"{folders['good']}/../../outside/away",
        "link": folders["link"],
        "sneaky": folders["sneaky"],
        "etc": "/etc",
        "relative": "allowed/good",
        "nan": folders["nan"],
    }[case]
    before = served(engine.url)
    r = load(gateway.url, f"refused-{case}", path)
    error = r.json()["error"]
    assert r.status_code == status and error["code"] == status and words in error["message"], error
    assert "\n" not in error["message"]
    assert served(engine.url) == before  # vLLM read nothing


def test_an_allowed_adapter_loads_from_its_resolved_path_and_serves(engine, gateway, folders):
    # a path that wanders but stays inside: vLLM is sent (and reads) the folder that was inspected
    r = load(gateway.url, "allowed-good", f"{folders['nan']}/../good")
    assert r.status_code == 200, r.text
    try:
        assert served(engine.url)["allowed-good"] == str(folders["good"].resolve())
        body = {"model": "allowed-good", "prompt": "The keeper climbed the stairs", "max_tokens": 4, "temperature": 0}
        answer = httpx.post(f"{gateway.url}/v1/completions", json=body, headers=AUTH, timeout=300)
        assert answer.status_code == 200 and answer.json()["model"] == "allowed-good"
    finally:
        assert unload(gateway.url, "allowed-good").status_code == 200
    assert "allowed-good" not in served(engine.url)


def test_the_probe_client_sends_the_gateway_key(engine, gateway):
    """`lcserve probe --url GATEWAY` against a keyed gateway: LCSERVE_API_KEY (--api-key) goes with every
    request; without it the one line says where the key goes."""
    from lcserve.serving.probes.client import ProbeClient

    assert engine.base_model in ProbeClient(gateway.url, api_key=KEY).models()
    with pytest.raises(ProbeError, match=f"answered HTTP 401.*the gateway's key in {API_KEY_ENV}"):
        ProbeClient(gateway.url).models()


def test_without_allowed_folders_runtime_loading_is_off(engine, folders):
    with Stack(upstream_url=engine.url, gateway_port=0, api_key=KEY) as stack:
        r = load(stack.url, "off", folders["good"])
    assert r.status_code == 403 and "--allow-adapter-dir" in r.json()["error"]["message"]
    assert "off" not in served(engine.url)


@pytest.mark.parametrize("source", ["file", "environment"])
def test_the_key_from_a_file_or_the_environment_guards_loading(engine, folders, tmp_path, source):
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    args, env = ["--allow-adapter-dir", str(folders["allowed"])], {"LCSERVE_API_KEY": ""}
    if source == "file":
        args += ["--api-key-file", str(key_file)]
    else:
        env["LCSERVE_API_KEY"] = KEY
    gateway = GatewayCommand(engine.url, args, env, tmp_path)
    try:
        gateway.wait_ready()
        assert KEY.encode() not in Path(f"/proc/{gateway.proc.pid}/cmdline").read_bytes()  # not for `ps` to show
        assert "visible to every user" not in gateway.stderr()
        assert httpx.get(f"{gateway.url}/v1/models", timeout=30).status_code == 401
        assert load(gateway.url, "keyed", folders["good"], headers={}).status_code == 401
        assert load(gateway.url, "keyed", folders["good"], headers={"Authorization": "Bearer nope"}).status_code == 401
        assert "keyed" not in served(engine.url)
        assert load(gateway.url, "keyed", folders["good"]).status_code == 200
        assert "keyed" in served(gateway.url, AUTH)
        assert unload(gateway.url, "keyed").status_code == 200
    finally:
        gateway.stop()


def test_a_key_on_the_command_line_gets_a_note(engine, tmp_path):
    gateway = GatewayCommand(engine.url, ["--api-key", KEY], {"LCSERVE_API_KEY": ""}, tmp_path)
    try:
        gateway.wait_ready()
        assert "visible to every user of this machine" in gateway.stderr()
        assert httpx.get(f"{gateway.url}/v1/models", headers=AUTH, timeout=30).status_code == 200
    finally:
        gateway.stop()


def test_a_non_loopback_bind_without_a_key_warns_loudly(engine, tmp_path):
    """192.0.2.1 (TEST-NET-1) is no address of this machine: the warning comes before the bind,
    which then fails with one line; nothing is exposed."""
    gateway = GatewayCommand(engine.url, ["--host", "192.0.2.1"], {"LCSERVE_API_KEY": ""}, tmp_path)
    assert gateway.proc.wait(60) == 2
    lines = [line for line in gateway.stderr().splitlines() if line.strip() and " INFO " not in line]
    assert lines[0].startswith("WARNING: the gateway listens on 192.0.2.1, which is not loopback, and has no API key")
    assert lines[-1].startswith("error: the gateway cannot listen on 192.0.2.1")
    keyed = GatewayCommand(engine.url, ["--host", "192.0.2.1"], {"LCSERVE_API_KEY": KEY}, tmp_path)
    assert keyed.proc.wait(60) == 2
    assert "WARNING" not in keyed.stderr()
    loopback = GatewayCommand(engine.url, [], {"LCSERVE_API_KEY": ""}, tmp_path)
    try:
        loopback.wait_ready()
        assert "WARNING" not in loopback.stderr()
        assert httpx.get(f"{loopback.url}/v1/models", timeout=30).status_code == 200  # open, as asked, on loopback
    finally:
        loopback.stop()


def test_serve_on_a_non_loopback_host_without_a_key_warns_loudly(embedded_model_dir):
    """The same for `lcserve serve`: the gateway opens before vLLM starts, so nothing is started."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lcserve.cli",
            "serve",
            "--base-only",
            "--host",
            "192.0.2.1",
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "LCSERVE_API_KEY": ""},
    )
    assert result.returncode == 2, result.stderr
    assert "WARNING: the gateway listens on 192.0.2.1, which is not loopback, and has no API key" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: the gateway cannot listen on 192.0.2.1")


@pytest.mark.parametrize(
    "args, words",
    [
        (["--api-key-file", "/nonexistent/key"], "--api-key-file /nonexistent/key: cannot read it"),
        (["--api-key-file", "{empty}"], "the file is empty"),
        (["--api-key-file", "{key}", "--api-key", "x"], "give the key one way only"),
        (
            ["--allow-adapter-dir", "/nonexistent/adapters", "--api-key", "x"],
            "--allow-adapter-dir /nonexistent/adapters: not a folder",
        ),
        (["--allow-adapter-dir", "{dir}"], "--allow-adapter-dir needs an API key"),
    ],
)
@pytest.mark.parametrize("command", ["serve", "gateway"])
def test_key_and_folder_mistakes_are_one_line_before_anything_starts(engine, tmp_path, command, args, words):
    (tmp_path / "empty").write_text("")
    (tmp_path / "key").write_text("k\n")
    args = [a.format(empty=tmp_path / "empty", key=tmp_path / "key", dir=tmp_path) for a in args]
    head = (
        ["serve", "--base-only", "--port", str(free_port())]
        if command == "serve"
        else ["gateway", "--upstream", engine.url, "--port", str(free_port())]
    )
    result = subprocess.run(
        [sys.executable, "-m", "lcserve.cli", *head, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "LCSERVE_API_KEY": ""},
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and lines[-1].startswith("error: ") and words in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
