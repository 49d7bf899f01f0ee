"""`lcserve gateway` as a process of its own, for the integration tests that front an engine with it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.unit.test_supervisor import free_port, wait_until


class GatewayCommand:
    """`lcserve gateway --upstream URL` in a subprocess, as users run it in front of an engine."""

    def __init__(self, upstream: str, args: list[str], env: dict[str, str], workdir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.err = workdir / f"gateway-{self.port}.err"
        with self.err.open("wb") as sink:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "lcserve.cli",
                    "gateway",
                    "--upstream",
                    upstream,
                    "--port",
                    str(self.port),
                    *args,
                ],
                stdout=subprocess.DEVNULL,
                stderr=sink,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **env},
            )

    def stderr(self) -> str:
        return self.err.read_text()

    def wait_ready(self) -> None:
        assert wait_until(lambda: self.proc.poll() is not None or "gateway ready" in self.stderr(), 60), self.stderr()
        assert self.proc.poll() is None, self.stderr()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
