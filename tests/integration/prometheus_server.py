"""A real Prometheus for the tests: the Debian package `prometheus` (installed by ./run_tests.sh's
set-up, scripts/test-deps.sh), started on a free loopback port with a temporary config and data folder."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import yaml

from lcserve.engine import free_port


def prometheus_tools() -> tuple[str, str]:
    """Paths of `prometheus` and `promtool`. The tests never install anything: the set-up does."""
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    assert prometheus and promtool, "prometheus/promtool not found: run scripts/test-deps.sh (./run_tests.sh does)"
    return prometheus, promtool


class PrometheusServer:
    """`with PrometheusServer(workdir, targets=["127.0.0.1:PORT"]) as prom: prom.query("up")`."""

    def __init__(self, workdir: Path, targets: list[str], rule_files: list[Path] = (), scrape_interval: str = "1s"):
        self.workdir = Path(workdir)
        self.targets = targets
        self.rule_files = [str(p) for p in rule_files]
        self.scrape_interval = scrape_interval
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary, _ = prometheus_tools()
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval},
            "rule_files": self.rule_files,
            "scrape_configs": [{"job_name": "lcserve", "static_configs": [{"targets": self.targets}]}],
        }
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.log_path = self.workdir / "prometheus.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"prometheus exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}"
                )
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"prometheus not ready within 60 s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def query(self, expr: str) -> list[dict]:
        """An instant PromQL query; the result vector (list of {"metric", "value"})."""
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        r.raise_for_status()
        body = r.json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    def wait_for(self, expr: str, predicate, timeout_s: float = 30.0) -> list[dict]:
        """Poll `expr` until `predicate(result)` holds; the last result either way."""
        deadline = time.monotonic() + timeout_s
        result = self.query(expr)
        while not predicate(result) and time.monotonic() < deadline:
            time.sleep(0.5)
            result = self.query(expr)
        return result

    def __enter__(self) -> PrometheusServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
