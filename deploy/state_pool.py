"""The plan's figures for a hybrid's recurrent state (state.py): what one sequence's state costs, the
block size vLLM raises, and how many sequences the state pool holds, which caps max_num_seqs.

vLLM 0.32 keeps the states in the KV block pool: a running sequence holds its state blocks whatever
its length, so at most (num_blocks - 1) / (state blocks + one block per attention group) sequences
run at once. With full CUDA graphs (GPUs) vLLM refuses to start when max_num_seqs exceeds num_blocks
("max_num_seqs (1024) exceeds available Mamba cache blocks", config/compilation.py); the CPU build
captures no graphs and starts, the sequences beyond the pool waiting. The planner's default
max_num_seqs is vLLM's, capped at the pool.
"""

from __future__ import annotations

from dataclasses import dataclass

from lcserve.errors import PlanError
from lcserve.model_config import ModelInfo
from lcserve.state_layers import STATE_KINDS

from .device import Device
from .kv import Capacity, KVLayout
from .plan_types import Explained, PlanRequest, Reason
from .state import CACHE_MODE


@dataclass(frozen=True)
class StatePool(Explained):
    """max_num_seqs after the state pool, with its reason; `pool` is None without state layers."""

    max_num_seqs: int
    why_seqs: str
    pool: int | None = None


def state_layer_count(model: ModelInfo) -> int:
    return sum(layer.kind in STATE_KINDS for layer in model.layers)


def state_reasons(layout: KVLayout, model: ModelInfo, base_block: int) -> tuple[Reason, ...]:
    """The state's own figures: its shapes, dtypes and bytes, the raised block size, the cache mode."""
    state = layout.state
    if state is None:
        return ()
    n, page = state_layer_count(model), layout.page_bytes
    reasons = []
    if layout.block_size != base_block:
        reasons.append(
            Reason(
                "block_size",
                str(layout.block_size),
                f"raised from {base_block}: the smallest multiple of max(attention kernel block "
                f"{state.kernel_block}, {base_block}) tokens whose attention page ({layout.bytes_per_token_layer} B "
                f"per token) holds one layer's state of {state.bytes} B (vLLM's Platform._align_hybrid_block_size); "
                "passed explicitly so vLLM keeps it",
            )
        )
    padding = 100 * (page - state.bytes) / state.bytes
    reasons.append(
        Reason(
            "recurrent state per sequence",
            f"{n * state.bytes} B",
            f"{n} {state.kind} layers x {state.bytes} B ({state.describe()}; {state.source}); {state.dtype_why}; "
            f"each layer's state page padded to the attention page {page} B (+{padding:.2f}%), "
            "the same at any length",
        )
    )
    checkpoint = state.blocks_per_request - 2
    reasons.append(
        Reason(
            "mamba_cache_mode",
            CACHE_MODE,
            "vLLM enables prefix caching for hybrid models by default, which sets mamba_cache_mode align: each "
            f"state group holds {state.blocks_per_request} blocks per sequence (2 + {checkpoint} prefill "
            "checkpoint), whatever its length",
        )
    )
    return tuple(reasons)


def choose_max_num_seqs(device: Device, layout: KVLayout, cap: Capacity, request: PlanRequest) -> StatePool:
    """max_num_seqs within the state pool: vLLM's default capped at it; a requested value above
    num_blocks refused on GPUs (vLLM refuses it there), warned about on the CPU build."""
    batch = device.batch
    if layout.state is None:
        return StatePool(batch.max_num_seqs, batch.why_seqs)
    state_blocks = sum(g.blocks_per_request(0, 1, 0) for g in layout.groups if g.kind in STATE_KINDS)
    attention_groups = sum(g.kind not in STATE_KINDS for g in layout.groups)
    per_seq = state_blocks + attention_groups
    pool = (cap.num_blocks - 1) // per_seq
    at = f"at max_model_len {cap.max_model_len}"
    pool_reason = Reason(
        "state pool (sequences)",
        str(pool),
        f"({cap.num_blocks} blocks - 1 null block) // ({state_blocks} state blocks + {attention_groups} attention "
        f"block(s)) per running sequence: the sequences whose states fit at once {at}",
    )
    graphs = not device.profile.is_cpu
    if request.max_num_seqs:
        seqs = request.max_num_seqs
        if graphs and seqs > cap.num_blocks:
            raise PlanError(
                f"{{max_num_seqs}} {seqs}: vLLM refuses to start with more sequences than Mamba cache blocks under "
                f"full CUDA graphs ({cap.num_blocks} blocks {at}); largest feasible: {cap.num_blocks} "
                f"({pool} hold a state at once)",
                "max_num_seqs",
            )
        warnings = ()
        if seqs > pool:
            warnings = (
                f"max_num_seqs {seqs} is above the state pool ({pool} sequences hold a state at once {at}); "
                "the others wait",
            )
        return StatePool(seqs, batch.why_seqs, pool, reasons=(pool_reason,), warnings=warnings)
    chosen = max(1, min(batch.max_num_seqs, pool))
    refusal = (
        f"vLLM refuses max_num_seqs above num_blocks {cap.num_blocks} under full CUDA graphs"
        if graphs
        else "more would wait for a state (the CPU build starts with more)"
    )
    why = (
        f"{batch.why_seqs.split(';')[0]}, capped at the state pool {pool}: {refusal}"
        if chosen < batch.max_num_seqs
        else f"{batch.why_seqs}; within the state pool {pool}"
    )
    return StatePool(chosen, why, pool, reasons=(pool_reason,))
