"""`lcserve gateway` (the gateway alone, in front of a vLLM started elsewhere), and the gateway's key and
adapter-folder options, which `lcserve serve` shares."""

from __future__ import annotations

import logging
from pathlib import Path

import click
from click.core import ParameterSource

from lcserve.engine import UNIX_SCHEME
from lcserve.errors import LcserveError
from lcserve.options import option

from .security import allowed_dirs, exposure_warning, key_from_file, read_api_key
from .stack import run_stack


def gateway_security_options(f):
    """The gateway's key and adapter-folder options, shared by `serve` and `gateway`."""
    for decorate in reversed(
        [
            click.option(
                "--api-key",
                envvar="LCSERVE_API_KEY",
                help="Bearer token clients must send; prefer the env LCSERVE_API_KEY or --api-key-file (argv "
                "shows in `ps`). Enables adapter load/unload, with --allow-adapter-dir.",
            ),
            click.option(
                "--api-key-file",
                type=click.Path(path_type=Path, dir_okay=False),
                help="File whose first line is the gateway's API key.",
            ),
            click.option(
                "--allow-adapter-dir",
                "allow_adapter_dirs",
                multiple=True,
                type=click.Path(path_type=Path),
                metavar="DIR",
                help="Folder that runtime adapter loads (/v1/load_lora_adapter, with the API "
                "key) may read from, as vLLM sees it (repeatable); without one, runtime "
                "loading is off.",
            ),
        ]
    ):
        f = decorate(f)
    return f


def gateway_access(
    api_key: str | None, api_key_file: Path | None, allow_adapter_dirs: tuple[Path, ...], say
) -> tuple[str | None, tuple[Path, ...]]:
    """The API key (from --api-key, LCSERVE_API_KEY or --api-key-file) and the allowed adapter folders,
    checked before any slow work; `say` prints the warnings."""
    key = read_api_key(api_key, api_key_file)
    if api_key and click.get_current_context().get_parameter_source("api_key") == ParameterSource.COMMANDLINE:
        say(
            "note: --api-key on the command line is visible to every user of this machine (`ps`); "
            "prefer LCSERVE_API_KEY or --api-key-file"
        )
    allowed = allowed_dirs(allow_adapter_dirs)
    if allowed and not key:
        raise LcserveError(
            "--allow-adapter-dir needs an API key (LCSERVE_API_KEY, --api-key-file or --api-key): "
            "without one the gateway does not expose adapter loading"
        )
    return key, allowed


def _parse_training_lengths(_ctx, _param, pairs: tuple[str, ...]) -> dict[str, int]:
    lengths = {}
    for pair in pairs:
        name, _, value = pair.rpartition("=")
        if not name or not value.isdigit() or int(value) <= 0:
            raise click.BadParameter(f"{pair!r}: write MODEL=TOKENS, e.g. writer=256")
        lengths[name] = int(value)
    return lengths


def upstream_address(url: str) -> str:
    """`--upstream` as the gateway uses it: http(s)://HOST:PORT, or unix:/ABSOLUTE/PATH for a vLLM
    started with `--uds PATH`; LcserveError naming the fix otherwise."""
    if url.startswith(("http://", "https://")):
        return url
    if url.startswith(UNIX_SCHEME) and Path(url[len(UNIX_SCHEME) :]).is_absolute():
        return url
    raise LcserveError(
        f"--upstream {url}: write http://HOST:PORT for a vLLM on TCP, or unix:/ABSOLUTE/PATH for a vLLM "
        "started with --uds PATH"
    )


def read_upstream_key(key_file: Path | None) -> str | None:
    """The remote vLLM's `--api-key`, from --upstream-api-key-file (its first line)."""
    if key_file is None:
        return None
    return key_from_file("--upstream-api-key-file", key_file, "the key vLLM was started with (--api-key)")


@click.command("gateway", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--upstream",
    required=True,
    help="The running vLLM OpenAI server: http://HOST:PORT, or unix:/PATH/vllm.sock for a vLLM started with "
    "--uds PATH (the socket's folder should be 0700, shared only with the gateway).",
)
@click.option(
    "--upstream-api-key-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="File whose first line is the key the upstream vLLM was started with (its --api-key); sent on every "
    "request to it, never to clients.",
)
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless told otherwise)."
)
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port to serve on.")
@gateway_security_options
@option(
    "--training-len",
    "--training-length",
    "training_lengths",
    multiple=True,
    metavar="MODEL=TOKENS",
    callback=_parse_training_lengths,
    help="Training length of a served model when its folder has no metadata (repeatable).",
)
def gateway(
    upstream, upstream_api_key_file, host, port, api_key, api_key_file, allow_adapter_dirs, training_lengths
) -> None:
    """Serve the OpenAI-compatible gateway (with /metrics) in front of a vLLM started elsewhere."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    upstream = upstream_address(upstream)
    upstream_key = read_upstream_key(upstream_api_key_file)
    api_key, allowed = gateway_access(
        api_key, api_key_file, allow_adapter_dirs, lambda line: click.echo(line, err=True)
    )
    warning = exposure_warning(host, bool(api_key))
    if warning:
        click.secho(warning, err=True, fg="red", bold=True)
    run_stack(
        upstream_url=upstream,
        upstream_api_key=upstream_key,
        gateway_host=host,
        gateway_port=port,
        api_key=api_key,
        training_lengths=training_lengths,
        allowed_adapter_dirs=allowed,
        on_ready=lambda stack: click.echo(f"gateway ready: {stack.url} -> {upstream}", err=True),
    )
