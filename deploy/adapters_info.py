"""What the planner needs from an adapter: rank, target modules, training length.

The rank and targets come from PEFT's `adapter_config.json`; the training length from
`lcserve.adapters.training_length.training_seq_len` (lcserve_adapter.json, an axolotl
YAML, training_args) unless the user states it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lcserve.adapters.training_length import training_seq_len as adapter_training_seq_len
from lcserve.errors import AdapterError


@dataclass(frozen=True)
class AdapterInfo:
    path: Path
    rank: int
    target_modules: tuple[str, ...] | str  # a list of names, or a regex / "all-linear" as PEFT allows
    training_seq_len: int | None


def read_adapter(adapter_dir: str | Path, training_seq_len: int | None = None) -> AdapterInfo:
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / "adapter_config.json"
    if not path.exists():
        raise AdapterError(f"{path}: missing; --adapter must be a PEFT adapter folder "
                           "(adapter_config.json + adapter_model.safetensors)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}: unreadable JSON ({e}); re-save the adapter with PEFT") from None
    if not isinstance(config.get("r"), int) or config["r"] < 1:
        raise AdapterError(f"{path}: field 'r' (LoRA rank) is missing or not a positive integer")
    targets = config.get("target_modules")
    if not targets:
        raise AdapterError(f"{path}: field 'target_modules' is missing or empty; vLLM needs it to mount the adapter")
    # vLLM ignores rank_pattern, but its buffers must still hold the largest rank present.
    rank = max([config["r"], *(int(v) for v in (config.get("rank_pattern") or {}).values())])
    if training_seq_len is None:
        training_seq_len = adapter_training_seq_len(adapter_dir)
    return AdapterInfo(adapter_dir, rank, targets if isinstance(targets, str) else tuple(targets), training_seq_len)
