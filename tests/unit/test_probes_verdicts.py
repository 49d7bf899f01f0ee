"""Verdicts from hand-made records: accuracy, effective length, paired bootstrap, loss change, gauges."""

import json

import numpy as np
import pytest

from lcserve.serving.probes.gauges import gauge_samples
from lcserve.serving.probes.scoring import score_needle, score_passkey
from lcserve.serving.probes.verdicts import (
    accuracy_by_length,
    effective_length,
    loss_profile,
    nolima_effective_length,
    paired_bootstrap,
    ruler_effective_length,
    summarize,
    wilson,
)

DEPTHS = (0.0, 0.5, 1.0)
LENGTHS = (128, 256, 512, 1024)


def record(model, task, length, depth, output, gold):
    score = score_passkey(output, gold) if task == "passkey" else score_needle(output, gold, ("1111111",))
    return {
        "model": model,
        "task": task,
        "cell": f"{task}:{length}:{depth}:k",
        "length": length,
        "depth": depth,
        "output": output,
        "gold": gold,
        "correct": score.correct,
        "empty": score.empty,
        "distractor": score.distractor,
    }


def needle_answers(model, answers: dict[int, list[str]]):
    return [
        record(model, "needle", length, depth, out, "4429751")
        for length, outs in answers.items()
        for depth, out in zip(DEPTHS, outs)
    ]


RIGHT = [": 4429751."] * 3
BASE = needle_answers("base", {n: RIGHT for n in LENGTHS})
# the adapter holds to 512, then: one right, one empty, one partial (6 of 7 digits)
ADAPTER = needle_answers("writer", {128: RIGHT, 256: RIGHT, 512: RIGHT, 1024: [": 4429751", "", ": 442975"]})


def test_accuracy_counts_empty_answers_apart():
    acc = accuracy_by_length(ADAPTER, "writer", "needle")
    assert acc[512] == {
        "accuracy": 1.0,
        "n": 3,
        "empty": 0,
        "distractor": 0,
        "lo": pytest.approx(0.4385, abs=1e-4),
        "hi": 1.0,
    }
    assert acc[1024] == {
        "accuracy": pytest.approx(1 / 3), "n": 3, "empty": 1, "distractor": 0, "lo": pytest.approx(0.0615, abs=1e-4),
        "hi": pytest.approx(0.7923, abs=1e-4),
    }  # fmt: skip


def test_distractor_answers_are_counted():
    records = needle_answers("m", {256: [": 1111111", ": 4429751", "x"]})
    assert accuracy_by_length(records, "m", "needle")[256]["distractor"] == 1


@pytest.mark.parametrize(
    "accuracy, expected",
    [
        ({128: 1.0, 256: 0.9, 512: 0.8, 1024: 0.5}, 512),
        ({128: 1.0, 256: 0.5, 512: 1.0}, 128),  # monotone: a lucky pass after a fail does not count
        ({128: 0.7, 256: 1.0}, None),
        ({128: 1.0, 256: None}, 128),
        ({}, None),
    ],
)
def test_effective_length(accuracy, expected):
    assert effective_length(accuracy, 0.8) == expected


# Expected values worked out by hand from the published definitions: RULER, the longest length scoring
# above Llama-2-7B's 85.6% at 4K; NoLiMa, the longest length keeping 85% of the best score at <= 1K.
FIELD_CASES = [
    # 0.86 beats 85.6%, 0.855 does not; NoLiMa's floor is 0.85 x 1.0, which 0.855 keeps
    ({256: 1.0, 1024: 0.9, 2048: 0.86, 4096: 0.855, 8192: 0.5}, 2048, 4096),
    # a weak model: nothing beats 85.6%; its own best short score is 0.6, floor 0.51
    ({512: 0.6, 1024: 0.5, 4096: 0.52, 8192: 0.3}, None, 4096),
    ({2048: 1.0, 4096: 1.0}, 4096, None),  # no rung at 1K or below: no NoLiMa base
    ({512: 0.0, 1024: 0.0, 2048: None}, None, None),
]


