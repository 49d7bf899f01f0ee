"""Segment-wise LoRA ops for vLLM's CPU build, installed as a vLLM general plugin.

vLLM's CPU LoRA path (`vllm/lora/ops/torch_ops/lora_ops.py`) expands each contiguous run of
tokens that share an adapter into per-token indices and gathers a full copy of the adapter's
weight matrix for every token before an einsum: for an 8k-token prompt that is gigabytes of
copies per layer, and prefill with an adapter runs ~30x slower than without. vLLM's v1 runner
always takes this "sgmv" path, and it already hands us the runs (start, length, adapter
slot), so one matrix product per run computes the same thing.

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

# A child of vLLM's "vllm" logger, so these lines reach the engine's log beside vLLM's own: in
# vLLM's processes only that logger has a handler, and a plain module logger's INFO lines vanish.
log = logging.getLogger(f"vllm.{__name__}")
_used = False


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
    log.info("%s (%s=%s, pid %d)", INSTALLED, ENV_VAR, SEGMENTED, os.getpid())
