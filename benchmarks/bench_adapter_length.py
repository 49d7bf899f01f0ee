"""Does a short-trained adapter keep its base's long context, and does a reduced LoRA scale help?

Two experiments on one vLLM CPU engine, the embedded Gemma 3 270M with seven LoRA adapters mounted
at once, so every arm answers the very same prompts on the same engine:

- training length: the demo recipe (`lcserve embedded train-adapter`: same corpus, seed, learning
  rate, rank) with its examples packed end to end into rows of exactly 128, 256 or 1024 tokens,
  1024 tokens per step, one epoch: the same data, steps and tokens per step, only the positions
  trained on differ (`packed-128`, `packed-256`, `packed-1024`). `writer` is the demo adapter's
  first, unpacked recipe (`UNPACKED_RECIPE`): one example per row, cut at 256, so it never trains
  past its longest example (recorded as `longest_row_tokens`); the shipped demo adapter is now
  `packed-256`'s recipe.
- LoRA scale: `writer` copied at scale x 0.75, x 0.5 and x 0.25 (`adapters/scale.py`: lora_alpha x s).

Per arm: passkey accuracy by length (one prompt per depth, the same cells for every arm), the
paired adapter-minus-base difference with its 95% bootstrap interval (lcserve's probe), the
effective length (accuracy >= 80% at every rung up to it), and the style-marker rate on the
corpus's held-out prompts (greedy). Results go to docs/findings/adapter_length.json, a plot to
docs/findings/adapter_length.png.

    python -m benchmarks.bench_adapter_length [--lengths 1024,4096,8192,16384] [--depths 12]
    python -m benchmarks.bench_adapter_length --plot-only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from rich.console import Console

from benchmarks.findings import RESULTS, adapter_length_table, adapter_scale_table, correct_per_length, run_conditions
from lcserve import embedded
from lcserve.adapters.mount import mount_args
from lcserve.adapters.scale import write_scaled_adapter
from lcserve.adapters.style import corpus_examples, style_score
from lcserve.adapters.train import UNPACKED_RECIPE, TrainConfig, train_demo_adapter
from lcserve.adapters.training_length import LCSERVE_METADATA
from lcserve.engine import EngineProcess, EngineSpec, free_port
from lcserve.paths import demo_adapter_dir, lcserve_home
from lcserve.serving.cpu_lora import ENV_VAR as CPU_LORA_ENV
from lcserve.serving.cpu_lora import SEGMENTED
from lcserve.serving.probes import ProbeConfig, run_probe
from lcserve.serving.probes.plan import TIERS, Tier

PACKED_LENGTHS = (128, 256, 1024)
PACKED_TOKENS_PER_STEP = 1024
SCALES = (0.75, 0.5, 0.25)
STYLE_TOKENS = 64  # enough for the opener and a sentence or two; the rate counts any marker


def tier(depths: int) -> Tier:
    """Passkey only, `depths` evenly spread depths per length; no needle, loss or continuation."""
    return dataclasses.replace(
        TIERS["quick"],
        name="adapter-length",
        max_length=None,
        passkey_depths=tuple(round((i + 0.5) / depths, 3) for i in range(depths)),
        needle_depths=(),
        controls=0,
        loss_tokens=0,
        generation_tokens=0,
        budget_minutes=None,
    )


def build_arms(progress_console: Console) -> dict[str, Path]:
    """Adapter name -> folder: the demo adapter, its scaled copies and the packed recipes (trained once)."""
    shipped = demo_adapter_dir().name  # the shipped adapter is packed-256's recipe; `writer` is the first, unpacked one
    writer = train_demo_adapter(lcserve_home() / "adapters" / f"{shipped}-unpacked", config=UNPACKED_RECIPE)
    arms = {"writer": writer}
    for scale in SCALES:
        out = lcserve_home() / "adapters" / f"{writer.name}-scale-{scale:g}"
        arms[f"writer-s{scale:g}"] = write_scaled_adapter(writer, out, scale, force=True)
    for length in PACKED_LENGTHS:
        progress_console.print(f"training packed-{length} (or reusing it)")
        config = TrainConfig(seq_len=length, packed_tokens_per_step=PACKED_TOKENS_PER_STEP)
        arms[f"packed-{length}"] = train_demo_adapter(
            lcserve_home() / "adapters" / f"{shipped}-packed-{length}", config=config
        )
    return arms


def style_rates(url: str, models: list[str]) -> dict[str, dict]:
    """Greedy replies to the held-out prompts, every model in one concurrent batch; the marker rate per model."""
    prompts = [row["prompt"] for row in corpus_examples("heldout")]

    def reply(job: tuple[str, str]) -> str:
        body = {
            "model": job[0],
            "messages": [{"role": "user", "content": job[1]}],
            "max_tokens": STYLE_TOKENS,
            "temperature": 0,
        }
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
        response.raise_for_status()
        return response.json()["choices"][0]["message"]["content"]

    jobs = [(m, p) for m in models for p in prompts]
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(reply, jobs))
    out = {}
    for i, model in enumerate(models):
        score = style_score(replies[i * len(prompts) : (i + 1) * len(prompts)])
        out[model] = {
            "styled": score.styled,
            "answers": score.answers,
            "signed_off": score.signed_off,
            "markers_per_answer": round(score.markers_per_answer, 2),
        }
    return out


def arm_figures(summary: dict, name: str, folder: Path | None) -> dict:
    """One arm's passkey cells, effective length, paired difference to the base, training facts (pure)."""
    entry = summary["models"][name]
    passkey = entry["tasks"]["passkey"]
    figures = {
        "accuracy": correct_per_length(passkey["by_length"]),
        "effective_length": passkey["effective_length"],
    }
    comparison = summary.get("comparisons", {}).get(name)
    if comparison:
        figures["vs_base"] = {
            length: {k: round(r[k], 4) for k in ("mean", "lo", "hi")} | {"n": r["n"]}
            for length, r in comparison["retrieval"]["passkey"]["by_length"].items()
            if r
        }
    if folder:
        meta = json.loads((folder / LCSERVE_METADATA).read_text())
        figures["training"] = {k: meta.get(k) for k in ("training_seq_len", "longest_row_tokens", "steps", "loss_last")}
        figures["training"]["packed_tokens_per_step"] = meta["train_config"].get("packed_tokens_per_step", 0)
        figures["lora_scale"] = meta.get("lora_scale", 1)
    return figures


