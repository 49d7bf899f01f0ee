"""A short soak in the integration tier (benchmarks/bench_soak.py runs it for minutes): mixed
traffic through `lcserve serve` (base and adapter, short and long prompts, streaming and not,
client cancellations) while the engine is SIGKILLed once. Every request completes, fails with a
clear error or was cancelled by its client: none is lost or hangs. The supervisor restarts the
engine once, which ends idle (no running or waiting request, KV cache released)."""

from __future__ import annotations

import pytest

from benchmarks.bench_soak import Soak, warm_up

pytestmark = pytest.mark.integration

TRAFFIC_S = 75  # one kill 5-10 s in; the restart takes most of the rest, then traffic resumes


def test_short_soak_with_an_engine_kill(embedded_model_dir, demo_adapter, tmp_path):
    soak = Soak(tmp_path)
    try:
        soak.start()
        warm_up(soak)
        figures = soak.run(TRAFFIC_S, workers=3, gap_s=(5, 10), seed=13, max_kills=1, deadline_s=300)
        warm_up(soak)  # the restarted engine serves both models
    finally:
        code = soak.stop()
    print(f"\nsoak: {figures}")
    assert figures["lost"] == 0 and figures["hung"] == 0, (figures, soak.logs())
    assert len(figures["kills"]) == 1 and figures["restarts"] == 1, figures
    assert figures["completed"] > 0 and figures["failed_clear"] > 0  # served before and after, refused while down
    assert figures["engine_at_end"] == {"running": 0, "waiting": 0, "kv_usage": 0}, figures
    assert figures["gateway_rss_mib"]["growth"] < 256, figures
    assert code == 0, soak.logs()
