"""The length ladder, the tiers, model resolution, the time estimate and trimming to a budget
(pure, no engine)."""

import re

import pytest

from lcserve.errors import ProbeError
from lcserve.serving.probes.client import ServedModel
from lcserve.serving.probes.plan import (
    REPETITION_WINDOW,
    TIERS,
    Rates,
    cached_prefill_s,
    estimate_s,
    fit_style_lengths,
    ladder,
    ladder_top,
    make_plan,
    spread,
    trim,
)
from lcserve.serving.probes.runner import check_lengths, resolve_models

RATES = {
    "base": Rates(prefill=0.0006, growth=3e-8, decode=0.03, logprob=0.002),
    "writer": Rates(prefill=0.0009, growth=4e-8, decode=0.04, logprob=0.003),
}


def test_prompt_cost_grows_with_length():
    r = RATES["base"]
    assert r.prompt_s(1000) == pytest.approx(1000 * (0.0006 + 3e-5))
    assert r.prompt_s(32000) / 32000 > r.prompt_s(1000) / 1000
    assert r.prompt_s(1000, logprobs=True) > r.prompt_s(1000)


def test_ladder_doubles_from_half_the_training_length():
    assert ladder(256, 8192) == [128, 256, 512, 1024, 2048, 4096, 8192]
    assert ladder(256, 10000) == [128, 256, 512, 1024, 2048, 4096, 8192, 10000]
    assert ladder(300, 8192) == [150, 300, 600, 1200, 2400, 4800, 8192]
    assert ladder(4096, 2048) == [2048]


def test_ladder_above_the_server_is_an_error():
    with pytest.raises(ProbeError, match="above the server's max_model_len 1024"):
        ladder(4096, 1024)


def test_lengths_above_max_model_len_are_one_clear_error():
    assert check_lengths((1024, 256, 1024), 8192, "http://x") == [256, 1024]
    with pytest.raises(
        ProbeError, match=r"--lengths 16384, 32768 above the max_model_len 8192 of http://x; .*--max-model-len"
    ):
        check_lengths((256, 16384, 32768), 8192, "http://x")


SERVED = {
    "base": ServedModel("base", 8192, None, "/models/base"),
    "writer": ServedModel("writer", 8192, "base", "/nonexistent/writer"),
    "other": ServedModel("other", 8192, "elsewhere", "/nonexistent/other"),
}


def test_resolve_models_finds_the_adapters_of_the_base():
    assert resolve_models(SERVED, "http://x", "base", None, 256) == {"writer": 256}
    assert resolve_models(SERVED, "http://x", "base", (), None) == {}


@pytest.mark.parametrize(
    "base, adapters, message",
    [
        (
            "nope",
            None,
            re.escape("http://x does not serve a model named 'nope' (it serves: base, other, writer); pass --base"),
        ),
        ("base", ("missing",), "does not serve an adapter named 'missing'"),
        ("base", ("writer",), "the training length of adapter 'writer' is unknown .* pass --training-len"),
    ],
)
def test_resolve_models_errors(base, adapters, message):
    with pytest.raises(ProbeError, match=message):
        resolve_models(SERVED, "http://x", base, adapters, None)


def quick_plan(models=("base", "writer"), style_models=()):
    tier = TIERS["quick"]
    lengths = ladder(256, ladder_top(tier, 256, 8192))
    return make_plan(tier, models, lengths, 256, 8192, style_models, (1024, 4096, 8192))


def test_quick_plan_shape():
    plan = quick_plan()
    # half the training length to 8x it, not to max_model_len
    assert plan.lengths == (128, 256, 512, 1024, 2048)
    # 5 lengths x (12 passkey + 3 needle depths x 4) + 4 controls + loss + repetition, per model
    assert len(plan.passkey_depths) == 12 and plan.needle_per_depth == 4 and len(plan.needle_depths) == 3
    assert plan.requests() == 2 * (5 * 24 + 4 + 2)
    assert plan.loss_tokens == 2048 and plan.generation_tokens == 2 * REPETITION_WINDOW
    assert plan.style_models == ()  # no writer: no style at length


def test_quick_plan_with_a_writer_adds_style_at_length():
    plan = quick_plan(style_models=("base", "writer"))
    assert plan.style_lengths == (1024, 4096, 8192) and plan.style_prompts == 6
    assert plan.requests() == 2 * (5 * 24 + 4 + 2) + 3 * 6 * 2


