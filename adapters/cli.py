"""`lcserve adapters ...` and `lcserve embedded train-adapter`."""

import click


@click.group()
def adapters() -> None:
    """Inspect, merge, verify and mount LoRA adapters."""


@click.command()
def train_adapter_command() -> None:
    """Train the demo LoRA adapter on the embedded model at a short sequence length."""
    raise click.ClickException("not built yet")
