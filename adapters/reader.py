"""Read a PEFT LoRA adapter folder once: its config as one typed value, its tensors parsed into what they touch.

`read_adapter` is the one reader of `adapter_config.json`: it checks the fields every LoRA
reader needs and returns a `LoraAdapter` that inspect, merge, verify, mount and the planner all
take. No pickle: tensors come from `adapter_model.safetensors`; `adapter_model.bin` is read only
when the caller allows it (torch.load with weights_only). Every problem a user can cause is an
AdapterError that names the file and the fix.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from lcserve.errors import AdapterError, ModelError
from lcserve.safetensors_header import read_header

from .training_length import training_seq_len_source

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt")
PEFT_PREFIX = "base_model.model."
STATED = "stated"  # training_seq_len_source when the caller gives the length


class TensorKind(StrEnum):
    """Kinds of adapter tensors, by what the merge does with them (PEFT's tensor names where it has one)."""

    LORA_A = "lora_A"
    LORA_B = "lora_B"
    LORA_B_BIAS = "lora_B_bias"
    EMB_A = "lora_embedding_A"
    EMB_B = "lora_embedding_B"
    MAGNITUDE = "magnitude"  # DoRA
    TOKENS = "trainable_tokens_delta"  # TrainableTokens: whole embedding rows, by index (trainable_token_indices)
    FULL = "full"  # a whole tensor that replaces the base's (modules_to_save, bias, saved embeddings)


@dataclass(frozen=True)
class LoraAdapter:
    """One PEFT LoRA adapter, read once: the `adapter_config.json` fields lcserve uses (PEFT's
    `LoraConfig` names, as vLLM's `PEFTHelper` reads them) and the length it was trained at.

    Built by `read_adapter`, which checks it; every consumer takes this value instead of the JSON.
    Frozen, and its pattern dicts are not to be changed either.
    """

    path: Path
    """The adapter folder."""
    r: int
    """Rank of every LoRA module that `rank_pattern` does not name."""
    lora_alpha: float
    """Scale numerator of every module that `alpha_pattern` does not name (int or float, as saved)."""
    target_modules: tuple[str, ...] | str | None
    """Module names, or one regex / "all-linear" as PEFT allows; None when only `target_parameters` is set."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module ranks, keyed by a module-name suffix pattern (first match wins, as in PEFT)."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alphas, matched like `rank_pattern`."""
    use_rslora: bool = False
    """Scale by alpha/sqrt(r) instead of alpha/r (rsLoRA)."""
    use_dora: bool = False
    """DoRA: a per-output magnitude vector on top of the LoRA delta."""
    modules_to_save: tuple[str, ...] = ()
    """Modules the adapter replaces whole (trained copies saved beside the LoRA tensors)."""
    bias: str = "none"
    """Which base biases were trained: "none", "all" or "lora_only"."""
    lora_bias: bool = False
    """lora_B carries a bias."""
    fan_in_fan_out: bool = False
    """The base stores weights as (in, out), like GPT-2's Conv1D."""
    init_lora_weights: bool | str = True
    """How PEFT initialised the adapter; some inits (PiSSA, OLoRA, LoftQ, CorDA) also change the base."""
    ensure_weight_tying: bool = False
    """PEFT applies an embedding LoRA to the tied output embedding too."""
    base_model_name_or_path: str | None = None
    """The base the adapter says it was trained on (informative: lcserve checks shapes, not names)."""
    alora_invocation_tokens: tuple = ()
    """aLoRA (activated LoRA); this and the next four are PEFT features lcserve refuses, read only to name them."""
    layer_replication: tuple = ()
    use_qalora: bool = False
    use_bdlora: bool = False
    """BD-LoRA (PEFT holds a BdLoraConfig; only whether it is set matters here)."""
    target_parameters: tuple[str, ...] = ()
    """LoRA on raw parameters (fused MoE experts) instead of modules."""
    trainable_token_indices: tuple[int, ...] | dict[str, tuple[int, ...]] = ()
    """TrainableTokens: embedding rows trained whole (new special tokens). A tuple names rows of the
    input embedding; a dict maps embedding module names (matched as suffixes, as PEFT does) to rows."""
    training_seq_len: int | None = None
    """The sequence length the adapter was trained at, when something beside it (or the caller) says so."""
    training_seq_len_source: str | None = None
    """Where `training_seq_len` came from: a file name, or "stated" when the caller gave it."""

    @property
    def max_rank(self) -> int:
        """The largest rank over `r` and `rank_pattern`: what vLLM's `--max-lora-rank` must hold
        (its `PEFTHelper.validate_legal` checks the same)."""
        return max([self.r, *self.rank_pattern.values()])

    def rank_and_scaling(self, module: str) -> tuple[int, float]:
        """PEFT's rank and scale for one module (`model.layers.0.self_attn.q_proj`), as vLLM's
        `PEFTHelper.get_rank_and_scaling`: the first pattern key that matches the name's suffix,
        then alpha/sqrt(r) with rsLoRA, alpha/r without."""
        rank = _pattern_value(self.rank_pattern, module, self.r)
        alpha = _pattern_value(self.alpha_pattern, module, self.lora_alpha)
        return rank, (alpha / math.sqrt(rank) if self.use_rslora else alpha / rank)

    def token_indices(self, module: str) -> tuple[int, ...] | None:
        """The rows PEFT trained whole in `module` (`model.embed_tokens`), or None. A plain list
        belongs to the input embedding, the one module PEFT saves a delta for; a dict key names the
        module by suffix (PEFT's `_set_trainable` matches with `endswith`)."""
        indices = self.trainable_token_indices
        if isinstance(indices, tuple):
            return indices or None
        return next((rows for key, rows in indices.items() if module.endswith(key)), None)


def _pattern_value(pattern: dict, module: str, default):
    """PEFT's `get_pattern_key`: a key matches a suffix of the module name that starts at a dot."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass(frozen=True)
class AdapterTensor:
    key: str  # name in the adapter file
    module: str  # module path in the base, e.g. model.layers.0.self_attn.q_proj
    kind: TensorKind
    shape: tuple[int, ...]
    dtype: str

    @property
    def base_key(self) -> str:
        """The base tensor this one reads or replaces."""
        if self.kind == TensorKind.FULL:
            return self.module
        if self.kind == TensorKind.LORA_B_BIAS:
            return f"{self.module}.bias"
        return f"{self.module}.weight"


def read_adapter(adapter_dir: str | Path, training_seq_len: int | None = None) -> LoraAdapter:
    """The adapter in `adapter_dir`, checked for the fields every LoRA reader needs (vLLM's among them).

    The training length is `training_seq_len` when given, else what the trainer left beside the
    adapter (see training_length.py), else None.
    """
    adapter_dir = Path(adapter_dir)
    config = _read_config_json(adapter_dir)
    path = adapter_dir / CONFIG_FILE
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"{path}: peft_type is {peft_type}; lcserve handles LoRA adapters only")
    r = config.get("r")
    if not _positive(r, int):
        raise AdapterError(f"{path}: field `r` is {r!r}; it must be a positive integer (the LoRA rank)")
    targets, target_parameters = config.get("target_modules"), config.get("target_parameters")
    if not targets and not target_parameters:
        raise AdapterError(
            f"{path}: field `target_modules` is missing or empty; vLLM needs it to mount the adapter "
            "(re-save the adapter with PEFT)"
        )
    if targets and not (isinstance(targets, str) or _all(targets, str)):
        raise AdapterError(
            f"{path}: field `target_modules` is {targets!r}; it must be a list of module names or "
            "one regex (re-save the adapter with PEFT)"
        )
    alpha = config.get("lora_alpha")
    if not _positive(alpha, (int, float)):
        raise AdapterError(f"{path}: field `lora_alpha` is {alpha!r}; it must be a positive number")
    rank_pattern = _pattern(config, "rank_pattern", int, path)
    alpha_pattern = _pattern(config, "alpha_pattern", (int, float), path)
    if training_seq_len is not None:
        seq = (training_seq_len, STATED)
    else:
        seq = training_seq_len_source(adapter_dir) or (None, None)
    return LoraAdapter(
        path=adapter_dir,
        r=r,
        lora_alpha=alpha,
        target_modules=(targets if isinstance(targets, str) else tuple(targets)) if targets else None,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        use_rslora=bool(config.get("use_rslora")),
        use_dora=bool(config.get("use_dora")),
        modules_to_save=tuple(config.get("modules_to_save") or ()),
        bias=str(config.get("bias") or "none"),
        lora_bias=bool(config.get("lora_bias")),
        fan_in_fan_out=bool(config.get("fan_in_fan_out")),
        init_lora_weights=config.get("init_lora_weights", True),
        ensure_weight_tying=bool(config.get("ensure_weight_tying")),
        base_model_name_or_path=config.get("base_model_name_or_path"),
        alora_invocation_tokens=_tuple(config.get("alora_invocation_tokens")),
        layer_replication=_tuple(config.get("layer_replication")),
        use_qalora=bool(config.get("use_qalora")),
        use_bdlora=bool(config.get("use_bdlora")),
        target_parameters=_tuple(target_parameters),
        trainable_token_indices=_token_indices(config, path),
        training_seq_len=seq[0],
        training_seq_len_source=seq[1],
    )


def _read_config_json(adapter_dir: Path) -> dict:
    if not adapter_dir.is_dir():
        raise AdapterError(f"{adapter_dir}: adapter folder not found; pass the folder that holds {CONFIG_FILE}")
    path = adapter_dir / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterError(
            f"{path}: missing; a PEFT adapter folder needs {CONFIG_FILE} (save it with model.save_pretrained)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e}); re-save the adapter with PEFT") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object; re-save the adapter with PEFT")
    return config


def _positive(value, kind) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool) and value > 0


def _all(values, kind) -> bool:
    return isinstance(values, list | tuple) and all(isinstance(v, kind) for v in values)


def _pattern(config: dict, key: str, kind, path: Path) -> dict:
    """`rank_pattern` / `alpha_pattern`: {module pattern: positive value} (vLLM rejects anything else)."""
    pattern = config.get(key) or {}
    if not isinstance(pattern, dict) or not all(_positive(v, kind) for v in pattern.values()):
        what = "positive integer ranks" if kind is int else "positive numbers"
        raise AdapterError(
            f"{path}: field `{key}` is {pattern!r}; it must map module names to {what} (re-save the adapter with PEFT)"
        )
    return dict(pattern)


def _token_indices(config: dict, path: Path) -> tuple[int, ...] | dict[str, tuple[int, ...]]:
    """`trainable_token_indices`: a list of row indices, or {embedding module name: list of row indices}."""
    value = config.get("trainable_token_indices")
    if value is None:
        return ()
    rows = list(value.values()) if isinstance(value, dict) else [value]
    if not all(
        isinstance(r, list) and r and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in r)
        for r in rows
    ):
        raise AdapterError(
            f"{path}: field `trainable_token_indices` is {value!r}; it must be a list of token ids or "
            "map embedding module names to lists of token ids (re-save the adapter with PEFT)"
        )
    if isinstance(value, dict):
        return {str(k): tuple(v) for k, v in value.items()}
    return tuple(value)


def _tuple(value) -> tuple:
    if not value:
        return ()
    return tuple(value) if isinstance(value, list | tuple) else (value,)


def weights_file(adapter_dir: Path, allow_pickle: bool = False) -> Path:
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / SAFETENSORS_FILE
    if path.exists():
        return path
    for name in PICKLE_FILES:
        if (adapter_dir / name).exists():
            if not allow_pickle:
                raise AdapterError(
                    f"{adapter_dir / name}: pickle weights are not read by default (they can run code); "
                    "convert to adapter_model.safetensors or pass --allow-pickle"
                )
            return adapter_dir / name
    raise AdapterError(f"{adapter_dir}: no {SAFETENSORS_FILE}; save the adapter with safe_serialization=True")


def parse_key(key: str) -> tuple[str, TensorKind]:
    """(module path in the base, kind) for one adapter tensor name, as PEFT writes them."""
    name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
    parts = name.split(".")
    if len(parts) >= 3 and parts[-2] in (TensorKind.LORA_A, TensorKind.LORA_B) and parts[-1] in ("weight", "bias"):
        if parts[-2] == TensorKind.LORA_B and parts[-1] == "bias":
            return ".".join(parts[:-2]), TensorKind.LORA_B_BIAS
        if parts[-1] == "weight":
            return ".".join(parts[:-2]), TensorKind(parts[-2])
    if len(parts) >= 3 and parts[-2:] == ["token_adapter", TensorKind.TOKENS]:
        return ".".join(parts[:-2]), TensorKind.TOKENS
    if parts[-1] in (TensorKind.EMB_A, TensorKind.EMB_B):
        return ".".join(parts[:-1]), TensorKind(parts[-1])
    if parts[-1] == "lora_magnitude_vector":
        return ".".join(parts[:-1]), TensorKind.MAGNITUDE
    if len(parts) >= 2 and parts[-2] == "lora_magnitude_vector" and parts[-1] == "weight":
        return ".".join(parts[:-2]), TensorKind.MAGNITUDE
    if len(parts) >= 3 and parts[-2] == "base_layer":
        # save_embedding_layers: PEFT stores the (possibly resized) base embedding itself.
        return ".".join(parts[:-2] + parts[-1:]), TensorKind.FULL
    if any(p.startswith("lora_") for p in parts):
        raise AdapterError(f"adapter tensor {key!r}: unknown LoRA tensor name; lcserve reads PEFT LoRA adapters")
    return name, TensorKind.FULL


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
        items = [(name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in _load_pickle(path).items()]
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


def nonfinite_tensors(adapter_dir: Path, allow_pickle: bool = False) -> list[str]:
    """Names of the adapter tensors that hold NaN or inf: the one finiteness check (inspect runs it,
    so merge, verify, mount and runtime loading all refuse such an adapter). vLLM would mount it
    without a word and serve garbage. A full read of the values: adapters are small."""
    return [
        name
        for name, tensor in sorted(load_tensors(adapter_dir, allow_pickle).items())
        if tensor.is_floating_point() and not bool(tensor.isfinite().all())
    ]


def _load_pickle(path: Path) -> dict:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad pickle
        raise AdapterError(
            f"{path}: unreadable ({type(e).__name__}: {e}); re-save the adapter as safetensors"
        ) from None
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
