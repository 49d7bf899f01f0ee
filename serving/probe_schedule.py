"""Run the long-context probe beside the served stack: once when the engine is ready and then on
a schedule, publishing each run's results as the gateway's `lcserve_probe_*` gauges.

A probe run competes with user traffic for the engine, so it is opt-in (`lcserve serve
--probe-on-start`, `--probe-every MINUTES`) and one run at a time; a run that fails (engine
restarting, a model gone) is logged and the schedule goes on.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from datetime import datetime
from pathlib import Path

from lcserve.errors import LcserveError

from .metrics import set_probe_results
from .probes import gauge_samples
from .probes.retrieval import run_retrieval_probe, served_embedding_model
from .probes.runner import ProbeConfig, run_probe

log = logging.getLogger("lcserve.serving.probes")


class ProbeSchedule:
    """Probe `config` (its url is replaced by the engine's) on start when `on_start`, then every
    `every_s` seconds when given; each run's files go to a timestamped folder under `out_root`.
    An embedding model gets the retrieval probe, which compares the gateway's long-input policies:
    it runs against `gateway_url` (set it to the gateway's address, and `gateway_key` to its key) or else
    the given url."""

    def __init__(self, config: ProbeConfig, out_root: Path, on_start: bool = True, every_s: float | None = None):
        if not on_start and not every_s:
            raise ValueError("a probe schedule needs on_start or every_s")
        self.config = config
        self.out_root = Path(out_root)
        self.on_start = on_start
        self.every_s = every_s
        self.gateway_url: str | None = None
        self.gateway_key: str | None = None
        self.runs = 0
        self.last_summary: dict | None = None
        self.last_error: str | None = None
        self.finished = threading.Event()  # set after each run, for callers that wait on one
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, url: str) -> None:
        self._thread = threading.Thread(target=self._loop, args=(url,), name="lcserve-probe", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop scheduling; a run in flight ends with the process (its thread is a daemon)."""
        self._stopping.set()

    def _loop(self, url: str) -> None:
        if not self.on_start and self._stopping.wait(self.every_s):
            return
        while not self._stopping.is_set():
            self.run_once(url)
            if not self.every_s or self._stopping.wait(self.every_s):
                return

    def run_once(self, url: str) -> dict | None:
        out_dir = self.out_root / f"probe-{datetime.now():%Y%m%d-%H%M%S}"
        started = time.monotonic()
        log.info("probe run %d starting against %s (files in %s)", self.runs + 1, url, out_dir)
        try:
            summary = self._probe(url, out_dir)
            set_probe_results(gauge_samples(summary))
            self.last_summary, self.last_error = summary, None
            log.info(
                "probe run %d done in %.0f s: %s",
                self.runs + 1,
                time.monotonic() - started,
                "; ".join(
                    f"{model} effective length {entry['tasks']['needle']['effective_length']}"
                    for model, entry in summary.get("models", {}).items()
                    if "needle" in entry["tasks"]
                )
                or "; ".join(summary.get("verdict", [])),
            )
            return summary
        except (LcserveError, OSError) as e:
            self.last_error = str(e)
            log.warning("probe run %d failed: %s", self.runs + 1, e)
            return None
        finally:
            self.runs += 1
            self.finished.set()

    def _probe(self, url: str, out_dir: Path) -> dict:
        """The generative probes, or the retrieval probe when the base is an embedding model."""
        embedding = served_embedding_model(url, self.config.base)
        if embedding is None:
            return run_probe(dataclasses.replace(self.config, url=url, out_dir=out_dir, console=None))
        c = self.config
        return run_retrieval_probe(
            self.gateway_url or url,
            embedding,
            c.tier,
            out_dir,
            c.training_length,
            c.threshold,
            c.seed,
            api_key=self.gateway_key if self.gateway_url else None,
        )