@pytest.mark.parametrize("accuracy, ruler, nolima", FIELD_CASES)
def test_the_fields_effective_lengths(accuracy, ruler, nolima):
    assert ruler_effective_length(accuracy) == ruler
    assert nolima_effective_length(accuracy) == nolima


def test_the_fields_effective_lengths_fail_on_a_perturbed_threshold(monkeypatch):
    """Each expectation above pins its definition's threshold: nudged, the first case changes."""
    from lcserve.serving.probes import verdicts

    accuracy, ruler, nolima = FIELD_CASES[0]
    monkeypatch.setattr(verdicts, "RULER_THRESHOLD", 0.85)
    monkeypatch.setattr(verdicts, "NOLIMA_KEEP", 0.86)
    assert ruler_effective_length(accuracy) != ruler and nolima_effective_length(accuracy) != nolima


def test_paired_bootstrap_is_seeded_and_flags_only_clear_regressions():
    rng = np.random.default_rng(0)
    diffs = list(rng.choice([-1.0, 0.0, 1.0], size=30, p=[0.5, 0.3, 0.2]))
    assert paired_bootstrap(diffs, seed=7) == paired_bootstrap(diffs, seed=7)
    assert paired_bootstrap(diffs, seed=7) != paired_bootstrap(diffs, seed=8)
    assert paired_bootstrap([-1.0] * 10, seed=0) == {
        "mean": -1.0, "lo": -1.0, "hi": -1.0, "n": 10, "regression": True, "decision": "worse",
    }  # fmt: skip
    assert not paired_bootstrap([-1.0] * 5, seed=0)["regression"]  # too few pairs to tell
    assert paired_bootstrap([-1.0] * 8 + [0.0] * 2, seed=0)["regression"]
    assert not paired_bootstrap([0.0, 0.0, 1.0, -1.0], seed=0)["regression"]
    assert paired_bootstrap([], seed=0) is None


def test_paired_bootstrap_interval_matches_the_normal_approximation_on_a_large_sample():
    rng = np.random.default_rng(1)
    diffs = list(rng.choice([-1.0, 0.0], size=400, p=[0.3, 0.7]))
    result = paired_bootstrap(diffs, seed=0, resamples=4000)
    half = 1.96 * np.std(diffs) / np.sqrt(len(diffs))
    assert result["lo"] == pytest.approx(result["mean"] - half, abs=0.01)
    assert result["hi"] == pytest.approx(result["mean"] + half, abs=0.01)


def loss_records():
    base = [None] + [-2.0] * 1023
    adapter = [None] + [-2.0] * 255 + [-3.0] * 768  # worse by 1 nat from position 256 on
    return [
        {"model": "base", "task": "loss", "cell": "loss:1024", "length": 1024, "logprobs": base},
        {"model": "writer", "task": "loss", "cell": "loss:1024", "length": 1024, "logprobs": adapter},
    ]


def test_loss_profile_splits_at_the_training_length():
    profile = loss_profile(loss_records()[1]["logprobs"], 256)
    assert profile["edges"] == [0, 16, 32, 64, 128, 256, 512, 1024]
    assert profile["nll"] == [2.0, 2.0, 2.0, 2.0, 2.0, 3.0, 3.0]
    assert (profile["within"], profile["beyond"], profile["tokens"]) == (2.0, 3.0, 1024)


def repetition_records():
    return [
        {
            "model": m,
            "task": "repetition",
            "cell": "repetition:1088",
            "length": 1088,
            "window": 256,
            "prompt_tokens": 64,
            "rep2": r2,
            "rep4": r4,
        }
        for m, r2, r4 in (("base", [0.2, 0.2], [0.0, 0.1]), ("writer", [0.3, 0.9], [0.1, 0.8]))
    ]


