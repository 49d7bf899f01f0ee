"""The gateway's probe schedule against the real engine: a run on start-up lands as the
`lcserve_probe_*` gauges on the gateway's /metrics, for the base and the mounted adapter."""

from dataclasses import replace

import httpx
import pytest

from lcserve.serving.probe_schedule import ProbeSchedule
from lcserve.serving.probes.plan import TIERS
from lcserve.serving.probes.runner import ProbeConfig
from lcserve.serving.stack import Stack
from tests.unit.test_metrics import value

pytestmark = pytest.mark.integration


def test_probe_on_start_publishes_gauges(engine, tmp_path, monkeypatch):
    # the wiring, not the figures: one rung at the adapter's training length, one depth per task and
    # no long continuation, so the run is short on any machine without a time budget to miss
    small = replace(
        TIERS["quick"], passkey_depths=(0.5,), needle_depths=(0.5,), generation_tokens=0, budget_minutes=None,
        needle_per_depth=1, style_prompts=0,
    )  # fmt: skip
    monkeypatch.setitem(TIERS, "quick", small)
    config = ProbeConfig(base=engine.base_model, lengths=(256,))
    probe = ProbeSchedule(config, tmp_path, on_start=True)
    stack = Stack(upstream_url=engine.url, gateway_port=0, probe=probe)
    stack.start()
    try:
        assert probe.finished.wait(900), "the probe run did not finish"
        assert probe.last_error is None, probe.last_error
        text = httpx.get(f"{stack.url}/metrics", timeout=30).text
        summary = probe.last_summary
        for model in (engine.base_model, engine.adapter_model):
            needle = summary["models"][model]["tasks"]["needle"]
            assert (
                value(text, "lcserve_probe_accuracy", model=model, task="needle", length="256")
                == needle["by_length"]["256"]["accuracy"]
            )
            assert value(text, "lcserve_probe_effective_length", model=model) == (needle["effective_length"] or 0)
        (run_dir,) = tmp_path.iterdir()
        assert (run_dir / "summary.json").exists() and (run_dir / "records.jsonl").exists()
    finally:
        stack.stop()