def run(args, console: Console) -> dict:
    base_dir = embedded.prepare()
    arms = build_arms(console)
    spec = EngineSpec(
        model=str(base_dir),
        served_model_name=embedded.SERVED_NAME,
        port=free_port(),
        args=[
            "--max-model-len",
            str(max(args.lengths)),
            *mount_args(list(arms.items()), embedded.SERVED_NAME),
            "--enforce-eager",  # LoRA on the CPU build runs eager (as `lcserve serve` starts it)
        ],
        env={"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind", CPU_LORA_ENV: SEGMENTED},
    )
    work = Path(tempfile.mkdtemp(prefix="bench-adapter-length-"))
    engine = EngineProcess(spec, work / "vllm.log")
    started = time.monotonic()
    engine.start()
    try:
        engine.wait_ready(600)
        console.print("engine ready; style rates on the held-out prompts")
        style = style_rates(engine.url, [embedded.SERVED_NAME, *arms])
        console.print("styled answers: " + ", ".join(f"{m} {s['styled']}/{s['answers']}" for m, s in style.items()))
        TIERS.setdefault(args.tier.name, args.tier)  # run_probe takes its tier by name
        summary = run_probe(
            ProbeConfig(
                url=engine.url,
                base=embedded.SERVED_NAME,
                adapters=tuple(arms),
                tier=args.tier.name,
                lengths=tuple(args.lengths),
                out_dir=work / "probe",
                seed=args.seed,
                repetition=False,
                console=console,
            )
        )
    finally:
        engine.stop()
    figures = {"base": arm_figures(summary, embedded.SERVED_NAME, None)}
    figures.update({name: arm_figures(summary, name, folder) for name, folder in arms.items()})
    for name, entry in figures.items():
        entry["style"] = style[embedded.SERVED_NAME if name == "base" else name]
    console.print(f"logs and probe files: {work}")
    return {"arms": figures, "engine_seconds": round(time.monotonic() - started), "probe_wall_s": summary["wall_s"]}


