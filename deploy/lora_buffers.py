"""LoRA: the max_loras and max_lora_rank the adapters need, and the buffers vLLM allocates for them at
startup (whatever adapter is loaded later), which come out of the KV cache's memory.
"""

from __future__ import annotations

import re

from lcserve.adapters.reader import LoraAdapter
from lcserve.errors import PlanError
from lcserve.model_config import ModelInfo
from lcserve.vllm_rules import ALLOWED_MAX_LORA_RANKS, round_max_lora_rank

from .plan_types import Choice, LoraPlan, Reason, gib

# vLLM packs these projections into one wrapped layer (qkv_proj, gate_up_proj): targeting
# any member allocates LoRA buffers for all of them.
PACKED = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"})
ROW_PARALLEL = {"o_proj", "down_proj", "out_proj", "dense", "fc2", "w2", "c_proj", "wo"}
REPLICATED_HINTS = ("q_a_proj", "kv_a_proj", "kv_a_proj_with_mqa")


def plan_lora(model: ModelInfo, adapters: list[LoraAdapter], dtype_bytes: int) -> Choice[LoraPlan]:
    """One slot per adapter at the smallest rank vLLM allows that holds the largest adapter."""
    rank = max(a.max_rank for a in adapters)
    max_lora_rank = round_max_lora_rank(rank)
    if max_lora_rank is None:
        raise PlanError(
            f"adapter rank {rank} is above vLLM's largest max_lora_rank {ALLOWED_MAX_LORA_RANKS[-1]}; "
            f"largest feasible: {ALLOWED_MAX_LORA_RANKS[-1]} (merge this adapter into the base instead)"
        )
    modules = wrapped_modules(model, adapters)
    if not modules:
        raise PlanError(
            f"no module of {model.path} matches the adapters' target_modules "
            f"({', '.join(str(a.target_modules) for a in adapters)}); is the adapter for this base?"
        )
    names = tuple(sorted({m.rsplit(".", 1)[-1] for m in modules}))
    plan = LoraPlan(max_loras=len(adapters), max_lora_rank=max_lora_rank, target_modules=names, buffer_bytes=0)
    plan = LoraPlan(plan.max_loras, plan.max_lora_rank, names, lora_buffer_bytes(model, plan, 1, dtype_bytes))
    why = f"largest adapter rank {rank} rounded up to a rank vLLM allows {ALLOWED_MAX_LORA_RANKS}"
    return Choice(plan, reasons=(Reason("max_lora_rank", str(max_lora_rank), why),))


def wrapped_modules(model: ModelInfo, adapters: list[LoraAdapter]) -> set[str]:
    """Full module names vLLM wraps for these adapters (packed siblings included)."""
    layer_modules = [m for m in model.linear_shapes if ".layers." in m or ".h." in m]
    matched: set[str] = set()
    for a in adapters:
        t = a.target_modules
        if t is None:  # target_parameters only: no linear module is wrapped
            continue
        for m in layer_modules:
            if (
                t == "all-linear"
                or (isinstance(t, str) and re.fullmatch(t, m))
                or (not isinstance(t, str) and any(m == x or m.endswith("." + x) for x in t))
            ):
                matched.add(m)
    for m in list(matched):
        parent, short = m.rsplit(".", 1)
        for group in PACKED:
            if short in group:
                matched |= {f"{parent}.{s}" for s in group if f"{parent}.{s}" in model.linear_shapes}
    return matched


def lora_buffer_bytes(model: ModelInfo, lora: LoraPlan, t: int, dtype_bytes: int) -> int:
    """max_loras x max_lora_rank x sum(in + out) x dtype bytes, with TP sharding of
    column-parallel outputs and row-parallel inputs (vLLM lora/layers create_lora_weights)."""
    total = 0
    wanted = set(lora.target_modules) | {s for g in PACKED if g & set(lora.target_modules) for s in g}
    for name, (out, inp) in model.linear_shapes.items():
        short = name.rsplit(".", 1)[-1]
        if short not in wanted or not (".layers." in name or ".h." in name):
            continue
        if short in ROW_PARALLEL:
            inp //= t
        elif not short.startswith(REPLICATED_HINTS):
            out //= t
        total += inp + out
    return lora.max_loras * lora.max_lora_rank * total * dtype_bytes


def lora_buffers_reason(lora: LoraPlan, device_bytes: int, dtype_bytes: int) -> Reason:
    """Why the buffers take `device_bytes` on one device."""
    return Reason(
        "LoRA buffers",
        gib(device_bytes),
        f"max_loras {lora.max_loras} x max_lora_rank "
        f"{lora.max_lora_rank} x sum(in + out) over wrapped modules ({', '.join(lora.target_modules)}) x "
        f"{dtype_bytes} B, per device",
    )
