"""The length ladder, the tiers, model resolution, the time estimate and trimming to a budget
(pure, no engine)."""

import re

import pytest

from lcserve.errors import ProbeError
from lcserve.serving.probes.client import ServedModel
from lcserve.serving.probes.plan import TIERS, Rates, estimate_s, ladder, make_plan, trim
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


def quick_plan(models=("base", "writer")):
    return make_plan(TIERS["quick"], models, ladder(256, 8192), 256, 8192)


def test_quick_plan_shape():
    plan = quick_plan()
    assert plan.lengths[0] == 128 and plan.lengths[-1] == 8192
    # 7 lengths x (2 passkey + 3 needle) + 4 controls + loss + repetition, per model
    assert plan.requests() == 2 * (7 * 5 + 4 + 2)
    assert plan.loss_tokens == 4096 and plan.generation_tokens == 1024


def test_estimate_grows_with_the_plan():
    small = make_plan(TIERS["quick"], ("base",), [128, 256], 256, 8192)
    assert 0 < estimate_s(small, RATES) < estimate_s(quick_plan(("base",)), RATES) < estimate_s(quick_plan(), RATES)


def test_trim_drops_depths_first_then_generation_loss_and_top_lengths():
    plan = make_plan(TIERS["full"], ("base", "writer"), ladder(256, 32768), 256, 32768)
    full = estimate_s(plan, RATES)
    trimmed, dropped, fits = trim(plan, RATES, full * 0.6)
    assert fits and estimate_s(trimmed, RATES) <= full * 0.6
    assert dropped[0] == "needle depths 0.25, 0.75"
    assert trimmed.lengths == plan.lengths  # depths alone were enough
    smaller, dropped, fits = trim(plan, RATES, full * 0.1)
    assert dropped[:4] == [
        "needle depths 0.25, 0.75",
        "needle depths 0, 1",
        "passkey depths 0.1, 0.9",
        "repetition continuation 4096 -> 2048 tokens",
    ]
    assert any(d.startswith("loss document") for d in dropped) and dropped[-1].startswith("length ")
    assert smaller.needle_depths == (0.5,) and smaller.passkey_depths == (0.5,)
    assert smaller.generation_tokens == 512 and smaller.loss_tokens >= 512
    assert fits and estimate_s(smaller, RATES) <= full * 0.1


def test_trim_keeps_a_plan_that_fits_and_says_when_nothing_is_left_to_drop():
    plan = quick_plan()
    assert trim(plan, RATES, 10**6) == (plan, [], True)
    smallest, dropped, fits = trim(plan, RATES, 0.6)
    assert not fits and len(smallest.lengths) == 3 and dropped[-1] == "length 1024"


def test_trim_can_keep_every_length():
    plan = quick_plan()
    smallest, dropped, fits = trim(plan, RATES, 0.6, keep_lengths=True)
    assert not fits and smallest.lengths == plan.lengths
    assert not any(d.startswith("length") for d in dropped)
