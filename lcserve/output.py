"""One way to print a command's result: JSON for machines (`--json`), or a human rendering.

Every command that a script might read takes `@json_option` and ends with `emit(...)`, so the
JSON form is the same everywhere (indented, paths as strings) and stdout carries nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import click

json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")


def emit(data, as_json: bool, human: Callable[[], None] | None = None) -> None:
    """Print `data` as JSON when `as_json`, else call `human()` (or print the JSON when there is none)."""
    if as_json or human is None:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        human()
