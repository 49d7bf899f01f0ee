"""Read what the planner needs from files and the machine; the planner itself (`plan.py`) reads nothing.

`lcserve deploy plan|check` and `lcserve serve` both plan through here, so a model, a profile
and adapters are read the same way wherever a plan is made.
"""

from __future__ import annotations

from pathlib import Path

from lcserve.adapters.reader import LoraAdapter, read_adapter
from lcserve.errors import PlanError
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


CPU_KV_CACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"


def cpu_kv_cache_space(environ: dict[str, str]) -> int | None:
    """`VLLM_CPU_KVCACHE_SPACE` in whole GiB, None when unset or empty (vLLM's own reading); PlanError,
    naming the variable as the user set it, for a value vLLM would crash on (int()) or start without
    a KV cache (0)."""
    value = environ.get(CPU_KV_CACHE_ENV, "")
    if value == "":
        return None
    if not value.isdigit() or int(value) < 1:
        raise PlanError(
            f"{CPU_KV_CACHE_ENV}={value!r}: must be a whole number of GiB, at least 1 (the CPU build's KV "
            f"cache size); set e.g. {CPU_KV_CACHE_ENV}=4, or unset it and the plan sizes the KV cache"
        )
    return int(value)
