"""Keep vLLM running: start it, watch it, restart it with back-off when it dies.

The gateway reads the state through three attributes (`up`, `restarts`, `generation`), so it
can answer 503 at once while the engine is down instead of letting requests hang. vLLM's API
server exits when its engine core dies (VLLM_KEEP_ALIVE_ON_ENGINE_DEATH is off by default), so
watching the process is enough to see a dead engine.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from lcserve.engine import EngineProcess, EngineSpec, bearer, check_vllm_version, engine_client
from lcserve.errors import EngineError

log = logging.getLogger("lcserve.serving")


@dataclass(frozen=True)
class Backoff:
    """Delay before restart number n of a run of failures: initial x factor^(n-1), capped."""

    initial_s: float = 1.0
    factor: float = 2.0
    max_s: float = 30.0

    def delay(self, failures: int) -> float:
        return min(self.max_s, self.initial_s * self.factor ** max(0, failures - 1))


class Supervisor:
    """One supervised vLLM server. `start()` blocks until the first readiness (EngineError with
    the log tail when it fails); afterwards a thread restarts the engine whenever it exits.

    A run of failures is reset once the engine has stayed up `stable_after_s`. After
    `max_failures` deaths in one run the supervisor gives up: `failed` is set and `failure`
    holds the EngineError to report.
    """

    def __init__(
        self,
        spec: EngineSpec,
        log_path: Path,
        *,
        ready_timeout_s: float = 900.0,
        backoff: Backoff = Backoff(),
        max_failures: int = 5,
        stable_after_s: float = 60.0,
        poll_s: float = 0.25,
        process_factory: Callable[[EngineSpec, Path], EngineProcess] = EngineProcess,
    ):
        self.spec = spec
        self.log_path = Path(log_path)
        self.ready_timeout_s = ready_timeout_s
        self.backoff = backoff
        self.max_failures = max_failures
        self.stable_after_s = stable_after_s
        self.poll_s = poll_s
        self.process_factory = process_factory
        self.up = False
        self.restarts = 0
        self.generation = 0  # +1 each time an engine becomes ready: the gateway re-reads /v1/models
        self.failure: EngineError | None = None
        self.failed = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._process: EngineProcess | None = None
        self._ready_at = 0.0
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def process(self) -> EngineProcess | None:
        return self._process

    def start(self) -> None:
        self._launch()
        self._thread = threading.Thread(target=self._watch, name="lcserve-supervisor", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the engine (SIGTERM, then SIGKILL of its whole process group) and the watcher.
        A serving engine gets `timeout_s` to finish its requests; one still loading gets 5 s
        (vLLM 0.32 does not act on SIGTERM while it loads the model, and has nothing to drain)."""
        with self._lock:
            self._stopping.set()
            process = self._process
        serving, self.up = self.up, False
        if process is not None:
            process.stop(timeout_s if serving else min(timeout_s, 5.0))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _launch(self) -> None:
        with self._lock:
            if self._stopping.is_set():
                raise EngineError("the engine is being stopped")
            self._process = self.process_factory(self.spec, self.log_path)
            self._process.start()
        try:
            self._process.wait_ready(self.ready_timeout_s)
        except EngineError:
            self._process.stop(10)
            raise
        self._ready_at = time.monotonic()
        self.generation += 1
        self.up = True

    def _watch(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            process = self._process
            if process.alive():
                if failures and time.monotonic() - self._ready_at > self.stable_after_s:
                    failures = 0
                self._stopping.wait(self.poll_s)
                continue
            self.up = False
            if self._stopping.is_set():
                return
            code = process.returncode
            process.stop(10)  # reap what is left of its group: workers must not hold the port
            failures += 1
            if failures > self.max_failures:
                self.failure = EngineError(
                    f"vLLM died {failures} times in a row (last exit code {code}); giving up. "
                    f"Log: {self.log_path}\nLast log lines:\n{process.log_tail(25)}"
                )
                log.error("%s", self.failure)
                self.failed.set()
                return
            delay = self.backoff.delay(failures)
            log.warning(
                "vLLM exited with code %s; restarting in %.0f s (restart %d, log %s)",
                code,
                delay,
                self.restarts + 1,
                self.log_path,
            )
            if self._stopping.wait(delay):
                return
            self.restarts += 1
            try:
                self._launch()
                log.warning("vLLM is back after restart %d", self.restarts)
            except EngineError as e:
                if not self._stopping.is_set():
                    log.warning("restart %d failed: %s", self.restarts, str(e).splitlines()[0])


class ExternalEngine:
    """An engine managed elsewhere (another supervisor, Kubernetes): watched through GET /health
    every `poll_s`, never restarted. Same attributes as Supervisor, for the gateway."""

    def __init__(self, url: str, poll_s: float = 1.0, api_key: str | None = None):
        self.url = url.rstrip("/")  # http://host:port, or unix:/path/vllm.sock
        self.poll_s = poll_s
        self.headers = bearer(api_key)
        self.up = False
        self.restarts = 0
        self.generation = 0
        self.failed = threading.Event()  # never set: an external engine is not ours to give up on
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """EngineError when nothing healthy answers at the URL now, or when the vLLM there is not a
        release the kit is tested with (its /version)."""
        with engine_client(self.url, timeout=5.0, headers=self.headers) as client:
            self._check(client)
            if not self.up:
                raise EngineError(f"no healthy vLLM answers at {self.url}/health; start it first or fix the URL")
            version = self._version(client)
            if version is not None:
                check_vllm_version(version, f"at {self.url}")
        self._thread = threading.Thread(target=self._watch, name="lcserve-engine-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()

    def _version(self, client: httpx.Client) -> str | None:
        """vLLM's GET /version, None when the server does not say."""
        try:
            version = client.get("/version").json().get("version")
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        return version if isinstance(version, str) else None

    def _check(self, client: httpx.Client) -> None:
        try:
            healthy = client.get("/health").status_code == 200
        except httpx.HTTPError:
            healthy = False
        if healthy and not self.up:
            self.generation += 1
        self.up = healthy

    def _watch(self) -> None:
        with engine_client(self.url, timeout=max(1.0, self.poll_s), headers=self.headers) as client:
            while not self._stopping.wait(self.poll_s):
                self._check(client)
