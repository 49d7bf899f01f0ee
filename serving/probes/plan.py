"""What a probe run asks the server: the length ladder, the tiers, the time estimate, and the
trimming of a plan to a time budget (fewer depths first). Pure functions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lcserve.errors import ProbeError

from .tasks import ANSWER_TOKENS

REPETITION_WINDOW = 256  # tokens per rep-n window
REPETITION_PROMPT_TOKENS = 64  # the opening of the document that the long continuation starts from
# Seeded sampling, not greedy: a small model's greedy continuation loops within a few hundred
# tokens whatever its context, which would hide any difference between base and adapter.
REPETITION_SAMPLING = {"temperature": 0.7, "top_p": 0.95}


def spread(count: int, first: float = 0.05, last: float = 0.95) -> tuple[float, ...]:
    """`count` depths evenly from `first` to `last`: one passkey prompt each, so a length gets
    `count` paired prompts whose text before the needle is the same haystack."""
    if count == 1:
        return ((first + last) / 2,)
    return tuple(round(first + (last - first) * i / (count - 1), 3) for i in range(count))


@dataclass(frozen=True)
class Tier:
    name: str
    max_length: int | None  # cap on the ladder's top (None: the server's max_model_len)
    passkey_depths: tuple[float, ...]  # one prompt per depth and length
    needle_depths: tuple[float, ...]
    distractors: int
    controls: int
    loss_tokens: int  # cap on the length of the per-position loss document
    generation_tokens: int  # length of the repetition continuation
    budget_minutes: float | None  # default time budget (the plan is trimmed to fit it)
    max_factor: int | None = None  # the ladder stops at this many times the training length
    needle_per_depth: int = 1  # needle prompts per (length, depth) cell, each its own key and value
    style_lengths: tuple[int, ...] = ()  # style at length: context lengths of the preamble + answer
    style_prompts: int = 0  # held-out prompts per style length
    style_tokens: int = 0  # answer budget of a style prompt


TIERS = {
    # 8x the training length with power to decide: 12 paired passkey prompts per length, 3 needle depths
    # x 4 prompts, two repetition windows (first vs later), and the writer's style at 1k to 16k tokens.
    # About 6 minutes on 2 CPU cores (Gemma 3 270M, base + the demo writer): the prefix cache serves each
    # prompt's text before its needle, and base and adapter decode side by side.
    "quick": Tier(
        "quick",
        None,
        spread(12),
        (0.0, 0.5, 1.0),
        2,
        4,
        4096,
        2 * REPETITION_WINDOW,
        9.5,
        max_factor=8,
        needle_per_depth=4,
        style_lengths=(1024, 4096, 8192, 16384),
        style_prompts=6,
        style_tokens=96,
    ),  # fmt: skip
    "full": Tier(
        "full",
        None,
        spread(12),
        (0.0, 0.25, 0.5, 0.75, 1.0),
        2,
        10,
        32768,
        4096,
        None,
        needle_per_depth=4,
        style_lengths=(1024, 4096, 8192, 16384),
        style_prompts=24,
        style_tokens=128,
    ),  # fmt: skip
}


@dataclass(frozen=True)
class Plan:
    models: tuple[str, ...]
    lengths: tuple[int, ...]
    passkey_depths: tuple[float, ...]
    needle_depths: tuple[float, ...]
    distractors: int
    controls: int
    loss_tokens: int
    generation_tokens: int
    reference_length: int  # the (shortest) training length the ladder is built on
    needle_per_depth: int = 1
    style_models: tuple[str, ...] = ()  # the base and the writers whose style is scored (empty: no style probe)
    style_lengths: tuple[int, ...] = ()
    style_prompts: int = 0
    style_tokens: int = 0

    def requests(self) -> int:
        per_model = len(self.lengths) * (len(self.passkey_depths) + len(self.needle_depths) * self.needle_per_depth)
        per_model += self.controls + (self.loss_tokens > 0) + (self.generation_tokens > 0)
        style = len(self.style_lengths) * self.style_prompts * len(self.style_models)
        return per_model * len(self.models) + style


@dataclass(frozen=True)
class Rates:
    """Seconds per token for one model on this server, measured by a few calibration requests.

    A prompt token costs more the longer the prompt (attention reads all earlier tokens):
    `growth` is that extra cost per token of prompt, fitted from two prompt sizes.
    """

    prefill: float
    growth: float
    decode: float
    logprob: float  # prefill with prompt_logprobs, much dearer: a full-vocabulary softmax per position

    def prompt_s(self, tokens: int, logprobs: bool = False) -> float:
        return tokens * ((self.logprob if logprobs else self.prefill) + self.growth * tokens)

    def extend_s(self, cached: int, tokens: int) -> float:
        """A prompt of `tokens` whose first `cached` tokens the prefix cache already holds."""
        return self.prompt_s(tokens) - self.prompt_s(min(cached, tokens))


def ladder(reference: int, top: int) -> list[int]:
    """reference x 0.5, 1, 2, 4, ... up to `top`, and `top` itself when the doubling skips it.

    The first rung (half the training length) is the short control: an adapter that fails
    there broke the answer format, not long context.
    """
    if reference // 2 > top:
        raise ProbeError(
            f"the ladder starts at {reference // 2} tokens (half the training length {reference}), above the server's max_model_len {top}"
        )
    lengths = []
    length = max(reference // 2, 1)
    while length <= top:
        lengths.append(length)
        length *= 2
    if lengths[-1] < top:
        lengths.append(top)
    return lengths


def ladder_top(tier: Tier, reference: int, max_model_len: int) -> int:
    """The ladder's top rung: max_model_len, capped by the tier's length and factor of the training length."""
    caps = [max_model_len, tier.max_length or max_model_len]
    if tier.max_factor:
        caps.append(tier.max_factor * reference)
    return min(caps)


def fit_style_lengths(
    lengths: tuple[int, ...], max_model_len: int, url: str, explicit: bool
) -> tuple[tuple[int, ...], list[str]]:
    """The style-at-length lengths that fit max_model_len, and a note for each left out; ProbeError
    for one the user asked for explicitly."""
    over = [n for n in lengths if n > max_model_len]
    if over and explicit:
        raise ProbeError(
            f"--style-lengths {', '.join(map(str, over))} above the max_model_len {max_model_len} of {url}; "
            f"drop them or restart vLLM with a larger --max-model-len"
        )
    kept = tuple(sorted({n for n in lengths if n <= max_model_len}))
    return kept, [f"style at length {n} (above max_model_len {max_model_len})" for n in over]


def make_plan(
    tier: Tier,
    models: tuple[str, ...],
    lengths: list[int],
    reference: int,
    max_model_len: int,
    style_models: tuple[str, ...] = (),
    style_lengths: tuple[int, ...] = (),
) -> Plan:
    """The tier made concrete for these models and lengths; style at length only with writers to score."""
    return Plan(
        models=models,
        lengths=tuple(lengths),
        passkey_depths=tier.passkey_depths,
        needle_depths=tier.needle_depths,
        distractors=tier.distractors,
        controls=tier.controls,
        loss_tokens=min(tier.loss_tokens, max(lengths)),
        generation_tokens=min(tier.generation_tokens, max_model_len - REPETITION_PROMPT_TOKENS),
        reference_length=reference,
        needle_per_depth=tier.needle_per_depth,
        style_models=style_models if style_lengths and tier.style_prompts else (),
        style_lengths=style_lengths if style_models else (),
        style_prompts=tier.style_prompts if style_models else 0,
        style_tokens=tier.style_tokens,
    )


def cached_prefill_s(r: Rates, tokens: int, depths: list[float]) -> float:
    """Prefill of one length's prompts sent deepest first over one haystack: the first is computed
    whole, each later one from its needle on (the text before it is in the prefix cache)."""
    order = sorted(depths, reverse=True)
    return r.prompt_s(tokens) + sum(r.extend_s(int(d * tokens), tokens) for d in order[1:])


def estimate_s(plan: Plan, rates: dict[str, Rates]) -> float:
    """Engine seconds the plan needs, from the calibrated rates, with the prefix cache's savings and
    the batched decode of the runner's waves (base and adapter side by side finish sooner still)."""
    needles = [d for d in plan.needle_depths for _ in range(plan.needle_per_depth)]
    prompts = len(plan.lengths) * (len(plan.passkey_depths) + len(needles)) + plan.controls
    total = 0.0
    for model in plan.models:
        r = rates[model]
        for length in plan.lengths:
            tokens = length - ANSWER_TOKENS
            total += cached_prefill_s(r, tokens, list(plan.passkey_depths)) + cached_prefill_s(r, tokens, needles)
        total += ANSWER_TOKENS * prompts * r.decode / 4  # four prompts of a model decode as one batch
        total += r.prompt_s(plan.loss_tokens, logprobs=True)
        total += r.prompt_s(REPETITION_PROMPT_TOKENS) + plan.generation_tokens * r.decode
    for model in plan.style_models:
        r = rates[model]
        for length in plan.style_lengths:
            preamble = length - plan.style_tokens
            total += r.prompt_s(preamble) + (plan.style_prompts - 1) * r.extend_s(preamble - 32, preamble)
            total += 2 * plan.style_tokens * r.decode  # the first answer, then the others decoded as one batch
    return total


