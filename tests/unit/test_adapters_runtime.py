"""`lcserve adapters load` / `unload` against a real lcserve gateway in front of the gateway tests'
fault-injection upstream: the key from the environment, the local verdict checked first, and one
clear line for each way the server can refuse. The same commands against the real vLLM are in
tests/integration/test_adapters_runtime.py."""

from __future__ import annotations

import json
import socket

import pytest
from aiohttp import web
from click.testing import CliRunner

from lcserve.adapters.runtime import API_KEY_ENV, refusal
from lcserve.cli import cli
from tests.unit.test_adapters_inspect import PLAIN, write_adapter
from tests.unit.test_gateway import FakeEngineForFaultInjection, Status, start_gateway

KEY = "s3cret"


class UpstreamWithLoraState(FakeEngineForFaultInjection):
    """The gateway tests' upstream, answering a load as vLLM does: it keeps what it was asked to load,
    and refuses a second load under the same name with vLLM's own error document. It has no unload
    route, like a vLLM started without VLLM_ALLOW_RUNTIME_LORA_UPDATING."""

    def __init__(self):
        super().__init__()
        self.loaded: dict[str, str] = {}

    async def _load(self, request):
        self.calls["load"] += 1
        body = await request.json()
        name = body["lora_name"]
        if name in self.loaded:
            message = (
                f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in "
                "place, set 'load_inplace' to True."
            )
            return web.json_response(
                {"error": {"message": message, "type": "InvalidUserInput", "param": None, "code": 400}}, status=400
            )
        self.loaded[name] = body["lora_path"]
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")


@pytest.fixture
def upstream():
    fake = UpstreamWithLoraState()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def gateway(upstream, tmp_path):
    g = start_gateway(Status(upstream.url), api_key=KEY, allowed_adapter_dirs=(tmp_path,))
    yield g
    g.stop()


def lcserve(*args: str, key: str | None = KEY):
    """Run `lcserve adapters ...` with the key in the environment only (None: no key at all)."""
    return CliRunner().invoke(cli, ["adapters", *args], env={API_KEY_ENV: key})


def one_error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_load_through_the_gateway_with_the_key_from_the_environment(upstream, gateway, tmp_path, monkeypatch):
    adapter = write_adapter(tmp_path / "writer", {}, PLAIN)
    monkeypatch.chdir(tmp_path)  # a relative DIR reaches the server as an absolute path
    result = lcserve("load", "writer", "writer", "--url", gateway.url, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "name": "writer",
        "path": str(adapter.resolve()),
        "verdict": "mount",
        "message": "Success: LoRA adapter 'writer' added successfully.",
    }
    assert upstream.loaded == {"writer": str(adapter.resolve())}
    outside = one_error_line(lcserve("load", "remote", "/srv/adapters/remote", "--url", gateway.url))
    assert "HTTP 403" in outside and str(tmp_path) in outside  # the gateway loads only from the allowed folders
    assert "remote" not in upstream.loaded


def test_a_missing_or_wrong_key_names_the_variable(upstream, gateway):
    for key, problem in ((None, "the server needs an API key"), ("nope", "the API key is wrong")):
        line = one_error_line(lcserve("load", "w", "/srv/w", "--url", gateway.url, key=key))
        assert "HTTP 401" in line and problem in line and API_KEY_ENV in line
    assert upstream.calls["load"] == 0


def test_a_gateway_without_a_key_does_not_expose_loading(upstream):
    g = start_gateway(Status(upstream.url))
    try:
        line = one_error_line(lcserve("load", "w", "/srv/w", "--url", g.url))
    finally:
        g.stop()
    assert "HTTP 403" in line and "started without an API key" in line and API_KEY_ENV in line
    assert upstream.calls["load"] == 0


def test_an_adapter_vllm_cannot_mount_is_refused_before_the_server_sees_it(upstream, gateway, tmp_path):
    dora = write_adapter(tmp_path / "dora", {"use_dora": True}, PLAIN)
    line = one_error_line(lcserve("load", "dora", str(dora), "--url", gateway.url))
    assert "DoRA" in line and "--mode merge" in line
    pissa = write_adapter(tmp_path / "pissa", {"init_lora_weights": "pissa"}, PLAIN)
    assert "cannot be served" in one_error_line(lcserve("load", "pissa", str(pissa), "--url", gateway.url))
    assert upstream.calls["load"] == 0


def test_vllms_own_refusal_comes_back_with_its_reason(upstream, gateway, tmp_path):
    adapter = str(write_adapter(tmp_path / "w", {}, PLAIN))
    assert lcserve("load", "w", adapter, "--url", gateway.url).exit_code == 0
    line = one_error_line(lcserve("load", "w", adapter, "--url", gateway.url))
    assert "HTTP 400: The lora adapter 'w' has already been loaded" in line


def test_unload_where_runtime_updating_is_off(upstream, gateway):
    line = one_error_line(lcserve("unload", "w", "--url", gateway.url))
    assert "HTTP 404" in line and "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in line


def test_unreachable_url():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    for args in (("load", "w", "/srv/w"), ("unload", "w")):
        line = one_error_line(lcserve(*args, "--url", url))
        assert "unreachable" in line and "--url" in line


@pytest.mark.parametrize(
    "status, body, sent_key, expected",
    [
        (404, '{"detail":"Not Found"}', True, "does not allow runtime LoRA updating"),
        (
            404,
            '{"error":{"message":"The lora adapter \'x\' cannot be found.","type":"NotFoundError","code":404}}',
            True,
            "HTTP 404: The lora adapter 'x' cannot be found.",
        ),
        (401, '{"error":"Unauthorized"}', False, "the server needs an API key"),
        (
            500,
            '{"error":{"message":"LoRA rank 64 is greater\\nthan max_lora_rank 16.","code":500}}',
            True,
            "HTTP 500: LoRA rank 64 is greater than max_lora_rank 16.",
        ),
        (502, "<html>bad gateway</html>", True, "HTTP 502: <html>bad gateway</html>"),
    ],
)
def test_refusal_reads_the_server_answer(status, body, sent_key, expected):
    message = refusal(status, body, sent_key)
    assert expected in message and "\n" not in message
