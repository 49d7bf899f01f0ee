"""`lcserve probe`: the long-context probes (or, for an embedding model, the retrieval probe) against a
running server, beside the probes themselves."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import click
from rich.console import Console

from lcserve.errors import ProbeError
from lcserve.options import gateway_api_key, option
from lcserve.output import emit, json_option

from .plan import TIERS, parse_lengths
from .report import rich_tables
from .retrieval import markdown as retrieval_markdown
from .retrieval import run_retrieval_probe, served_embedding_model
from .runner import DEFAULT_BASE, DEFAULT_REFERENCE, ProbeConfig, run_probe
from .style import load_markers


@click.command("probe")
@click.option(
    "--url",
    default="http://127.0.0.1:8000",
    show_default=True,
    help="OpenAI-compatible vLLM endpoint (vLLM itself or the lcserve gateway).",
)
@click.option("--base", default=DEFAULT_BASE, show_default=True, help="Served name of the base model.")
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    help="Served name of an adapter (repeatable). Default: every adapter the server mounts on the base.",
)
@click.option("--base-only", is_flag=True, help="Probe the base alone, even if adapters are mounted.")
@click.option(
    "--lengths",
    help="Context lengths to probe, e.g. 128,1k,8k. Default: the adapter's training length x 0.5, 1, 2, 4, ... up to max_model_len (the quick tier stops at 8x the training length).",
)
@click.option(
    "--tier",
    type=click.Choice(list(TIERS)),
    default="quick",
    show_default=True,
    help="quick: lengths up to 8x the training length, 12 paired passkey prompts and 3 needle depths x 4 prompts per length, loss over up to 4k tokens, a 512-token continuation, style at length (writers: 6 prompts, 1k to 16k tokens), a 9.5-minute budget that never drops a prompt. full: up to max_model_len, 12 passkey prompts and 5 needle depths x 4 per length, loss over up to 32k tokens, a 4k-token continuation, style on 24 prompts, no budget.",
)
@click.option(
    "--budget-minutes",
    type=float,
    help="Time budget of the whole run: the plan is trimmed to fit (shorter continuation and loss document, then the longest style length, fewer depths, the top lengths) and says what it dropped. Default: the quick tier's 9.5 minutes, which only shortens the continuation and loss; none for full.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    help="Folder for records.jsonl, summary.json, report.md and PNG plots. Default: ./probe-<time>.",
)
@option(
    "--training-len",
    "--training-length",
    "training_length",
    type=click.IntRange(min=1),
    help=f"Training length of the adapters, when their folder has no metadata (base only: the ladder reference, default {DEFAULT_REFERENCE}).",
)
@click.option(
    "--threshold",
    type=click.FloatRange(0, 1),
    default=0.8,
    show_default=True,
    help="Accuracy an effective length must reach at every rung.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of needles, keys and the bootstrap.")
@click.option(
    "--no-repetition",
    is_flag=True,
    help="Leave out the long continuation (repetition by window): on a CPU engine the slowest task, and the "
    "only one that decodes more than a few tokens. Retrieval and loss by position still run.",
)
@click.option(
    "--no-style",
    is_flag=True,
    help="Leave out style at length (the writer's style markers after a long neutral preamble, against the base).",
)
@click.option(
    "--style-markers",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A text file of the writer's style phrases, one per line (matched case-insensitively): style at length "
    "scores every adapter with them. Default: the demo writer's own markers, for adapters trained on its corpus.",
)
@click.option(
    "--style-lengths",
    help="Context lengths of style at length (preamble + question + answer), e.g. 1k,4k. Default: 1k, 4k, 8k, 16k, "
    "those above max_model_len left out with a note.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 64),
    help="Requests in flight at once, in plan order. Default: wave by wave: one prompt for the base and every "
    "adapter side by side (their decodes batch; the prefix cache keeps the haystack), and a style length's "
    "questions together once its preamble is cached.",
)
@gateway_api_key
@json_option
def probe(
    url,
    base,
    adapters,
    base_only,
    lengths,
    tier,
    budget_minutes,
    out_dir,
    training_length,
    threshold,
    seed,
    no_repetition,
    no_style,
    style_markers,
    style_lengths,
    concurrency,
    api_key,
    as_json,
):
    """Tell whether short-trained adapters hold at long context, against their base; for an embedding
    model, whether retrieval holds past its training length (recall@1 and MRR per long-input policy).

    Passkey and needle retrieval (RULER-style, with distractors) on a length ladder, a
    no-context control, loss by token position on a long public-domain text (vLLM
    prompt_logprobs) and repetition of a long continuation. Prompts are sized exactly with
    the server's /tokenize; adapters and base answer the same prompts, so differences come
    with a paired bootstrap interval.
    """
    if budget_minutes is not None and budget_minutes <= 0:
        raise ProbeError("--budget-minutes must be positive")
    if base_only and adapters:
        raise ProbeError("--base-only and --adapter exclude each other; pass one of them")
    if style_markers:
        load_markers(style_markers)  # a file that is empty or not text: one line before any request
    out_dir = out_dir or Path(f"probe-{datetime.now():%Y%m%d-%H%M%S}")
    console = Console(stderr=True)
    embedding = served_embedding_model(url, base, api_key)
    if embedding is not None:  # an embedding model: the retrieval probe, by length, depth and policy
        generative = {
            "--adapter": adapters,
            "--base-only": base_only,
            "--lengths": lengths,
            "--budget-minutes": budget_minutes is not None,
            "--no-repetition": no_repetition,
            "--no-style": no_style,
            "--style-markers": style_markers,
            "--style-lengths": style_lengths,
            "--concurrency": concurrency,
        }
        refuse_generation_options(embedding["id"], url, [name for name, given in generative.items() if given])
        summary = run_retrieval_probe(
            url, embedding, tier, out_dir, training_length, threshold, seed, console.print, api_key
        )
        emit(summary, as_json, lambda: Console().print(retrieval_markdown(summary), highlight=False))
        return
    summary = run_probe(
        ProbeConfig(
            url=url,
            base=base,
            adapters=() if base_only else (tuple(adapters) or None),
            tier=tier,
            lengths=parse_lengths(lengths) if lengths else None,
            budget_minutes=budget_minutes,
            out_dir=out_dir,
            training_length=training_length,
            threshold=threshold,
            seed=seed,
            concurrency=concurrency,
            repetition=not no_repetition,
            style=not no_style,
            style_markers=style_markers,
            style_lengths=parse_lengths(style_lengths, "--style-lengths") if style_lengths else None,
            console=console,
            api_key=api_key,
        )
    )
    emit(summary, as_json, lambda: print_probe_summary(summary, base, out_dir))


def refuse_generation_options(model: str, url: str, given: list[str]) -> None:
    """One line for options of the generative probes (passkey, needle, loss, repetition, style) given
    against an embedding model, which gets the retrieval probe."""
    if given:
        raise ProbeError(
            f"'{model}' at {url} is an embedding model, which gets the retrieval probe: {', '.join(given)} "
            f"{'applies' if len(given) == 1 else 'apply'} to the generative probes only; drop "
            f"{'it' if len(given) == 1 else 'them'}"
        )


def print_probe_summary(summary: dict, base: str, out_dir: Path) -> None:
    """The summary as tables and verdicts on stdout (--json prints the summary itself)."""
    out = Console()
    for table in rich_tables(summary):
        out.print(table)
    for name, comp in summary["comparisons"].items():
        out.print(f"[bold]{name} vs {base}[/bold]")
        for line in comp["verdict"]:
            out.print(f"  - {line}", highlight=False)
    if summary["dropped"]:
        out.print(f"left out: {'; '.join(summary['dropped'])}", highlight=False)
    out.print(
        f"{summary['requests']} requests (planned {summary['planned_requests']}) in {summary['wall_s']:.0f} s; "
        f"files in {out_dir}/",
        highlight=False,
    )
