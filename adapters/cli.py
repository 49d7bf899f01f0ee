"""`lcserve adapters ...`: each command reads its arguments, makes one library call and prints the result."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import click
from rich.console import Console
from rich.progress import DownloadColumn
from rich.table import Table

from lcserve.options import gateway_api_key
from lcserve.output import emit, json_option
from lcserve.progress import progress_bar

from .inspection import AdapterReport, Verdict, inspect_adapter
from .merge import OUT_DTYPES, merge_adapter
from .mount import mount_args, parse_adapter_spec
from .reader import read_adapter
from .runtime import load_adapter, unload_lora_adapter
from .scale import write_scaled_adapter
from .verify import VerifyResult, verify_merge

DIR = click.Path(exists=False, file_okay=False, path_type=Path)
allow_pickle_option = click.option(
    "--allow-pickle", is_flag=True, help="Read adapter_model.bin (pickle) when there is no safetensors file."
)
url_option = click.option(
    "--url", default="http://127.0.0.1:8000", show_default=True, help="The running `lcserve serve` (its gateway)."
)


scale_option = click.option(
    "--scale",
    type=float,
    default=1.0,
    show_default=True,
    help="Multiply the adapter's LoRA scale (lora_alpha) by this, in (0, 1]: the adapter at reduced strength.",
)


def _console() -> Console:
    return Console(stderr=True)


@click.group()
def adapters() -> None:
    """Inspect, merge, verify and mount LoRA adapters; load and unload them in a running server."""


@adapters.command()
@click.argument("adapter", type=DIR)
@click.option(
    "--base", "base_dir", type=DIR, help="Base model folder: check every tensor shape and the vocabulary against it."
)
@allow_pickle_option
@json_option
def inspect(adapter: Path, base_dir: Path | None, allow_pickle: bool, as_json: bool) -> None:
    """Report an adapter's LoRA settings and whether vLLM can mount it or it must be merged.

    Reads adapter_config.json and the adapter's tensors (values too: NaN or inf make it unusable;
    no pickle unless allowed), and only the headers of the base. Exit code 0 for `mount` or
    `merge`, 1 when the adapter cannot be served (on that base).
    """
    report = inspect_adapter(read_adapter(adapter), base_dir, allow_pickle=allow_pickle)
    emit(report.to_json(), as_json, lambda: _print_report(report))
    if report.verdict == Verdict.UNUSABLE:
        raise SystemExit(1)


def _print_report(report: AdapterReport) -> None:
    a = report.adapter
    targets = a.target_modules if isinstance(a.target_modules, str) else ", ".join(sorted(a.target_modules or ()))
    console = Console()
    table = Table(title=f"adapter {a.path}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = [
        ("weights", report.weights_file),
        ("rank / alpha", f"{a.r} / {a.lora_alpha}" + (" (rsLoRA: alpha/sqrt(r))" if a.use_rslora else "")),
        ("max rank", str(report.max_rank)),
        ("LoRA modules", f"{report.lora_modules} ({targets or '-'})"),
        ("DoRA", str(a.use_dora)),
        ("modules_to_save", ", ".join(a.modules_to_save) or "-"),
        ("bias / lora_bias", f"{a.bias} / {a.lora_bias}"),
        ("rank_pattern", json.dumps(a.rank_pattern) if a.rank_pattern else "-"),
        ("alpha_pattern", json.dumps(a.alpha_pattern) if a.alpha_pattern else "-"),
        ("fan_in_fan_out", str(a.fan_in_fan_out)),
        ("embedding LoRA", str(report.embedding_lora)),
        ("trainable tokens", ", ".join(f"{n} rows of {m}" for m, n in sorted(report.trainable_tokens.items())) or "-"),
        ("base it names", a.base_model_name_or_path or "-"),
        (
            "training length",
            f"{a.training_seq_len} tokens ({a.training_seq_len_source})" if a.training_seq_len else "not recorded",
        ),
    ]
    if report.base_dir:
        rows += [
            ("checked against", f"{report.base_dir} ({report.base_architecture})"),
            (
                "vocabulary",
                f"base {report.base_vocab_size}"
                + (f", adapter {report.adapter_vocab_size}" if report.adapter_vocab_size else ""),
            ),
            ("shapes", "all fit" if not report.fit_problems else f"{len(report.fit_problems)} problem(s)"),
        ]
    rows.append(("rules", report.vllm))
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    style = {Verdict.MOUNT: "green", Verdict.MERGE: "yellow"}.get(report.verdict, "red")
    line = f"verdict: [{style} bold]{report.verdict}[/]"
    if report.verdict == Verdict.MOUNT and report.max_lora_rank:
        line += f"  (vLLM: --enable-lora --max-lora-rank {report.max_lora_rank})"
    console.print(line)
    for reason in report.reasons:
        console.print(f"  - {reason}")
    for note in report.notes:
        console.print(f"  [dim]note: {note}[/]")


@adapters.command()
@click.argument("adapter", type=DIR)
@click.option("--base", "base_dir", type=DIR, required=True, help="Base model folder (safetensors).")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    required=True,
    help="New folder for the merged model (written atomically).",
)
@click.option(
    "--dtype",
    type=click.Choice(list(OUT_DTYPES)),
    default=None,
    help="Dtype of the merged weights (default: as stored in the base).",
)
@click.option("--force", is_flag=True, help="Replace --out when an earlier lcserve run wrote it (never other folders).")
@scale_option
@allow_pickle_option
@json_option
def merge(
    adapter: Path,
    base_dir: Path,
    out_dir: Path,
    dtype: str | None,
    force: bool,
    scale: float,
    allow_pickle: bool,
    as_json: bool,
) -> None:
    """Merge ADAPTER into the base, tensor by tensor (peak memory: the adapter plus one tensor).

    Handles LoRA, rsLoRA, rank/alpha patterns, DoRA, modules_to_save, biases, fan_in_fan_out and
    trainable tokens (trainable_token_indices).
    Keeps the base's config (long-context fields checked), tokenizer and generation config and
    writes lcserve_merge.json (base and adapter hashes, the adapter's training length, the scale;
    `adapters verify` compares at that scale).
    """
    console = _console()
    with progress_bar(console, DownloadColumn()) as progress:
        result = merge_adapter(
            read_adapter(adapter),
            base_dir,
            out_dir,
            dtype=dtype,
            force=force,
            progress=progress,
            allow_pickle=allow_pickle,
            scale=scale,
        )
    emit(
        {"out_dir": str(result.out_dir), "seconds": result.seconds, **result.provenance},
        as_json,
        lambda: console.print(
            f"merged {result.merged_modules} LoRA modules, replaced {result.replaced_tensors} "
            f"tensors in {result.seconds:.1f} s -> {result.out_dir}"
        ),
    )


@adapters.command()
@click.argument("merged", type=DIR)
@click.option("--adapter", "adapter_dir", type=DIR, required=True, help="The adapter that was merged.")
@click.option("--base", "base_dir", type=DIR, required=True, help="The base it was merged into.")
@click.option(
    "--tolerance",
    type=float,
    default=None,
    help="Largest accepted |logit difference| (default: 1.5x what an exact merge rounded to the merged "
    "dtype shows on the same prompts, at least 1e-3).",
)
@click.option(
    "--long-tokens",
    type=int,
    default=None,
    help="Length of the long prompt (default: twice the adapter's training length, at least 600).",
)
@allow_pickle_option
@json_option
def verify(
    merged: Path,
    adapter_dir: Path,
    base_dir: Path,
    tolerance: float | None,
    long_tokens: int | None,
    allow_pickle: bool,
    as_json: bool,
) -> None:
    """Check that MERGED computes what base + adapter computes in PEFT (fp32 logits).

    Exit code 0 when the largest logit difference is within the tolerance and top-1 tokens
    agree; 1 otherwise.
    """
    with progress_bar(_console()) as progress:
        result = verify_merge(
            merged,
            read_adapter(adapter_dir),
            base_dir,
            tolerance=tolerance,
            long_tokens=long_tokens,
            progress=progress,
            allow_pickle=allow_pickle,
        )
    emit(result.to_json(), as_json, lambda: _print_verify(result, merged))
    if not result.passed:
        raise SystemExit(1)


def _print_verify(result: VerifyResult, merged: Path) -> None:
    cosine = result.compared != "logits"  # an embedding model: 1 - cosine of the vectors, not logit differences
    table = Table(title=f"{merged} vs PEFT(base + adapter), fp32 {'embeddings' if cosine else 'logits'}")
    diff, agree = ("1 - cosine", "lowest cosine") if cosine else ("|diff|", "top-1 agree")
    for col in ("prompt", "tokens", "compared", f"max {diff}", f"mean {diff}", agree, "adapter effect"):
        table.add_column(col, justify="left" if col == "prompt" else "right")
    for p in result.prompts:
        table.add_row(
            p.name,
            str(p.tokens),
            str(p.positions),
            f"{p.max_abs_diff:.4g}",
            f"{p.mean_abs_diff:.3g}",
            f"{p.top1_agreement:.1%}",
            f"{p.adapter_effect:.3g}",
        )
    Console().print(table)
    trained = f"{result.training_seq_len} tokens" if result.training_seq_len else "not recorded"
    floor = (
        f" (an exact merge rounded to it differs by up to {result.rounding_floor:.3g})" if result.rounding_floor else ""
    )
    Console().print(
        f"merged dtype {result.merged_dtype}{floor}; adapter trained at {trained}; longest prompt "
        f"{result.long_prompt_tokens} tokens"
    )
    verdict = "[green bold]PASS[/]" if result.passed else "[red bold]FAIL[/]"
    Console().print(
        f"{verdict}: max {diff} {result.max_abs_diff:.4g} (tolerance {result.tolerance:g}), "
        f"{agree} {result.top1_agreement:.1%} (minimum {result.min_top1_agreement:.0%})"
    )
    if result.adapter_effect <= result.tolerance:
        Console().print(
            f"[yellow]note: the adapter changes {'embeddings' if cosine else 'logits'} by less than the tolerance; this check cannot "
            "tell the merged model from the base[/]"
        )


@adapters.command()
@click.argument("adapter", type=DIR)
@scale_option
@click.option(
    "--out", "out_dir", type=click.Path(path_type=Path), required=True, help="New folder for the scaled copy."
)
@click.option("--force", is_flag=True, help="Replace --out when an earlier lcserve run wrote it (never other folders).")
@json_option
def scale(adapter: Path, scale: float, out_dir: Path, force: bool, as_json: bool) -> None:
    """Copy ADAPTER with its LoRA scale multiplied by --scale: mount the copy (`serve --adapter`,
    `adapters load`) to serve the adapter at reduced strength; `adapters merge --scale` merges it so.

    Only lora_alpha changes (and alpha_pattern), so each layer's delta is exactly scale x the
    trained one. docs/findings.md measures what it does to long-context retrieval and style.
    """
    out = write_scaled_adapter(adapter, out_dir, scale, force=force)
    emit({"out_dir": str(out), "scale": scale}, as_json, lambda: click.echo(f"scaled x{scale:g} -> {out}"))


@adapters.command("mount-args")
@click.argument("specs", nargs=-1, required=True, metavar="NAME=DIR...")
@click.option("--base-name", required=True, help="The served name of the base model (vLLM --served-model-name).")
@json_option
def mount_args_command(specs: tuple[str, ...], base_name: str, as_json: bool) -> None:
    """Print the vLLM arguments that mount these adapters (--enable-lora ... --lora-modules ...), for a
    vLLM you start yourself."""
    args = mount_args([parse_adapter_spec(s) for s in specs], base_name)
    emit(args, as_json, lambda: click.echo(shlex.join(args)))


@adapters.command()
@click.argument("name")
@click.argument("adapter", metavar="DIR")
@url_option
@gateway_api_key
@json_option
def load(name: str, adapter: str, url: str, api_key: str | None, as_json: bool) -> None:
    """Load the adapter in DIR into a running `lcserve serve`, served as NAME.

    The server reads DIR: give its path on the server's machine. When DIR is on this machine
    too, it is inspected first, and only an adapter vLLM can mount as it is gets sent. The
    gateway exposes loading only behind its API key.
    """
    loaded = load_adapter(url, name, adapter, api_key)
    checked = "" if loaded.verdict else "; not on this machine, so only the server checked it"
    emit(loaded.to_json(), as_json, lambda: click.echo(f"{loaded.message} ({loaded.path}{checked})"))


@adapters.command()
@click.argument("name")
@url_option
@gateway_api_key
@json_option
def unload(name: str, url: str, api_key: str | None, as_json: bool) -> None:
    """Unload the adapter served as NAME from a running `lcserve serve` (behind its API key)."""
    message = unload_lora_adapter(url, name, api_key)
    emit({"name": name, "message": message}, as_json, lambda: click.echo(message))