def _thinned(depths: tuple[float, ...]) -> tuple[float, ...]:
    """Every other depth, ends kept (0, .25, .5, .75, 1 -> 0, .5, 1); from two or three, the middle one."""
    return depths[::2] if len(depths) > 3 else (depths[len(depths) // 2],)


def _depths(depths: tuple[float, ...]) -> str:
    return ", ".join(f"{d:g}" for d in depths)


def _shorter_runs(plan: Plan):
    """The long continuation (two windows kept: a first and a later one), then the loss document
    (kept beyond twice the training length): the steps that cost no statistical power."""
    if plan.generation_tokens > 2 * REPETITION_WINDOW:
        shorter = max(2 * REPETITION_WINDOW, plan.generation_tokens // 2)
        return replace(
            plan, generation_tokens=shorter
        ), f"repetition continuation {plan.generation_tokens} -> {shorter} tokens"
    floor = 2 * plan.reference_length
    if plan.loss_tokens > floor:
        shorter = max(floor, plan.loss_tokens // 2)
        return replace(plan, loss_tokens=shorter), f"loss document {plan.loss_tokens} -> {shorter} tokens"
    return None


def _reductions(plan: Plan, keep_power: bool):
    """The next smaller plan and what it drops, in the order: long generation, loss document, and
    unless `keep_power`: the longest style length, depths, top lengths; None when it cannot shrink."""
    step = _shorter_runs(plan)
    if step or keep_power:
        return step
    if len(plan.style_lengths) > 1:
        return replace(plan, style_lengths=plan.style_lengths[:-1]), f"style at length {plan.style_lengths[-1]}"
    if len(plan.needle_depths) > 1 or len(plan.passkey_depths) > 1:
        if len(plan.needle_depths) >= len(plan.passkey_depths):
            kept = _thinned(plan.needle_depths)
            gone = tuple(d for d in plan.needle_depths if d not in kept)
            return replace(plan, needle_depths=kept), f"needle depths {_depths(gone)}"
        kept = _thinned(plan.passkey_depths)
        gone = tuple(d for d in plan.passkey_depths if d not in kept)
        return replace(plan, passkey_depths=kept), f"passkey depths {_depths(gone)}"
    if len(plan.lengths) > 3:
        return replace(
            plan, lengths=plan.lengths[:-1], loss_tokens=min(plan.loss_tokens, plan.lengths[-2])
        ), f"length {plan.lengths[-1]}"
    return None


def trim(
    plan: Plan, rates: dict[str, Rates], budget_s: float, keep_power: bool = False
) -> tuple[Plan, list[str], bool]:
    """Shrink the plan until its estimate fits the budget. Returns the plan, what was dropped
    (in order) and whether it now fits; `keep_power` never drops a rung, a depth or a prompt,
    only shortens the continuation and the loss document."""
    dropped: list[str] = []
    while estimate_s(plan, rates) > budget_s:
        step = _reductions(plan, keep_power)
        if step is None:
            return plan, dropped, False
        plan, message = step
        dropped.append(message)
    return plan, dropped, True


def parse_lengths(text: str, option: str = "--lengths") -> tuple[int, ...]:
    """'128,1k,8k' -> (128, 1024, 8192)."""
    lengths = []
    for part in text.split(","):
        part = part.strip().lower()
        try:
            value = int(part[:-1]) * 1024 if part.endswith("k") else int(part)
        except ValueError:
            raise ProbeError(f"{option}: '{part}' is not a token count; write e.g. 128,1k,8k") from None
        if value <= 0:
            raise ProbeError(f"{option}: {value} must be positive")
        lengths.append(value)
    return tuple(lengths)