def test_passkey_depths_spread_evenly():
    assert spread(12)[0] == 0.05 and spread(12)[-1] == 0.95 and len(set(spread(12))) == 12
    assert spread(3) == (0.05, 0.5, 0.95) and spread(1) == (0.5,)


def test_ladder_top_is_8x_the_training_length_capped_by_the_server():
    assert ladder_top(TIERS["quick"], 256, 8192) == 2048
    assert ladder_top(TIERS["quick"], 4096, 8192) == 8192
    assert ladder_top(TIERS["full"], 256, 32768) == 32768


def test_style_lengths_above_max_model_len_are_left_out_with_a_note_or_refused_when_asked():
    assert fit_style_lengths((1024, 4096, 8192, 16384), 8192, "http://x", explicit=False) == (
        (1024, 4096, 8192),
        ["style at length 16384 (above max_model_len 8192)"],
    )
    with pytest.raises(ProbeError, match=r"--style-lengths 16384 above the max_model_len 8192 of http://x; drop"):
        fit_style_lengths((1024, 16384), 8192, "http://x", explicit=True)


def test_the_prefix_cache_makes_deepest_first_cheaper():
    """Deepest first, each later prompt pays only from its needle on: at 1 ms a token and no growth,
    needles at 0.5, 1.0 and 0.0 of 1000 tokens cost 1000 + 500 + 1000 tokens (by hand)."""
    flat = Rates(prefill=0.001, growth=0.0, decode=0.03, logprob=0.002)
    assert cached_prefill_s(flat, 1000, [0.5, 1.0, 0.0]) == pytest.approx(2.5)
    assert cached_prefill_s(flat, 1000, [0.9] * 4) == pytest.approx(1.0 + 3 * 0.1)


def test_estimate_grows_with_the_plan():
    small = make_plan(TIERS["quick"], ("base",), [128, 256], 256, 8192)
    assert 0 < estimate_s(small, RATES) < estimate_s(quick_plan(("base",)), RATES) < estimate_s(quick_plan(), RATES)
    assert estimate_s(quick_plan(), RATES) < estimate_s(quick_plan(style_models=("base", "writer")), RATES)


def test_trim_shortens_runs_first_then_style_depths_and_top_lengths():
    plan = make_plan(
        TIERS["full"], ("base", "writer"), ladder(256, 32768), 256, 32768, ("base", "writer"), (1024, 4096)
    )
    full = estimate_s(plan, RATES)
    smaller, dropped, fits = trim(plan, RATES, full * 0.1)
    assert dropped[:3] == [
        "repetition continuation 4096 -> 2048 tokens",
        "repetition continuation 2048 -> 1024 tokens",
        "repetition continuation 1024 -> 512 tokens",
    ]
    first_depth = next(i for i, d in enumerate(dropped) if "depths" in d)
    assert dropped.index("style at length 4096") < first_depth
    assert any(d.startswith("loss document") for d in dropped[:first_depth])
    assert dropped[first_depth] == "passkey depths " + ", ".join(f"{d:g}" for d in spread(12)[1::2])
    assert dropped[-1].startswith("length ") and fits and estimate_s(smaller, RATES) <= full * 0.1
    assert smaller.generation_tokens == 512 and smaller.loss_tokens >= 512


def test_trim_keeps_a_plan_that_fits_and_says_when_nothing_is_left_to_drop():
    plan = quick_plan()
    assert trim(plan, RATES, 10**6) == (plan, [], True)
    smallest, dropped, fits = trim(plan, RATES, 0.6)
    assert not fits and len(smallest.lengths) == 3 and dropped[-1] == "length 1024"


def test_the_tiers_own_budget_keeps_every_prompt():
    plan = quick_plan(style_models=("base", "writer"))
    smallest, dropped, fits = trim(plan, RATES, 0.6, keep_power=True)
    assert not fits and smallest.lengths == plan.lengths and smallest.passkey_depths == plan.passkey_depths
    assert smallest.needle_depths == plan.needle_depths and smallest.style_lengths == plan.style_lengths
    assert all(d.startswith(("repetition", "loss")) for d in dropped)
