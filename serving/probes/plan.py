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


@dataclass(frozen=True)
class Tier:
    name: str
    max_length: int | None  # cap on the ladder's top (None: the server's max_model_len)
    passkey_depths: tuple[float, ...]
    needle_depths: tuple[float, ...]
    distractors: int
    controls: int
    loss_tokens: int  # cap on the length of the per-position loss document
    generation_tokens: int  # length of the repetition continuation
    budget_minutes: float | None  # default time budget (the plan is trimmed to fit it)


TIERS = {
    # Lengths up to 8192 within 10 minutes on 2 CPU cores (Gemma 3 270M, base + one adapter):
    # the budget trims depths first when the engine is slow, e.g. a LoRA mounted on the vLLM
    # CPU build, whose prefill costs several times the base's.
    "quick": Tier("quick", 8192, (0.25, 0.75), (0.0, 0.5, 1.0), 2, 4, 4096, 1024, 9.0),
    "full": Tier("full", None, (0.1, 0.5, 0.9), (0.0, 0.25, 0.5, 0.75, 1.0), 2, 10, 32768, 4096, None),
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

    def requests(self) -> int:
        per_model = len(self.lengths) * (len(self.passkey_depths) + len(self.needle_depths)) + self.controls
        per_model += (self.loss_tokens > 0) + (self.generation_tokens > 0)
        return per_model * len(self.models)


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


def make_plan(tier: Tier, models: tuple[str, ...], lengths: list[int], reference: int, max_model_len: int) -> Plan:
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
    )


def estimate_s(plan: Plan, rates: dict[str, Rates]) -> float:
    """Engine seconds the plan needs, from the calibrated rates."""
    depths = len(plan.passkey_depths) + len(plan.needle_depths)
    answers = ANSWER_TOKENS * (len(plan.lengths) * depths + plan.controls)
    total = 0.0
    for model in plan.models:
        r = rates[model]
        total += depths * sum(r.prompt_s(length - ANSWER_TOKENS) for length in plan.lengths) + answers * r.decode
        total += r.prompt_s(plan.loss_tokens, logprobs=True)
        total += r.prompt_s(REPETITION_PROMPT_TOKENS) + plan.generation_tokens * r.decode
    return total


def _thinned(depths: tuple[float, ...]) -> tuple[float, ...]:
    """Every other depth, ends kept (0, .25, .5, .75, 1 -> 0, .5, 1); from two or three, the middle one."""
    return depths[::2] if len(depths) > 3 else (depths[len(depths) // 2],)


def _depths(depths: tuple[float, ...]) -> str:
    return ", ".join(f"{d:g}" for d in depths)


def _reductions(plan: Plan, keep_lengths: bool):
    """The next smaller plan and what it drops, in the order: depths, long generation, loss
    document, top lengths (unless kept); None when the plan cannot shrink further."""
    if len(plan.needle_depths) > 1 or len(plan.passkey_depths) > 1:
        if len(plan.needle_depths) >= len(plan.passkey_depths):
            kept = _thinned(plan.needle_depths)
            gone = tuple(d for d in plan.needle_depths if d not in kept)
            return replace(plan, needle_depths=kept), f"needle depths {_depths(gone)}"
        kept = _thinned(plan.passkey_depths)
        gone = tuple(d for d in plan.passkey_depths if d not in kept)
        return replace(plan, passkey_depths=kept), f"passkey depths {_depths(gone)}"
    if plan.generation_tokens > 2 * REPETITION_WINDOW:  # keep two windows: a first and a later one
        shorter = max(2 * REPETITION_WINDOW, plan.generation_tokens // 2)
        return replace(
            plan, generation_tokens=shorter
        ), f"repetition continuation {plan.generation_tokens} -> {shorter} tokens"
    floor = 2 * plan.reference_length  # keep positions beyond the training length in the loss curve
    if plan.loss_tokens > floor:
        shorter = max(floor, plan.loss_tokens // 2)
        return replace(plan, loss_tokens=shorter), f"loss document {plan.loss_tokens} -> {shorter} tokens"
    if not keep_lengths and len(plan.lengths) > 3:
        return replace(
            plan, lengths=plan.lengths[:-1], loss_tokens=min(plan.loss_tokens, plan.lengths[-2])
        ), f"length {plan.lengths[-1]}"
    return None


def trim(
    plan: Plan, rates: dict[str, Rates], budget_s: float, keep_lengths: bool = False
) -> tuple[Plan, list[str], bool]:
    """Shrink the plan until its estimate fits the budget. Returns the plan, what was dropped
    (in order) and whether it now fits; `keep_lengths` never drops a rung of the ladder."""
    dropped: list[str] = []
    while estimate_s(plan, rates) > budget_s:
        step = _reductions(plan, keep_lengths)
        if step is None:
            return plan, dropped, False
        plan, message = step
        dropped.append(message)
    return plan, dropped, True


def parse_lengths(text: str) -> tuple[int, ...]:
    """'128,1k,8k' -> (128, 1024, 8192)."""
    lengths = []
    for part in text.split(","):
        part = part.strip().lower()
        try:
            value = int(part[:-1]) * 1024 if part.endswith("k") else int(part)
        except ValueError:
            raise ProbeError(f"--lengths: '{part}' is not a token count; write e.g. 128,1k,8k") from None
        if value <= 0:
            raise ProbeError(f"--lengths: {value} must be positive")
        lengths.append(value)
    return tuple(lengths)