def controls(model, outputs):
    return [
        dict(record(model, "control", 0, None, out, gold), cell=f"control:0:None:{i}")
        for i, (out, gold) in enumerate(outputs)
    ]


def full_summary():
    records = BASE + ADAPTER + loss_records() + repetition_records()
    records += controls("base", [(" 10.", "6187461"), (" 100", "3048888")])
    records += controls("writer", [(" 6187461", "6187461"), (" 3048888", "3048888")])  # answers from memory
    return summarize(records, "base", {"writer": 256}, 256, threshold=0.8, seed=0)


def test_summary_is_json_ready_and_holds_the_verdicts():
    summary = full_summary()
    assert json.loads(json.dumps(summary)) == summary
    writer = summary["models"]["writer"]
    assert writer["tasks"]["needle"]["effective_length"] == 512
    assert summary["models"]["base"]["tasks"]["needle"]["effective_length"] == 1024
    assert writer["tasks"]["needle"]["grid"]["1024"] == {"0.0": 1.0, "0.5": 0.0, "1.0": 0.0}
    assert writer["tasks"]["control"]["accuracy"] == 1.0
    comp = summary["comparisons"]["writer"]
    at_1024 = comp["retrieval"]["needle"]["by_length"]["1024"]
    assert at_1024["mean"] == pytest.approx(-2 / 3) and at_1024["n"] == 3
    beyond = comp["retrieval"]["needle"]["beyond_training"]
    assert beyond["n"] == 6 and beyond["mean"] == pytest.approx(-1 / 3)
    assert comp["loss"] == {"within": 0.0, "beyond": 1.0, "change": 1.0}
    assert comp["repetition"]["mean_rep4"] == pytest.approx(0.45 - 0.05)
    text = "\n".join(comp["verdict"])
    assert "adapter 512, base 1024" in text
    assert "worse beyond the training length by 1.000" in text
    assert "answers 100% without the text" in text
    assert "short control" not in text


def test_a_failed_short_control_is_named():
    broken = needle_answers("writer", {n: ["", "", ""] for n in LENGTHS})
    summary = summarize(BASE + broken, "base", {"writer": 256}, 256, threshold=0.8, seed=0)
    text = "\n".join(summary["comparisons"]["writer"]["verdict"])
    assert "needle short control (128 tokens): base 100%, adapter 0%" in text
    assert "significantly worse than base at" not in text  # 3 pairs a length: too few to tell
    assert (
        "needle beyond 256 tokens: adapter - base -1.00 [-1.00, -1.00] over 6 paired prompts: a significant regression"
        in text
    )
    assert summary["models"]["writer"]["tasks"]["needle"]["by_length"]["256"]["empty"] == 3


def test_gauge_samples_mirror_the_summary():
    summary = full_summary()
    samples = gauge_samples(summary)
    accuracy = {
        (s[1]["model"], s[1]["task"], s[1]["length"]): s[2] for s in samples if s[0] == "lcserve_probe_accuracy"
    }
    assert accuracy[("writer", "needle", "1024")] == pytest.approx(1 / 3)
    assert accuracy[("base", "needle", "128")] == 1.0
    assert accuracy[("writer", "control", "0")] == 1.0
    assert len(accuracy) == 2 * (len(LENGTHS) + 1)
    effective = {s[1]["model"]: s[2] for s in samples if s[0] == "lcserve_probe_effective_length"}
    assert effective == {"base": 1024.0, "writer": 512.0}
    for name, key in (("ruler", "effective_length_ruler"), ("nolima", "effective_length_nolima")):
        by = {s[1]["model"]: s[2] for s in samples if s[0] == f"lcserve_probe_effective_length_{name}"}
        assert by == {m: float(e["tasks"]["needle"][key] or 0) for m, e in summary["models"].items()}
    assert all(isinstance(v, float) and all(isinstance(x, str) for x in labels.values()) for _, labels, v in samples)


