"""From raw probe records to verdicts: accuracy per length and depth, effective length,
adapter-vs-base regressions with a paired bootstrap interval, the loss change beyond the
training length, repetition by window. Pure: the summary can be rebuilt from records.jsonl.
"""

from __future__ import annotations

import numpy as np

from .scoring import nll_by_bucket, position_edges
from .style import paired_markers, style_by_length, verdict_line

RETRIEVAL = ("passkey", "needle")
RESAMPLES = 2000
# Fewer pairs than this cannot show a regression: with 5 of 5 prompts lost a two-sided sign
# test still gives p = 0.06, while the percentile bootstrap would call it certain.
MIN_PAIRS = 6
Z95 = 1.959964  # the normal quantile of a two-sided 95% interval


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval of a proportion: unlike the normal one, it stays inside [0, 1] and is
    not zero-wide at 0/n or n/n, which a 12-prompt rung often scores."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(sum(values) / len(values)) if values else None


def accuracy_by_length(records: list[dict], model: str, task: str) -> dict[int, dict]:
    rows: dict[int, list[dict]] = {}
    for r in records:
        if r["model"] == model and r["task"] == task:
            rows.setdefault(r["length"], []).append(r)
    out = {}
    for length, rs in sorted(rows.items()):
        lo, hi = wilson(sum(r["correct"] for r in rs), len(rs))
        out[length] = {
            "accuracy": _mean(r["correct"] for r in rs),
            "n": len(rs),
            "empty": sum(r["empty"] for r in rs),
            "distractor": sum(r["distractor"] for r in rs),
            "lo": lo,
            "hi": hi,
        }
    return out


def depth_grid(records: list[dict], model: str, task: str) -> dict[int, dict[float, float]]:
    """Accuracy per (length, requested depth): the heatmap."""
    cells: dict[int, dict[float, list[float]]] = {}
    for r in records:
        if r["model"] == model and r["task"] == task:
            cells.setdefault(r["length"], {}).setdefault(r["depth"], []).append(r["correct"])
    return {length: {depth: _mean(v) for depth, v in sorted(row.items())} for length, row in sorted(cells.items())}


def effective_length(accuracy: dict[int, float | None], threshold: float) -> int | None:
    """The longest length up to which every rung of the ladder reaches the threshold.

    Monotone on purpose: a model that fails at 2k and passes at 4k by chance does not hold at 4k.
    None when even the shortest rung fails.
    """
    best = None
    for length in sorted(accuracy):
        if accuracy[length] is None or accuracy[length] < threshold:
            break
        best = length
    return best


# The field's definitions, beside lcserve's (every rung up to the length holds `threshold`), so a result
# reads against published ones:
RULER_THRESHOLD = 0.856  # RULER: Llama-2-7B's score at 4K; effective length is the longest length above it
NOLIMA_KEEP = 0.85  # NoLiMa: the longest length keeping 85% of the model's own short-context score ...
NOLIMA_SHORT = 1024  # ... its best score at 1K tokens or fewer (NoLiMa measures 250, 500 and 1K)


def ruler_effective_length(accuracy: dict[int, float | None]) -> int | None:
    """RULER's effective length: the longest probed length whose score exceeds RULER_THRESHOLD."""
    held = [length for length, a in accuracy.items() if a is not None and a > RULER_THRESHOLD]
    return max(held, default=None)


def nolima_effective_length(accuracy: dict[int, float | None]) -> int | None:
    """NoLiMa's effective length: the longest probed length that keeps NOLIMA_KEEP of the model's base
    score (its best at NOLIMA_SHORT tokens or fewer). None without a short rung, or with a base of 0."""
    short = [a for length, a in accuracy.items() if length <= NOLIMA_SHORT and a is not None]
    if not short or max(short) <= 0:
        return None
    floor = NOLIMA_KEEP * max(short)
    return max((length for length, a in accuracy.items() if a is not None and a >= floor), default=None)


def paired_bootstrap(diffs: list[float], seed: int, resamples: int = RESAMPLES, level: float = 0.95) -> dict | None:
    """Mean of paired differences (adapter - base on the same prompts), its percentile interval,
    whether that is a regression (interval below 0, at least MIN_PAIRS pairs), and the decision
    against 0: 'worse' (a regression), 'not worse' (interval at or above 0) or 'undecided'."""
    if not diffs:
        return None
    d = np.asarray(diffs, dtype=float)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    regression = bool(hi < 0 and len(d) >= MIN_PAIRS)
    return {
        "mean": float(d.mean()),
        "lo": float(lo),
        "hi": float(hi),
        "n": len(d),
        "regression": regression,
        "decision": "worse" if regression else "not worse" if lo >= 0 else "undecided",
    }


