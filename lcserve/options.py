"""Command-line options shared by several commands, each defined once, in vLLM's words.

An option is named as vLLM names the setting (`--max-model-len`, `--max-num-seqs`, ...). Names
lcserve used before still parse but are hidden from the help, so old scripts keep working.
"""

from __future__ import annotations

import click

from .vllm_rules import KV_CACHE_DTYPES


class RenamedOption(click.Option):
    """An option whose first name is shown; the others are older names kept for scripts."""

    def get_help_record(self, ctx: click.Context):
        shown, self.opts = self.opts, self.opts[:1]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = shown


def option(*names: str, **kwargs):
    return click.option(*names, cls=RenamedOption, **kwargs)


max_model_len = option(
    "--max-model-len",
    "--context",
    "max_model_len",
    type=click.IntRange(min=1),
    help="Context window in tokens (default: the model's derived maximum, or the largest that fits).",
)
max_num_seqs = option(
    "--max-num-seqs",
    "max_num_seqs",
    type=click.IntRange(min=1),
    help="vLLM's cap on sequences in one batch (default: vLLM's own for the device). A cap, not a "
    "promise: the plan says how many fit at full length and at what length all of them fit.",
)
full_context_requests = option(
    "--full-context-requests",
    "--concurrency",
    "full_context_requests",
    type=click.IntRange(min=1),
    help="Requests of max_model_len the KV cache must hold at once: refused when they cannot fit (default 1; "
    "the CPU build sizes its cache for the profile's default_concurrency).",
)
kv_cache_dtype = option(
    "--kv-cache-dtype",
    "--kv-dtype",
    "kv_cache_dtype",
    type=click.Choice(list(KV_CACHE_DTYPES)),
    default="auto",
    show_default=True,
    help="KV cache dtype; fp8 halves a bf16 cache.",
)
rope_scaling = click.option(
    "--rope-scaling",
    type=click.Choice(["yarn"]),
    help="Allow --max-model-len above the model's maximum by YaRN (passed as --hf-overrides).",
)
profile = click.option(
    "--profile",
    default="auto",
    show_default=True,
    help="Hardware profile (`lcserve deploy profiles`), a YAML file, or auto (NVML, else CPU).",
)
