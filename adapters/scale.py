"""Serve an adapter at reduced strength: a copy whose LoRA scale is multiplied by s.

A LoRA adds scale x B A x to a layer, with scale = lora_alpha / r (or / sqrt(r), rsLoRA), so
multiplying `lora_alpha` and every `alpha_pattern` value by s multiplies each layer's delta by s
exactly, with the weights untouched (no rounding). vLLM and PEFT both read the scale from
adapter_config.json, so the copy mounts like any adapter, and `adapters merge` merges it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from lcserve.errors import AdapterError
from lcserve.paths import output_dir

from .reader import LoraAdapter, read_adapter, read_tensor_infos
from .training_length import LCSERVE_METADATA

# The multiplier on the trained LoRA scale: in a scaled copy's lcserve_adapter.json (the product of
# every scaling so far) and in a merge's lcserve_merge.json (`adapters merge --scale`).
LORA_SCALE = "lora_scale"


def check_scale(adapter: LoraAdapter, scale: float) -> None:
    """AdapterError unless every part of `adapter` scales with lora_alpha by `scale` (pure)."""
    if not 0 < scale <= 1:
        raise AdapterError(f"--scale {scale}: must be in (0, 1]; 1 keeps the adapter as trained")
    whole = [
        name
        for name, present in (
            ("DoRA magnitudes", adapter.use_dora),
            ("trainable-token rows", adapter.trainable_token_indices),
            ("modules_to_save", adapter.modules_to_save),
            (f"trained base biases (bias={adapter.bias})", adapter.bias != "none"),
        )
        if present
    ]
    if whole and scale != 1:
        raise AdapterError(
            f"{adapter.path}: its {', '.join(whole)} do not scale with lora_alpha; "
            "--scale works on plain LoRA (and rsLoRA, patterns, lora_bias) adapters only"
        )


def scaled_adapter(adapter: LoraAdapter, scale: float) -> LoraAdapter:
    """The adapter read as if its lora_alpha and alpha_pattern were multiplied by `scale` (pure)."""
    check_scale(adapter, scale)
    return dataclasses.replace(
        adapter,
        lora_alpha=adapter.lora_alpha * scale,
        alpha_pattern={k: v * scale for k, v in adapter.alpha_pattern.items()},
    )


def scaled_config(config: dict, scale: float) -> dict:
    """adapter_config.json with lora_alpha and alpha_pattern multiplied by `scale` (pure)."""
    out = dict(config)
    out["lora_alpha"] = config["lora_alpha"] * scale
    out["alpha_pattern"] = {k: v * scale for k, v in (config.get("alpha_pattern") or {}).items()}
    return out


def scaled_metadata(metadata: dict, scale: float) -> dict:
    """lcserve_adapter.json of the copy: the source's (its training length stays true) with the scale (pure)."""
    return {**metadata, LORA_SCALE: metadata.get(LORA_SCALE, 1) * scale}


def write_scaled_adapter(adapter_dir: Path, out_dir: Path, scale: float, force: bool = False) -> Path:
    """Copy `adapter_dir` to `out_dir` (atomically) with its LoRA scale multiplied by `scale`."""
    check_scale(read_adapter(adapter_dir), scale)  # AdapterError for anything that is not a readable LoRA
    read_tensor_infos(adapter_dir)  # and for missing, empty or corrupt weights (the copy would not load)
    out_dir = Path(out_dir)
    source = Path(adapter_dir).resolve()
    if source == out_dir.resolve() or source in out_dir.resolve().parents:
        raise AdapterError(f"--out {out_dir}: is or lies inside the adapter folder {adapter_dir}; choose a new folder")
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    try:
        metadata = json.loads((Path(adapter_dir) / LCSERVE_METADATA).read_text())
    except (OSError, json.JSONDecodeError):
        metadata = {}
    rewritten = {
        "adapter_config.json": scaled_config(config, scale),
        LCSERVE_METADATA: scaled_metadata(metadata, scale),
    }
    with output_dir(out_dir, force, inputs=(("adapter", source),)) as tmp:
        for path in sorted(Path(adapter_dir).iterdir()):
            if path.is_file() and path.name not in rewritten:
                shutil.copy2(path, tmp / path.name)
        for name, content in rewritten.items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
    return out_dir