def compare_retrieval(records: list[dict], base: str, adapter: str, task: str, training_length: int, seed: int) -> dict:
    """Adapter minus base accuracy per length, on prompts paired by cell, and pooled beyond the training length."""
    by_cell = {m: {r["cell"]: r for r in records if r["model"] == m and r["task"] == task} for m in (base, adapter)}
    paired = [(b, by_cell[adapter][c]) for c, b in by_cell[base].items() if c in by_cell[adapter]]
    lengths = sorted({b["length"] for b, _ in paired})
    by_length = {
        length: paired_bootstrap([a["correct"] - b["correct"] for b, a in paired if b["length"] == length], seed)
        for length in lengths
    }
    beyond = paired_bootstrap([a["correct"] - b["correct"] for b, a in paired if b["length"] > training_length], seed)
    return {"by_length": by_length, "beyond_training": beyond}


def loss_profile(logprobs: list[float | None], training_length: int) -> dict:
    """Mean NLL per log2 position bucket (with an edge at the training length), and the means
    before and from the training length on."""
    edges = position_edges(len(logprobs), training_length)
    return {
        "edges": edges,
        "nll": nll_by_bucket(logprobs, edges),
        "within": nll_by_bucket(logprobs, [0, training_length])[0],
        "beyond": nll_by_bucket(logprobs, [training_length, len(logprobs)])[0]
        if len(logprobs) > training_length
        else None,
        "tokens": len(logprobs),
    }


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def compare_loss(base: dict, adapter: dict) -> dict:
    """Adapter minus base NLL; `change` is how much worse (positive) the gap gets beyond the training length."""
    within = _minus(adapter["within"], base["within"])
    beyond = _minus(adapter["beyond"], base["beyond"])
    return {"within": within, "beyond": beyond, "change": _minus(beyond, within)}


def _record(records: list[dict], model: str, task: str) -> dict | None:
    return next((r for r in records if r["model"] == model and r["task"] == task), None)


def summarize(
    records: list[dict], base: str, adapters: dict[str, int], reference: int, threshold: float, seed: int
) -> dict:
    """The summary of a run. `adapters` maps each adapter to its training length; the base is
    read against the ladder's reference length."""
    training = {base: reference, **adapters}
    models: dict[str, dict] = {}
    for model, length in training.items():
        entry: dict = {"role": "base" if model == base else "adapter", "training_length": length, "tasks": {}}
        for task in RETRIEVAL:
            acc = accuracy_by_length(records, model, task)
            if acc:
                scores = {k: v["accuracy"] for k, v in acc.items()}
                entry["tasks"][task] = {
                    "by_length": acc,
                    "grid": depth_grid(records, model, task),
                    "effective_length": effective_length(scores, threshold),
                    "effective_length_ruler": ruler_effective_length(scores),
                    "effective_length_nolima": nolima_effective_length(scores),
                }
        control = accuracy_by_length(records, model, "control")
        if control:
            entry["tasks"]["control"] = control[0]
        loss = _record(records, model, "loss")
        if loss:
            entry["loss"] = loss_profile(loss["logprobs"], length)
        style = style_by_length(records, model)
        if style:
            entry["style"] = style
        rep = _record(records, model, "repetition")
        if rep:
            entry["repetition"] = {
                "window": rep["window"],
                "prompt_tokens": rep["prompt_tokens"],
                "rep2": rep["rep2"],
                "rep4": rep["rep4"],
                "mean_rep2": _mean(rep["rep2"]),
                "mean_rep4": _mean(rep["rep4"]),
            }
        models[model] = entry

    comparisons = {}
    for adapter, length in adapters.items():
        comp: dict = {"training_length": length, "retrieval": {}}
        for task in RETRIEVAL:
            if task in models[adapter]["tasks"] and task in models[base]["tasks"]:
                comp["retrieval"][task] = compare_retrieval(records, base, adapter, task, length, seed)
        if "loss" in models[adapter] and "loss" in models[base]:
            # both curves split at the adapter's training length
            comp["loss"] = compare_loss(
                loss_profile(_record(records, base, "loss")["logprobs"], length), models[adapter]["loss"]
            )
        if "repetition" in models[adapter] and "repetition" in models[base]:
            comp["repetition"] = {
                k: _minus(models[adapter]["repetition"][k], models[base]["repetition"][k])
                for k in ("mean_rep2", "mean_rep4")
            }
        if "style" in models[adapter]:
            comp["style"] = {n: paired_bootstrap(d, seed) for n, d in paired_markers(records, base, adapter).items()}
        comp["verdict"] = verdict_lines(models[base], models[adapter], comp, threshold)
        comparisons[adapter] = comp
    return _json_keys(
        {
            "threshold": threshold,
            "seed": seed,
            "reference_length": reference,
            "models": models,
            "comparisons": comparisons,
        }
    )


