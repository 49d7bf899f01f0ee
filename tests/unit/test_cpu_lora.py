"""lcserve's segment-wise CPU LoRA ops against vLLM's own torch ops, on the shapes vLLM passes.

vLLM is always installed with lcserve: a broken import of its ops is a failure here, not a skip.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from vllm.lora.ops.torch_ops import lora_ops as stock

from lcserve.serving import cpu_lora

SLOTS, RANK, HIDDEN, OUT = 3, 16, 64, 96


def runs(*segments: tuple[int, int]):
    """vLLM's prefill metadata for consecutive (length, slot) runs."""
    lengths = torch.tensor([n for n, _ in segments])
    starts = torch.zeros_like(lengths)
    starts[1:] = torch.cumsum(lengths, 0)[:-1]
    slots = torch.tensor([s for _, s in segments])
    return starts, lengths, slots, len(segments), int(lengths.max()), int(lengths.sum())


@pytest.fixture
def weights():
    torch.manual_seed(0)
    a = torch.randn(SLOTS, 1, RANK, HIDDEN, dtype=torch.bfloat16)
    b = torch.randn(SLOTS, 1, OUT, RANK, dtype=torch.bfloat16)
    a[-1].zero_(), b[-1].zero_()  # an empty last slot: where vLLM's ops send slot -1
    return a, b


MIXED = [(5, 0), (3, -1), (7, 1), (1, 0)]


@pytest.mark.parametrize("segments", [[(9, 0)], MIXED, [(4, -1), (6, 1)]])
def test_shrink_matches_vllm(weights, segments):
    a, _ = weights
    meta = runs(*segments)
    x = torch.randn(meta[-1], HIDDEN, dtype=torch.bfloat16)
    want, got = torch.zeros(meta[-1], RANK), torch.full((meta[-1], RANK), 7.0)  # stale values must be overwritten
    stock.sgmv_shrink(x, a, want, *meta, 0.5)
    cpu_lora.sgmv_shrink(x, a, got, *meta, 0.5)
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("add_inputs", [True, False])
@pytest.mark.parametrize("segments", [[(9, 0)], MIXED])
def test_expand_matches_vllm(weights, segments, add_inputs):
    _, b = weights
    meta = runs(*segments)
    x = torch.randn(meta[-1], RANK)
    start = torch.randn(meta[-1], OUT + 8, dtype=torch.bfloat16)  # the model pads wider than the adapter
    want, got = start.clone(), start.clone()
    stock.sgmv_expand(x, b, want, *meta, add_inputs)
    cpu_lora.sgmv_expand(x, b, got, *meta, add_inputs)
    torch.testing.assert_close(got[:, :OUT], want[:, :OUT], rtol=2e-2, atol=5e-2)
    assert torch.equal(got[:, OUT:], start[:, OUT:])


@pytest.mark.parametrize("add_inputs", [True, False])
def test_expand_slice_matches_vllm(weights, add_inputs):
    _, b = weights
    meta = runs(*MIXED)
    x = torch.randn(meta[-1], RANK)
    start = torch.randn(meta[-1], 3 * OUT, dtype=torch.bfloat16)
    want, got = start.clone(), start.clone()
    stock.sgmv_expand_slice(x, b, want, *meta, OUT, OUT, add_inputs)
    cpu_lora.sgmv_expand_slice(x, b, got, *meta, OUT, OUT, add_inputs)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=5e-2)


def test_requests_without_adapter_get_no_lora_even_when_every_slot_is_used(weights):
    """vLLM's ops index slot -1 as the last slot; the segment ops leave base rows untouched."""
    a, _ = weights
    a = a.clone()
    a[-1].normal_()
    meta = runs((4, 0), (4, -1))
    x = torch.randn(8, HIDDEN, dtype=torch.bfloat16)
    want, got = torch.zeros(8, RANK), torch.zeros(8, RANK)
    stock.sgmv_shrink(x, a, want, *meta, 1.0)
    cpu_lora.sgmv_shrink(x, a, got, *meta, 1.0)
    assert want[4:].abs().sum() > 0, "vLLM's stock op no longer misreads slot -1; update the docstring"
    assert torch.equal(got[4:], torch.zeros(4, RANK))
    torch.testing.assert_close(got[:4], want[:4], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("value, installed", [(None, False), ("stock", False), ("segmented", True)])
def test_plugin_installs_only_when_asked(monkeypatch, value, installed):
    punica_cpu = importlib.import_module("vllm.lora.punica_wrapper.punica_cpu")
    for name in ("sgmv_shrink", "sgmv_expand", "sgmv_expand_slice"):
        monkeypatch.setattr(punica_cpu, name, getattr(stock, name))
    if value is None:
        monkeypatch.delenv(cpu_lora.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(cpu_lora.ENV_VAR, value)
    cpu_lora.register()
    assert (punica_cpu.sgmv_shrink is cpu_lora.sgmv_shrink) is installed
    assert (punica_cpu.sgmv_expand_slice is cpu_lora.sgmv_expand_slice) is installed


def test_plugin_lines_reach_vllms_log_once(monkeypatch, caplog, weights):
    """The install line and the first-use line go to a child of vLLM's "vllm" logger (the only one with
    a handler in vLLM's processes), the first-use line once per process: the integration test reads them."""
    punica_cpu = importlib.import_module("vllm.lora.punica_wrapper.punica_cpu")
    for name in ("sgmv_shrink", "sgmv_expand", "sgmv_expand_slice"):
        monkeypatch.setattr(punica_cpu, name, getattr(stock, name))
    monkeypatch.setattr(cpu_lora, "_used", False)
    monkeypatch.setenv(cpu_lora.ENV_VAR, cpu_lora.SEGMENTED)
    assert cpu_lora.log.name.startswith("vllm.")
    with caplog.at_level("INFO", logger=cpu_lora.log.name):
        cpu_lora.register()
        a, _ = weights
        meta = runs((4, 0))
        for _ in range(2):
            cpu_lora.sgmv_shrink(torch.randn(4, HIDDEN, dtype=torch.bfloat16), a, torch.zeros(4, RANK), *meta, 1.0)
    messages = [r.getMessage() for r in caplog.records]
    assert sum(cpu_lora.INSTALLED in m for m in messages) == 1
    assert sum(cpu_lora.FIRST_USE in m for m in messages) == 1
