"""PNG figures of a summary: depth x length heatmaps, loss by position, repetition by window."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _grid(entry: dict, task: str) -> tuple[list[int], list[float], np.ndarray]:
    grid = entry["tasks"][task]["grid"]
    lengths = sorted(int(k) for k in grid)
    depths = sorted({float(d) for row in grid.values() for d in row})
    values = np.full((len(depths), len(lengths)), np.nan)
    for j, length in enumerate(lengths):
        for d, acc in grid[str(length)].items():
            if acc is not None:
                values[depths.index(float(d)), j] = acc
    return lengths, depths, values


def _heatmap(ax, lengths, depths, values, title, cmap, vmin, vmax, first=False):
    image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", origin="upper")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45)
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    if first:
        ax.set_ylabel("needle depth")
    ax.set_title(title)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if not np.isnan(values[i, j]):
                dark = image.norm(values[i, j]) < 0.5 if cmap == "viridis" else abs(values[i, j]) > 0.5
                ax.text(
                    j,
                    i,
                    f"{values[i, j]:.1f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if dark else "black",
                )
    return image


def heatmaps(summary: dict, task: str, path: Path) -> Path | None:
    """One panel per model (accuracy) and one per adapter (adapter - base)."""
    models = [m for m, e in summary["models"].items() if task in e["tasks"]]
    if not models:
        return None
    base = next(m for m, e in summary["models"].items() if e["role"] == "base")
    adapters = [m for m in models if m != base and base in models]
    fig, axes = plt.subplots(
        1, len(models) + len(adapters), figsize=(4.5 * (len(models) + len(adapters)), 4), squeeze=False
    )
    panels = iter(axes[0])
    for i, model in enumerate(models):
        lengths, depths, values = _grid(summary["models"][model], task)
        image = _heatmap(next(panels), lengths, depths, values, f"{task}: {model}", "viridis", 0, 1, first=i == 0)
    fig.colorbar(image, ax=axes[0][: len(models)].tolist(), label="accuracy")
    for adapter in adapters:
        lengths, depths, values = _grid(summary["models"][adapter], task)
        base_values = _grid(summary["models"][base], task)[2]  # same plan, same cells
        ax = next(panels)
        image = _heatmap(ax, lengths, depths, values - base_values, f"{task}: {adapter} - {base}", "RdBu", -1, 1)
        fig.colorbar(image, ax=ax, label="accuracy difference")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def loss_by_position(summary: dict, path: Path) -> Path | None:
    models = {m: e for m, e in summary["models"].items() if "loss" in e}
    if not models:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for model, entry in models.items():
        edges, nll = entry["loss"]["edges"], entry["loss"]["nll"]
        points = [((lo + hi) / 2, v) for lo, hi, v in zip(edges, edges[1:], nll) if v is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=model)
    for model, entry in models.items():
        if entry["role"] == "adapter":
            ax.axvline(entry["training_length"], linestyle="--", color="grey")
            ax.annotate(
                f"{model} trained at {entry['training_length']}",
                (entry["training_length"], 0.98),
                xycoords=("data", "axes fraction"),
                rotation=90,
                va="top",
                ha="right",
                fontsize=8,
            )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("token position (bucket middle)")
    ax.set_ylabel("mean NLL (nats/token)")
    ax.set_title("loss by position on the shipped document")
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def repetition(summary: dict, path: Path) -> Path | None:
    models = {m: e for m, e in summary["models"].items() if "repetition" in e}
    if not models:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for model, entry in models.items():
        rep = entry["repetition"]
        starts = [rep["prompt_tokens"] + i * rep["window"] for i in range(len(rep["rep2"]))]
        for ax, key in zip(axes, ("rep2", "rep4")):
            ax.plot(starts, rep[key], marker="o", label=model)
    for ax, key in zip(axes, ("rep-2", "rep-4")):
        for entry in models.values():
            if entry["role"] == "adapter":
                ax.axvline(entry["training_length"], linestyle="--", color="grey")
        ax.set_ylim(0, 1)
        ax.set_xlabel("window start (context position)")
        ax.set_title(f"{key} per {next(iter(models.values()))['repetition']['window']}-token window")
        ax.legend()
    axes[0].set_ylabel("1 - unique/total n-grams")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def style(summary: dict, path: Path) -> Path | None:
    """Style at length: markers per answer by context length, one line per model; each writer's paired
    95% interval against the base as a band around its line."""
    models = {m: e["style"] for m, e in summary["models"].items() if "style" in e}
    if not models:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for model, by_length in models.items():
        lengths = sorted(int(k) for k in by_length)
        values = [by_length[str(n)]["markers_per_answer"] for n in lengths]
        (line,) = ax.plot(lengths, values, marker="o", label=model)
        comp = summary["comparisons"].get(model, {}).get("style")
        base = summary["models"][next(m for m, e in summary["models"].items() if e["role"] == "base")].get("style", {})
        if comp and base:
            lo = [base[str(n)]["markers_per_answer"] + comp[str(n)]["lo"] for n in lengths]
            hi = [base[str(n)]["markers_per_answer"] + comp[str(n)]["hi"] for n in lengths]
            ax.fill_between(lengths, lo, hi, alpha=0.2, color=line.get_color(), label=f"{model}: base + 95% interval")
    ax.set_xscale("log", base=2)
    lengths = sorted({int(k) for by_length in models.values() for k in by_length})
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xlabel("context length (neutral preamble + question + answer, tokens)")
    ax.set_ylabel("style markers per answer")
    ax.set_title("style at length: does the writer keep its voice?")
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def write_all(summary: dict, out_dir: Path) -> list[Path]:
    made = [
        style(summary, out_dir / "style_by_length.png"),
        heatmaps(summary, "needle", out_dir / "heatmap_needle.png"),
        heatmaps(summary, "passkey", out_dir / "heatmap_passkey.png"),
        loss_by_position(summary, out_dir / "loss_by_position.png"),
        repetition(summary, out_dir / "repetition.png"),
    ]
    return [p for p in made if p]
