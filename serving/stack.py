"""What a serve path runs, and the one loop that runs it until SIGINT/SIGTERM.

`Stack`: a supervised vLLM on a private Unix socket, the gateway on the public port (with
`upstream_url`, the gateway fronts a vLLM that is managed elsewhere). `EngineAlone`: vLLM itself
on the public port (`serve --no-gateway`). `run_served` runs either (`lcserve serve`);
`run_stack` builds and runs a `Stack` (`lcserve gateway`, tests).
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from lcserve.engine import EngineProcess, EngineSpec, isolation_problem
from lcserve.paths import lcserve_home

from .adapter_metrics import LoadedAdapter
from .capacity import Predictions
from .gateway import Gateway
from .probe_schedule import ProbeSchedule
from .security import SOCKET_NAME, default_socket_dir, engine_socket
from .supervisor import ExternalEngine, Supervisor

if TYPE_CHECKING:
    from rich.console import Console

log = logging.getLogger("lcserve.serving")


class Stack:
    """Engine + gateway. Give `spec` to launch and supervise vLLM on a Unix socket in a private
    folder (`socket_dir`, or a fresh one under the temporary folder; no TCP port: only the gateway
    is reachable, so its API key guards everything), or `upstream_url` (`http://...` or
    `unix:/path/vllm.sock`) to front an engine that is already running, with `upstream_api_key`
    when that vLLM was started with `--api-key`."""

    def __init__(
        self,
        spec: EngineSpec | None = None,
        *,
        upstream_url: str | None = None,
        upstream_api_key: str | None = None,
        socket_dir: Path | None = None,
        gateway_host: str = "127.0.0.1",
        gateway_port: int = 8080,
        api_key: str | None = None,
        training_lengths: dict[str, int] | None = None,
        log_path: Path | None = None,
        ready_timeout_s: float = 900.0,
        probe: ProbeSchedule | None = None,
        allowed_adapter_dirs: tuple[str | Path, ...] = (),
        embedding_policies: dict[str, str] | None = None,
        predictions: Predictions | None = None,
        merged_adapters: dict[str, LoadedAdapter] | None = None,
    ):
        if (spec is None) == (upstream_url is None):
            raise ValueError("give exactly one of spec (launch vLLM) and upstream_url (front a running vLLM)")
        self.socket_dir: Path | None = None  # the private folder, removed at stop when this stack made it
        self.made_socket_dir = False
        snapshots = None
        if spec is not None:
            folder = Path(socket_dir) if socket_dir else default_socket_dir()
            made = not folder.exists()
            spec = dataclasses.replace(spec, uds=str(engine_socket(folder)))
            problem = isolation_problem(spec)
            spec = dataclasses.replace(spec, private_network=problem is None)
            if problem:
                log.warning(
                    "vLLM shares this machine's network (%s): its torch.distributed (gloo) groups listen on "
                    "loopback TCP ports, which other local processes can reach (they serve no HTTP)",
                    problem,
                )
            self.socket_dir, self.made_socket_dir = folder, made
            snapshots = folder / "adapters"
            self.engine: Supervisor | ExternalEngine = Supervisor(
                spec, log_path or lcserve_home() / "logs" / f"vllm-{folder.name}.log", ready_timeout_s=ready_timeout_s
            )
        else:
            self.engine = ExternalEngine(upstream_url, api_key=upstream_api_key)
        self.gateway = Gateway(
            self.engine,
            api_key=api_key,
            training_lengths=training_lengths,
            allowed_adapter_dirs=allowed_adapter_dirs,
            embedding_policies=embedding_policies,
            predictions=predictions,
            upstream_api_key=upstream_api_key,
            adapter_snapshots=snapshots,
            merged_adapters=merged_adapters,
        )
        self.gateway_host = gateway_host
        self.gateway_port = gateway_port
        self.api_key = api_key  # the gateway's: the scheduled retrieval probe goes through it
        self.probe = probe

    @property
    def url(self) -> str:
        return self.gateway.url

    def start(self) -> None:
        """Open the gateway first (a taken port fails at once, and clients get 503 + Retry-After
        while vLLM loads), then start the engine and wait until it serves (EngineError with
        vLLM's log tail if it does not)."""
        raise_open_files_limit()
        self.gateway.start(self.gateway_host, self.gateway_port)
        try:
            self.engine.start()
        except BaseException:
            self.gateway.stop()
            raise
        if self.probe is not None:  # straight to the engine: probe traffic stays out of the gateway's series
            self.probe.gateway_url = self.url  # but the retrieval probe compares the gateway's long-input policies
            self.probe.gateway_key = self.api_key
            self.probe.start(self.engine.url)

    def wait(self) -> None:
        """Block until the supervisor gives up on the engine; raise why."""
        self.engine.failed.wait()
        raise self.engine.failure

    def stop(self) -> None:
        if self.probe is not None:
            self.probe.stop()
        self.gateway.stop()
        self.engine.stop()
        if self.made_socket_dir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
        elif self.socket_dir is not None:  # the operator's folder: only what lcserve put there goes
            (self.socket_dir / SOCKET_NAME).unlink(missing_ok=True)
            shutil.rmtree(self.socket_dir / "adapters", ignore_errors=True)

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def raise_open_files_limit() -> None:
    """Each client stream holds two sockets in the gateway (client and engine): lift the soft
    open-files limit (often 1024) to the hard one, as vLLM does for itself, so a burst of
    connections is queued by the engine instead of refused by accept()."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            log.warning("cannot raise the open-files limit from %d; a large burst of connections may be refused", soft)


class EngineAlone:
    """`serve --no-gateway`: vLLM itself on the public port, unsupervised (no restarts), reporting on
    `console`; when it exits on its own, lcserve exits 1 with its log tail."""

    def __init__(self, engine: EngineProcess, ready_timeout_s: float, console: Console):
        self.engine = engine
        self.ready_timeout_s = ready_timeout_s
        self.console = console

    @property
    def url(self) -> str:
        return self.engine.url

    def start(self) -> None:
        self.console.print(f"starting vLLM for {self.engine.spec.served_model_name} (log: {self.engine.log_path})")
        self.engine.start()
        with self.console.status("waiting for vLLM to become ready..."):
            self.engine.wait_ready(self.ready_timeout_s)

    def wait(self) -> None:
        while self.engine.alive():
            time.sleep(0.5)
        self.console.print(
            f"[red]vLLM exited with code {self.engine.returncode}[/red]; last log lines:\n{self.engine.log_tail(20)}"
        )
        raise SystemExit(1)

    def stop(self) -> None:
        if self.engine.proc is not None:
            self.console.print("stopping vLLM...")
        self.engine.stop()


class _ShutdownRequested(Exception):
    pass


def run_stack(
    spec: EngineSpec | None = None,
    gateway_host: str = "127.0.0.1",
    gateway_port: int = 8080,
    *,
    upstream_url: str | None = None,
    upstream_api_key: str | None = None,
    api_key: str | None = None,
    training_lengths: dict[str, int] | None = None,
    log_path: Path | None = None,
    ready_timeout_s: float = 900.0,
    on_ready: Callable[[Stack], None] | None = None,
    probe: ProbeSchedule | None = None,
    allowed_adapter_dirs: tuple[str | Path, ...] = (),
    embedding_policies: dict[str, str] | None = None,
    predictions: Predictions | None = None,
) -> None:
    """Run the stack until SIGINT/SIGTERM, then stop the gateway and the engine's whole process
    group (no orphans, both ports released). A signal while vLLM is still starting stops it too.
    EngineError when vLLM does not become ready, or when the supervisor gives up restarting it.
    (If lcserve itself is killed, the engine's watchdog stops vLLM: see lcserve/watchdog.py.)"""
    stack = Stack(
        spec,
        upstream_url=upstream_url,
        upstream_api_key=upstream_api_key,
        gateway_host=gateway_host,
        gateway_port=gateway_port,
        api_key=api_key,
        training_lengths=training_lengths,
        log_path=log_path,
        ready_timeout_s=ready_timeout_s,
        probe=probe,
        allowed_adapter_dirs=allowed_adapter_dirs,
        embedding_policies=embedding_policies,
        predictions=predictions,
    )
    run_served(stack, on_ready)


def run_served(served: Stack | EngineAlone, on_ready: Callable[[Stack | EngineAlone], None] | None = None) -> None:
    """Start `served`, call `on_ready(served)` once it serves, and run it until a signal or until it ends."""

    def start() -> None:
        served.start()
        if on_ready is not None:
            on_ready(served)

    run_until_signal(start, served.wait, served.stop)


def run_until_signal(start: Callable[[], None], wait: Callable[[], None], stop: Callable[[], None]) -> None:
    """The run loop of every serve path: `start`, then `wait` (it returns or raises when what is served
    ends on its own) until SIGINT/SIGTERM. A signal during `start` stops too; `stop` runs however it
    ends, once (a second Ctrl-C does not interrupt it); the previous signal handlers come back."""

    def on_signal(signum, _frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # one shutdown; a second Ctrl-C must not interrupt it
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise _ShutdownRequested(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        start()
        wait()
    except _ShutdownRequested as e:
        log.info("%s received; stopping", e)
    finally:
        stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
