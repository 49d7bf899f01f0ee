"""The human side of a summary: one table (rich for the terminal, markdown for report.md)."""

from __future__ import annotations

from rich.table import Table

from .verdicts import NOLIMA_KEEP, NOLIMA_SHORT, RULER_THRESHOLD


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _diff(result: dict | None) -> str:
    if not result:
        return "-"
    mark = " !" if result["regression"] else " ?" if result.get("decision") == "undecided" else ""
    return f"{result['mean']:+.2f} [{result['lo']:+.2f},{result['hi']:+.2f}]{mark}"


def style_rows(summary: dict) -> tuple[list[str], list[list[str]]] | None:
    """Style at length per context length: markers per answer (and sign-offs) of each model, and each
    writer's paired difference to the base with its 95% interval; None when the run had no style probe."""
    models = {m: e["style"] for m, e in summary["models"].items() if "style" in e}
    writers = {name: comp["style"] for name, comp in summary["comparisons"].items() if comp.get("style")}
    if not models:
        return None
    header = ["style length", *(f"{m} markers/answer (signed off)" for m in models)]
    header += [f"{w} Δ markers" for w in writers]
    rows = []
    for length in sorted({int(k) for rows in models.values() for k in rows}):
        row = [str(length)]
        for by_length in models.values():
            r = by_length.get(str(length))
            signed = f" ({_pct(r['signed_off'])})" if r and r["signed_off"] is not None else ""
            row.append(f"{r['markers_per_answer']:.2f}{signed}" if r else "-")
        row += [_diff(by_length.get(str(length))) for by_length in writers.values()]
        rows.append(row)
    return header, rows


def accuracy_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    """Per length: accuracy of every model on passkey and needle, then each adapter's needle
    and passkey difference to the base (Δ) with its 95% interval ("!" = significant regression)."""
    models = summary["models"]
    comparisons = summary["comparisons"]
    lengths = sorted(
        {
            int(k)
            for m in models.values()
            for t in ("passkey", "needle")
            for k in m["tasks"].get(t, {}).get("by_length", {})
        }
    )
    header = ["length"]
    for name in models:
        header += [f"{name} passkey", f"{name} needle"]
    for name in comparisons:
        header += [f"{name} Δ needle", f"{name} Δ passkey"]
    rows = []
    for length in lengths:
        key = str(length)
        row = [key]
        for entry in models.values():
            for task in ("passkey", "needle"):
                row.append(_pct(entry["tasks"].get(task, {}).get("by_length", {}).get(key, {}).get("accuracy")))
        for comp in comparisons.values():
            for task in ("needle", "passkey"):
                row.append(_diff(comp["retrieval"].get(task, {}).get("by_length", {}).get(key)))
        rows.append(row)
    return header, rows


def model_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    """One row per measure, one column per model."""
    models = summary["models"]
    header = ["measure", *models]
    measures = {
        "trained at": lambda e: str(e["training_length"]) if e["role"] == "adapter" else "(base)",
        "effective length, needle": lambda e: str(e["tasks"].get("needle", {}).get("effective_length") or "none"),
        "effective length, passkey": lambda e: str(e["tasks"].get("passkey", {}).get("effective_length") or "none"),
        **{
            f"{task} effective length, {name}": (
                lambda e, task=task, key=key: str(e["tasks"].get(task, {}).get(key) or "none")
            )
            for task in ("needle", "passkey")
            for name, key in (("RULER", "effective_length_ruler"), ("NoLiMa", "effective_length_nolima"))
        },
        "no-context control": lambda e: _pct(e["tasks"].get("control", {}).get("accuracy")),
        "empty answers": lambda e: str(
            sum(r["empty"] for t in ("passkey", "needle") for r in e["tasks"].get(t, {}).get("by_length", {}).values())
        ),
        "distractor answers": lambda e: str(
            sum(r["distractor"] for r in e["tasks"].get("needle", {}).get("by_length", {}).values())
        ),
        "NLL before T (nats/token)": lambda e: _num(e.get("loss", {}).get("within"), 3),
        "NLL from T on": lambda e: _num(e.get("loss", {}).get("beyond"), 3),
        "rep-2 (mean of windows)": lambda e: _num(e.get("repetition", {}).get("mean_rep2"), 2),
        "rep-4 (mean of windows)": lambda e: _num(e.get("repetition", {}).get("mean_rep4"), 2),
    }
    rows = [[name, *(fn(entry) for entry in models.values())] for name, fn in measures.items()]
    rates = summary.get("rates", {})
    if rates:
        # what one prompt token costs the engine: a mounted LoRA on a CPU build costs several times the base
        rows.append(
            [
                "prefill ms/token (calibrated)",
                *(_num(1000 * rates[m]["prefill"], 2) if m in rates else "-" for m in models),
            ]
        )
        rows.append(
            [
                "decode ms/token (calibrated)",
                *(_num(1000 * rates[m]["decode"], 1) if m in rates else "-" for m in models),
            ]
        )
    return header, rows


def _num(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def rich_tables(summary: dict) -> list[Table]:
    tables = []
    named = [("accuracy by length", accuracy_rows(summary)), ("per model", model_rows(summary))]
    named += [("style at length", style_rows(summary))] if style_rows(summary) else []
    for title, (header, rows) in named:
        table = Table(title=title)
        for i, column in enumerate(header):
            table.add_column(column, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        tables.append(table)
    return tables


def markdown(summary: dict) -> str:
    parts = [
        f"# lcserve probe: {summary['url']}",
        "",
        f"tier {summary['tier']}, threshold {summary['threshold']:.0%}, wall time {summary['wall_s']:.0f} s",
        "",
    ]
    tables = [accuracy_rows(summary), model_rows(summary), style_rows(summary)]
    for header, rows in filter(None, tables):
        parts.append("| " + " | ".join(header) + " |")
        parts.append("|" + "---|" * len(header))
        parts += ["| " + " | ".join(row) + " |" for row in rows]
        parts.append("")
    parts += [
        f"Effective length: lcserve's, the longest length up to which every rung scores at least "
        f"{summary['threshold']:.0%}; RULER's, the longest length scoring above {RULER_THRESHOLD:.1%} "
        f"(Llama-2-7B at 4K); NoLiMa's, the longest length keeping {NOLIMA_KEEP:.0%} of the model's own best "
        f"score at {NOLIMA_SHORT:,} tokens or fewer.",
        "",
        "Intervals are 95%: Wilson's for an accuracy, a paired bootstrap for a difference to the base; "
        "'?' marks a difference whose interval crosses 0 (undecided: more prompts would decide it), "
        "'!' a significant regression.",
        "",
    ]
    if summary.get("style_markers"):
        parts += [
            "Style at length: held-out prompts of the writer's corpus after a neutral preamble (the shipped novel, "
            f"an earlier chat turn), greedy, scored with {summary['style_markers']}; Δ markers is writer - base "
            "on the same prompts.",
            "",
        ]
    if "planned_requests" in summary:
        parts += [f"{summary['requests']} requests of {summary['planned_requests']} planned.", ""]
    if summary["dropped"]:
        parts += ["Left out (max_model_len, no markers, or the budget): " + "; ".join(summary["dropped"]), ""]
    for name, comp in summary["comparisons"].items():
        parts.append(f"## {name} vs base")
        parts += [f"- {line}" for line in comp["verdict"]]
        parts.append("")
    return "\n".join(parts)
