"""vLLM arguments passed through `lcserve serve` come last, and vLLM takes the last value of a flag.
The plan must therefore be made with the values that actually reach vLLM, or refuse a contradiction.

On a hybrid sliding-window model (Gemma 2) vLLM's KV capacity depends on max_num_batched_tokens,
because a sliding-window layer keeps window - 1 + max_num_batched_tokens tokens per request.
"""

import json

import pytest
import yaml
from click.testing import CliRunner

from lcserve.cli import cli
from lcserve.deploy.plan_types import PlanRequest
from lcserve.deploy.settings import take_vllm_args
from lcserve.errors import PlanError
from lcserve.vllm_rules import human_readable_int
from tests.support.tiny_models import build_tiny_model


def dry_run(model, *args: str) -> dict:
    r = CliRunner().invoke(cli, ["serve", str(model), "--dry-run", *args], env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def gemma2():
    return build_tiny_model("gemma2-hybrid")


def test_the_plan_follows_passed_through_batch_tokens(gemma2):
    """Sliding layers keep window - 1 + max_num_batched_tokens tokens: more batch tokens, fewer requests.
    tests/integration/test_deploy_vllm.py checks the passed-through figure against vLLM's own."""
    default = dry_run(gemma2, "--max-model-len", "4096")
    passed = dry_run(gemma2, "--max-model-len", "4096", "--", "--max-num-batched-tokens", "4096")
    assert default["plan"]["max_num_batched_tokens"] == 2048 and passed["plan"]["max_num_batched_tokens"] == 4096
    assert passed["plan"]["kv_cache_tokens"] < default["plan"]["kv_cache_tokens"]
    cmd = passed["command"]
    assert cmd.count("--max-num-batched-tokens") == 1 and cmd[cmd.index("--max-num-batched-tokens") + 1] == "4096"


def test_every_planned_flag_reaches_vllm_once(gemma2):
    out = dry_run(
        gemma2,
        "--",
        "--max-model-len",
        "2k",
        "--max_num_seqs",
        "7",
        "--block-size=16",
        "--kv-cache-dtype",
        "fp8",
        "--enable-prefix-caching",
    )
    cmd = out["command"]
    for flag, value in (
        ("--max-model-len", "2000"),
        ("--max-num-seqs", "7"),
        ("--block-size", "16"),
        ("--kv-cache-dtype", "fp8"),
    ):
        assert cmd.count(flag) == 1 and cmd[cmd.index(flag) + 1] == value, flag
    assert "--max_num_seqs" not in cmd and "--block-size=16" not in cmd and "--enable-prefix-caching" in cmd
    assert out["plan"]["block_size"] == 16 and out["plan"]["max_num_seqs"] == 7


def test_plan_render_and_serve_agree_on_the_same_settings(gemma2, tmp_path):
    """The planning command, the rendering and `serve` take the same settings and the same passed-through
    vLLM flags, and come to the same plan and the same vLLM arguments."""
    settings = [
        "--max-model-len",
        "4096",
        "--max-num-seqs",
        "6",
        "--",
        "--max-num-batched-tokens",
        "4096",
        "--seed",
        "1",
    ]
    r = CliRunner().invoke(cli, ["deploy", "plan", "--model", str(gemma2), "--profile", "cpu", "--kv-cache-gib", "1",
                                 "--json", *settings])  # fmt: skip
    assert r.exit_code == 0, r.output
    planned = json.loads(r.stdout)
    served = dry_run(gemma2, "--profile", "cpu", *settings)
    assert planned["max_num_batched_tokens"] == 4096 and planned["kv_cache_tokens"] == served["plan"]["kv_cache_tokens"]
    passed = planned.pop("passed_through")
    machine = ("device", "speed")  # the free RAM read at each call, and what is predicted from it
    assert {k: v for k, v in planned.items() if k not in machine} == {
        k: v for k, v in served["plan"].items() if k not in machine
    }
    command = served["command"]
    assert planned["vllm_args"] == command[command.index("--max-model-len") :][: len(planned["vllm_args"])]
    assert command[-2:] == passed == ["--seed", "1"]

    # the rendered Deployment runs `lcserve serve` on the pod: run it here (the pod's paths mapped) as a dry run
    out = tmp_path / "k8s"
    r = CliRunner().invoke(cli, ["deploy", "render", "--target", "k8s", "--out", str(out), "--model", str(gemma2),
                                 "--profile", "cpu", "--kv-cache-gib", "1", *settings])  # fmt: skip
    assert r.exit_code == 0, r.output
    docs = [d for f in sorted(out.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    (tmp_path / "profile.yaml").write_text(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["profile.yaml"])
    (tmp_path / "api-key").write_text("k\n")
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    mapped = {"/models/model": str(gemma2), "/etc/lcserve/profile/profile.yaml": str(tmp_path / "profile.yaml"),
              "/etc/lcserve/api-key/api-key": str(tmp_path / "api-key")}  # fmt: skip
    argv = [mapped.get(a, a) for a in pod["containers"][0]["command"][2:]]
    rendered = dry_run(*argv)
    assert rendered["plan"]["kv_cache_tokens"] == planned["kv_cache_tokens"]
    assert rendered["plan"]["vllm_args"] == planned["vllm_args"] and rendered["command"][-2:] == passed


def test_a_contradiction_is_refused_in_one_line(gemma2):
    r = CliRunner().invoke(
        cli, ["serve", str(gemma2), "--max-model-len", "4096", "--dry-run", "--", "--max-model-len", "2048"]
    )
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    assert "--max-model-len 4096 and the passed-through vLLM argument --max-model-len 2048 disagree" in r.output


def test_the_same_value_twice_is_no_contradiction():
    request, rest = take_vllm_args(PlanRequest(max_model_len=4096), ("--max-model-len", "4096", "--seed", "1"))
    assert request.max_model_len == 4096 and rest == ("--seed", "1")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("--max-model-len",), "has no value"),
        (("--max-num-seqs", "many"), "'many' is not a valid value"),
    ],
)
def test_bad_passed_through_values(args, fragment):
    with pytest.raises(PlanError, match=fragment):
        take_vllm_args(PlanRequest(), args)


def test_auto_max_model_len_leaves_the_choice_to_the_planner():
    assert take_vllm_args(PlanRequest(), ("--max-model-len", "auto"))[0].max_model_len is None


@pytest.mark.parametrize("text, value", [("32k", 32_000), ("32K", 32_768), ("25.6k", 25_600), ("4096", 4096)])
def test_sizes_read_as_vllm_reads_them(text, value):
    assert human_readable_int(text) == value


def test_a_bad_size_is_refused():
    with pytest.raises(ValueError):
        human_readable_int("1.5K")
