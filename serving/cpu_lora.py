"""Segment-wise LoRA ops for vLLM's CPU build, installed as a vLLM general plugin.

vLLM's CPU LoRA path (`vllm/lora/ops/torch_ops/lora_ops.py`) expands each contiguous run of
tokens that share an adapter into per-token indices and gathers a full copy of the adapter's
weight matrix for every token before an einsum: for an 8k-token prompt that is gigabytes of
copies per layer, and prefill with an adapter runs ~30x slower than without. vLLM's v1 runner
always takes this "sgmv" path, and it already hands us the runs (start, length, adapter
slot), so one matrix product per run computes the same thing.

Every LoRA linear layer (a fused qkv has 3 slices, gate_up 2) goes through `add_lora_linear`,
which in vLLM runs one shrink and one expand per slice, each re-reading the step's metadata from
tensors, converting the slot's weights, and zero-filling a buffer: about 250 small ops per decode
step on a 270M model, more time than the products themselves. The plugin's `add_lora_linear`
does each run in two products for all slices together: the slices' A matrices side by side in
float32 (vLLM's shrink computes in float32), their B matrices block-diagonal, both without the
zero rows vLLM pads each adapter's rank with, built once per slot and rebuilt when vLLM writes
the slot; the runs are read once per step. (A shrink in bfloat16 runs 3-4x faster on a long
prompt, but its other order of float32 sums changed the demo adapter's greedy output: measured,
so it stays in float32.)

Two differences from the stock ops, both deliberate:
- a run with slot -1 (a request without an adapter) gets no LoRA contribution; the stock ops
  index the weights with -1 and so apply the *last* slot's adapter to base requests that
  share a batch with adapter requests whenever every slot is occupied;
- the `bgmv_*` ops (used for the logits and full-linear layers, a handful of rows per step)
  are left as they are.

The plugin changes nothing unless `LCSERVE_CPU_LORA_OPS=segmented` is set in the engine's
environment; `lcserve serve` sets it on the CPU build (override with `=stock`).
"""

from __future__ import annotations

import logging
import os

import torch

ENV_VAR = "LCSERVE_CPU_LORA_OPS"
SEGMENTED = "segmented"
MODES = (SEGMENTED, "stock")  # anything else: register() would quietly run vLLM's stock ops
INSTALLED = "lcserve: segment-wise CPU LoRA ops installed"
FIRST_USE = "lcserve: segment-wise CPU LoRA ops ran"
FEW_ROWS = 2  # runs this short expand in float32 (see add_lora_linear)

# A child of vLLM's "vllm" logger, so these lines reach the engine's log beside vLLM's own: in
# vLLM's processes only that logger has a handler, and a plain module logger's INFO lines vanish.
log = logging.getLogger(f"vllm.{__name__}")
_used = False
_STOCK: dict = {}  # vLLM's own methods the plugin replaced, for the paths it leaves to them


def _announce_first_use() -> None:
    """One log line per process the first time the segmented ops run (what shows they are live)."""
    global _used
    if not _used:
        _used = True
        log.info("%s (first LoRA batch in this process, pid %d)", FIRST_USE, os.getpid())


def _runs(seq_starts: torch.Tensor, seq_lens: torch.Tensor, slots: torch.Tensor):
    """(row slice, adapter slot) for each contiguous run of tokens sharing one adapter."""
    for start, length, slot in zip(seq_starts.tolist(), seq_lens.tolist(), slots.tolist()):
        yield slice(start, start + length), slot


def _product(inputs: torch.Tensor, weights: torch.Tensor, slot: int, dtype: torch.dtype) -> torch.Tensor:
    """inputs @ W[slot]^T in `dtype`; W is stacked as (slots, 1, out, in) or (slots, out, in)."""
    weight = weights[slot]
    if weight.dim() == 3:
        weight = weight.squeeze(0)
    return inputs.to(dtype) @ weight.to(dtype).T


def sgmv_shrink(
    inputs,
    lora_a_weights,
    output_tensor,
    b_seq_start_loc,
    seq_len_tensor,
    lora_indices_tensor,
    batches,
    max_seq_length,
    token_nums,
    scaling,
):
    _announce_first_use()
    rank = lora_a_weights.shape[-2]
    for rows, slot in _runs(b_seq_start_loc, seq_len_tensor, lora_indices_tensor):
        if slot < 0:
            output_tensor[rows, :rank] = 0
        else:
            output_tensor[rows, :rank] = scaling * _product(inputs[rows], lora_a_weights, slot, output_tensor.dtype)


def sgmv_expand(
    inputs,
    lora_b_weights,
    output_tensor,
    b_seq_start_loc,
    seq_len_tensor,
    lora_indices_tensor,
    batches,
    max_seq_length,
    token_nums,
    add_inputs=False,
):
    # The adapter and the model may pad their output widths differently.
    width = min(lora_b_weights.shape[-2], output_tensor.shape[1])
    for rows, slot in _runs(b_seq_start_loc, seq_len_tensor, lora_indices_tensor):
        if slot < 0:
            if not add_inputs:
                output_tensor[rows, :width] = 0
            continue
        product = _product(inputs[rows], lora_b_weights, slot, output_tensor.dtype)[:, :width]
        if add_inputs:
            output_tensor[rows, :width] += product
        else:
            output_tensor[rows, :width] = product


def sgmv_expand_slice(
    inputs,
    lora_b_weights,
    output_tensor,
    b_seq_start_loc,
    seq_len_tensor,
    lora_indices_tensor,
    batches,
    max_seq_length,
    token_nums,
    slice_offset,
    slice_size,
    add_inputs=False,
):
    columns = slice(slice_offset, slice_offset + slice_size)
    for rows, slot in _runs(b_seq_start_loc, seq_len_tensor, lora_indices_tensor):
        if slot < 0:
            if not add_inputs:
                output_tensor[rows, columns] = 0
            continue
        product = _product(inputs[rows], lora_b_weights, slot, output_tensor.dtype)
        if add_inputs:
            output_tensor[rows, columns] += product
        else:
            output_tensor[rows, columns] = product


