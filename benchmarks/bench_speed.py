"""The speed model against the real engine: calibrate, then predict and measure at points not used in the fit.

    flock /tmp/lcserve-heavy.lock python benchmarks/bench_speed.py [--users 1,4,16] [--prompts 256,2048]
        [--output 32] [--rounds 1] [--tiny llama-gqa] [--json OUT.json] [--profile-out FILE.yaml] [--plot OUT.png]
    python -m benchmarks.bench_speed --replot docs/findings/speed.json --plot docs/findings/speed.png

Starts vLLM once (the embedded Gemma 3 270M with its `writer` demo adapter mounted, the CPU build,
eager, a 1 GiB KV cache, as `lcserve deploy calibrate` does), measures the calibration points
(deploy/calibrate.py POINTS: prompts of 64/128/1024/3072 tokens at 1, 4 and 8 sequences), fits the
constants, then drives closed-loop streamed load at each (users, prompt) on the base and on the
adapter and prints the prediction beside the measurement (medians), with the error of each.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks.findings import run_conditions
from lcserve.deploy.calibrate import bench_rows, calibrate_on, calibration_of, write_calibrated_profile
from lcserve.deploy.inputs import read_plan_inputs
from lcserve.deploy.measure import engine_session
from lcserve.deploy.plan import PlanRequest, plan_deployment
from lcserve.deploy.speed import model_identity
from lcserve.embedded import embedded_model_path
from lcserve.paths import demo_adapter_dir
from tests.support.tiny_models import build_tiny_model


def numbers(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


COLUMNS = {  # row key -> heading: the client's medians, then vLLM's own means (its histograms)
    "ttft_ms_p50": "TTFT ms p50",
    "itl_ms_p50": "ITL ms p50",
    "output_tokens_per_s": "out tok/s",
    "ttft_ms_mean": "engine TTFT ms mean",
    "itl_ms_mean": "engine ITL ms mean",
}


def table(rows: list[dict]) -> str:
    head = f"{'model':<24} {'users':>5} {'prompt':>6}  " + "  ".join(
        f"{h + ' pred/meas (err)':>31}" for h in COLUMNS.values()
    )
    lines = [head]
    for r in rows:
        cells = [
            f"{r[k]['predicted']:>10,.1f} / {r[k]['measured']:>10,.1f} ({r[k]['error_pct']:+4.0f}%)" for k in COLUMNS
        ]
        lines.append(f"{r['model']:<24} {r['users']:>5} {r['prompt']:>6}  " + "  ".join(cells))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=numbers, default=[1, 4, 16])
    parser.add_argument("--prompts", type=numbers, default=[256, 2048])
    parser.add_argument("--output", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--no-adapter", action="store_true", help="Measure the base model only.")
    parser.add_argument(
        "--tiny", metavar="NAME", help="A tiny random test model (tests/support/tiny_models.py) instead, base only."
    )
    parser.add_argument("--json", type=Path, help="Write the figures here as JSON.")
    parser.add_argument("--profile-out", type=Path, help="Also write the calibrated profile here.")
    parser.add_argument("--plot", type=Path, help="Draw predicted against measured (PNG) here.")
    parser.add_argument("--replot", type=Path, help="Only draw --plot from this earlier --json; start nothing.")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(args.replot.read_text()), args.plot or args.replot.with_suffix(".png"))
        return 0

    adapter = None if args.no_adapter or args.tiny else demo_adapter_dir()
    folder = build_tiny_model(args.tiny) if args.tiny else embedded_model_path()
    profile, model, adapters = read_plan_inputs(folder, "cpu", [adapter] if adapter else [])
    plan = plan_deployment(profile, model, adapters, PlanRequest(max_model_len=4096, kv_cache_gib=1))
    loads = [(n, p) for p in args.prompts for n in args.users]
    log = Path(tempfile.mkstemp(prefix="lcserve-bench-speed-", suffix=".log")[1])

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    with engine_session(plan, adapter, None, log, progress) as (address, base, lora):
        figures, residuals = calibrate_on(plan, address, base, lora, progress)
        progress(f"fitted: {figures}")
        rows = bench_rows(plan, figures, address, base, False, loads, args.output, args.rounds, progress)
        if lora:
            rows += bench_rows(plan, figures, address, lora, True, loads, args.output, args.rounds, progress)
    calibration = calibration_of(figures, base, model_identity(model), "segmented" if lora else "", residuals)
    if args.profile_out:
        write_calibrated_profile(profile, calibration, args.profile_out)
    print("calibration residuals (points used in the fit):")
    for r in residuals:
        print(
            f"  {r['point']:<20} measured {r['measured_ms']:>9,.1f} ms  fitted {r['predicted_ms']:>9,.1f} ms  ({r['error_pct']:+.1f}%)"
        )
    print(
        f"constants: step overhead {calibration.step_overhead_ms} ms, request overhead {calibration.request_overhead_ms}"
        f" ms, {calibration.bandwidth_gbs} GB/s, {calibration.tflops} TFLOP/s, LoRA {calibration.lora_us_per_rank_token}"
        f" us/rank-token + {calibration.lora_ms_per_adapter_step} ms/adapter-step"
    )
    print("predicted vs measured at points not used in the fit (medians; closed loop, streamed):")
    print(table(rows))
    doc = {
        "model": f"tiny test model {args.tiny} ({model.architecture}, random weights)"
        if args.tiny
        else "Gemma 3 270M (embedded, bf16)" + (", alone and with the `writer` demo adapter" if lora else ""),
        "calibration": calibration.__dict__,
        "rows": rows,
        "conditions": run_conditions("python " + " ".join(sys.argv)),
    }
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    if args.plot:
        plot(doc, args.plot)
    return 0


def plot(doc: dict, out: Path) -> None:
    """Predicted against measured median TTFT and ITL, one point per (model, users, prompt), with the
    25% band the calibrated model is held to."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    for ax, key, label in ((axes[0], "ttft_ms_p50", "TTFT (ms)"), (axes[1], "itl_ms_p50", "ITL (ms)")):
        values = []
        for model, marker in zip(sorted({r["model"] for r in doc["rows"]}), "o^sv"):
            rows = [r for r in doc["rows"] if r["model"] == model]
            if rows:
                x, y = [r[key]["measured"] for r in rows], [r[key]["predicted"] for r in rows]
                ax.scatter(x, y, marker=marker, label=model)
                values += x + y
        lo, hi = min(values) * 0.7, max(values) * 1.3
        ax.plot([lo, hi], [lo, hi], color="black", lw=0.8)
        ax.fill_between(
            [lo, hi], [lo * 0.75, hi * 0.75], [lo * 1.25, hi * 1.25], color="grey", alpha=0.2, label="+-25%"
        )
        ax.set(
            xscale="log",
            yscale="log",
            xlabel=f"measured {label}",
            ylabel=f"predicted {label}",
            xlim=(lo, hi),
            ylim=(lo, hi),
        )
        ax.legend(fontsize=8)
    fig.suptitle("Speed model after `lcserve deploy calibrate`: points not used in the fit", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
