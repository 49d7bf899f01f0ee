"""The README's own example, as a new user runs it: a Llama-3.1-8B writer on an RTX 5090 at 64k.

The folder holds Llama-3.1-8B's real config.json and real-size safetensors shards whose data is
a hole (the planner reads headers only). vLLM serves this command: max_num_seqs 9 is its batch
cap, and one request of 64000 tokens fits. lcserve must accept it, pass the user's numbers to
vLLM unchanged, and say how many full-length requests fit and at what length all 9 do.
"""

import json
import re
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from lcserve.cli import cli
from tests.support.tiny_models import build_llama_3_1_8b

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def writer(tmp_path_factory) -> Path:
    return build_llama_3_1_8b(tmp_path_factory.mktemp("models") / "llama-3.1-8b-writer")


def script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "serve_vllm.sh"), *args], capture_output=True, text=True, timeout=300)


def readme_example() -> tuple[list[str], str, str]:
    """The command, the plan line and the speed line of the README's example block."""
    block = re.search(
        r"```text\n\$ (\./serve_vllm\.sh [^\n]+)\n(plan \(rtx-5090\).*?)\n(speed .*?)\n```",
        (ROOT / "README.md").read_text(),
        re.S,
    )
    return block[1].split()[1:], " ".join(block[2].split()), " ".join(block[3].split())


def test_the_readme_example_is_accepted_and_reaches_vllm_unchanged(writer):
    args, plan_line, speed_line = readme_example()
    r = script(*[str(writer) if a == "/models/llama-3.1-8b-writer" else a for a in args])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    cmd = out["command"]
    for option, value in (("--max-num-seqs", "9"), ("--max-model-len", "64000"), ("--gpu-memory-utilization", "0.9")):
        assert cmd.count(option) == 1 and cmd[cmd.index(option) + 1] == value, option
    summary = next(n for n in out["notes"] if n.startswith("plan (rtx-5090)"))
    assert plan_line in summary, (plan_line, summary)  # the README shows what the kit prints
    plan = out["plan"]
    assert f"{plan['max_concurrency']:.1f}" == "1.6" and 11000 <= plan["max_num_seqs_fit_len"] < 12000
    # The README states the predicted TTFT and ITL the plan computes, labelled uncalibrated, with equations.
    assert speed_line == plan["speed"]["summary"] and "uncalibrated" in speed_line
    reasons = {r["setting"]: r["why"] for r in plan["reasons"]}
    assert "1792 GB/s" in reasons["ITL at batch 9"] and "209.5 TFLOP/s" in reasons["TTFT at max_model_len"]
    assert any("max_num_seqs 9 is vLLM's cap" in w for w in plan["warnings"])


def test_a_full_context_target_that_does_not_fit_is_refused_in_the_users_words(writer):
    r = script(
        str(writer), "8000", "9", "64000", "0.90", "--profile", "rtx-5090", "--full-context-requests", "9", "--dry-run"
    )
    assert r.returncode == 2 and r.stdout == ""
    error = r.stderr.strip().splitlines()[-1]
    assert error.startswith("error: MAX_MODEL_LEN 64000 x 9 request(s) at full length (--full-context-requests 9)")
    assert "largest feasible: MAX_MODEL_LEN 11680 at 9 request(s), or 1 request(s) at MAX_MODEL_LEN 64000" in error
    assert "--max-model-len" not in error and "--context" not in error and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["serve", "{model}", "--profile", "rtx-5090", "--dry-run"],
        ["deploy", "plan", "--model", "{model}", "--profile", "rtx-5090"],
    ],
)
def test_lcserve_names_its_own_option(writer, command):
    args = [a.format(model=writer) for a in command] + [
        "--max-model-len",
        "64000",
        "--max-num-seqs",
        "9",
        "--full-context-requests",
        "9",
    ]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2
    assert "error: --max-model-len 64000 x 9" in r.output and "largest feasible: --max-model-len 11680" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_not_even_one_full_length_request_is_refused(writer):
    """Refuse what vLLM refuses: 131072 tokens of KV do not fit a 5090 beside 16 GB of weights."""
    r = script(str(writer), "8000", "auto", "131072", "0.90", "--profile", "rtx-5090", "--dry-run")
    assert r.returncode == 2
    assert "MAX_MODEL_LEN 131072 x 1 request(s)" in r.stderr and "largest feasible: MAX_MODEL_LEN" in r.stderr


def test_a_config_only_folder_plans_and_says_so_but_does_not_serve(tmp_path):
    """People size hardware before downloading 16 GB: config.json alone plans the same numbers."""
    config_only = build_llama_3_1_8b(tmp_path / "llama-3.1-8b", weights="config")
    plan = CliRunner().invoke(
        cli,
        [
            "deploy",
            "plan",
            "--model",
            str(config_only),
            "--profile",
            "rtx-5090",
            "--max-model-len",
            "64000",
            "--max-num-seqs",
            "9",
            "--json",
        ],
    )
    assert plan.exit_code == 0, plan.output
    weights = next(r for r in json.loads(plan.output)["reasons"] if r["setting"] == "weights")
    assert "config.json arithmetic" in weights["why"] and "8,030,261,248 parameters" in weights["why"]
    served = CliRunner().invoke(cli, ["serve", str(config_only), "--profile", "rtx-5090", "--dry-run"])
    assert served.exit_code == 2 and "no *.safetensors weights" in served.output
    assert len(served.output.strip().splitlines()) == 1
