"""The sequence length an adapter was trained at, from whatever the trainer left beside it.

Serving far beyond this length is what the kit is about, so every command that can name it
does. Sources, first hit wins: lcserve's own `lcserve_adapter.json`, an axolotl YAML config
(`sequence_len`), a HF Trainer `training_args.json` (`max_seq_length` / `max_length`).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

LCSERVE_METADATA = "lcserve_adapter.json"
_TRAINING_ARGS_KEYS = ("max_seq_length", "max_length", "model_max_length", "sequence_len")


def training_seq_len(adapter_dir: Path) -> int | None:
    """The recorded training sequence length, or None when nothing beside the adapter says it."""
    found = training_seq_len_source(Path(adapter_dir))
    return found[0] if found else None


def training_seq_len_source(adapter_dir: Path) -> tuple[int, str] | None:
    """(length, file it came from), so reports can say where the number was read."""
    adapter_dir = Path(adapter_dir)
    meta = _read_json(adapter_dir / LCSERVE_METADATA)
    if _positive_int(meta.get("training_seq_len")):
        return int(meta["training_seq_len"]), LCSERVE_METADATA
    for path in sorted(adapter_dir.glob("*.y*ml")):
        try:
            doc = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError, OSError):
            continue
        if isinstance(doc, dict) and _positive_int(doc.get("sequence_len")):
            return int(doc["sequence_len"]), path.name
    for name in ("training_args.json", "training_args_dict.json"):
        args = _read_json(adapter_dir / name)
        for key in _TRAINING_ARGS_KEYS:
            if _positive_int(args.get(key)):
                return int(args[key]), f"{name}:{key}"
    return None


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
