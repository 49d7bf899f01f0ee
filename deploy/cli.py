"""`lcserve deploy ...`."""

import click


@click.group()
def deploy() -> None:
    """Hardware profiles and the capacity planner."""
