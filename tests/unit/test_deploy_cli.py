"""`lcserve deploy plan / profiles`: the renderings carry the same numbers as the plan."""

from __future__ import annotations

import json

import yaml
from click.testing import CliRunner

from lcserve.cli import cli
from lcserve.deploy.hardware import detect


def run(*args):
    return CliRunner().invoke(cli, ["deploy", *args])


def test_plan_json_and_renderings_agree(embedded_model_dir, tmp_path):
    common = ["plan", "--model", str(embedded_model_dir), "--profile", "h100-80gb", "--context", "32768"]
    data = json.loads(run(*common, "--json").output)
    assert data["max_model_len"] == 32768 and data["gpu_memory_utilization"] == 0.9
    assert data["kv_cache_tokens"] == int(data["max_concurrency"] * 32768)

    human = run(*common)
    assert human.exit_code == 0
    assert f"KV capacity {data['kv_cache_tokens']:,} tokens" in " ".join(human.output.split())
    assert "cdiv(32768, 16) = 2048" in human.output  # the full-attention group's equation

    config = tmp_path / "vllm.yaml"
    as_yaml = yaml.safe_load(run(*common, "--format", "yaml", "--config-out", str(config)).output)
    assert as_yaml["max-model-len"] == 32768 and as_yaml == yaml.safe_load(config.read_text())
    assert run(*common, "--format", "args").output.split() == data["vllm_args"]
    shell = run(*common, "--format", "shell", "--port", "9000").output
    assert shell.startswith(f"./serve_vllm.sh {embedded_model_dir} 9000 {data['max_num_seqs']} 32768 0.9 -- ")


def test_cpu_plan_env_for_scripts(embedded_model_dir, tmp_path):
    profile = tmp_path / "cpu-16g.yaml"  # fixed RAM, so the plan does not depend on this machine's load
    profile.write_text("name: cpu-16g\nkind: cpu\nmemory_mib: 16384\ncount: 1\nblock_size: 128\n")
    out = run(
        "plan", "--model", str(embedded_model_dir), "--profile", str(profile), "--max-num-seqs", "2", "--format", "env"
    ).output
    lines = dict(line.removeprefix("export ").split("=", 1) for line in out.splitlines())
    assert lines["MAX_MODEL_LEN"] == "32768" and lines["MAX_NUM_SEQS"] == "2" and lines["GPU_MEM_UTIL"] == "auto"
    assert lines["VLLM_CPU_KVCACHE_SPACE"] == "1"


def test_impossible_request_is_one_line_exit_2(embedded_model_dir):
    result = run("plan", "--model", str(embedded_model_dir), "--profile", "cpu", "--max-model-len", "65536")
    assert result.exit_code == 2
    assert "largest feasible: --max-model-len 32768" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_old_option_names_still_parse_but_are_hidden(embedded_model_dir):
    """--context, --concurrency, --kv-dtype and --tp were lcserve's names before it took vLLM's."""
    old = run(
        "plan",
        "--model",
        str(embedded_model_dir),
        "--profile",
        "cpu",
        "--context",
        "4096",
        "--concurrency",
        "2",
        "--kv-dtype",
        "fp8",
        "--json",
    )
    new = run(
        "plan",
        "--model",
        str(embedded_model_dir),
        "--profile",
        "cpu",
        "--max-model-len",
        "4096",
        "--full-context-requests",
        "2",
        "--kv-cache-dtype",
        "fp8",
        "--json",
    )
    assert old.exit_code == 0 and json.loads(old.output)["vllm_args"] == json.loads(new.output)["vllm_args"]
    help_text = run("plan", "--help").output
    assert "--max-model-len" in help_text and "--full-context-requests" in help_text
    assert all(name not in help_text for name in ("--context", "--concurrency", "--kv-dtype", "--tp "))


def test_profiles_json_lists_shipped_and_auto():
    data = json.loads(run("profiles", "--json").output)
    names = {p["name"] for p in data["profiles"]}
    assert {"h100-80gb", "b200", "cpu"} <= names and data["auto"]["name"] == detect().name
    assert run("profiles").exit_code == 0
