"""`lcserve adapters ...` and `lcserve embedded train-adapter`."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.progress import DownloadColumn, TextColumn
from rich.table import Table

from lcserve.progress import progress_bar

DIR = click.Path(exists=False, file_okay=False, path_type=Path)


def _console() -> Console:
    return Console(stderr=True)


def _progress(console: Console, *columns):
    return progress_bar(console, *columns)


@click.group()
def adapters() -> None:
    """Inspect, merge, verify and mount LoRA adapters."""


@adapters.command()
@click.argument("adapter", type=DIR)
@click.option("--base", "base_dir", type=DIR, help="Base model folder: check every tensor shape and the vocabulary against it.")
@click.option("--allow-pickle", is_flag=True, help="Read adapter_model.bin (pickle) when there is no safetensors file.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def inspect(adapter: Path, base_dir: Path | None, allow_pickle: bool, as_json: bool) -> None:
    """Report an adapter's LoRA settings and whether vLLM can mount it or it must be merged.

    Reads adapter_config.json and the safetensors header only (no weights, no pickle).
    Exit code 0 for `mount` or `merge`, 1 when the adapter cannot be served on that base.
    """
    from .inspection import UNUSABLE, inspect_adapter

    report = inspect_adapter(adapter, base_dir, allow_pickle=allow_pickle)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        _print_report(report)
    if report.verdict == UNUSABLE:
        raise SystemExit(1)


def _print_report(report) -> None:
    console = Console()
    table = Table(title=f"adapter {report.adapter_dir}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = [
        ("weights", report.weights_file),
        ("rank / alpha", f"{report.rank} / {report.alpha}" + (" (rsLoRA: alpha/sqrt(r))" if report.use_rslora else "")),
        ("max rank", str(report.max_rank)),
        ("LoRA modules", f"{report.lora_modules} ({report.target_modules if isinstance(report.target_modules, str) else ', '.join(report.target_modules)})"),
        ("DoRA", str(report.use_dora)),
        ("modules_to_save", ", ".join(report.modules_to_save) or "-"),
        ("bias / lora_bias", f"{report.bias} / {report.lora_bias}"),
        ("rank_pattern", json.dumps(report.rank_pattern) if report.rank_pattern else "-"),
        ("alpha_pattern", json.dumps(report.alpha_pattern) if report.alpha_pattern else "-"),
        ("fan_in_fan_out", str(report.fan_in_fan_out)),
        ("embedding LoRA", str(report.embedding_lora)),
        ("base it names", report.base_model_name or "-"),
        ("training length", f"{report.training_seq_len} tokens ({report.training_seq_len_source})"
         if report.training_seq_len else "not recorded"),
    ]
    if report.base_dir:
        rows += [("checked against", f"{report.base_dir} ({report.base_architecture})"),
                 ("vocabulary", f"base {report.base_vocab_size}" + (f", adapter {report.adapter_vocab_size}"
                                                                    if report.adapter_vocab_size else "")),
                 ("shapes", "all fit" if not report.fit_problems else f"{len(report.fit_problems)} problem(s)")]
    rows.append(("rules", report.vllm))
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    style = {"mount": "green", "merge": "yellow"}.get(report.verdict, "red")
    line = f"verdict: [{style} bold]{report.verdict}[/]"
    if report.verdict == "mount" and report.max_lora_rank:
        line += f"  (vLLM: --enable-lora --max-lora-rank {report.max_lora_rank})"
    console.print(line)
    for reason in report.reasons:
        console.print(f"  - {reason}")
    for note in report.notes:
        console.print(f"  [dim]note: {note}[/]")


@adapters.command()
@click.argument("adapter", type=DIR)
@click.option("--base", "base_dir", type=DIR, required=True, help="Base model folder (safetensors).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="New folder for the merged model (written atomically).")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default=None,
              help="Dtype of the merged weights (default: as stored in the base).")
@click.option("--force", is_flag=True, help="Replace --out when it is not empty.")
@click.option("--allow-pickle", is_flag=True, help="Read adapter_model.bin (pickle) when there is no safetensors file.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def merge(adapter: Path, base_dir: Path, out_dir: Path, dtype: str | None, force: bool, allow_pickle: bool,
          as_json: bool) -> None:
    """Merge ADAPTER into the base, tensor by tensor (peak memory: the adapter plus one tensor).

    Handles LoRA, rsLoRA, rank/alpha patterns, DoRA, modules_to_save, biases and fan_in_fan_out.
    Keeps the base's config (long-context fields checked), tokenizer and generation config and
    writes lcserve_merge.json (base and adapter hashes, the adapter's training length).
    """
    from .merge import merge_adapter

    console = _console()
    with _progress(console, DownloadColumn()) as progress:
        result = merge_adapter(adapter, base_dir, out_dir, dtype=dtype, force=force, progress=progress,
                               allow_pickle=allow_pickle)
    if as_json:
        click.echo(json.dumps({"out_dir": str(result.out_dir), "seconds": result.seconds, **result.provenance}, indent=2))
    else:
        console.print(f"merged {result.merged_modules} LoRA modules, replaced {result.replaced_tensors} tensors "
                      f"in {result.seconds:.1f} s -> {result.out_dir}")


@adapters.command()
@click.argument("merged", type=DIR)
@click.option("--adapter", "adapter_dir", type=DIR, required=True, help="The adapter that was merged.")
@click.option("--base", "base_dir", type=DIR, required=True, help="The base it was merged into.")
@click.option("--tolerance", type=float, default=None,
              help="Largest accepted |logit difference| (default by merged dtype: fp32 1e-3, bf16 1.0, fp16 0.25, "
                   "or 1.5x what an exact merge rounded to that dtype shows, when larger).")
@click.option("--long-tokens", type=int, default=None,
              help="Length of the long prompt (default: twice the adapter's training length, at least 600).")
@click.option("--allow-pickle", is_flag=True, help="Read adapter_model.bin (pickle) when there is no safetensors file.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify(merged: Path, adapter_dir: Path, base_dir: Path, tolerance: float | None, long_tokens: int | None,
           allow_pickle: bool, as_json: bool) -> None:
    """Check that MERGED computes what base + adapter computes in PEFT (fp32 logits).

    Exit code 0 when the largest logit difference is within the tolerance and top-1 tokens
    agree; 1 otherwise.
    """
    from .verify import verify_merge

    console = _console()
    with _progress(console) as progress:
        result = verify_merge(merged, adapter_dir, base_dir, tolerance=tolerance, long_tokens=long_tokens,
                              progress=progress, allow_pickle=allow_pickle)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        table = Table(title=f"{merged} vs PEFT(base + adapter), fp32 logits")
        for col in ("prompt", "tokens", "compared", "max |diff|", "mean |diff|", "top-1 agree", "adapter effect"):
            table.add_column(col, justify="left" if col == "prompt" else "right")
        for p in result.prompts:
            table.add_row(p.name, str(p.tokens), str(p.positions), f"{p.max_abs_diff:.4g}", f"{p.mean_abs_diff:.3g}",
                          f"{p.top1_agreement:.1%}", f"{p.adapter_effect:.3g}")
        Console().print(table)
        trained = f"{result.training_seq_len} tokens" if result.training_seq_len else "not recorded"
        floor = (f" (an exact merge rounded to it differs by up to {result.rounding_floor:.3g})"
                 if result.rounding_floor else "")
        Console().print(f"merged dtype {result.merged_dtype}{floor}; adapter trained at {trained}; longest prompt "
                        f"{result.long_prompt_tokens} tokens")
        verdict = "[green bold]PASS[/]" if result.passed else "[red bold]FAIL[/]"
        Console().print(f"{verdict}: max |diff| {result.max_abs_diff:.4g} (tolerance {result.tolerance:g}), "
                        f"top-1 agreement {result.top1_agreement:.1%} (minimum {result.min_top1_agreement:.0%})")
        if result.adapter_effect <= result.tolerance:
            Console().print("[yellow]note: the adapter changes logits by less than the tolerance; this check cannot "
                            "tell the merged model from the base[/]")
    if not result.passed:
        raise SystemExit(1)


@adapters.command("mount-args")
@click.argument("specs", nargs=-1, required=True, metavar="NAME=DIR...")
@click.option("--base-name", required=True, help="The served name of the base model (vLLM --served-model-name).")
@click.option("--json", "as_json", is_flag=True, help="Print the arguments as a JSON list.")
def mount_args(specs: tuple[str, ...], base_name: str, as_json: bool) -> None:
    """Print the vLLM arguments that mount these adapters (--enable-lora, --lora-modules, ...)."""
    import shlex

    from .mount import parse_adapter_spec, vllm_lora_args

    args = vllm_lora_args([parse_adapter_spec(s) for s in specs], base_name)
    click.echo(json.dumps(args) if as_json else " ".join(shlex.quote(a) for a in args))


@click.command()
@click.option("--force", is_flag=True, help="Train again even when the adapter exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def train_adapter_command(force: bool, as_json: bool) -> None:
    """Train the demo LoRA adapter on the embedded model at a short sequence length (256 tokens).

    PEFT LoRA rank 8 on the shipped lighthouse-keeper corpus, fixed seed, a few minutes on
    2 CPU cores. Idempotent (a second run is instant). Output: $LCSERVE_HOME/adapters/gemma-3-270m-writer,
    with lcserve_adapter.json (training length, corpus hash) beside adapter_config.json.
    """
    from .train import is_trained, train_demo_adapter

    console = _console()
    if is_trained() and not force:
        path = train_demo_adapter()
    else:
        with _progress(console, TextColumn("{task.completed}/{task.total} steps")) as progress:
            path = train_demo_adapter(force=force, progress=progress)
    meta = json.loads((path / "lcserve_adapter.json").read_text())
    if as_json:
        click.echo(json.dumps({"adapter_dir": str(path), **meta}))
    else:
        console.print(f"demo adapter ready: {path} (trained at {meta['training_seq_len']} tokens)")
