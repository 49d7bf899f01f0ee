"""Facts about model folders that every reader shares: dtypes, the decoder's config fields, tied
embeddings, RoPE parameters, and what a merge records.

Pure and light (no torch, no transformers): the planner, the adapters code and the readers of
config.json and safetensors headers all take these facts from here, so they never disagree on
what a config or a header says. tests/unit/test_model_facts.py checks them against safetensors,
torch and transformers.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

GIB = 1024**3


def cdiv(a: int, b: int) -> int:
    """Ceiling division (vLLM's `cdiv`), exact on integers of any size."""
    return -(-a // b)


# --- dtypes: safetensors' codes, torch's names, and the names config.json and the CLIs use ---

# safetensors dtype code -> bytes per element
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}
# safetensors dtype code -> torch's name for it (the names config.json's `dtype` takes)
TORCH_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
# The floating-point dtypes of a checkpoint (config.json `dtype`/`torch_dtype`, `merge --dtype`), by
# every name they go by: torch's, its aliases (half, float) and the short ones (bf16, fp16, fp32).
DTYPE_NAMES = {
    "bfloat16": "BF16",
    "bf16": "BF16",
    "float16": "F16",
    "fp16": "F16",
    "half": "F16",
    "float32": "F32",
    "fp32": "F32",
    "float": "F32",
}
# Codes of the floating-point weights a dtype conversion applies to (FP8 weights are quantized
# storage with their own scales, never converted).
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
DEFAULT_DTYPE = "bfloat16"  # what lcserve assumes when config.json names no dtype


def dtype_code(name: str) -> str | None:
    """The safetensors code of a dtype given by its code or by a name in DTYPE_NAMES; None if unknown."""
    name = str(name)
    return name if name in DTYPE_BYTES else DTYPE_NAMES.get(name)


# --- config.json ---


def text_config(config: dict) -> dict:
    """The decoder's fields: a multimodal config's `text_config` over the top level."""
    inner = config.get("text_config")
    return {**config, **inner} if isinstance(inner, dict) else config


def config_dtype(config: dict) -> str:
    """The dtype name config.json states (`dtype`, or the older `torch_dtype`; text_config first),
    else DEFAULT_DTYPE."""
    text = text_config(config)
    return str(
        text.get("dtype")
        or text.get("torch_dtype")
        or config.get("dtype")
        or config.get("torch_dtype")
        or DEFAULT_DTYPE
    )


# Model types whose transformers config class ties the embeddings when config.json does not say;
# the rest default to untied. tests/unit/test_model_facts.py checks this against transformers.
TIED_BY_DEFAULT = ("gemma", "gemma2", "gemma3", "gemma3_text")


def tied_embeddings(config: dict) -> bool:
    """lm_head shares the input embedding (no lm_head tensor of its own): config.json's
    `tie_word_embeddings` (top level first, as the model class reads it, then text_config's), else
    the default of the config class."""
    inner = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    for level in (config, inner):
        if level.get("tie_word_embeddings") is not None:
            return bool(level["tie_word_embeddings"])
    return config.get("model_type") in TIED_BY_DEFAULT or inner.get("model_type") in TIED_BY_DEFAULT


def untied_config(config: dict) -> dict:
    """A copy of config.json saying the embeddings are untied, at every level that may say it."""
    out = json.loads(json.dumps(config))
    out["tie_word_embeddings"] = False
    if isinstance(out.get("text_config"), dict):
        out["text_config"]["tie_word_embeddings"] = False
    return out


# vLLM's names for the share of the head dim that is rotated (patch_rope_parameters)
PARTIAL_ROTARY_KEYS = ("partial_rotary_factor", "rotary_pct", "rotary_emb_fraction")


def rope_parameters(text: dict) -> dict:
    """RoPE parameters keyed by layer type ("default" when one set covers all layers).

    Accepts the transformers 5 `rope_parameters` (flat or nested per layer type) and the
    older `rope_scaling` + `rope_theta` pair; `type` is normalised to `rope_type`, and a top-level
    partial rotary factor is folded in, as vLLM's `patch_rope_parameters` does.
    """
    params = text.get("rope_parameters")
    if params is None:
        params = dict(text.get("rope_scaling") or {})
        if text.get("rope_theta") is not None:
            params.setdefault("rope_theta", text["rope_theta"])
    if not isinstance(params, dict):
        return {}
    nested = params and all(isinstance(v, dict) for v in params.values())
    groups = params if nested else {"default": params}
    out = {}
    for key, p in groups.items():
        p = dict(p)
        if "type" in p and "rope_type" not in p:
            p["rope_type"] = p.pop("type")
        p.setdefault("rope_type", "default")
        partial = next((text[k] for k in PARTIAL_ROTARY_KEYS if text.get(k) is not None), None)
        if partial is not None:
            p.setdefault("partial_rotary_factor", partial)
        out[key] = p
    return out


# --- merge provenance: lcserve_merge.json beside a merged model ---

MERGE_PROVENANCE = "lcserve_merge.json"


@dataclass(frozen=True)
class MergeProvenance:
    """What `lcserve adapters merge` records beside its output: which base and adapter bytes were
    merged, at which LoRA scale. `rope_check` reads the base from it, `adapters verify` the scale,
    `serve` whether a cached merge is still this adapter's. Fields keep lcserve_merge.json's keys."""

    lcserve_version: str | None = None
    base_dir: str | None = None
    base_safetensors_sha256: dict[str, str] = field(default_factory=dict)
    adapter_dir: str | None = None
    adapter_sha256: str | None = None
    adapter_training_seq_len: int | None = None
    adapter_training_seq_len_source: str | None = None
    adapter_base_model_name: str | None = None
    dtype: str | None = None  # merge --dtype, or "as base"
    lora_scale: float = 1.0  # the multiplier on the trained LoRA scale (adapters/scale.py LORA_SCALE)
    merged_modules: int = 0
    replaced_tensors: int = 0
    replaced_token_rows: dict[str, int] = field(default_factory=dict)
    untied_lm_head: bool = False
    features: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict) -> MergeProvenance:
        """The recorded fields; one that is missing or of another type keeps its default (a partial
        or hand-edited file never stops a plan or a serve)."""
        hints = typing.get_type_hints(cls)
        return cls(**{f.name: doc[f.name] for f in fields(cls) if _is_a(doc.get(f.name), hints[f.name])})


def _is_a(value, hint) -> bool:
    """Whether a JSON value fits a field's type hint (a whole number fits a float; null fits nothing)."""
    if value is None:
        return False
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    kinds = tuple(typing.get_origin(o) or o for o in options)
    return isinstance(value, kinds) or (float in kinds and isinstance(value, int))


def read_merge_provenance(model_dir: Path) -> MergeProvenance | None:
    """A merged model's record; None when the folder has none or it is unreadable (never raises)."""
    try:
        doc = json.loads((Path(model_dir) / MERGE_PROVENANCE).read_text())
    except (OSError, ValueError):
        return None
    return MergeProvenance.from_json(doc) if isinstance(doc, dict) else None


def write_merge_provenance(model_dir: Path, provenance: MergeProvenance) -> None:
    (Path(model_dir) / MERGE_PROVENANCE).write_text(json.dumps(provenance.to_json(), indent=2) + "\n")
