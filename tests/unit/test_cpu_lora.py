"""lcserve's segment-wise CPU LoRA ops against vLLM's own torch ops, on the shapes vLLM passes.

vLLM is always installed with lcserve: a broken import of its ops is a failure here, not a skip.
"""

from __future__ import annotations

import pytest
import torch
from vllm.lora.layers.utils import LoRAMapping
from vllm.lora.ops.torch_ops import lora_ops as stock
from vllm.lora.punica_wrapper import punica_cpu

from lcserve.serving import cpu_lora

SLOTS, RANK, HIDDEN, OUT = 3, 16, 64, 96
SGMV = ("sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")
# vLLM's own methods, taken before any test installs the plugin (register() patches the class).
STOCK_ADD_LORA_LINEAR = punica_cpu.PunicaWrapperCPU.add_lora_linear
STOCK_UPDATE_METADATA = punica_cpu.PunicaWrapperCPU.update_metadata
assert STOCK_ADD_LORA_LINEAR is not cpu_lora.add_lora_linear


def stock_installed(monkeypatch):
    """vLLM's ops in place, restored to whatever was there when the test ends."""
    for name in SGMV:
        monkeypatch.setattr(punica_cpu, name, getattr(stock, name))
    monkeypatch.setattr(punica_cpu.PunicaWrapperCPU, "add_lora_linear", STOCK_ADD_LORA_LINEAR)
    monkeypatch.setattr(punica_cpu.PunicaWrapperCPU, "update_metadata", STOCK_UPDATE_METADATA)


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
    stock_installed(monkeypatch)
    if value is None:
        monkeypatch.delenv(cpu_lora.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(cpu_lora.ENV_VAR, value)
    cpu_lora.register()
    assert (punica_cpu.sgmv_shrink is cpu_lora.sgmv_shrink) is installed
    assert (punica_cpu.sgmv_expand_slice is cpu_lora.sgmv_expand_slice) is installed
    assert (punica_cpu.PunicaWrapperCPU.add_lora_linear is cpu_lora.add_lora_linear) is installed
    cpu_lora.register()  # vLLM may load its plugins twice in one process: the stock method is kept
    assert cpu_lora._STOCK.get("add_lora_linear", STOCK_ADD_LORA_LINEAR) is STOCK_ADD_LORA_LINEAR


def test_plugin_lines_reach_vllms_log_once(monkeypatch, caplog, weights):
    """The install line and the first-use line go to a child of vLLM's "vllm" logger (the only one with
    a handler in vLLM's processes), the first-use line once per process: the integration test reads them."""
    stock_installed(monkeypatch)
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


# add_lora_linear: every slice of a LoRA linear layer at once, against vLLM's own method and torch ops.

QKV = (48, 16, 16)  # a fused qkv layer's slices: unequal widths, like Gemma's q, k and v


@pytest.fixture
def segmented(monkeypatch):
    """The plugin's add_lora_linear and update_metadata installed; the module's sgmv ops left as vLLM's,
    so vLLM's own add_lora_linear computes the expected values with vLLM's torch ops."""
    stock_installed(monkeypatch)
    monkeypatch.setenv(cpu_lora.ENV_VAR, cpu_lora.SEGMENTED)
    cpu_lora.register()
    for name in SGMV:
        monkeypatch.setattr(punica_cpu, name, getattr(stock, name))
    return punica_cpu.PunicaWrapperCPU(max_num_batched_tokens=64, max_batches=8, device="cpu")


def layer_weights(slices, seed=0):
    """A layer's stacked weights as vLLM allocates them, (slots, 1, rank, in) and (slots, 1, out, rank);
    slot 2 holds no adapter (zeros)."""
    torch.manual_seed(seed)
    a = tuple(torch.randn(SLOTS, 1, RANK, HIDDEN, dtype=torch.bfloat16) for _ in slices)
    b = tuple(torch.randn(SLOTS, 1, width, RANK, dtype=torch.bfloat16) for width in slices)
    for w in (*a, *b):
        w[2].zero_()
    return a, b


def set_step(wrapper, *segments):
    """One engine step through vLLM's update_metadata: (tokens, slot) runs; slot -1 is a base request."""
    ids = {0: 1, 1: 2, -1: 0}  # the LoRA ids in slots 0 and 1; 0 is no adapter
    mapping = [ids[slot] for n, slot in segments for _ in range(n)]
    wrapper.update_metadata(LoRAMapping(mapping, mapping, is_prefill=True), [1, 2, None], SLOTS, 100)
    return len(mapping)


def both(wrapper, tokens, a, b, slices, scale=1.0):
    """(vLLM's result, the plugin's) for one add_lora_linear call on the same inputs."""
    x = torch.randn(tokens, HIDDEN, dtype=torch.bfloat16)
    start = torch.randn(tokens, sum(slices), dtype=torch.bfloat16)
    want, got = start.clone(), start.clone()
    STOCK_ADD_LORA_LINEAR(wrapper, want, x, a, b, scale, slices)
    wrapper.add_lora_linear(got, x, a, b, scale, slices)
    return want, got


@pytest.mark.parametrize("slices", [QKV, (OUT,), (OUT, OUT)])
@pytest.mark.parametrize("segments", [[(1, 0)], [(9, 0)], MIXED, [(2, 1), (1, 0), (3, -1)]])
def test_add_lora_linear_matches_vllm(segmented, slices, segments):
    a, b = layer_weights(slices)
    tokens = set_step(segmented, *segments)
    want, got = both(segmented, tokens, a, b, slices)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=5e-2)


