"""A model's weight figures (bytes by dtype, parameter count, linear shapes) and where they come from.

The best source in the folder wins: the safetensors headers; else the index's total_size; else
config.json arithmetic (config_weights.py), so a model can be planned before its download.
`lcserve.model_config` reads a folder through this; `ModelInfo` carries the figures and the source.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import config_weights as cw
from .errors import ModelError
from .model_facts import DTYPE_BYTES, text_config, tied_embeddings
from .safetensors_header import index_total_size, read_model_tensors, safetensors_files

# Where ModelInfo's weight figures come from, best first.
WEIGHTS_FROM_HEADERS = "safetensors headers"
WEIGHTS_FROM_INDEX = "model.safetensors.index.json"
WEIGHTS_FROM_CONFIG = "config.json arithmetic"
MIXED_DTYPES = "mixed"  # bytes key of a quantized model sized by its index total (no split by dtype)


@dataclass(frozen=True)
class Weights:
    """Weight figures of a model and where they come from."""

    bytes_by_dtype: dict[str, int]
    param_count: int
    linear_shapes: dict[str, tuple[int, int]]
    source: str
    reason: str


def model_weights(model_dir: Path, config: dict) -> Weights:
    """Weight figures from the best source in the folder: the safetensors headers; else the
    index's total_size (count and shapes from config.json); else config.json arithmetic."""
    files = safetensors_files(model_dir)
    if any(f.exists() for f in files):  # a partial download fails on the missing shard, naming it
        missing = [f for f in files if not f.exists()]
        if missing:
            raise ModelError(
                f"{missing[0]}: file not found, though model.safetensors.index.json names it ({len(missing)} of "
                f"{len(files)} shards missing: a partial download?); re-download the model folder"
            )
        tensors = read_model_tensors(model_dir)
        return Weights(
            cw.bytes_by_dtype(tensors),
            cw.param_count(tensors),
            cw.linear_shapes(tensors),
            WEIGHTS_FROM_HEADERS,
            f"read from the headers of {len(files)} safetensors file(s)",
        )
    total = index_total_size(model_dir)
    try:
        if total is not None and not config.get("quantization_config"):
            return _weights_from_index(total, config)
        stored, shapes = cw.checkpoint_tensors(config), cw.linear_shapes(cw.unquantized_tensors(config))
    except ModelError as e:
        raise ModelError(f"{model_dir}: no *.safetensors weights; {e}") from None
    if total is None:
        missing = (
            "no *.safetensors, and no metadata.total_size in the index"
            if (model_dir / "model.safetensors.index.json").exists()
            else "no *.safetensors or model.safetensors.index.json in the folder"
        )
        return Weights(
            cw.bytes_by_dtype(stored),
            cw.param_count(stored),
            shapes,
            WEIGHTS_FROM_CONFIG,
            f"{missing}; computed from config.json ({_config_summary(config)})",
        )
    return Weights(
        {MIXED_DTYPES: total},
        cw.param_count(stored),
        shapes,
        WEIGHTS_FROM_INDEX,
        f"no *.safetensors in the folder; metadata.total_size of the index ({total:,} bytes); "
        "parameter count from config.json",
    )


def _weights_from_index(total: int, config: dict) -> Weights:
    """An unquantized model's figures from its index: bytes = total_size, count = total / dtype
    bytes; linear shapes from config.json when its architecture is known."""
    dtype = cw.checkpoint_dtype(text_config(config))
    reason = (
        f"no *.safetensors in the folder; metadata.total_size of the index ({total:,} bytes); "
        f"parameter count = total / {DTYPE_BYTES[dtype]} bytes ({dtype})"
    )
    try:
        shapes = cw.linear_shapes(cw.unquantized_tensors(config))
    except ModelError as e:
        shapes, reason = {}, f"{reason}; no linear shapes for LoRA sizing ({e})"
    return Weights({dtype: total}, total // DTYPE_BYTES[dtype], shapes, WEIGHTS_FROM_INDEX, reason)


def _config_summary(config: dict) -> str:
    """What the config arithmetic assumed, in a few words."""
    text = text_config(config)
    parts = [str(text.get("model_type")), cw.checkpoint_dtype(text)]
    quant = config.get("quantization_config")
    if quant:
        parts.append(f"{quant.get('quant_method')} quantized")
    if tied_embeddings(config):
        parts.append("tied embeddings")
    if text.get("num_nextn_predict_layers"):
        parts.append("MTP layers not counted: vLLM loads them only for speculative decoding")
    return ", ".join(parts)
