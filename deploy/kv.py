"""KV cache accounting, replayed from vLLM's own (v1/core/kv_cache_utils.py, v1/kv_cache_interface.py).

vLLM sizes the cache in blocks of `block_size` tokens. Layers with the same KV kind
share a block table; a hybrid model (sliding + full layers) is split into groups of an
equal number of layers (`_get_kv_cache_groups_uniform_page_size`), so one block holds
one page for every layer of a group and costs `group_size x page` bytes. A request at
`max_model_len` needs `cdiv(max_model_len, block_size)` blocks in each full-attention
group and only `cdiv(min(window - 1 + in_flight_tokens, max_model_len), block_size) + 1`
in each sliding-window group; the groups draw from one pool. From there:

    num_blocks      = kv_bytes // bytes_per_block
    max_concurrency = num_blocks / blocks_per_request      (vLLM's "Maximum concurrency")
    kv_tokens       = int(max_concurrency x max_model_len)  (vLLM's "KV cache size: N tokens")
"""

from __future__ import annotations

from dataclasses import dataclass

from lcserve.errors import PlanError
from lcserve.model_config import ModelInfo
from lcserve.model_facts import cdiv
from lcserve.state_layers import NO_CACHE, STATE_KINDS

from .state import StateSpec, aligned_block_size


@dataclass(frozen=True)
class KVGroup:
    kind: str  # "full", "sliding", "mla" or a state kind (state.py)
    window: int | None
    layers: int  # real layers in the group (the last group of a kind may be padded)
    layer_ids: tuple[int, ...] = ()  # their indices in the model
    state_blocks: int = 0  # a state group: blocks per sequence, whatever its length

    def blocks_per_request(self, max_model_len: int, block_size: int, in_flight_tokens: int) -> int:
        if self.kind in STATE_KINDS:
            return self.state_blocks
        if self.kind == "sliding":
            tokens = min(self.window - 1 + in_flight_tokens, max_model_len)
            return cdiv(tokens, block_size) + 1  # the window may start mid-block
        return cdiv(max_model_len, block_size)


@dataclass(frozen=True)
class KVLayout:
    block_size: int
    bytes_per_token_layer: int
    groups: tuple[KVGroup, ...]
    group_size: int
    equation: str  # how bytes_per_token_layer was computed, for the reasons
    stage_layers: int | None = None  # pipeline parallel: the widest group's layers on the fullest rank
    state: StateSpec | None = None  # a hybrid's state layers (their page padded to the attention page)

    @property
    def page_bytes(self) -> int:
        return self.block_size * self.bytes_per_token_layer

    @property
    def block_layers(self) -> int:
        """Layers one block holds a page for: the widest group's (on one pipeline rank)."""
        return self.stage_layers or max(g.layers for g in self.groups)

    @property
    def bytes_per_block(self) -> int:
        """One block of the shared pool: a page for each layer of the widest group."""
        return self.block_layers * self.page_bytes

    def blocks_per_request(self, max_model_len: int, in_flight_tokens: int) -> int:
        return sum(g.blocks_per_request(max_model_len, self.block_size, in_flight_tokens) for g in self.groups)

    def describe_groups(self) -> str:
        parts = {}
        for g in self.groups:
            label = f"sliding({g.window})" if g.kind == "sliding" else g.kind
            parts.setdefault(label, []).append(g.layers)
        return ", ".join(
            f"{len(sizes)} x {label} group(s) of {'/'.join(map(str, sorted(set(sizes), reverse=True)))} layers"
            for label, sizes in parts.items()
        )


@dataclass(frozen=True)
class Capacity:
    kv_bytes: int
    num_blocks: int
    blocks_per_request: int
    max_model_len: int

    @property
    def max_concurrency(self) -> float:
        return self.num_blocks / self.blocks_per_request

    @property
    def kv_tokens(self) -> int:
        return int(self.max_concurrency * self.max_model_len)


