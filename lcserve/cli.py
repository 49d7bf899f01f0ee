"""The `lcserve` command: composes the groups' commands, loading each only when it runs.

Each group owns its commands (`adapters/cli.py`, `deploy/cli.py`, `serving/cli.py`,
`serving/gateway_cli.py`, `serving/probes/cli.py`; the embedded default's in
`lcserve/embedded_cli.py`). The root names them in one table and imports a command's module only
when that command is asked for, so `lcserve --help` starts without vLLM, torch, aiohttp or
matplotlib.
"""

from __future__ import annotations

import importlib

import click

from . import __version__
from .errors import LcserveError

# name -> (module, attribute, one line for the root's help)
COMMANDS = {
    "embedded": ("lcserve.embedded_cli", "embedded", "the embedded default: Gemma 3 270M and the demo adapter"),
    "serve": ("lcserve.serving.cli", "serve", "plan, launch and supervise vLLM behind the gateway (the main job)"),
    "adapters": ("lcserve.adapters.cli", "adapters", "inspect, merge, verify, mount, load and unload LoRA adapters"),
    "deploy": ("lcserve.deploy.cli", "deploy", "hardware profiles and the capacity planner, with reasons"),
    "probe": ("lcserve.serving.probes.cli", "probe", "long-context probes, base vs adapter"),
    "gateway": ("lcserve.serving.gateway_cli", "gateway", "the gateway alone, in front of a vLLM started elsewhere"),
}


class UserFacingError(click.ClickException):
    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class LcserveGroup(click.Group):
    """The root group: commands from the table above, loaded lazily; an LcserveError is printed
    as one line (exit 2, no traceback)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attribute, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list from the table, without importing any group."""
        with formatter.section("Commands"):
            formatter.write_dl([(name, summary) for name, (_, _, summary) in COMMANDS.items()])

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LcserveError as e:
            raise UserFacingError(str(e)) from None


@click.group(cls=LcserveGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lcserve")
def cli() -> None:
    """Serve LoRA adapters fine-tuned at short length on long-context base models with vLLM."""


def main() -> None:
    cli(prog_name="lcserve")


if __name__ == "__main__":
    main()
