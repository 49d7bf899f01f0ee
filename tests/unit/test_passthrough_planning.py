"""vLLM arguments passed through `lcserve serve` come last, and vLLM takes the last value of a flag.
The plan must therefore be made with the values that actually reach vLLM, or refuse a contradiction.

On a hybrid sliding-window model (Gemma 2) vLLM's KV capacity depends on max_num_batched_tokens,
because a sliding-window layer keeps window - 1 + max_num_batched_tokens tokens per request.
"""

import json

import pytest
from click.testing import CliRunner

from lcserve.cli import cli
from lcserve.errors import PlanError
from lcserve.serving.launch import ServeOptions, take_planned_flags
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


def test_a_contradiction_is_refused_in_one_line(gemma2):
    r = CliRunner().invoke(
        cli, ["serve", str(gemma2), "--max-model-len", "4096", "--dry-run", "--", "--max-model-len", "2048"]
    )
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    assert "--max-model-len 4096 and the passed-through vLLM argument --max-model-len 2048 disagree" in r.output


def test_the_same_value_twice_is_no_contradiction():
    options = take_planned_flags(ServeOptions(max_model_len=4096, vllm_args=("--max-model-len", "4096", "--seed", "1")))
    assert options.max_model_len == 4096 and options.vllm_args == ("--seed", "1")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("--max-model-len",), "has no value"),
        (("--max-num-seqs", "many"), "'many' is not a valid value"),
    ],
)
def test_bad_passed_through_values(args, fragment):
    with pytest.raises(PlanError, match=fragment):
        take_planned_flags(ServeOptions(vllm_args=args))


def test_auto_max_model_len_leaves_the_choice_to_the_planner():
    assert take_planned_flags(ServeOptions(vllm_args=("--max-model-len", "auto"))).max_model_len is None


@pytest.mark.parametrize("text, value", [("32k", 32_000), ("32K", 32_768), ("25.6k", 25_600), ("4096", 4096)])
def test_sizes_read_as_vllm_reads_them(text, value):
    assert human_readable_int(text) == value


def test_a_bad_size_is_refused():
    with pytest.raises(ValueError):
        human_readable_int("1.5K")
