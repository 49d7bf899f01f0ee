"""`lcserve probe` against the real vLLM CPU engine: a tiny ladder end to end, and the one-line errors."""

import json
from dataclasses import replace

import httpx
import pytest
from click.testing import CliRunner

from lcserve.adapters.style import MARKERS
from lcserve.cli import LcserveGroup
from lcserve.serving.probes import gauge_samples
from lcserve.serving.probes.cli import probe
from lcserve.serving.probes.plan import REPETITION_WINDOW, TIERS, spread
from lcserve.serving.probes.tasks import ANSWER_TOKENS

pytestmark = pytest.mark.integration

LENGTHS = (256, 1024)


def lcserve_probe(*args):
    group = LcserveGroup()
    group.add_command(probe)
    return CliRunner().invoke(group, ["probe", *args])


def test_tiny_ladder_end_to_end(engine, tmp_path, monkeypatch):
    # one repetition window, a 1024-token loss document, 4 passkey prompts and 2 needle prompts per depth
    # a length, and style at one length on 2 questions: the wiring of every task, in a few minutes on 2 cores
    tier = replace(
        TIERS["quick"], generation_tokens=REPETITION_WINDOW, loss_tokens=1024, passkey_depths=spread(4),
        needle_per_depth=2, style_prompts=2, style_tokens=32,
    )  # fmt: skip
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
        "--style-lengths",
        "1k",
        "--out",
        str(tmp_path),
        "--json",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    assert sorted(summary["models"]) == sorted(models)

    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    plan = summary["plan"]
    per_length = len(plan["passkey_depths"]) + len(plan["needle_depths"]) * plan["needle_per_depth"]
    per_model = len(LENGTHS) * per_length + plan["controls"] + 2
    # style at length: the demo writer (known by its corpus) and the base answer the same 2 questions
    assert plan["style_models"] == [engine.base_model, engine.adapter_model] and plan["style_lengths"] == [1024]
    style = 2 * len(plan["style_models"])
    assert len(records) == summary["requests"] == summary["planned_requests"] == per_model * len(models) + style
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
        elif r["task"] == "style":
            assert 1024 - 32 - 40 <= r["prompt_tokens"] <= 1024 - 32 and r["output"].strip()
            assert r["markers"] == [m for m in MARKERS if m in r["output"].lower()]

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
    # the demo writer keeps its voice after a 1k-token preamble: more markers than the base on the same questions
    writer_style = summary["models"][engine.adapter_model]["style"]["1024"]
    assert (
        writer_style["markers_per_answer"] > summary["models"][engine.base_model]["style"]["1024"]["markers_per_answer"]
    )
    assert any(line.startswith("style at length") for line in summary["comparisons"][engine.adapter_model]["verdict"])
    assert {s[1]["model"] for s in samples if s[0] == "lcserve_probe_style_markers_per_answer"} == set(models)
    for png in (
        "heatmap_needle.png",
        "heatmap_passkey.png",
        "loss_by_position.png",
        "repetition.png",
        "style_by_length.png",
    ):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert "| 1024 |" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--base", "no-such-model"], "does not serve a model named 'no-such-model' (it serves: gemma-3-270m"),
        (["--adapter", "no-such-adapter"], "does not serve an adapter named 'no-such-adapter'"),
        (["--base-only", "--lengths", "256,16384"], "--lengths 16384 above the max_model_len 8192 of"),
        (["--base-only", "--training-length", "32768"], "above the server's max_model_len 8192"),
        (["--style-lengths", "1k,16k"], "--style-lengths 16384 above the max_model_len 8192 of"),
    ],
)
def test_user_errors_are_one_line(engine, tmp_path, args, fragment):
    result = lcserve_probe("--url", engine.url, *args, "--out", str(tmp_path))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.output
