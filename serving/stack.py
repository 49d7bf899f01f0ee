"""The served stack: a supervised vLLM on an internal loopback port, the gateway on the public one.

`run_stack` is what `lcserve serve` calls (blocks until SIGINT/SIGTERM); `Stack` is the same as
start/stop objects for tests and embedding. `python -m lcserve.serving.stack --upstream URL`
(the `gateway` command) puts a gateway in front of a vLLM that is managed elsewhere.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
from collections.abc import Callable
from pathlib import Path

import click

from lcserve.errors import EngineError, LcserveError
from lcserve.paths import lcserve_home

from .engine import EngineSpec, free_port
from .gateway import Gateway
from .probe_schedule import ProbeSchedule
from .supervisor import ExternalEngine, Supervisor

log = logging.getLogger("lcserve.serving")


class Stack:
    """Engine + gateway. Give `spec` to launch and supervise vLLM (always on 127.0.0.1, on
    `spec.port`, or a free port when it is 0: only the gateway is reachable from outside, so its
    API key guards everything), or `upstream_url` to front an engine that is already running."""

    def __init__(self, spec: EngineSpec | None = None, *, upstream_url: str | None = None,
                 gateway_host: str = "127.0.0.1", gateway_port: int = 8080, api_key: str | None = None,
                 training_lengths: dict[str, int] | None = None, log_path: Path | None = None,
                 ready_timeout_s: float = 900.0, probe: ProbeSchedule | None = None):
        if (spec is None) == (upstream_url is None):
            raise ValueError("give exactly one of spec (launch vLLM) and upstream_url (front a running vLLM)")
        if spec is not None:
            if spec.port and spec.port == gateway_port:
                raise EngineError(f"the engine's internal port and the gateway port are both {gateway_port}; "
                                   "give the engine another port")
            spec = dataclasses.replace(spec, host="127.0.0.1", port=spec.port or free_port())
            self.engine: Supervisor | ExternalEngine = Supervisor(
                spec, log_path or lcserve_home() / "logs" / f"vllm-{spec.port}.log",
                ready_timeout_s=ready_timeout_s)
        else:
            self.engine = ExternalEngine(upstream_url)
        self.gateway = Gateway(self.engine, api_key=api_key, training_lengths=training_lengths)
        self.gateway_host = gateway_host
        self.gateway_port = gateway_port
        self.probe = probe

    @property
    def url(self) -> str:
        return self.gateway.url

    def start(self) -> None:
        """Open the gateway first (a taken port fails at once, and clients get 503 + Retry-After
        while vLLM loads), then start the engine and wait until it serves (EngineError with
        vLLM's log tail if it does not)."""
        self.gateway.start(self.gateway_host, self.gateway_port)
        try:
            self.engine.start()
        except BaseException:
            self.gateway.stop()
            raise
        if self.probe is not None:  # straight to the engine: probe traffic stays out of the gateway's series
            self.probe.start(self.engine.url)

    def stop(self) -> None:
        if self.probe is not None:
            self.probe.stop()
        self.gateway.stop()
        self.engine.stop()

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class _ShutdownRequested(Exception):
    pass


def run_stack(spec: EngineSpec | None = None, gateway_host: str = "127.0.0.1", gateway_port: int = 8080, *,
              upstream_url: str | None = None, api_key: str | None = None,
              training_lengths: dict[str, int] | None = None, log_path: Path | None = None,
              ready_timeout_s: float = 900.0, on_ready: Callable[[Stack], None] | None = None,
              probe: ProbeSchedule | None = None) -> None:
    """Run the stack until SIGINT/SIGTERM, then stop the gateway and the engine's whole process
    group (no orphans, both ports released). A signal while vLLM is still starting stops it too.
    EngineError when vLLM does not become ready, or when the supervisor gives up restarting it."""
    stack = Stack(spec, upstream_url=upstream_url, gateway_host=gateway_host, gateway_port=gateway_port,
                  api_key=api_key, training_lengths=training_lengths, log_path=log_path,
                  ready_timeout_s=ready_timeout_s, probe=probe)

    def on_signal(signum, _frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # one shutdown; a second Ctrl-C must not interrupt it
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise _ShutdownRequested(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stack.start()
        if on_ready is not None:
            on_ready(stack)
        stack.engine.failed.wait()
        raise stack.engine.failure
    except _ShutdownRequested as e:
        log.info("%s received; stopping", e)
    finally:
        stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _parse_training_lengths(_ctx, _param, pairs: tuple[str, ...]) -> dict[str, int]:
    lengths = {}
    for pair in pairs:
        name, _, value = pair.rpartition("=")
        if not name or not value.isdigit() or int(value) <= 0:
            raise click.BadParameter(f"{pair!r}: write MODEL=TOKENS, e.g. writer=256")
        lengths[name] = int(value)
    return lengths


@click.command("gateway", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--upstream", required=True, help="URL of a running vLLM OpenAI server, e.g. http://127.0.0.1:8000.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless told otherwise).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port to serve on.")
@click.option("--api-key", envvar="LCSERVE_API_KEY",
              help="Bearer token clients must send (env LCSERVE_API_KEY); also enables adapter load/unload.")
@click.option("--training-length", "training_lengths", multiple=True, metavar="MODEL=TOKENS",
              callback=_parse_training_lengths,
              help="Training length of a served model when its folder has no metadata (repeatable).")
def gateway_command(upstream, host, port, api_key, training_lengths) -> None:
    """Serve the OpenAI-compatible gateway (with /metrics) in front of a vLLM started elsewhere."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        run_stack(upstream_url=upstream, gateway_host=host, gateway_port=port, api_key=api_key,
                  training_lengths=training_lengths,
                  on_ready=lambda stack: click.echo(f"gateway ready: {stack.url} -> {upstream}", err=True))
    except LcserveError as e:  # one line, exit 2, as the `lcserve` command prints it
        click.echo(f"error: {e}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    gateway_command()
