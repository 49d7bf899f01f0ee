"""`lcserve adapters load` / `unload` against the real vLLM (the session engine, which runs with
VLLM_ALLOW_RUNTIME_LORA_UPDATING) behind a real gateway with an API key and allowed adapter
folders: the adapter is served once loaded and gone once unloaded, and every refusal (the key, the
local verdict, the gateway's folder rule, vLLM's own) is one line. The server's other answers are
in tests/unit/test_adapters_runtime.py; the folder rules in tests/integration/test_security.py."""

from __future__ import annotations

import json

import httpx
import pytest
from click.testing import CliRunner

from lcserve.adapters.runtime import API_KEY_ENV
from lcserve.cli import cli
from lcserve.serving.stack import Stack
from tests.integration.test_adapters_verify import real_adapter

pytestmark = pytest.mark.integration

KEY = "integration-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
NAME = "runtime-extra"


@pytest.fixture(scope="module")
def gateway(engine, lora_adapter_dir, real_adapters_root):
    stack = Stack(
        upstream_url=engine.url,
        gateway_port=0,
        api_key=KEY,
        allowed_adapter_dirs=(lora_adapter_dir.parent, real_adapters_root),
    )
    stack.start()
    yield stack
    stack.stop()


def lcserve(*args: str, key: str | None = KEY):
    """Run `lcserve adapters ...` with the key in the environment only (None: no key at all)."""
    return CliRunner().invoke(cli, ["adapters", *args], env={API_KEY_ENV: key})


def served(gateway) -> list[str]:
    response = httpx.get(f"{gateway.url}/v1/models", headers=AUTH, timeout=30)
    response.raise_for_status()
    return [m["id"] for m in response.json()["data"]]


def one_error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_load_answer_and_unload_through_the_gateway(engine, gateway, lora_adapter_dir):
    loaded = lcserve("load", NAME, str(lora_adapter_dir), "--url", gateway.url, "--json")
    assert loaded.exit_code == 0, loaded.output
    try:
        doc = json.loads(loaded.stdout)
        assert doc["verdict"] == "mount" and doc["path"] == str(lora_adapter_dir.resolve())
        assert "added successfully" in doc["message"]
        assert NAME in served(gateway)
        body = {"model": NAME, "prompt": "The keeper climbed the stairs", "max_tokens": 4, "temperature": 0}
        answer = httpx.post(f"{gateway.url}/v1/completions", json=body, headers=AUTH, timeout=300)
        assert answer.status_code == 200 and answer.json()["model"] == NAME
    finally:
        unloaded = lcserve("unload", NAME, "--url", gateway.url, "--json")
    assert unloaded.exit_code == 0, unloaded.output
    assert "removed successfully" in json.loads(unloaded.stdout)["message"]
    assert NAME not in served(gateway)


def test_vllms_own_refusals_are_one_line_with_its_reason(engine, gateway, lora_adapter_dir):
    # vLLM's 404 for a name it does not serve is its own answer, not "runtime updating is off"
    line = one_error_line(lcserve("unload", "never-loaded", "--url", gateway.url))
    assert "cannot be found" in line and "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in line
    # an allowed, mountable adapter under the base's name: vLLM's own refusal comes back
    line = one_error_line(lcserve("load", engine.base_model, str(lora_adapter_dir), "--url", gateway.url))
    assert "conflicts with a served base model" in line


def test_a_path_outside_the_allowed_folders_is_the_gateways_refusal(engine, gateway):
    before = served(gateway)
    # not on this machine, so the command sends it unchecked: the gateway refuses it, vLLM never sees it
    line = one_error_line(lcserve("load", NAME, "/srv/not-here/adapter", "--url", gateway.url))
    assert "HTTP 403" in line and "resolves outside the adapter folders" in line
    assert served(gateway) == before


def test_the_key_and_the_local_verdict_are_checked_before_vllm_loads_anything(
    engine, gateway, lora_adapter_dir, real_adapters_root
):
    before = served(gateway)
    line = one_error_line(lcserve("load", NAME, str(lora_adapter_dir), "--url", gateway.url, key=None))
    assert "HTTP 401" in line and API_KEY_ENV in line
    line = one_error_line(lcserve("load", NAME, str(lora_adapter_dir), "--url", gateway.url, key="wrong"))
    assert "the API key is wrong" in line
    dora = real_adapter("dora", engine.model_dir, real_adapters_root)
    line = one_error_line(lcserve("load", "dora", str(dora), "--url", gateway.url))
    assert "DoRA" in line and "--mode merge" in line
    assert served(gateway) == before
