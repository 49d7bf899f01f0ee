"""`lcserve serve` and `serve_vllm.sh`: argument checks and the vLLM command, without an engine."""

import json
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from lcserve.cli import cli
from lcserve.engine import EngineSpec, vllm_command
from lcserve.serving import cli as serve_cli

ROOT = Path(__file__).resolve().parents[2]
GEMMA_LIKE = {
    "architectures": ["Gemma3ForCausalLM"],
    "model_type": "gemma3_text",
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "vocab_size": 128,
    "max_position_embeddings": 4096,
    "torch_dtype": "bfloat16",
}


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "serve_vllm.sh"), *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["embedded", "http"], "PORT must be an integer"),
        (["embedded", "70000"], "PORT must be an integer"),
        (["embedded", "8000", "many"], "MAX_NUM_SEQS must be a positive integer"),
        (["embedded", "8000", "4", "32k"], "MAX_MODEL_LEN must be a positive integer"),
        (["embedded", "8000", "4", "1024", "1.5"], "GPU_MEM_UTIL must be a number in (0, 1]"),
        (["embedded", "8000", "4", "1024", "0"], "GPU_MEM_UTIL must be a number in (0, 1]"),
        (["/no/such/model"], "is not a folder"),
    ],
)
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


def serve(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli, ["serve", *args], env=env)


def test_serve_command_rejects_context_above_model_maximum(embedded_model_dir):
    r = serve("--max-model-len", "40000", "--dry-run")
    assert r.exit_code == 2
    assert "--max-model-len 40000 is above the derived maximum 32768" in r.output
    assert "largest feasible: --max-model-len 32768" in r.output
    assert "Traceback" not in r.output


def test_serve_command_scales_rope_only_when_asked(embedded_model_dir):
    r = serve("--max-model-len", "65536", "--rope-scaling", "yarn", "--dry-run")
    assert r.exit_code == 0, r.output
    cmd = json.loads(r.output)["command"]
    overrides = json.loads(cmd[cmd.index("--hf-overrides") + 1])
    assert "yarn" in json.dumps(overrides) and cmd[cmd.index("--max-model-len") + 1] == "65536"


@pytest.mark.parametrize(
    "setup, fragment",
    [
        (lambda d: None, "config.json: missing"),
        (lambda d: (d / "config.json").write_text("{not json"), "unreadable JSON"),
        (lambda d: (d / "config.json").write_text(json.dumps(GEMMA_LIKE)), "no *.safetensors"),
        (
            lambda d: (
                (d / "config.json").write_text(json.dumps(GEMMA_LIKE)),
                (d / "model.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{}"),
            ),
            "corrupt safetensors header",
        ),
    ],
)
def test_serve_command_names_a_broken_model_folder(tmp_path, setup, fragment):
    model = tmp_path / "m"
    model.mkdir()
    setup(model)
    r = serve(str(model), "--dry-run")
    assert r.exit_code == 2 and fragment in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1


