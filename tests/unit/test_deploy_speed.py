"""The speed model (deploy/speed.py), its plan hook and its calibration fit, checked against what the
tests compute on their own: bytes and FLOPs by hand from a config.json's numbers, attention pairs by
brute force, vLLM's scheduler rules step by step, and constants recovered from synthetic points that
the test generates with its own formulas."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from lcserve.cli import cli
from lcserve.deploy import speed
from lcserve.deploy.calibrate import Point, calibration_of, fit, write_calibrated_profile
from lcserve.deploy.hardware import load_profile_file, resolve_profile
from lcserve.deploy.kv import kv_layout
from lcserve.deploy.plan import PlanRequest, plan_deployment
from lcserve.deploy.speed_plan import plan_cost
from lcserve.errors import PlanError
from lcserve.model_config import read_model

# A small Llama, untied, hybrid-free; every figure below is computed from these numbers by hand.
H, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 256, 512, 4, 8, 2, 5000
HEAD_DIM = H // HEADS
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": H,
    "intermediate_size": INTER,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "vocab_size": VOCAB,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "rope_theta": 10000.0,
}
PARAMS = VOCAB * H * 2 + LAYERS * (2 * H * H + 2 * H * KV_HEADS * HEAD_DIM + 3 * H * INTER + 2 * H) + H
LINEAR_FLOPS = 2 * LAYERS * (2 * H * H + 2 * H * KV_HEADS * HEAD_DIM + 3 * H * INTER)  # per token
KV_PER_TOKEN_LAYER = 2 * KV_HEADS * HEAD_DIM * 2  # K and V, bf16
WEIGHTS_READ = (PARAMS - VOCAB * H) * 2  # the input embedding is looked up, not read


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder


@pytest.fixture(scope="module")
def cost(tiny):
    model = read_model(tiny)
    return speed.model_cost(model, kv_layout(model, 2, 16, 1), 2, 1)


def figures(**kw) -> speed.Figures:
    base = dict(
        step_overhead_s=0.002,
        request_overhead_s=0.01,
        bandwidth=100e9,
        flops=5e12,
        interconnect=50e9,
        lora_s_per_rank_token=0.0,
        lora_s_per_adapter=0.0,
        source="test",
        calibrated=False,
    )
    return speed.Figures(**(base | kw))


def test_costs_match_the_hand_computed_config_figures(tiny, cost):
    assert read_model(tiny).param_count == PARAMS  # the test's own parameter count is the reader's
    assert cost.weight_bytes == WEIGHTS_READ
    assert cost.linear_flops_per_token == LINEAR_FLOPS
    assert cost.lm_head_flops == 2 * VOCAB * H
    assert cost.attention_flops_per_pair == 4 * HEADS * HEAD_DIM
    assert cost.kv_bytes_per_token_layer == KV_PER_TOKEN_LAYER and cost.windows == ((None, LAYERS),)


def test_a_decode_step_reads_weights_and_kv_and_a_prefill_step_is_compute(cost):
    f = figures()
    context, batch = 1000, 3
    features = speed.step_features(cost, [speed.Chunk(context, 1, True)] * batch, f.theta())
    assert features[1] == WEIGHTS_READ + batch * LAYERS * context * KV_PER_TOKEN_LAYER  # memory-bound: bytes
    assert batch * (LINEAR_FLOPS + 2 * VOCAB * H) / f.flops < features[1] / f.bandwidth and features[2] == 0
    assert features[7] == batch * LAYERS * (context + 1) * 4 * HEADS * HEAD_DIM  # attention adds, at its own rate
    prompt = speed.step_features(cost, [speed.Chunk(0, 2048, True)], f.theta())
    assert prompt[2] == 2048 * LINEAR_FLOPS + 2 * VOCAB * H and prompt[1] == 0  # compute-bound at these figures
    assert prompt[7] == LAYERS * (2048 * 2049 // 2) * 4 * HEADS * HEAD_DIM
    cpu = speed.step_features(cost, [speed.Chunk(0, 2048, True)], f.theta(), overlap=False)
    assert cpu[1] == WEIGHTS_READ and cpu[2] == prompt[2]  # a CPU's cores move the bytes and do the math: both count


@pytest.mark.parametrize(
    "start,n,window", [(0, 1, None), (0, 700, None), (300, 400, 512), (0, 2048, 512), (5000, 1, 512)]
)
def test_attention_pairs_by_brute_force(start, n, window):
    brute = sum(min(p + 1, window) if window else p + 1 for p in range(start, start + n))
    assert speed.key_pairs(start, n, window) == brute


def test_the_scheduler_decodes_first_and_chunks_prompts_within_the_budget(cost):
    budget = 512
    sim = speed.simulate(cost, figures(), speed.Pattern(3, 1000, 4), max_num_seqs=8, max_num_batched_tokens=budget)
    for step in sim.schedule:
        assert sum(n for _, n in step) <= budget
    # Step 0: request 0 takes the whole budget; step 1: it finishes its prompt (488) and request 1 gets the rest.
    assert sim.schedule[0] == [(0, 512)] and sim.schedule[1] == [(0, 488), (1, 24)]
    # Once request 0 decodes, it is scheduled first with one token, prompt chunks fill the rest.
    assert sim.schedule[2] == [(0, 1), (1, 511)]
    assert all(step[0] == (0, 1) for step in sim.schedule[2:5])
    assert [len(t.token_steps) for t in sim.traces] == [4, 4, 4]


def test_max_num_seqs_caps_the_running_requests(cost):
    sim = speed.simulate(cost, figures(), speed.Pattern(5, 100, 3), max_num_seqs=2, max_num_batched_tokens=4096)
    assert max(len(step) for step in sim.schedule) == 2
    assert sim.schedule[0] == [(0, 100), (1, 100)]  # the third waits although the budget has room


def test_more_users_never_lower_the_latency(cost):
    f = figures(bandwidth=2e9, flops=0.2e12)
    previous = None
    for users in (1, 2, 4, 8, 16, 32):
        s = speed.load_summary(speed.simulate(cost, f, speed.Pattern(users, 700, 16, 2), 64, 1024))
        if previous:
            assert s["itl_ms_p50"] >= previous["itl_ms_p50"] and s["ttft_ms_p50"] >= previous["ttft_ms_p50"]
        previous = s
    assert (
        previous["itl_ms_p90"]
        > 2 * speed.load_summary(speed.simulate(cost, f, speed.Pattern(1, 700, 16), 64, 1024))["itl_ms_p90"]
    )  # prompt chunks share the decode steps


def _synthetic(point: Point, truth: speed.Figures, rank: int) -> float:
    """The point's mean TTFT or ITL from the test's own formulas (no simulator): one request or
    `users` identical ones sent at once, each step priced by hand."""

    def step(tokens_by_request: list[tuple[int, int]], sampled: int, lora: bool) -> float:
        read = WEIGHTS_READ + sum(LAYERS * start * KV_PER_TOKEN_LAYER for start, _ in tokens_by_request)
        pairs = sum(sum(p + 1 for p in range(s, s + n)) for s, n in tokens_by_request)
        tokens = sum(n for _, n in tokens_by_request)
        flops = tokens * LINEAR_FLOPS + sampled * 2 * VOCAB * H
        t = truth.step_overhead_s + max(read / truth.bandwidth, flops / truth.flops)
        t += LAYERS * pairs * 4 * HEADS * HEAD_DIM / truth.attention_flops
        return t + (truth.lora_s_per_rank_token * rank * tokens + truth.lora_s_per_adapter if lora else 0)

    if point.quantity == "ttft":  # one request; prompt chunks of 2048
        chunks = [(s, min(2048, point.prompt - s)) for s in range(0, point.prompt, 2048)]
        return truth.request_overhead_s + sum(step([c], int(c == chunks[-1]), point.lora) for c in chunks)
    gaps = [step([(point.prompt + k, 1)] * point.users, point.users, point.lora) for k in range(point.output - 1)]
    return sum(gaps) / len(gaps)


def test_the_fit_recovers_known_constants_from_synthetic_points(tiny):
    model = read_model(tiny)
    rank = 8
    cost = speed.model_cost(model, kv_layout(model, 2, 16, 1), 2, 1, lora_rank=rank)
    truth = figures(
        step_overhead_s=0.012, request_overhead_s=0.04, bandwidth=6e9, flops=0.3e12, lora_s_per_rank_token=2e-6,
        lora_s_per_adapter=0.005, attention_flops=0.05e12,
    )  # fmt: skip
    specs = [
        ("prefill 128", 1, 128, 1, False, "ttft"),
        ("prefill 1024", 1, 1024, 1, False, "ttft"),
        ("prefill 1536", 1, 1536, 1, False, "ttft"),
        ("prefill 3072", 1, 3072, 1, False, "ttft"),
        ("decode 1 x 1500", 1, 1500, 16, False, "itl"),
        ("decode 1", 1, 64, 24, False, "itl"),
        ("decode 8", 8, 64, 24, False, "itl"),
        ("lora prefill", 1, 1024, 1, True, "ttft"),
        ("lora decode", 1, 64, 24, True, "itl"),
    ]
    points = [Point(*s, 0.0) for s in specs]
    points = [replace(p, measured_s=_synthetic(p, truth, rank)) for p in points]
    start = figures(step_overhead_s=0.001, request_overhead_s=0.001, bandwidth=50e9, flops=5e12)
    fitted, residuals = fit(cost, start, points, max_num_seqs=16, budget=2048)
    names = ("step_overhead_s", "request_overhead_s", "bandwidth", "flops", "lora_s_per_rank_token", "attention_flops")
    for name in names:
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=0.02), name
    assert fitted.lora_s_per_adapter == pytest.approx(truth.lora_s_per_adapter, abs=2e-4)
    assert all(abs(r["error_pct"]) < 1 for r in residuals)


def test_a_calibrated_profile_is_written_once_and_read_back(tiny, tmp_path):
    model = read_model(tiny)
    cost = speed.model_cost(model, kv_layout(model, 2, 16, 1), 2, 1)
    cal = calibration_of(figures(calibrated=True), "tiny-llama", speed.model_identity(model), "", [{"point": "x"}])
    out = write_calibrated_profile(resolve_profile("l4"), cal, tmp_path / "l4-cal.yaml")
    loaded = load_profile_file(out)
    assert loaded.calibration.bandwidth_gbs == 100 and loaded.calibration.tflops == 5 and loaded.name == "l4-cal"
    f = speed.figures_for(loaded, cost)
    assert f.calibrated and f.bandwidth == 100e9 and "calibrated on tiny-llama" in f.source
    write_calibrated_profile(resolve_profile("l4"), cal, out)  # its own file: replaced
    foreign = tmp_path / "mine.yaml"
    foreign.write_text("name: mine\n")
    with pytest.raises(PlanError, match="not written by `lcserve deploy calibrate`"):
        write_calibrated_profile(resolve_profile("l4"), cal, foreign)
    assert foreign.read_text() == "name: mine\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "l4-cal.yaml",
        "mine.yaml",
    ]  # nothing half-written beside them


def test_plan_reasons_carry_the_equations_and_say_uncalibrated(tiny):
    plan = plan_deployment(resolve_profile("l4"), read_model(tiny), (), PlanRequest(max_model_len=4096))
    reasons = {r.setting: r for r in plan.reasons}
    assert "uncalibrated" in reasons["speed figures"].value and "spec sheet of l4" in reasons["speed figures"].why
    itl = reasons["ITL at batch 1"]
    assert f"{WEIGHTS_READ:,} B weights" in itl.why and "300 GB/s" in itl.why
    assert "4,095-token prompt in chunks of <= 2,048" in reasons["TTFT at max_model_len"].why
    assert plan.speed["itl_ms_batch_1"] > 0 and plan.to_json()["speed"] == plan.speed


def test_latency_targets_choose_max_num_seqs_and_replicas(tiny):
    model, l4 = read_model(tiny), resolve_profile("l4")
    loose = plan_deployment(l4, model, (), PlanRequest(max_model_len=4096, slo_itl_ms=1e6, slo_ttft_ms=1e6))
    free = plan_deployment(l4, model, (), PlanRequest(max_model_len=4096))
    assert loose.max_num_seqs == min(free.max_num_seqs, free.speed["largest_batch"])
    itl_at_4 = plan_deployment(l4, model, (), PlanRequest(max_model_len=4096, max_num_seqs=4)).speed["load"][
        "itl_ms_p50"
    ]
    tight = plan_deployment(l4, model, (), PlanRequest(max_model_len=4096, slo_itl_ms=itl_at_4, target_concurrency=10))
    assert tight.max_num_seqs >= 4 and tight.speed["load"]["itl_ms_p50"] <= itl_at_4
    assert tight.replicas == -(-10 // tight.max_num_seqs)
    with pytest.raises(PlanError, match=r"best achievable: TTFT [\d,]+ ms, ITL [\d.]+ ms at max_num_seqs 1"):
        plan_deployment(l4, model, (), PlanRequest(max_model_len=4096, slo_itl_ms=0.01))


@pytest.mark.parametrize("flag,value", [("--slo-ttft-ms", "0"), ("--slo-itl-ms", "-5")])
def test_zero_or_negative_targets_are_one_line(tiny, flag, value):
    r = CliRunner().invoke(cli, ["deploy", "plan", "--model", str(tiny), "--profile", "l4", flag, value])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.output.strip() == f"error: {flag} {float(value):g}: a latency target must be above 0 ms"


def test_a_calibration_of_another_model_is_used_with_a_warning(tiny, tmp_path, cost):
    cal = calibration_of(figures(calibrated=True), "other", "OtherForCausalLM, 1 parameters, 1 layers", "", [])
    out = write_calibrated_profile(resolve_profile("l4"), cal, tmp_path / "l4-other.yaml")
    plan = plan_deployment(load_profile_file(out), read_model(tiny), (), PlanRequest(max_model_len=4096))
    assert any("was fitted on other" in w for w in plan.warnings) and plan.speed["calibrated"]
    assert plan_cost(plan) == cost


def test_a_broken_calibration_block_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    doc = yaml.safe_load((Path(__file__).parents[2] / "deploy" / "profiles" / "l4.yaml").read_text())
    bad.write_text(yaml.safe_dump(doc | {"calibration": {"bandwidth_gbs": -1}}))
    with pytest.raises(PlanError, match="calibration lacks"):
        load_profile_file(bad)


def test_calibrating_an_unreachable_server_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "cal.yaml"
    r = CliRunner().invoke(
        cli,
        ["deploy", "calibrate", "--url", "http://127.0.0.1:1", "--no-adapter", "--profile", "cpu", "--out", str(out)],
    )
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.output.strip() == "error: http://127.0.0.1:1: unreachable (ConnectError); start the server or fix --url"
    assert list(tmp_path.iterdir()) == []


def test_a_users_file_at_out_is_refused_before_any_engine_is_asked(tmp_path):
    """The --out check comes first: the server here is unreachable, and the error is about the file."""
    mine = tmp_path / "notes.yaml"
    mine.write_text("mine: true\n")
    args = ["deploy", "calibrate", "--url", "http://127.0.0.1:1", "--no-adapter", "--profile", "cpu"]
    r = CliRunner().invoke(cli, [*args, "--out", str(mine)])
    assert r.exit_code == 2 and "was not written by" in r.output and "unreachable" not in r.output, r.output
    assert mine.read_text() == "mine: true\n"
    r = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "no-such-folder" / "cal.yaml")])
    assert r.exit_code == 2 and "does not exist" in r.output and not (tmp_path / "no-such-folder").exists()


def test_a_point_without_timed_gaps_is_one_line_not_a_crash():
    """Every token in the first chunk (a client that read too late): no gap to time, one line."""
    from lcserve.deploy.calibrate import POINTS, measure_points
    from lcserve.errors import EngineError

    itl_point = next(p for p in POINTS if p[-1] == "itl")
    with pytest.raises(EngineError, match="tokens in one chunk, so no inter-token gap"):
        measure_points(lambda *_: ([0.1], []), lambda _: None, [itl_point], repeats=1)
    (point,) = measure_points(lambda *_: ([0.1], [0.02, 0.04]), lambda _: None, [itl_point], repeats=3)
    assert point.measured_s == pytest.approx(0.03)


def test_a_chunk_of_several_tokens_shares_its_gap():
    from lcserve.deploy.measure import token_gaps

    # 1 token at 0.0 s, then 1 token at 0.1 s, then 3 tokens at 0.4 s: four timed tokens, 0.4 s in all
    assert token_gaps([(0.0, 1), (0.1, 1), (0.4, 3)]) == pytest.approx([0.1, 0.1, 0.1, 0.1])
    assert token_gaps([(0.0, 5)]) == []
