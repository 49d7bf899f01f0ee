"""Command-line options shared by several commands, each defined once. The planner's settings are
declared in deploy/settings.py, which builds their options with `RenamedOption`.

Names lcserve used before still parse but are hidden from the help, so old scripts keep working.
"""

from __future__ import annotations

import click


class RenamedOption(click.Option):
    """An option whose first name is shown; the others are older names kept for scripts."""

    def get_help_record(self, ctx: click.Context):
        shown, self.opts = self.opts, self.opts[:1]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = shown

    def get_error_hint(self, ctx: click.Context) -> str:
        return f"'{self.opts[0]}'"


def option(*names: str, **kwargs):
    return click.option(*names, cls=RenamedOption, **kwargs)


API_KEY_ENV = "LCSERVE_API_KEY"  # where the gateway and its clients read the key (not argv: others can read it)
gateway_api_key = click.option(
    "--api-key",
    envvar=API_KEY_ENV,
    show_envvar=True,
    help=f"The gateway's API key; set {API_KEY_ENV} instead (a command line is visible to other users).",
)
profile = click.option(
    "--profile",
    default="auto",
    show_default=True,
    help="Hardware profile (`lcserve deploy profiles`), a YAML file, or auto (NVML, else CPU).",
)
gpus = click.option("--gpus", type=click.IntRange(min=1), help="GPUs per node (overrides the profile's count).")
training_len = option(
    "--training-len",
    "--training-length",
    "training_len",
    type=click.IntRange(min=1),
    help="The length (tokens) the adapter or model was trained at, when its folder does not say (instead of "
    "its metadata).",
)