def test_dry_run_takes_the_plan_and_lets_vllm_args_win(embedded_model_dir):
    r = serve(
        "--base-only",
        "--port",
        "9123",
        "--max-model-len",
        "4096",
        "--max-num-seqs",
        "4",
        "--dry-run",
        "--",
        "--max-num-batched-tokens",
        "512",
        env={"VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    cmd = out["command"]
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert out["gateway"] == "http://127.0.0.1:9123"  # clients talk to the gateway; vLLM sits behind it
    assert "--port" not in cmd and "--host" not in cmd  # no TCP port: vLLM's one address is a private socket
    assert Path(cmd[cmd.index("--uds") + 1]).name == "vllm.sock"
    assert cmd[cmd.index("--max-model-len") + 1] == "4096"
    assert cmd[cmd.index("--max-num-seqs") + 1] == "4"
    assert out["plan"]["max_model_len"] == 4096 and out["plan"]["kv_cache_tokens"] > 4 * 4096
    # the user's vLLM argument comes last, so vLLM's parser lets it win over the plan's
    last = len(cmd) - 1 - cmd[::-1].index("--max-num-batched-tokens")
    assert cmd[last + 1] == "512"
    if out["build"] == "cpu":
        assert "--enforce-eager" in cmd and out["env"] == {}
        assert any("VLLM_CPU_KVCACHE_SPACE=1 GiB (from the environment)" in n for n in out["notes"])


def test_no_gateway_puts_vllm_on_the_port(embedded_model_dir):
    r = serve("--base-only", "--no-gateway", "--port", "9124", "--dry-run")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["gateway"] is None and out["command"][out["command"].index("--port") + 1] == "9124"
    assert "--enable-lora" not in out["command"]


def test_embedded_default_mounts_the_demo_adapter(embedded_model_dir, demo_adapter):
    out = json.loads(serve("--dry-run").output)
    cmd = out["command"]
    module = json.loads(cmd[cmd.index("--lora-modules") + 1])
    assert module == {"name": "writer", "path": str(demo_adapter.resolve()), "base_model_name": "gemma-3-270m"}
    assert out["training_lengths"] == {"writer": 256}
    assert any(n.startswith("adapters: mount") for n in out["notes"])
    if out["build"] == "cpu":
        assert out["env"]["LCSERVE_CPU_LORA_OPS"] == "segmented"


def test_merged_model_is_merged_again_when_the_adapter_changed(
    embedded_model_dir, lora_adapter_dir, tmp_path, monkeypatch
):
    from rich.console import Console

    from lcserve.adapters.cache import ensure_merged, merged_dir
    from lcserve.adapters.merge import PROVENANCE
    from lcserve.adapters.reader import read_adapter

    monkeypatch.setenv("LCSERVE_HOME", str(tmp_path))
    adapter = read_adapter(lora_adapter_dir)
    quiet = Console(quiet=True)
    merged = merged_dir("mine", adapter, embedded_model_dir)
    ensure_merged(adapter, embedded_model_dir, merged, quiet)
    provenance = json.loads((merged / PROVENANCE).read_text())
    ensure_merged(adapter, embedded_model_dir, merged, quiet)
    assert json.loads((merged / PROVENANCE).read_text()) == provenance  # reused, not merged again
    (merged / PROVENANCE).write_text(json.dumps({**provenance, "adapter_sha256": "0" * 64}))  # a stale folder
    ensure_merged(adapter, embedded_model_dir, merged, quiet)
    assert json.loads((merged / PROVENANCE).read_text())["adapter_sha256"] == provenance["adapter_sha256"]


def test_adapter_is_mounted_with_the_planned_lora_capacity(embedded_model_dir, lora_adapter_dir):
    r = serve("--adapter", f"mine={lora_adapter_dir}", "--dry-run")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    cmd = out["command"]
    module = json.loads(cmd[cmd.index("--lora-modules") + 1])
    assert module == {"name": "mine", "path": str(lora_adapter_dir.resolve()), "base_model_name": "gemma-3-270m"}
    assert cmd.count("--enable-lora") == 1 and cmd[cmd.index("--max-lora-rank") + 1] == "8"  # rank 4 rounds up
    assert out["plan"]["max_lora_rank"] == 8


def test_adapter_only_merges_without_writing_on_a_dry_run(embedded_model_dir, lora_adapter_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LCSERVE_HOME", str(tmp_path))
    r = serve(str(embedded_model_dir), "--adapter", f"mine={lora_adapter_dir}", "--adapter-only", "--dry-run")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    cmd = out["command"]
    assert cmd[cmd.index("--served-model-name") + 1] == "mine" and "--enable-lora" not in cmd
    assert cmd[cmd.index("--model") + 1].startswith(str(tmp_path / "merged" / "mine-"))
    assert not (tmp_path / "merged").exists()


def test_bad_adapter_spec_is_one_line(embedded_model_dir):
    r = serve("--adapter", "no-equals-sign", "--dry-run")
    assert r.exit_code == 2 and "expected NAME=DIR" in r.output and "Traceback" not in r.output


def test_gpu_memory_utilization_reaches_vllm_and_the_plan_follows_it(embedded_model_dir):
    """A dry run for a GPU profile on this CPU machine plans with the user's fraction, not the default."""

    def planned(util: str) -> dict:
        r = serve("--base-only", "--profile", "l4", "--gpu-memory-utilization", util, "--dry-run")
        assert r.exit_code == 0, r.output
        return json.loads(r.output)

    low, high = planned("0.5"), planned("0.8")
    assert low["command"][low["command"].index("--gpu-memory-utilization") + 1] == "0.5"
    assert low["command"].count("--gpu-memory-utilization") == 1
    assert low["plan"]["kv_cache_bytes"] < high["plan"]["kv_cache_bytes"]
    assert "--enforce-eager" not in low["command"] and any(n.startswith("dry run for l4") for n in low["notes"])


def test_gpu_profile_is_refused_when_really_serving_on_the_cpu_build(embedded_model_dir, monkeypatch):
    monkeypatch.setattr(serve_cli, "vllm_build", lambda: "cpu")
    r = serve("--base-only", "--profile", "l4", "--ready-timeout", "1")
    assert r.exit_code == 2 and "GPU profile but this machine runs vLLM's CPU build" in r.output


def test_vllm_command_keeps_the_arguments_in_order():
    spec = EngineSpec(
        model="/m", served_model_name="m", port=1234, args=["--max-model-len", "2048", "--enable-lora", "--seed", "1"]
    )
    cmd = vllm_command(spec, python="py")
    assert cmd == [
        "py",
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        "/m",
        "--served-model-name",
        "m",
        "--host",
        "127.0.0.1",
        "--port",
        "1234",
        "--max-model-len",
        "2048",
        "--enable-lora",
        "--seed",
        "1",
    ]


# ---- the engine's door (issue 23): vLLM's private socket folder, `gateway --upstream unix:` ----------


def test_engine_socket_folder_is_created_private(tmp_path):
    from lcserve.serving.security import engine_socket

    sock = engine_socket(tmp_path / "run")
    assert sock == tmp_path / "run" / "vllm.sock" and (tmp_path / "run").stat().st_mode & 0o777 == 0o700
    spec = EngineSpec(model="m", served_model_name="m", uds=str(sock))
    cmd = vllm_command(spec)
    assert cmd[cmd.index("--uds") + 1] == str(sock) and "--port" not in cmd and "--host" not in cmd
    assert spec.url == f"unix:{sock}"


def one_line_error(args: list[str]) -> str:
    r = CliRunner().invoke(cli, args)
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


def test_a_socket_folder_others_could_open_is_one_line(embedded_model_dir, tmp_path):
    folder = tmp_path / "open"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    line = one_line_error(["serve", "--base-only", "--port", "18431", "--engine-socket-dir", str(folder)])
    assert f"--engine-socket-dir {folder}: mode 0755" in line and f"chmod 700 {folder}" in line
    folder.chmod(0o700)  # fixed as the line says: accepted
    from lcserve.serving.security import engine_socket

    assert engine_socket(folder) == folder / "vllm.sock"


def test_a_socket_folder_lcserve_cannot_write_is_one_line(tmp_path, monkeypatch):
    """As root every folder is writable, so the kernel's answer for another user is stood in for."""
    from lcserve.errors import LcserveError
    from lcserve.serving import security

    folder = tmp_path / "readonly"
    folder.mkdir(mode=0o500)
    monkeypatch.setattr(security.os, "access", lambda path, mode: False)
    with pytest.raises(
        LcserveError, match=rf"--engine-socket-dir {folder}: lcserve cannot write there; run `chmod u\+wx"
    ):
        security.engine_socket(folder)


def test_a_socket_path_too_long_or_a_file_is_one_line(tmp_path):
    from lcserve.errors import LcserveError
    from lcserve.serving.security import engine_socket

    with pytest.raises(LcserveError, match="longer than 107 bytes"):
        engine_socket(tmp_path / ("d" * 120))
    (tmp_path / "file").write_text("")
    with pytest.raises(LcserveError, match="not a folder"):
        engine_socket(tmp_path / "file")


@pytest.mark.parametrize("upstream", ["127.0.0.1:8000", "unix:relative/vllm.sock", "/run/vllm.sock"])
def test_gateway_upstream_spelling_is_one_line(upstream):
    line = one_line_error(["gateway", "--upstream", upstream, "--port", "18432"])
    assert f"--upstream {upstream}: write http://HOST:PORT" in line and "unix:/ABSOLUTE/PATH" in line


def test_gateway_upstream_key_file_mistakes_are_one_line(tmp_path):
    (tmp_path / "empty").write_text("")
    args = ["gateway", "--upstream", "unix:/run/vllm.sock", "--port", "18433", "--upstream-api-key-file"]
    assert "the file is empty" in one_line_error([*args, str(tmp_path / "empty")])
    assert "cannot read it" in one_line_error([*args, str(tmp_path / "missing")])


def test_an_adapter_snapshot_is_named_by_its_content(tmp_path):
    """vLLM 0.32 keys its prefix cache by adapter name and path: new weights must get a new path,
    the same weights the same one, and later writes to the operator's folder must not reach it."""
    from lcserve.serving.security import snapshot

    adapter, root = tmp_path / "x", tmp_path / "snapshots"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"A")
    first = snapshot(adapter, root)
    assert snapshot(adapter, root) == first
    (adapter / "adapter_model.safetensors").write_bytes(b"B")
    second = snapshot(adapter, root)
    assert second != first and (first / "adapter_model.safetensors").read_bytes() == b"A"
    assert (second / "adapter_model.safetensors").read_bytes() == b"B"
