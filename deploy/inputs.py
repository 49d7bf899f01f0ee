"""Read what the planner needs from files and the machine; the planner itself (`plan.py`) reads nothing.

`lcserve deploy plan|check` and `lcserve serve` both plan through here, so a model, a profile
and adapters are read the same way wherever a plan is made.
"""

from __future__ import annotations

from pathlib import Path

from lcserve.adapters.reader import LoraAdapter, read_adapter
from lcserve.model_config import ModelInfo, read_model

from .hardware import Profile, resolve_profile


def read_plan_inputs(
    model_dir: Path,
    profile: str,
    adapter_dirs: list[Path] | tuple = (),
    gpus: int | None = None,
    training_seq_len: int | None = None,
) -> tuple[Profile, ModelInfo, list[LoraAdapter]]:
    """(profile, model, adapters) for `plan_deployment`."""
    return (
        resolve_profile(profile, gpus),
        read_model(model_dir),
        [read_adapter(d, training_seq_len) for d in adapter_dirs],
    )
