"""`lcserve probe` against the real vLLM CPU engine: a tiny ladder end to end, and the one-line errors."""

import json
from dataclasses import replace

import httpx
import pytest
from click.testing import CliRunner

from lcserve.cli import LcserveGroup
from lcserve.serving.probes import gauge_samples
from lcserve.serving.probes.cli import probe
from lcserve.serving.probes.plan import REPETITION_WINDOW, TIERS
from lcserve.serving.probes.tasks import ANSWER_TOKENS

pytestmark = pytest.mark.integration

LENGTHS = (256, 1024)


def lcserve_probe(*args):
    group = LcserveGroup()
    group.add_command(probe)
    return CliRunner().invoke(group, ["probe", *args])


def test_tiny_ladder_end_to_end(engine, tmp_path, monkeypatch):
    # one repetition window and a 1024-token loss document instead of the quick tier's four windows
    # and 4096 tokens: on 2 cores the continuation and the long prefill are most of the run's time
    tier = replace(TIERS["quick"], generation_tokens=REPETITION_WINDOW, loss_tokens=1024)
    monkeypatch.setitem(TIERS, "quick", tier)
    # the probe takes every adapter the engine mounts on the base (none, or some when the engine has LoRA on)
    served = httpx.get(f"{engine.url}/v1/models", timeout=30).json()["data"]
    adapters = [m["id"] for m in served if m.get("parent") == engine.base_model]
    models = [engine.base_model, *adapters]
    result = lcserve_probe(
        "--url",
        engine.url,
        "--base",
        engine.base_model,
        "--training-length",
        "256",
        "--lengths",
        ",".join(map(str, LENGTHS)),
        "--out",
        str(tmp_path),
        "--concurrency",
        "4",  # the models' continuations decode in one batch
        "--json",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    assert sorted(summary["models"]) == sorted(models)

    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    plan = summary["plan"]
    per_model = len(LENGTHS) * (len(plan["passkey_depths"]) + len(plan["needle_depths"])) + plan["controls"] + 2
    assert len(records) == summary["requests"] == per_model * len(models)
    for r in records:
        # the server saw exactly the prompt we sized with its own tokenizer
        assert r["prompt_tokens"] == r["sized_tokens"], r
        if r["task"] in ("passkey", "needle"):
            assert r["length"] - ANSWER_TOKENS - 4 <= r["prompt_tokens"] <= r["length"] - ANSWER_TOKENS
            assert r["correct"] in (0.0, 1.0) and (not r["empty"] or r["output"].strip() == "")
        elif r["task"] == "loss":
            assert len(r["logprobs"]) == r["prompt_tokens"] and r["logprobs"][0] is None
            assert all(lp <= 0 for lp in r["logprobs"][1:])
        elif r["task"] == "repetition":
            assert r["output_tokens"] >= 0.9 * plan["generation_tokens"]
            assert len(r["rep2"]) == r["output_tokens"] // REPETITION_WINDOW

    for name, entry in summary["models"].items():
        needle = entry["tasks"]["needle"]
        assert sorted(needle["by_length"], key=int) == [str(n) for n in LENGTHS]
        assert needle["effective_length"] in (None, *LENGTHS)
        retrieval = [r["correct"] for r in records if r["model"] == name and r["task"] in ("passkey", "needle")]
        # the probe measures retrieval, not luck: the text helps compared with no text at all
        assert sum(retrieval) / len(retrieval) > entry["tasks"]["control"]["accuracy"]
        assert plan["loss_tokens"] - 8 <= entry["loss"]["tokens"] <= plan["loss_tokens"] - 1
    for adapter in adapters:
        comp = summary["comparisons"][adapter]
        assert comp["training_length"] == 256 and comp["verdict"]
    samples = gauge_samples(summary)
    assert {s[1]["model"] for s in samples} == set(models)
    for png in ("heatmap_needle.png", "heatmap_passkey.png", "loss_by_position.png", "repetition.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert "| 1024 |" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--base", "no-such-model"], "does not serve a model named 'no-such-model' (it serves: gemma-3-270m"),
        (["--adapter", "no-such-adapter"], "does not serve an adapter named 'no-such-adapter'"),
        (["--base-only", "--lengths", "256,16384"], "--lengths 16384 above the max_model_len 8192 of"),
        (["--base-only", "--training-length", "32768"], "above the server's max_model_len 8192"),
    ],
)
def test_user_errors_are_one_line(engine, tmp_path, args, fragment):
    result = lcserve_probe("--url", engine.url, *args, "--out", str(tmp_path))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.output
