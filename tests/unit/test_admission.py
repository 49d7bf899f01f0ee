"""Admission's decisions: the key, the adapter routes, and whether a prompt can fit max_model_len."""

import json
import re

import pytest
from aiohttp.test_utils import make_mocked_request

from lcserve.serving import admission as ad
from lcserve.serving.metrics import GatewayMetrics, ModelLimits
from lcserve.serving.upstream import Upstream
from tests.unit.test_metrics import Status, value


def admission(api_key=None, up=True) -> ad.Admission:
    status = Status(up=up)
    return ad.Admission(Upstream(status), GatewayMetrics(status), api_key=api_key, retry_after_s=7)


def test_requested_output_tokens():
    assert ad.requested_output_tokens({"max_tokens": 50}, chat=False) == 50
    assert ad.requested_output_tokens({"max_completion_tokens": 7, "max_tokens": 50}, chat=True) == 7
    assert ad.requested_output_tokens({}, chat=True) == 1


def test_overflow_message():
    model = ModelLimits("m", 256, 8192)
    assert ad.overflow_message(model, 8000, 192) is None
    message = ad.overflow_message(model, 8000, 200)
    assert "max_model_len=8192" in message and "by at least 8 tokens" in message


def test_may_overflow_only_near_the_limit():
    model = ModelLimits("m", 256, 8192)
    room = 8192 - ad.TEMPLATE_ALLOWANCE
    assert not ad.may_overflow(model, body_bytes=room - 100, output_tokens=100)
    assert ad.may_overflow(model, body_bytes=room - 100, output_tokens=101)
    assert not ad.may_overflow(ModelLimits("m", 256, None), body_bytes=10**9, output_tokens=1)


def test_tokenize_bodies():
    chat = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0,
        "add_generation_prompt": True,
    }
    assert ad.tokenize_bodies(chat, chat=True, model="m") == (
        [{"model": "m", "messages": chat["messages"], "add_generation_prompt": True}],
        [],
    )
    assert ad.tokenize_bodies({"prompt": "one"}, chat=False, model="m") == ([{"model": "m", "prompt": "one"}], [])
    assert ad.tokenize_bodies({"prompt": [1, 2, 3]}, chat=False, model="m") == ([], [3])
    batch = {"prompt": ["a", [1, 2]], "add_special_tokens": False}
    assert ad.tokenize_bodies(batch, chat=False, model="m") == (
        [{"model": "m", "prompt": "a", "add_special_tokens": False}],
        [2],
    )
    assert ad.tokenize_bodies({"prompt": [{"x": 1}]}, chat=False, model="m") is None  # only vLLM can judge it
    assert ad.tokenize_bodies({}, chat=False, model="m") == ([], [])


def test_json_object():
    assert ad.json_object(b'{"model": "m"}') == {"model": "m"}
    assert ad.json_object(b'{"a": ' + b"[" * 127 + b"]" * 127 + b"}")  # as deep as a body may nest


@pytest.mark.parametrize(
    "raw, problem",
    [
        (b"[1, 2]", "is an array, not a JSON object"),
        (b"null", "is null, not a JSON object"),
        (b"not json", "is not valid JSON (Expecting value"),
        (b'{"prompt": "caf\xe9"}', "is not valid UTF-8 (byte 15"),
        (b'{"a": ' + b"[" * 128 + b"]" * 128 + b"}", "more than 128 levels deep"),
        (b"[" * 100_000, "more than 128 levels deep"),  # deeper than Python's parser recurses
    ],
)
def test_json_object_names_what_is_wrong(raw, problem):
    with pytest.raises(ad.BadBody, match=re.escape(problem)) as e:
        ad.json_object(raw)
    assert "\n" not in str(e.value) and "send" in str(e.value)


def test_check_key():
    gate = admission(api_key="s3cret")
    assert gate.check_key(make_mocked_request("GET", "/v1/models", headers={"Authorization": "bearer s3cret"})) is None
    for headers in ({}, {"Authorization": "Bearer s3cre"}, {"Authorization": "Basic s3cret"}):
        refusal = gate.check_key(make_mocked_request("GET", "/v1/models", headers=headers))
        assert refusal.status == 401 and refusal.headers["WWW-Authenticate"] == "Bearer"
        assert "--api-key" in json.loads(refusal.body)["error"]["message"]
    assert admission().check_key(make_mocked_request("GET", "/v1/models")) is None  # no key configured


def test_adapter_routes_need_a_configured_key():
    refusal = admission().check_adapter_route(make_mocked_request("POST", "/v1/load_lora_adapter"))
    assert refusal.status == 403
    assert json.loads(refusal.body)["error"]["message"].startswith("/v1/load_lora_adapter needs an API key")
    keyed = admission(api_key="k")
    assert keyed.check_adapter_route(make_mocked_request("POST", "/v1/load_lora_adapter")).status == 401
    authorized = make_mocked_request("POST", "/v1/load_lora_adapter", headers={"Authorization": "Bearer k"})
    assert keyed.check_adapter_route(authorized) is None


def test_engine_down_is_counted_unless_told_not_to():
    gate = admission(up=False)
    refusal = gate.check_engine()
    assert refusal.status == 503 and refusal.headers["Retry-After"] == "7"
    assert gate.check_engine(count=False).status == 503
    assert value(gate.metrics.render(), "lcserve_gateway_errors_total", reason="engine_unavailable") == 1
    assert admission(up=True).check_engine() is None
