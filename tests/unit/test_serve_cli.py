"""`lcserve serve` and `serve_vllm.sh`: argument checks and the vLLM command, without an engine."""

import json
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from lcserve.cli import cli
from lcserve.serving import cli as serve_cli
from lcserve.serving.engine import EngineSpec, vllm_command

ROOT = Path(__file__).resolve().parents[2]
EMPTY_SAFETENSORS = b"\x02\0\0\0\0\0\0\0{}"


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "serve_vllm.sh"), *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args, fragment", [
    (["embedded", "http"], "PORT must be an integer"),
    (["embedded", "70000"], "PORT must be an integer"),
    (["embedded", "8000", "many"], "MAX_NUM_SEQS must be a positive integer"),
    (["embedded", "8000", "4", "32k"], "MAX_MODEL_LEN must be a positive integer"),
    (["embedded", "8000", "4", "1024", "1.5"], "GPU_MEM_UTIL must be a number in (0, 1]"),
    (["embedded", "8000", "4", "1024", "0"], "GPU_MEM_UTIL must be a number in (0, 1]"),
    (["/no/such/model"], "is not a folder"),
])
def test_serve_script_rejects_bad_arguments_in_one_line(args, fragment):
    r = run_script(*args)
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], r.stderr


def test_serve_script_help():
    r = run_script("--help")
    assert r.returncode == 0
    assert "MODEL" in r.stdout and "GPU_MEM_UTIL" in r.stdout and "embedded" in r.stdout


def test_serve_command_rejects_context_above_model_maximum(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    (model / "model.safetensors").write_bytes(EMPTY_SAFETENSORS)
    r = CliRunner().invoke(cli, ["serve", str(model), "--max-model-len", "8192", "--dry-run"])
    assert r.exit_code == 2
    assert "above the model's maximum context 4096" in r.output and "use at most 4096" in r.output
    assert "Traceback" not in r.output


@pytest.mark.parametrize("setup, fragment", [
    (lambda d: None, "config.json not found"),
    (lambda d: (d / "config.json").write_text("{not json"), "is not valid JSON"),
    (lambda d: (d / "config.json").write_text(json.dumps({"max_position_embeddings": 64})), "no *.safetensors"),
    (lambda d: ((d / "config.json").write_text(json.dumps({"max_position_embeddings": 64})),
                (d / "model.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{}")), "corrupt safetensors header"),
])
def test_serve_command_names_a_broken_model_folder(tmp_path, setup, fragment):
    model = tmp_path / "m"
    model.mkdir()
    setup(model)
    r = CliRunner().invoke(cli, ["serve", str(model), "--dry-run"])
    assert r.exit_code == 2 and fragment in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1


def test_dry_run_builds_the_vllm_command(tmp_path, monkeypatch):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    (model / "model.safetensors").write_bytes(EMPTY_SAFETENSORS)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    r = CliRunner().invoke(cli, ["serve", str(model), "--port", "9123", "--max-num-seqs", "4", "--dry-run",
                                 "--", "--seed", "7"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    cmd = out["command"]
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--port") + 1] == "9123"
    assert cmd[cmd.index("--max-model-len") + 1] == "4096"  # the model's maximum by default
    assert cmd[cmd.index("--max-num-seqs") + 1] == "4"
    assert cmd[cmd.index("--seed") + 1] == "7"
    if out["build"] == "cpu":
        assert "--enforce-eager" in cmd
        assert "VLLM_CPU_KVCACHE_SPACE=3" in " ".join(out["notes"])


def test_vllm_command_orders_lora_then_passthrough():
    spec = EngineSpec(model="/m", served_model_name="m", port=1234, max_model_len=2048,
                      gpu_memory_utilization=0.9, lora_args=["--enable-lora"], extra_args=["--seed", "1"])
    cmd = vllm_command(spec, python="py")
    assert cmd == ["py", "-m", "vllm.entrypoints.openai.api_server", "--model", "/m", "--served-model-name", "m",
                   "--host", "127.0.0.1", "--port", "1234", "--max-model-len", "2048",
                   "--gpu-memory-utilization", "0.9", "--enable-lora", "--seed", "1"]


@pytest.mark.parametrize("available_gib, expected", [(0.5, 1), (5.9, 2), (12, 6), (100, 16)])
def test_cpu_kv_space_is_half_of_available_within_bounds(available_gib, expected):
    assert serve_cli.cpu_kv_space_gib(int(available_gib * 1024**3)) == expected
