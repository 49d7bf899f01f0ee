"""The context: how long a request may be (max_model_len), past the model's derived maximum only with
YaRN, and how that length compares with what the adapters were trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

from lcserve.adapters.reader import LoraAdapter
from lcserve.errors import PlanError
from lcserve.model_config import ModelInfo
from lcserve.model_facts import cdiv

from .device import Device
from .kv import KVLayout, fits, largest_fitting_len
from .memory import does_not_fit
from .plan_types import Choice, Explained, PlanRequest, Reason, gib


@dataclass(frozen=True)
class ContextLimit(Explained):
    """The largest max_model_len the plan may choose, and the `--hf-overrides` (YaRN) that allow it."""

    limit: int
    hf_overrides: dict | None


def context_limit(model: ModelInfo, request: PlanRequest) -> ContextLimit:
    """The derived maximum, or past it only with YaRN."""
    derived, wanted = model.derived_max_len, request.max_model_len
    if wanted is None or wanted <= derived:
        return ContextLimit(derived, None)
    if request.rope_scaling is None:
        raise PlanError(
            f"{{max_model_len}} {wanted} is above the derived maximum {derived} "
            f"({model.derived_max_len_reason}); largest feasible: {{max_model_len}} {derived}. To go "
            "further, scale RoPE explicitly with {rope_scaling} yarn",
            "max_model_len",
        )
    reason = Reason(
        "hf_overrides",
        "YaRN",
        f"context {wanted} > derived {derived}: RoPE scaled by YaRN factor "
        f"{_yarn_factor(model, wanted):g} = {wanted} / original {_original_len(model)} on "
        "full-attention layers",
    )
    warning = (
        f"max_model_len {wanted} is past the model's trained range ({derived}); YaRN is set through "
        f"--hf-overrides; measure quality with `lcserve probe` before relying on it"
    )
    return ContextLimit(wanted, yarn_overrides(model, wanted), reasons=(reason,), warnings=(warning,))


def _original_len(model: ModelInfo) -> int:
    for p in model.rope_parameters.values():
        if p.get("original_max_position_embeddings"):
            return int(p["original_max_position_embeddings"])
    return model.derived_max_len


def _yarn_factor(model: ModelInfo, context: int) -> float:
    return cdiv(100 * context, _original_len(model)) / 100


def yarn_overrides(model: ModelInfo, context: int) -> dict:
    """The `--hf-overrides` that make vLLM apply YaRN and accept `context` as max_model_len.

    vLLM treats a YaRN max_position_embeddings as already scaled, so the override sets it
    (and model_max_length, which caps it through the tokenizer config) to the new length.
    With per-layer-type RoPE (Gemma 3) only full-attention layers are scaled: sliding
    layers never see distances beyond their window.
    """
    yarn = {
        "rope_type": "yarn",
        "factor": _yarn_factor(model, context),
        "original_max_position_embeddings": _original_len(model),
    }
    params = model.rope_parameters
    if set(params) == {"default"}:
        rope = {**params["default"], **yarn}
    else:
        rope = {k: ({**v, **yarn} if k == "full_attention" else dict(v)) for k, v in params.items()}
    return {"max_position_embeddings": context, "model_max_length": context, "rope_parameters": rope}


def choose_max_model_len(
    device: Device,
    layout: KVLayout,
    kv_bytes: int,
    request: PlanRequest,
    limit: int,
    full_context_target: int,
    tp: int,
) -> Choice[int]:
    """The requested length when the target fits it, else the derived maximum, else the largest that fits."""
    model, in_flight = device.model, device.in_flight_tokens
    derived, n = model.derived_max_len, full_context_target
    wanted = request.max_model_len
    if wanted is not None:
        if not fits(layout, kv_bytes, wanted, in_flight(wanted), n):
            raise _requested_len_does_not_fit(device, layout, kv_bytes, request, limit, n)
        why = f"requested {wanted} (derived maximum {derived}: {model.derived_max_len_reason})"
        return Choice(wanted, reasons=(Reason("max_model_len", str(wanted), why),))
    if fits(layout, kv_bytes, limit, in_flight(limit), n):
        why = f"the derived maximum ({model.derived_max_len_reason})"
        return Choice(limit, reasons=(Reason("max_model_len", str(limit), why),))
    best = largest_fitting_len(layout, kv_bytes, limit, in_flight(limit), n)
    if best < 1:
        raise does_not_fit(device, tp, limit)
    why = (
        f"largest length at which {n} request(s) fit the KV budget "
        f"{gib(kv_bytes)} (bisection, as vLLM's --max-model-len auto); derived maximum {derived} "
        "does not fit"
    )
    return Choice(best, reasons=(Reason("max_model_len", str(best), why),))


def _requested_len_does_not_fit(
    device: Device, layout: KVLayout, kv_bytes: int, request: PlanRequest, limit: int, n: int
) -> PlanError:
    """The requested length at `n` full-length requests needs more blocks than the budget: the largest
    length that fits, and (for n > 1) how many requests fit at the requested length."""
    wanted, in_flight = request.max_model_len, device.in_flight_tokens
    per_request = layout.blocks_per_request(wanted, in_flight(wanted))
    best_len = largest_fitting_len(layout, kv_bytes, limit, in_flight(limit), n)
    best_n = (kv_bytes // layout.bytes_per_block - 1) // per_request
    target = f" ({{full_context_requests}} {n})" if request.full_context_requests else ""
    return PlanError(
        f"{{max_model_len}} {wanted} x {n} request(s) at full length{target} needs "
        f"{n * per_request + 1} KV blocks of {layout.bytes_per_block / 1024**2:.2f} MiB, the budget "
        f"holds {kv_bytes // layout.bytes_per_block} ({gib(kv_bytes)}); largest feasible: "
        f"{{max_model_len}} {best_len}"
        + (f" at {n} request(s), or {best_n} request(s) at {{max_model_len}} {wanted}" if n > 1 else ""),
        "max_model_len",
    )


def training_ratio(adapters: list[LoraAdapter], max_len: int, threshold: float) -> Choice[float | None]:
    """max_model_len over the shortest training length among the adapters; a warning above `threshold`."""
    known = [a for a in adapters if a.training_seq_len]
    if not known:
        if not adapters:
            return Choice(None)
        why = (
            "no lcserve_adapter.json / axolotl sequence_len / "
            "training_args beside the adapter; pass --training-len to check serving vs training length"
        )
        return Choice(None, reasons=(Reason("training length", "unknown", why),))
    shortest = min(known, key=lambda a: a.training_seq_len)
    ratio = max_len / shortest.training_seq_len
    why = f"{max_len} / {shortest.training_seq_len} ({shortest.path.name}); warning above {threshold:g}x"
    reason = Reason("max_model_len / training length", f"{ratio:.1f}x", why)
    warnings = ()
    if ratio > threshold:
        warnings = (
            f"max_model_len {max_len} is {ratio:.0f}x the training length {shortest.training_seq_len} of "
            f"adapter {shortest.path.name}: quality past {shortest.training_seq_len} tokens is unmeasured; "
            f"run the long-context probes (`lcserve probe`) before serving long prompts, or lower max_model_len",
        )
    return Choice(ratio, reasons=(reason,), warnings=warnings)
