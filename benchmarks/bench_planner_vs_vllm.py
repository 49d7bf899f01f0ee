"""The planner against the engine: predicted vs vLLM-reported KV capacity and concurrency.

For each architecture (tiny random models built from transformers configs, plus the
embedded Gemma 3 270M) the planner plans a CPU deployment with a fixed
VLLM_CPU_KVCACHE_SPACE; the real vLLM CPU build is started with exactly the plan's
arguments and stopped as soon as it logs "CPU KV cache size: N tokens, Maximum
concurrency for L tokens per request: Xx". The table shows both figures and the error.

    python -m benchmarks.bench_planner_vs_vllm [--only NAME ...] [--kv-gib 1] [--out DIR]

Engine starts dominate (about a minute each on 2 cores); this is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lcserve.deploy.hardware import GIB, resolve_profile  # noqa: E402
from lcserve.deploy.measure import measure_capacity  # noqa: E402
from lcserve.deploy.plan import PlanRequest, plan_deployment  # noqa: E402
from lcserve.model_config import read_model  # noqa: E402
from tests.support.tiny_models import BUILDERS, build_tiny_model  # noqa: E402

# (row name, model, KV dtype)
CASES = [(name, name, "auto") for name in BUILDERS] + [
    ("llama-gqa fp8 KV", "llama-gqa", "fp8"),
    ("gemma-3-270m (embedded)", "embedded", "auto"),
]


def model_dir(name: str) -> Path:
    if name == "embedded":
        from lcserve.embedded import prepare

        return prepare()
    return build_tiny_model(name)


def err(predicted: float, measured: float) -> float:
    return 100.0 * (predicted - measured) / measured


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="row names or model names to run")
    parser.add_argument("--kv-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE for every engine")
    parser.add_argument("--out", type=Path, default=Path("out/bench-planner"), help="logs and results.json")
    args = parser.parse_args()
    cases = [c for c in CASES if not args.only or c[0] in args.only or c[1] in args.only]
    args.out.mkdir(parents=True, exist_ok=True)
    # This machine's CPU profile (block sizes, AMX) with a fixed RAM figure: the KV size is fixed,
    # so the plan must not depend on what other processes hold at the moment.
    profile = dataclasses.replace(resolve_profile("cpu"), memory_bytes=32 * GIB)
    console = Console(width=max(Console().width, 150))
    rows = []
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("starting vLLM", total=len(cases))
        for row_name, name, kv_dtype in cases:
            progress.update(task, description=f"vLLM: {row_name}")
            path = model_dir(name)
            model = read_model(path)
            plan = plan_deployment(profile, model, (), PlanRequest(kv_cache_dtype=kv_dtype, kv_cache_gib=args.kv_gib))
            log = args.out / f"{row_name.split()[0]}-{kv_dtype}.log"
            started = time.monotonic()
            measured = measure_capacity(path, plan, log_path=log)
            rows.append(
                {
                    "architecture": row_name,
                    "model_class": model.architecture,
                    "attention": model.attention_summary,
                    "max_model_len": plan.max_model_len,
                    "block_size": plan.block_size,
                    "predicted_tokens": plan.kv_tokens,
                    "measured_tokens": measured.kv_tokens,
                    "tokens_error_pct": err(plan.kv_tokens, measured.kv_tokens),
                    "predicted_concurrency": round(plan.max_concurrency, 2),
                    "measured_concurrency": measured.max_concurrency,
                    "concurrency_error_pct": err(round(plan.max_concurrency, 2), measured.max_concurrency),
                    "engine_seconds": round(time.monotonic() - started, 1),
                    "log": str(log),
                }
            )
            progress.advance(task)

    table = Table(title=f"planner vs vLLM CPU (VLLM_CPU_KVCACHE_SPACE={args.kv_gib})", header_style="bold")
    for col in (
        "architecture",
        "attention",
        "max_model_len",
        "predicted tokens",
        "measured tokens",
        "error %",
        "predicted conc.",
        "measured conc.",
        "error %",
    ):
        table.add_column(col, justify="left" if col in ("architecture", "attention") else "right")
    for r in rows:
        table.add_row(
            r["architecture"],
            ", ".join(f"{k} x{v}" for k, v in r["attention"].items()),
            str(r["max_model_len"]),
            f"{r['predicted_tokens']:,}",
            f"{r['measured_tokens']:,}",
            f"{r['tokens_error_pct']:+.2f}",
            f"{r['predicted_concurrency']:.2f}",
            f"{r['measured_concurrency']:.2f}",
            f"{r['concurrency_error_pct']:+.2f}",
        )
    console.print(table)
    print(
        "\n| architecture | attention | max_model_len | predicted tokens | measured tokens | error % "
        "| predicted conc. | measured conc. | error % |\n|---|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['architecture']} | {', '.join(f'{k} x{v}' for k, v in r['attention'].items())} | {r['max_model_len']} "
            f"| {r['predicted_tokens']:,} | {r['measured_tokens']:,} | {r['tokens_error_pct']:+.2f} "
            f"| {r['predicted_concurrency']:.2f} | {r['measured_concurrency']:.2f} | {r['concurrency_error_pct']:+.2f} |"
        )
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    worst = max(max(abs(r["tokens_error_pct"]), abs(r["concurrency_error_pct"])) for r in rows)
    console.print(f"largest error: {worst:.2f}% (target <= 1%); results: {args.out / 'results.json'}")
    return 0 if worst <= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
