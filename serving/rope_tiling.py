"""The "repeated table" RoPE variant, as a vLLM general plugin: an experiment, never a fix.

A claim circulates that a model's context can be extended by repeating its RoPE cos/sin
table past the length it was trained at. This plugin builds exactly that variant so the
probes can measure it (docs/findings.md, benchmarks/bench_rope_tiling.py): every rotary
table vLLM computes gets row `p mod L0` at row `p`, so a token at position p is rotated as if
it stood at p mod L0. vLLM itself is not edited: `RotaryEmbeddingBase.__init__` is wrapped so
each table is tiled right after vLLM builds it (every RoPE class that builds its table
through the base class, the default one Gemma 3 uses included).

Inert unless `LCSERVE_ROPE_TILE_LEN=L0` is set in the engine's environment. A model served
this way should record it in its config.json (`lcserve.rope_check.tiled_config`), so that
`lcserve deploy plan` warns about it.
"""

from __future__ import annotations

import functools
import logging
import os

ENV_VAR = "LCSERVE_ROPE_TILE_LEN"
INSTALLED = "lcserve: RoPE tables tiled past position"

# A child of vLLM's logger, so the line reaches the engine log (see serving/cpu_lora.py).
log = logging.getLogger(f"vllm.{__name__}")


def tile_rows(table, original_length: int):
    """`table` with row p replaced by row p mod `original_length` (a torch tensor, rows = positions)."""
    import torch

    index = torch.arange(table.shape[0], device=table.device) % original_length
    return table.index_select(0, index)


def tile_length(environ=os.environ) -> int | None:
    """L0 from the environment, None when unset; a clear error when it is not a positive integer."""
    value = environ.get(ENV_VAR, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{ENV_VAR}={value!r}: set it to a positive number of positions (e.g. 2048), or unset it")
    return int(value)


def register() -> None:
    """vLLM general-plugin entry point; loaded in every vLLM process, possibly more than once."""
    original_length = tile_length()
    if original_length is None:
        return
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbeddingBase

    init = RotaryEmbeddingBase.__init__
    if getattr(init, "lcserve_tiled", None) is not None:
        return

    @functools.wraps(init)
    def tiled_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        table = getattr(self, "cos_sin_cache", None)
        if table is not None and table.shape[0] > original_length:
            self.cos_sin_cache = tile_rows(table, original_length)

    tiled_init.lcserve_tiled = original_length
    RotaryEmbeddingBase.__init__ = tiled_init
    log.info("%s %d (%s, pid %d)", INSTALLED, original_length, ENV_VAR, os.getpid())
