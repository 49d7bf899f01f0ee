"""Mounting: vLLM LoRA arguments, the mount/merge decision, the runtime client's error path."""

from __future__ import annotations

import json
import socket

import pytest

from lcserve.adapters.inspection import inspect_adapter
from lcserve.adapters.mount import MODES, Mode, decide_mode, lora_modules_args, mount_args, parse_adapter_spec
from lcserve.adapters.reader import read_adapter
from lcserve.adapters.runtime import load_lora_adapter, unload_lora_adapter
from lcserve.errors import AdapterError, EngineError
from lcserve.vllm_rules import VllmRules
from tests.unit.test_adapters_inspect import Q, write_adapter

RULES = VllmRules(version="0.32.0", honors_rank_alpha_patterns=True)


def _adapter(tmp_path, name, rank=8, **config):
    tensors = {f"{Q}.lora_A.weight": (rank, 64), f"{Q}.lora_B.weight": (128, rank)}
    return write_adapter(tmp_path / name, {"r": rank, **config}, tensors)


def test_lora_args_json_form_and_rank_rounding(tmp_path):
    a, b = _adapter(tmp_path, "a", rank=8), _adapter(tmp_path, "b", rank=24)
    args = mount_args([("a", a), ("b", b)], "gemma-3-270m")
    assert args[:7] == [
        "--enable-lora",
        "--max-loras",
        "2",
        "--max-lora-rank",
        "32",  # 24 rounded up to an allowed value
        "--max-cpu-loras",
        "2",
    ]
    assert args[7] == "--lora-modules"
    modules = [json.loads(x) for x in args[8:]]
    assert modules == [
        {"name": "a", "path": str(a.resolve()), "base_model_name": "gemma-3-270m"},
        {"name": "b", "path": str(b.resolve()), "base_model_name": "gemma-3-270m"},
    ]


def test_lora_args_refuse_what_vllm_rejects(tmp_path):
    dora = _adapter(tmp_path, "dora", use_dora=True)
    with pytest.raises(AdapterError, match="DoRA"):
        mount_args([("d", dora)], "base")
    (plain,) = _reports(tmp_path, {})
    with pytest.raises(AdapterError, match="unique"):
        lora_modules_args([("x", plain), ("x", plain)], "base")
    with pytest.raises(AdapterError, match="unique"):
        lora_modules_args([("base", plain)], "base")
    assert lora_modules_args([("x", plain)], "base")[0] == "--lora-modules"


def _reports(tmp_path, *configs):
    return [inspect_adapter(read_adapter(_adapter(tmp_path, f"a{i}", **c)), rules=RULES) for i, c in enumerate(configs)]


def test_decide_mode(tmp_path):
    plain, dora = _reports(tmp_path, {}, {"use_dora": True})
    two = _reports(tmp_path / "two", {}, {})
    assert decide_mode([plain]).mode == "mount"  # base stays served beside it
    assert decide_mode([plain], all_traffic=True).mode == "merge"  # one adapter serves everything
    assert decide_mode([dora]).mode == "merge"
    assert "DoRA" in decide_mode([dora]).reasons[0]
    assert decide_mode(two).mode == "mount"
    assert decide_mode([plain], "merge").mode == "merge"
    with pytest.raises(AdapterError, match="use --mode merge"):
        decide_mode([dora], "mount")
    with pytest.raises(AdapterError, match="serves one adapter"):
        decide_mode([plain, dora])
    with pytest.raises(AdapterError, match="one adapter per model"):
        decide_mode(two, "merge")
    with pytest.raises(AdapterError, match="--mode"):
        decide_mode([plain], "fast")
    assert MODES == ("auto", "mount", "merge") and decide_mode([plain], Mode.MOUNT).mode == Mode.MOUNT


def test_decide_mode_refuses_unusable(tmp_path):
    (bad,) = _reports(tmp_path, {"init_lora_weights": "pissa"})
    with pytest.raises(AdapterError, match="cannot be served"):
        decide_mode([bad])


@pytest.mark.parametrize(
    "spec, ok", [("writer=/x/y", True), ("writer=", False), ("=/x", False), ("writer", False), ("a b=/x", False)]
)
def test_parse_adapter_spec(spec, ok):
    if ok:
        assert parse_adapter_spec(spec) == ("writer", __import__("pathlib").Path("/x/y"))
    else:
        with pytest.raises(AdapterError, match="--adapter"):
            parse_adapter_spec(spec)


def test_runtime_client_unreachable_server_is_one_clear_error():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for call in (
        lambda: load_lora_adapter(f"http://127.0.0.1:{port}", "w", "/x"),
        lambda: unload_lora_adapter(f"http://127.0.0.1:{port}", "w"),
    ):
        with pytest.raises(EngineError, match="unreachable"):
            call()


def test_mount_args_cli(tmp_path):
    from click.testing import CliRunner

    from lcserve.cli import cli

    a = _adapter(tmp_path, "a")
    result = CliRunner().invoke(cli, ["adapters", "mount-args", f"writer={a}", "--base-name", "gemma-3-270m", "--json"])
    assert result.exit_code == 0
    args = json.loads(result.stdout)  # capacity first, then the adapters
    assert (args[0], args[-2], json.loads(args[-1])["name"]) == ("--enable-lora", "--lora-modules", "writer")
