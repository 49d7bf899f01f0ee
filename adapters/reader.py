"""Read a PEFT LoRA adapter folder: its config, and its tensors parsed into what they touch.

No pickle: tensors come from `adapter_model.safetensors`; `adapter_model.bin` is read only
when the caller allows it (torch.load with weights_only). Every problem a user can cause is
an AdapterError that names the file and the fix.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from lcserve.errors import AdapterError, ModelError
from lcserve.safetensors_header import read_header

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt")
PEFT_PREFIX = "base_model.model."

# Kinds of adapter tensors, by what the merge does with them.
LORA_A, LORA_B, LORA_B_BIAS = "lora_A", "lora_B", "lora_B_bias"
EMB_A, EMB_B = "lora_embedding_A", "lora_embedding_B"
MAGNITUDE = "magnitude"   # DoRA
FULL = "full"             # a whole tensor that replaces the base's (modules_to_save, bias, saved embeddings)


@dataclass(frozen=True)
class AdapterTensor:
    key: str                  # name in the adapter file
    module: str               # module path in the base, e.g. model.layers.0.self_attn.q_proj
    kind: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def base_key(self) -> str:
        """The base tensor this one reads or replaces."""
        if self.kind == FULL:
            return self.module
        if self.kind == LORA_B_BIAS:
            return f"{self.module}.bias"
        return f"{self.module}.weight"


def read_config(adapter_dir: Path) -> dict:
    """adapter_config.json, checked for the fields every LoRA reader needs."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise AdapterError(f"{adapter_dir}: adapter folder not found; pass the folder that holds adapter_config.json")
    path = adapter_dir / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterError(f"{path}: missing; a PEFT adapter folder needs adapter_config.json (save it with "
                           "model.save_pretrained)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e}); re-save the adapter with PEFT") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object; re-save the adapter with PEFT")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"{path}: peft_type is {peft_type}; lcserve handles LoRA adapters only")
    for field, kind in (("r", int), ("lora_alpha", (int, float))):
        value = config.get(field)
        if not isinstance(value, kind) or isinstance(value, bool) or value <= 0:
            raise AdapterError(f"{path}: field `{field}` is {value!r}; it must be a positive number")
    if not config.get("target_modules") and not config.get("target_parameters"):
        raise AdapterError(f"{path}: field `target_modules` is missing or empty; re-save the adapter with PEFT")
    return config


def weights_file(adapter_dir: Path, allow_pickle: bool = False) -> Path:
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / SAFETENSORS_FILE
    if path.exists():
        return path
    for name in PICKLE_FILES:
        if (adapter_dir / name).exists():
            if not allow_pickle:
                raise AdapterError(f"{adapter_dir / name}: pickle weights are not read by default (they can run code); "
                                   "convert to adapter_model.safetensors or pass --allow-pickle")
            return adapter_dir / name
    raise AdapterError(f"{adapter_dir}: no {SAFETENSORS_FILE}; save the adapter with safe_serialization=True")


def parse_key(key: str) -> tuple[str, str]:
    """(module path in the base, kind) for one adapter tensor name, as PEFT writes them."""
    name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    parts = name.split(".")
    if len(parts) >= 3 and parts[-2] in (LORA_A, LORA_B) and parts[-1] in ("weight", "bias"):
        if parts[-2] == LORA_B and parts[-1] == "bias":
            return ".".join(parts[:-2]), LORA_B_BIAS
        if parts[-1] == "weight":
            return ".".join(parts[:-2]), parts[-2]
    if parts[-1] in (EMB_A, EMB_B):
        return ".".join(parts[:-1]), parts[-1]
    if parts[-1] == "lora_magnitude_vector":
        return ".".join(parts[:-1]), MAGNITUDE
    if len(parts) >= 2 and parts[-2] == "lora_magnitude_vector" and parts[-1] == "weight":
        return ".".join(parts[:-2]), MAGNITUDE
    if len(parts) >= 3 and parts[-2] == "base_layer":
        # save_embedding_layers: PEFT stores the (possibly resized) base embedding itself.
        return ".".join(parts[:-2] + parts[-1:]), FULL
    if any(p.startswith("lora_") for p in parts):
        raise AdapterError(f"adapter tensor {key!r}: unknown LoRA tensor name; lcserve reads PEFT LoRA adapters")
    return name, FULL


def read_tensor_infos(adapter_dir: Path, allow_pickle: bool = False) -> list[AdapterTensor]:
    """Every adapter tensor's name, target and shape, from the safetensors header (no weights loaded)."""
    path = weights_file(adapter_dir, allow_pickle)
    if path.suffix == ".safetensors":
        try:
            infos, _ = read_header(path)
        except ModelError as e:
            raise AdapterError(str(e)) from None
        items = [(name, tuple(i.shape), i.dtype) for name, i in infos.items()]
    else:
        items = [(name, tuple(t.shape), str(t.dtype).removeprefix("torch."))
                 for name, t in _load_pickle(path).items()]
    if not items:
        raise AdapterError(f"{path}: holds no tensors; re-save the adapter with PEFT")
    out = []
    for name, shape, dtype in sorted(items):
        module, kind = parse_key(name)
        out.append(AdapterTensor(name, module, kind, shape, dtype))
    return out


def load_tensors(adapter_dir: Path, allow_pickle: bool = False) -> dict:
    """All adapter tensors as torch tensors (adapters are small: this is the one full read)."""
    path = weights_file(adapter_dir, allow_pickle)
    if path.suffix != ".safetensors":
        return _load_pickle(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    read_tensor_infos(adapter_dir)  # a truncated file fails here with a clear message
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{path}: unreadable safetensors ({e}); re-save the adapter") from None


def _load_pickle(path: Path) -> dict:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad pickle
        raise AdapterError(f"{path}: unreadable ({type(e).__name__}: {e}); re-save the adapter as safetensors") from None
    if not isinstance(state, dict):
        raise AdapterError(f"{path}: expected a dict of tensors; re-save the adapter as safetensors")
    return state


def adapter_sha256(adapter_dir: Path, allow_pickle: bool = False) -> str:
    """One digest over the config and the weights file: what a merged model was built from."""
    digest = hashlib.sha256()
    for path in (Path(adapter_dir) / CONFIG_FILE, weights_file(adapter_dir, allow_pickle)):
        digest.update(path.name.encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
