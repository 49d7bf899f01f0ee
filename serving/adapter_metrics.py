"""Which LoRA adapters the engine serves, as `lcserve_lora_adapter_loaded{adapter,base,mode,rank}`.

vLLM's own `vllm:lora_requests_info` names only adapters with requests in flight, so an idle
adapter is invisible there. The gateway knows the served list: vLLM's `/v1/models` (re-read after
each load and unload through the gateway, and after each engine restart), where an adapter is an
entry with a `parent`; and an adapter merged into the base at start (`serve --mode merge`), which
vLLM serves as a plain model. Requests and tokens per adapter are the per-model series
(`lcserve_requests`, `lcserve_prompt_tokens`, `lcserve_generation_tokens`, label `model`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily

LOADED = "lcserve_lora_adapter_loaded"


@dataclass(frozen=True)
class LoadedAdapter:
    adapter: str  # the served name
    base: str  # the served base it is mounted on (for a merge: the base folder's name)
    mode: str  # "mount" (vLLM's LoRA, at start or at run time) or "merge" (merged into the base at start)
    rank: int | None


def adapter_rank(folder: str | Path | None) -> int | None:
    """The adapter's largest LoRA rank (`r` and `rank_pattern`, as vLLM's --max-lora-rank must hold)
    from the folder's adapter_config.json; None when it cannot be read."""
    try:
        config = json.loads((Path(folder) / "adapter_config.json").read_text())
        ranks = [config.get("r"), *(config.get("rank_pattern") or {}).values()]
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    ranks = [r for r in ranks if isinstance(r, int)]
    return max(ranks) if ranks else None


def loaded_family(adapters: list[LoadedAdapter]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        LOADED,
        "1 while the LoRA adapter is served (mounted at start or loaded at run time through the gateway, or "
        "merged into the base); its series goes when it is unloaded.",
        labels=["adapter", "base", "mode", "rank"],
    )
    for a in sorted(adapters, key=lambda a: a.adapter):
        family.add_metric([a.adapter, a.base, a.mode, "" if a.rank is None else str(a.rank)], 1.0)
    return family