@pytest.mark.parametrize("k, n", [(0, 12), (6, 12), (10, 12), (12, 12), (1, 3)])
def test_wilson_interval_matches_scipy(k, n):
    from scipy.stats import binomtest

    expected = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson(k, n) == (pytest.approx(expected.low, abs=1e-6), pytest.approx(expected.high, abs=1e-6))


def test_decisions_say_undecided_when_the_interval_crosses_zero():
    assert paired_bootstrap([0.0] * 12, seed=0)["decision"] == "not worse"
    assert paired_bootstrap([0.0] * 11 + [-1.0], seed=0)["decision"] == "undecided"
    # one lost pair in 31: the interval is about [-0.10, 0], still across 0
    assert paired_bootstrap([0.0] * 30 + [-1.0], seed=0)["decision"] == "undecided"


def passkey_pairs(base_right: int, adapter_right: int, n: int = 12, length: int = 2048):
    records = []
    for model, right in (("base", base_right), ("writer", adapter_right)):
        for i in range(n):
            records.append(dict(record(model, "passkey", length, i / n, " 12345" if i < right else " 9", "12345")))
            records[-1]["cell"] = f"passkey:{length}:{i / n}:passkey"
    return records


def test_verdict_gives_each_interval_and_its_decision():
    summary = summarize(passkey_pairs(12, 10), "base", {"writer": 256}, 256, threshold=0.8, seed=0)
    line = next(v for v in summary["comparisons"]["writer"]["verdict"] if v.startswith("passkey at 2048"))
    # the Wilson bounds are scipy's (test_wilson_interval_matches_scipy); the difference: 2 of 12 pairs lost
    assert line == (
        "passkey at 2048 (12 paired prompts): adapter 83% [55%, 95%], base 100% [76%, 100%]; "
        "adapter - base -0.17 [-0.42, +0.00] undecided"
    )


def style_records():
    """Two lengths x 6 questions: the writer styled at 1024 (3 markers, signed off), plain at 8192."""
    styled = {"markers": ["ahoy", "fair winds", "steady lights"], "signed_off": True}
    plain = {"markers": [], "signed_off": False}
    rows = []
    for length in (1024, 8192):
        for i in range(6):
            for model, score in (("base", plain), ("writer", styled if length == 1024 else plain)):
                rows.append({"model": model, "task": "style", "cell": f"style:{length}:{i}", "length": length, **score})
    return rows


def test_style_at_length_is_summarized_with_a_paired_interval_and_published_as_gauges():
    summary = summarize(BASE + ADAPTER + style_records(), "base", {"writer": 256}, 256, threshold=0.8, seed=0)
    writer = summary["models"]["writer"]["style"]
    assert writer["1024"] == {"markers_per_answer": 3.0, "styled": 1.0, "signed_off": 1.0, "n": 6}
    assert writer["8192"]["markers_per_answer"] == 0.0
    comp = summary["comparisons"]["writer"]["style"]
    assert (comp["1024"]["mean"], comp["1024"]["lo"], comp["1024"]["decision"]) == (3.0, 3.0, "not worse")
    assert comp["8192"]["hi"] == 0.0
    line = next(v for v in summary["comparisons"]["writer"]["verdict"] if v.startswith("style at length"))
    assert "1024: 3.0 markers/answer, signed off 100%, writer - base +3.00 [+3.00, +3.00] kept" in line
    assert "8192: 0.0 markers/answer, signed off 0%, writer - base +0.00 [+0.00, +0.00] lost" in line
    samples = {(s[0], s[1]["model"], s[1]["length"]): s[2] for s in gauge_samples(summary) if "style" in s[0]}
    assert samples[("lcserve_probe_style_markers_per_answer", "writer", "1024")] == 3.0
    assert samples[("lcserve_probe_style_signed_off", "writer", "8192")] == 0.0
    assert samples[("lcserve_probe_style_markers_per_answer", "base", "1024")] == 0.0