def test_add_lora_linear_scales_the_shrink(segmented):
    a, b = layer_weights(QKV)
    want, got = both(segmented, set_step(segmented, *MIXED), a, b, QKV, scale=0.5)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=5e-2)


def test_add_lora_linear_leaves_base_rows_alone_even_when_every_slot_is_used(segmented):
    a, b = layer_weights((OUT,))
    a[0][2].normal_(), b[0][2].normal_()  # all three slots hold an adapter
    x = torch.randn(8, HIDDEN, dtype=torch.bfloat16)
    start = torch.zeros(8, OUT, dtype=torch.bfloat16)
    set_step(segmented, (4, 0), (4, -1))
    want, got = start.clone(), start.clone()
    STOCK_ADD_LORA_LINEAR(segmented, want, x, a, b, 1.0, (OUT,))
    segmented.add_lora_linear(got, x, a, b, 1.0, (OUT,))
    assert want[4:].abs().sum() > 0, "vLLM's stock op no longer misreads slot -1; update the docstring"
    assert torch.equal(got[4:], start[4:])
    torch.testing.assert_close(got[:4], want[:4], rtol=2e-2, atol=5e-2)


def test_a_slot_written_again_is_read_again(segmented):
    """vLLM loads an adapter into a slot in place (set_lora's copy_): the fused copy must follow."""
    a, b = layer_weights(QKV)
    tokens = set_step(segmented, (5, 0))
    both(segmented, tokens, a, b, QKV)
    new_a, new_b = layer_weights(QKV, seed=1)
    for old, new in zip((*a, *b), (*new_a, *new_b)):
        old[0, 0].copy_(new[0, 0])
    want, got = both(segmented, tokens, a, b, QKV)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=5e-2)


def test_each_step_reads_its_own_runs(segmented):
    """The runs are read once per step: a new step with other adapters must not reuse the last one's."""
    a, b = layer_weights((OUT,))
    both(segmented, set_step(segmented, (6, 0)), a, b, (OUT,))
    want, got = both(segmented, set_step(segmented, (3, 1), (3, -1)), a, b, (OUT,))
    torch.testing.assert_close(got, want, rtol=2e-2, atol=5e-2)


def test_add_lora_linear_takes_float32_lora_weights(segmented):
    """`--lora-dtype float32` on a bfloat16 model: the products run in the model's dtype, as vLLM's casts do."""
    a, b = layer_weights(QKV)
    a, b = tuple(w.float() for w in a), tuple(w.float() for w in b)
    want, got = both(segmented, set_step(segmented, *MIXED), a, b, QKV)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=5e-2)


def test_decode_metadata_is_left_to_vllm(segmented):
    """vLLM's v1 runners always mark a step as prefill; a step marked decode takes vLLM's own path."""
    a, b = layer_weights(QKV)
    mapping = (1, 1, 0, 2)
    segmented.update_metadata(LoRAMapping(mapping, mapping, is_prefill=False), [1, 2, None], SLOTS, 100)
    want, got = both(segmented, len(mapping), a, b, QKV)
    assert torch.equal(got, want)


@pytest.mark.parametrize("segments", [[(1, 0)], [(9, 0)], MIXED])
def test_rank_padding_is_dropped_and_changes_nothing(segmented, segments):
    """vLLM pads a rank-r adapter to max_lora_rank with zero rows of A (and zero columns of B): the fused
    weights keep only the used ranks (a slice may use none), and the result is vLLM's."""
    a, b = layer_weights(QKV)
    used = (RANK // 2, 0, RANK // 4)
    for slot in (0, 1):
        for a_i, b_i, r in zip(a, b, used):
            a_i[slot, :, r:].zero_(), b_i[slot, :, :, r:].zero_()
    want, got = both(segmented, set_step(segmented, *segments), a, b, QKV)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=5e-2)
    fused_a, fused_b, _ = cpu_lora.fused_weights({}, a, b, 0, torch.bfloat16)
    assert fused_a.shape == (HIDDEN, sum(used)) and fused_b.shape == (sum(used), sum(QKV))