def _json_keys(value):
    """Lengths and depths as string keys, so the summary in memory is the one in summary.json."""
    if isinstance(value, dict):
        return {str(k): _json_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_keys(v) for v in value]
    return value


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _interval(row: dict) -> str:
    return f"{_pct(row['accuracy'])} [{_pct(row['lo'])}, {_pct(row['hi'])}]"


def interval_lines(base: dict, adapter: dict, comp: dict) -> list[str]:
    """Per task and length: each model's accuracy with its 95% Wilson interval, and the paired
    adapter - base difference with its 95% bootstrap interval, decided against 0: 'worse', 'not
    worse', or 'undecided' when the interval crosses 0 (more prompts would decide it)."""
    lines = []
    for task, result in comp["retrieval"].items():
        for length, diff in result["by_length"].items():
            a = adapter["tasks"][task]["by_length"].get(length)
            b = base["tasks"][task]["by_length"].get(length)
            if not (a and b and diff):
                continue
            lines.append(
                f"{task} at {length} ({diff['n']} paired prompts): adapter {_interval(a)}, base {_interval(b)}; "
                f"adapter - base {diff['mean']:+.2f} [{diff['lo']:+.2f}, {diff['hi']:+.2f}] {diff['decision']}"
            )
    return lines


def verdict_lines(base: dict, adapter: dict, comp: dict, threshold: float) -> list[str]:
    """Plain sentences for the report: what holds, what regressed, and which control explains it."""
    lines = []
    t = comp["training_length"]
    needle_a, needle_b = adapter["tasks"].get("needle"), base["tasks"].get("needle")
    if needle_a and needle_b:
        lines.append(
            f"effective length (needle accuracy >= {threshold:.0%} at every rung): adapter "
            f"{needle_a['effective_length'] or 'none'}, base {needle_b['effective_length'] or 'none'} (trained at {t})"
        )
    lines += interval_lines(base, adapter, comp)
    for task, result in comp["retrieval"].items():
        worse = [str(length) for length, r in result["by_length"].items() if r and r["regression"]]
        if worse:
            lines.append(
                f"{task}: adapter significantly worse than base at {', '.join(worse)} tokens (95% paired bootstrap)"
            )
        pooled = result["beyond_training"]
        if pooled:
            lines.append(
                f"{task} beyond {t} tokens: adapter - base {pooled['mean']:+.2f} [{pooled['lo']:+.2f}, {pooled['hi']:+.2f}] "
                f"over {pooled['n']} paired prompts{': a significant regression' if pooled['regression'] else ''}"
            )
    for task in RETRIEVAL:
        a, b = adapter["tasks"].get(task), base["tasks"].get(task)
        if a and b:
            shortest = min(a["by_length"])
            acc_a, acc_b = a["by_length"][shortest]["accuracy"], b["by_length"][shortest]["accuracy"]
            if acc_b is not None and acc_a is not None and acc_b >= threshold > acc_a:
                lines.append(
                    f"{task} short control ({shortest} tokens): base {_pct(acc_b)}, adapter {_pct(acc_a)}: "
                    "the adapter breaks the answer even at short length, so long-context figures say little"
                )
    for model_name, entry in (("adapter", adapter), ("base", base)):
        control = entry["tasks"].get("control")
        if control and control["accuracy"] is not None and control["accuracy"] > 0.2:
            lines.append(
                f"no-context control: {model_name} answers {_pct(control['accuracy'])} without the text: retrieval scores are inflated"
            )
    loss = comp.get("loss")
    if loss and loss["change"] is not None:
        direction = "worse" if loss["change"] > 0 else "better"
        lines.append(
            f"loss: adapter - base {loss['within']:+.3f} nats/token before {t} tokens, {loss['beyond']:+.3f} from {t} on "
            f"({direction} beyond the training length by {abs(loss['change']):.3f})"
        )
    if comp.get("style"):
        lines.append(verdict_line(comp["style"], adapter["style"]))
    rep = comp.get("repetition")
    if rep and rep["mean_rep4"] is not None:
        lines.append(
            f"repetition of the long continuation: rep-4 adapter {adapter['repetition']['mean_rep4']:.2f} vs base "
            f"{base['repetition']['mean_rep4']:.2f} (0 = no repeated 4-grams, 1 = a loop)"
        )
    return lines
