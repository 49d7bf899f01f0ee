"""The "stretched RoPE table" claim: does repeating the rotary cos/sin table past an original
length L0 extend a model's context? lcserve's probes answer it for the embedded model.

Two arms answer the same probe prompts (same seed, lengths and tier), each on its own vLLM CPU
engine: `base`, the embedded Gemma 3 270M as it is, and `tiled`, the variant folder this script
builds (the base's files, linked, with a config.json that records the tiling as
`lcserve_rope_tiling`) served with the `serving/rope_tiling.py` plugin on
(`LCSERVE_ROPE_TILE_LEN=L0`). Passkey and needle accuracy by length, and the loss by position
split at L0, go to docs/findings/rope_tiling.json, and a plot to docs/findings/rope_tiling.png.

    python -m benchmarks.bench_rope_tiling [--original-length 2048] [--lengths 1024,2048,3072,4096,6144]
    python -m benchmarks.bench_rope_tiling --arms tiled        # one arm per run; the file keeps the other

The probe (`TIER` below) asks 3 passkey and 5 needle depths per length, 4 no-context controls and
the loss over 4096 tokens. About 5 minutes of engine time per arm on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from benchmarks.findings import RESULTS, correct_per_length, rope_loss_table, rope_tiling_table, run_conditions
from lcserve import embedded
from lcserve.engine import EngineProcess, EngineSpec, free_port
from lcserve.paths import atomic_dir, lcserve_home
from lcserve.rope_check import read_config, tiled_config
from lcserve.serving.probes import ProbeConfig, run_probe
from lcserve.serving.probes.plan import TIERS
from lcserve.serving.rope_tiling import ENV_VAR as TILE_ENV
from lcserve.serving.rope_tiling import INSTALLED

ARMS = ("base", "tiled")
NOT_LINKED = ("config.json", embedded.MARKER)  # the variant writes its own config and is not the embedded model
# The quick tier with the full tier's depths (3 passkey, 5 needle per length), untrimmed, without the
# repetition continuation: decode-bound on 2 cores (minutes per arm) and silent about positions.
TIER = dataclasses.replace(
    TIERS["quick"],
    name="rope-tiling",
    passkey_depths=TIERS["full"].passkey_depths,
    needle_depths=TIERS["full"].needle_depths,
    generation_tokens=0,
    budget_minutes=None,
)


def build_variant(base_dir: Path, original_length: int) -> Path:
    """The tiled variant's folder: the base's files linked, config.json recording the tiling (atomic)."""
    target = lcserve_home() / "models" / f"{base_dir.name}-rope-tiled-{original_length}"
    config = tiled_config(read_config(base_dir), original_length)
    if read_config(target) == config:
        return target
    with atomic_dir(target) as tmp:
        for path in sorted(base_dir.iterdir()):
            if path.is_file() and path.name not in NOT_LINKED:
                (tmp / path.name).symlink_to(path.resolve())
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return target


def probe_arm(arm: str, model_dir: Path, args, work: Path) -> dict:
    """Start vLLM for one arm, probe it, stop it; the arm's figures from the probe's summary."""
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    if arm == "tiled":
        env[TILE_ENV] = str(args.original_length)
    spec = EngineSpec(
        model=str(model_dir),
        served_model_name=embedded.SERVED_NAME,  # the same name: both arms get the same prompts
        port=free_port(),
        args=["--max-model-len", str(max(args.lengths)), "--enforce-eager"],
        env=env,
    )
    engine = EngineProcess(spec, work / f"vllm-{arm}.log")
    started = time.monotonic()
    engine.start()
    try:
        engine.wait_ready(600)
        if arm == "tiled" and INSTALLED not in engine.log_path.read_text(errors="replace"):
            raise SystemExit(f"the tiling plugin did not load (no log line); reinstall lcserve: {engine.log_path}")
        summary = run_probe(
            ProbeConfig(
                url=engine.url,
                base=embedded.SERVED_NAME,
                adapters=(),
                tier=TIER.name,
                lengths=tuple(args.lengths),
                out_dir=work / f"probe-{arm}",
                training_length=args.original_length,  # the loss is split at L0
                seed=args.seed,
                console=Console(stderr=True),
            )
        )
    finally:
        engine.stop()
    return arm_figures(summary, model_dir, env, round(time.monotonic() - started))


def arm_figures(summary: dict, model_dir: Path, env: dict, engine_seconds: int) -> dict:
    """Correct / asked per task and length, effective lengths and the loss split, from a probe summary (pure)."""
    tasks = summary["models"][embedded.SERVED_NAME]["tasks"]
    loss = summary["models"][embedded.SERVED_NAME].get("loss") or {}
    return {
        "model_dir": str(model_dir),
        "env": env,
        "accuracy": {
            task: correct_per_length({str(k): v for k, v in tasks[task]["by_length"].items()})
            for task in ("passkey", "needle")
            if task in tasks
        },
        "effective_length": {task: tasks[task]["effective_length"] for task in ("passkey", "needle") if task in tasks},
        "loss": {k: loss.get(k) for k in ("within", "beyond", "tokens")},
        "dropped": summary.get("dropped", []),
        "engine_seconds": engine_seconds,
    }


def plot(doc: dict, path: Path) -> None:
    """Left: passkey and needle accuracy by length per arm, L0 marked. Right: mean NLL per token
    before and from L0 per arm. A small PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, loss_ax) = plt.subplots(1, 2, figsize=(8, 3.2), dpi=100, gridspec_kw={"width_ratios": [2, 1]})
    colors = dict(zip(doc["arms"], ("tab:blue", "tab:red")))
    for arm, figures in doc["arms"].items():
        width = 4 if arm == "base" else 1.5  # the base drawn thick underneath: equal points stay visible
        for task, style in (("passkey", "-o"), ("needle", "--s")):
            cells = [(int(length), c["correct"] / c["n"]) for length, c in figures["accuracy"][task].items()]
            ax.plot(*zip(*sorted(cells)), style, color=colors[arm], linewidth=width, label=f"{arm} {task}")
    ax.axvline(doc["original_length"], color="grey", linestyle=":", linewidth=1, label=f"L0 = {doc['original_length']}")
    ax.set(xlabel="context length (tokens)", ylabel="accuracy (correct / asked)", ylim=(-0.05, 1.05))
    ax.set_title("retrieval", fontsize=9)
    ax.legend(fontsize=7, loc="lower left", ncol=2)
    spans = (f"< {doc['original_length']}", f">= {doc['original_length']}")
    for i, (arm, figures) in enumerate(doc["arms"].items()):
        values = [figures["loss"]["within"], figures["loss"]["beyond"] or 0]
        loss_ax.bar([x + 0.4 * i for x in (0, 1)], values, 0.4, color=colors[arm], label=arm)
    loss_ax.set_xticks([0.2, 1.2], [f"positions {s}" for s in spans], fontsize=7)
    loss_ax.set(ylabel="mean NLL per token")
    loss_ax.set_title("loss on a long document", fontsize=9)
    loss_ax.legend(fontsize=7)
    fig.suptitle("Gemma 3 270M: base vs repeated RoPE table", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original-length", type=int, default=2048, help="L0: rows past it repeat from row 0")
    parser.add_argument("--lengths", default="1024,2048,3072,4096,6144", help="comma-separated probe lengths")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from the result file, no engine")
    parser.add_argument("--out", type=Path, default=RESULTS / "rope_tiling.json")
    args = parser.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",")]
    if args.plot_only:
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return 0
    if TILE_ENV in os.environ:
        raise SystemExit(f"unset {TILE_ENV}: this script sets it for the tiled arm only")
    TIERS.setdefault(TIER.name, TIER)  # run_probe takes its tier by name
    base_dir = embedded.prepare()
    models = {"base": base_dir, "tiled": build_variant(base_dir, args.original_length)}
    settings = {"original_length": args.original_length, "lengths": args.lengths, "seed": args.seed}
    doc = json.loads(args.out.read_text()) if args.out.exists() else {}
    if {k: doc.get(k) for k in settings} != settings:
        doc = {}  # other settings: the arms of an earlier run are not comparable
    doc = {
        **settings,
        "model": "Gemma 3 270M (embedded, bf16), base only: no adapter",
        "probe": f"lcserve probe: {len(TIER.passkey_depths)} passkey and {len(TIER.needle_depths)} needle depths "
        f"per length, loss over {TIER.loss_tokens} tokens, no repetition; lengths {args.lengths}",
        "conditions": run_conditions(" ".join(["python -m benchmarks.bench_rope_tiling", *sys.argv[1:]])),
        "arms": doc.get("arms", {}),
    }
    work = Path(tempfile.mkdtemp(prefix="bench-rope-tiling-"))
    for arm in args.arms:
        doc["arms"][arm] = probe_arm(arm, models[arm], args, work)
        doc["arms"] = {a: doc["arms"][a] for a in ARMS if a in doc["arms"]}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(rope_tiling_table(doc))
    print(rope_loss_table(doc))
    if set(doc["arms"]) == set(ARMS):
        plot(doc, args.out.with_suffix(".png"))
    print(f"results: {args.out}; logs and probe files: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
