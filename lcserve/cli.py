"""The `lcserve` command: composes the core commands and the three groups' commands."""

from __future__ import annotations

import click

from . import __version__
from .errors import LcserveError


class LcserveGroup(click.Group):
    """A click group that prints LcserveError as one line and exits 2 (no traceback)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LcserveError as e:
            raise UserFacingError(str(e)) from None


class UserFacingError(click.ClickException):
    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


@click.group(cls=LcserveGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lcserve")
def cli() -> None:
    """Serve LoRA adapters fine-tuned at short length on long-context base models with vLLM.

    \b
    lcserve embedded prepare   prepare the embedded default model (Gemma 3 270M)
    lcserve serve              plan, launch and supervise vLLM (the main job)
    lcserve adapters ...       inspect, merge and verify LoRA adapters
    lcserve deploy ...         hardware profiles and the capacity planner
    lcserve probe ...          long-context probes, base vs adapter
    lcserve gateway ...        the gateway alone, in front of a vLLM started elsewhere
    """


def _compose() -> None:
    from .embedded_cli import embedded
    from lcserve.adapters.cli import adapters, train_adapter_command
    from lcserve.deploy.cli import deploy
    from lcserve.serving.cli import serve
    from lcserve.serving.probe_cli import probe
    from lcserve.serving.stack import gateway_command

    embedded.add_command(train_adapter_command, "train-adapter")
    for command in (embedded, adapters, deploy, serve, probe, gateway_command):
        cli.add_command(command)


_compose()


def main() -> None:
    cli(prog_name="lcserve")


if __name__ == "__main__":
    main()