def plot(doc: dict, path: Path) -> None:
    """Left: against the positions each adapter trained on, the passkey gap to the base at the longest
    length (95% interval) and the effective length. Right: the same gap and the style markers per
    answer against the LoRA scale. A small PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = str(doc["lengths"][-1])
    arms = doc["arms"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2), dpi=100, sharey=True)

    def gap(ax, xs: list[float], names: list[str]) -> None:
        diffs = [arms[n]["vs_base"][top] for n in names]
        means = [d["mean"] for d in diffs]
        errors = [[m - d["lo"] for m, d in zip(means, diffs)], [d["hi"] - m for m, d in zip(means, diffs)]]
        ax.errorbar(xs, means, yerr=errors, fmt="-o", color="tab:red", capsize=3, label=f"passkey gap at {top}")
        ax.axhline(0, color="grey", linewidth=1, linestyle=":")
        for x, name in zip(xs, names):
            ax.annotate(
                name, (x, arms[name]["vs_base"][top]["mean"]), fontsize=6, xytext=(3, -9), textcoords="offset points"
            )

    trained = sorted(
        (arms[n]["training"]["longest_row_tokens"], n) for n in arms if n == "writer" or n.startswith("packed-")
    )
    gap(left, [x for x, _ in trained], [n for _, n in trained])
    left.set_xscale("log", base=2)
    left.set_xlim(64, 2048)  # room for the labels
    left.set(xlabel="longest trained row (tokens)", ylabel="adapter - base (95% interval)", ylim=(-1.05, 0.25))
    left.set_title("training length", fontsize=9)
    effective = left.twinx()
    effective.plot(
        [x for x, _ in trained],
        [arms[n]["effective_length"] or 0 for _, n in trained],
        "s--",
        color="tab:blue",
        label="effective length",
    )
    effective.set_yscale("log", base=2)
    effective.set_ylabel("effective length (tokens)", color="tab:blue")

    scaled = sorted((arms[n]["lora_scale"], n) for n in arms if n == "writer" or n.startswith("writer-s"))
    gap(right, [x for x, _ in scaled], [n for _, n in scaled])
    right.set(xlabel="LoRA scale s")
    right.set_title("LoRA scale (writer)", fontsize=9)
    style = right.twinx()
    style.plot(
        [x for x, _ in scaled], [arms[n]["style"]["markers_per_answer"] for _, n in scaled], "s--", color="tab:green"
    )
    style.set_ylabel("style markers per answer", color="tab:green")
    style.set_ylim(0, None)
    left.legend(fontsize=7, loc="lower right")
    fig.suptitle("Gemma 3 270M + LoRA: passkey retrieval against the base", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,4096,8192,16384", help="comma-separated probe lengths")
    parser.add_argument("--depths", type=int, default=12, help="passkey depths (prompts) per length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from the result file, no engine")
    parser.add_argument("--out", type=Path, default=RESULTS / "adapter_length.json")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return 0
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.tier = tier(args.depths)
    console = Console(stderr=True)
    doc = {
        "lengths": args.lengths,
        "depths": args.depths,
        "seed": args.seed,
        "model": f"Gemma 3 270M (embedded, bf16) with {len(SCALES) + len(PACKED_LENGTHS) + 1} rank-8 LoRA adapters mounted at once",
        "probe": f"lcserve probe: passkey only, {args.depths} depths per length, lengths {args.lengths}, seed {args.seed}",
        "recipe": f"demo recipe (lr 1e-3, rank 8, alpha 16, seed 0, one epoch); packed arms: {PACKED_TOKENS_PER_STEP} tokens per step",
        "conditions": run_conditions(" ".join(["python -m benchmarks.bench_adapter_length", *sys.argv[1:]])),
        **run(args, console),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(adapter_length_table(doc))
    print(adapter_scale_table(doc))
    plot(doc, args.out.with_suffix(".png"))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