def pp_partitions(num_layers: int, pp: int) -> list[int]:
    """Layers per pipeline stage, as vLLM splits them (distributed/utils.py get_pp_indices): an even
    share each, the remainder one layer apiece to the stages before the last (the last holds the norm)."""
    parts = [num_layers // pp] * pp
    for i in range(2, num_layers % pp + 2):
        parts[-i] += 1
    return parts


def stage_block_layers(groups: tuple[KVGroup, ...], num_layers: int, pp: int) -> int:
    """With pipeline parallelism vLLM forms the groups over the whole model, then each rank keeps its
    own layers of each group (kv_cache_utils _project_kv_cache_groups_to_worker); a rank's block
    holds a page per layer of its widest group, and every rank takes the smallest block count."""
    parts, start, widest = pp_partitions(num_layers, pp), 0, 0
    for n in parts:
        stage = range(start, start + n)
        widest = max(widest, max(sum(i in stage for i in g.layer_ids) for g in groups))
        start += n
    return widest


def kv_layout(
    model: ModelInfo, kv_dtype_bytes: int, block_size: int, tp: int, pp: int = 1, state: StateSpec | None = None
) -> KVLayout:
    """The KV groups and page size vLLM builds for `model` on one tensor-parallel rank (of the
    pipeline stage whose blocks are the largest); a hybrid's `state` layers share the pool."""
    layers = model.layers
    unknown = sorted({layer.kind for layer in layers} - {"full", "sliding", "mla", NO_CACHE, *STATE_KINDS})
    if unknown:
        raise PlanError(
            f"{model.path}: layer kind(s) {', '.join(unknown)} (e.g. linear attention / Mamba state) are not "
            "modelled by the planner; it covers full, sliding-window and MLA attention and the state layers of "
            "GraniteMoeHybrid, Qwen3Next, NemotronH and Jamba"
        )
    kinds = {layer.kind for layer in layers} - {NO_CACHE}
    if kinds & set(STATE_KINDS) and (state is None or not kinds - set(STATE_KINDS) or "mla" in kinds):
        raise PlanError(
            f"{model.path}: state layers without attention, or beside MLA, are not modelled by the planner "
            f"(layer kinds: {', '.join(sorted(kinds))})"
        )
    if "mla" in kinds:
        if kinds != {"mla"}:
            raise PlanError(f"{model.path}: MLA mixed with other attention kinds is not modelled by the planner")
        per_token = model.mla.latent_dim * kv_dtype_bytes
        equation = (
            f"MLA: (kv_lora_rank {model.mla.kv_lora_rank} + qk_rope_head_dim {model.mla.qk_rope_head_dim})"
            f" x {kv_dtype_bytes} B = {per_token} B (one latent, no K/V pair, not split by TP)"
        )
    else:
        # vLLM (config/model.py get_num_kv_heads): max(1, heads // TP); below one head per rank it
        # replicates the KV heads, so each rank stores a whole head.
        local_heads = max(1, model.num_kv_heads // tp)
        per_token = 2 * local_heads * model.head_dim * kv_dtype_bytes
        heads = f"{model.num_kv_heads} KV heads / TP {tp}" if tp > 1 else f"{model.num_kv_heads} KV heads"
        if tp > model.num_kv_heads:
            heads = f"max(1, {model.num_kv_heads} KV heads // TP {tp}): replicated on every rank"
        equation = f"2 (K,V) x {local_heads} ({heads}) x head_dim {model.head_dim} x {kv_dtype_bytes} B = {per_token} B"

    if state is not None:  # Platform._align_hybrid_block_size: an attention page holds one state
        block_size = aligned_block_size(per_token, state.bytes, block_size, state.kernel_block)
    buckets: dict[tuple[str, int | None], list[int]] = {}
    for i, layer in enumerate(layers):
        if layer.kind != NO_CACHE:
            buckets.setdefault((layer.kind, layer.window), []).append(i)
    sizes = [len(ids) for ids in buckets.values()]
    # vLLM uses the smallest bucket as group size, unless padding to the largest is cheap.
    group_size = max(sizes) if max(sizes) < min(sizes) * 1.5 else min(sizes)
    groups = []
    for (kind, window), ids in buckets.items():
        num_groups = cdiv(len(ids), group_size)
        # layers[i::num_groups] for i in range(num_groups)
        blocks = state.blocks_per_request if kind in STATE_KINDS else 0
        groups += [
            KVGroup(kind, window, len(ids[i::num_groups]), tuple(ids[i::num_groups]), blocks) for i in range(num_groups)
        ]
    groups = tuple(groups)
    stage = stage_block_layers(groups, len(layers), pp) if pp > 1 else None
    return KVLayout(block_size, per_token, groups, group_size, equation, stage, state)


def capacity(layout: KVLayout, kv_bytes: int, max_model_len: int, in_flight_tokens: int) -> Capacity:
    return Capacity(
        kv_bytes,
        kv_bytes // layout.bytes_per_block,
        layout.blocks_per_request(max_model_len, in_flight_tokens),
        max_model_len,
    )


def fits(layout: KVLayout, kv_bytes: int, max_model_len: int, in_flight_tokens: int, requests: int = 1) -> bool:
    """Whether `requests` requests at `max_model_len` fit; one block is vLLM's null block."""
    usable_blocks = kv_bytes // layout.bytes_per_block - 1
    return requests * layout.blocks_per_request(max_model_len, in_flight_tokens) <= usable_blocks


def largest_fitting_len(layout: KVLayout, kv_bytes: int, upper: int, in_flight_tokens: int, requests: int = 1) -> int:
    """Largest max_model_len <= upper at which `requests` requests fit (0 if none), by bisection
    as vLLM's `_estimate_max_model_len_from_groups` does."""
    lo, hi, best = 1, upper, 0
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(layout, kv_bytes, mid, in_flight_tokens, requests):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best