def _step_runs(wrapper) -> list[tuple[slice, int]]:
    """This step's runs as Python values, read from vLLM's metadata tensors once per step (not per layer)."""
    runs = wrapper.__dict__.get("_lcserve_runs")
    if runs is None:
        runs = wrapper._lcserve_runs = list(_runs(*wrapper.prefill_metadata[:3]))
    return runs


def update_metadata(self, *args, **kwargs) -> None:
    """vLLM's metadata update, then forget the last step's runs."""
    _STOCK["update_metadata"](self, *args, **kwargs)
    self._lcserve_runs = None


def _slot_matrix(stacked: torch.Tensor, slot: int) -> torch.Tensor:
    weight = stacked[slot]
    return weight.squeeze(0) if weight.dim() == 3 else weight


def _used_ranks(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of one slice without the rank rows that are zero in A: vLLM pads every adapter to
    max_lora_rank with zeros (a rank-8 adapter beside a rank-64 one, or under a larger --max-lora-rank),
    and a zero row of A adds exactly nothing, so dropping it changes no bit and saves its products."""
    used = a.ne(0).any(dim=1)
    return a[used], b[:, used]


def fused_weights(cache: dict, lora_a_stacked, lora_b_stacked, slot: int, dtype) -> tuple[torch.Tensor, ...]:
    """(A, B, B in float32) of one slot for all slices at once: A is (in, sum of ranks) in float32, B
    block-diagonal (sum of ranks, sum of outputs) in the model's `dtype`; the ranks are those the
    adapter uses. Cached per layer and slot; a tensor's `_version` counts in-place writes (set_lora's
    copy_, reset_lora's fill), so a reloaded slot rebuilds."""
    stacked = (*lora_a_stacked, *lora_b_stacked)
    key = (id(lora_a_stacked[0]), slot)
    versions = tuple(t._version for t in stacked)
    hit = cache.get(key)
    if hit is None or hit[0] is not lora_a_stacked[0] or hit[1] != versions:
        pairs = [
            _used_ranks(_slot_matrix(a, slot), _slot_matrix(b, slot)) for a, b in zip(lora_a_stacked, lora_b_stacked)
        ]
        a = torch.cat([a for a, _ in pairs]).to(torch.float32).T
        b = torch.block_diag(*[b.T for _, b in pairs]).to(torch.float32)
        hit = cache[key] = (lora_a_stacked[0], versions, a, b.to(dtype), b)
    return hit[2:]


def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None, **kwargs) -> None:
    """y[:, slices] += (x @ A_i^T * scale) @ B_i^T for every slice, per run; vLLM's roundings kept
    (shrink in float32, rounded to y's dtype before the expand, the product rounded before the add).
    A run of FEW_ROWS or fewer (a decode step) expands in float32 on values already in y's dtype, which
    is how a bfloat16 product accumulates too: one row of Gemma 3 270M's expands costs 16-26 us in
    bfloat16 against 7-12 in float32 (torch 2.13 on an AVX512-BF16 core), and from four rows on
    bfloat16 is the faster."""
    if not self.is_prefill:  # vLLM's v1 runners always take the sgmv path; keep theirs otherwise
        return _STOCK["add_lora_linear"](
            self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs
        )
    if self.no_lora:
        return
    _announce_first_use()
    cache = self.__dict__.setdefault("_lcserve_fused", {})
    x = x.view(-1, x.shape[-1])
    out = y.view(-1, y.shape[-1])
    width = sum(output_slices)
    for rows, slot in _step_runs(self):
        if slot < 0:
            continue
        a, b, b_float32 = fused_weights(cache, lora_a_stacked, lora_b_stacked, slot, out.dtype)
        shrunk = x[rows].to(torch.float32) @ a
        if scale != 1.0:
            shrunk = scale * shrunk
        shrunk = shrunk.to(out.dtype)
        if rows.stop - rows.start <= FEW_ROWS:
            out[rows, :width] += (shrunk.to(torch.float32) @ b_float32).to(out.dtype)
        else:
            out[rows, :width] += shrunk @ b


def check_environment(environ) -> None:
    """LcserveError for an `LCSERVE_CPU_LORA_OPS` that is neither mode (a typo would go unnoticed)."""
    from lcserve.errors import LcserveError

    value = environ.get(ENV_VAR)
    if value is not None and value not in MODES:
        raise LcserveError(f"{ENV_VAR}={value!r}: unknown; set it to {' or '.join(MODES)}, or unset it")


def register() -> None:
    """vLLM general-plugin entry point; loaded in every vLLM process, possibly more than once."""
    if os.environ.get(ENV_VAR, "stock") != SEGMENTED:
        return
    from vllm.lora.punica_wrapper import punica_cpu

    punica_cpu.sgmv_shrink = sgmv_shrink
    punica_cpu.sgmv_expand = sgmv_expand
    punica_cpu.sgmv_expand_slice = sgmv_expand_slice
    wrapper = punica_cpu.PunicaWrapperCPU
    if wrapper.add_lora_linear is not add_lora_linear:  # register() may run more than once
        _STOCK["add_lora_linear"], _STOCK["update_metadata"] = wrapper.add_lora_linear, wrapper.update_metadata
    wrapper.add_lora_linear = add_lora_linear
    wrapper.update_metadata = update_metadata
    log.info("%s (%s=%s, pid %d)", INSTALLED, ENV_VAR, SEGMENTED, os.getpid())
