"""Inspect a LoRA adapter (optionally against its base) and decide: mount it in vLLM, or merge it.

Reads adapter_config.json and the safetensors header only. The verdict follows vLLM's real
rules (see vllm_rules.py): `mount` when vLLM's reader accepts the adapter as it is and
computes the same function as PEFT; `merge` when vLLM rejects it or would silently mis-scale
it (lcserve's merge handles those); `unusable` when the adapter does not fit the base or
uses a feature neither path can serve faithfully.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lcserve.errors import ModelError
from lcserve.safetensors_header import read_model_tensors

from . import reader
from .reader import EMB_A, EMB_B, FULL, LORA_A, LORA_B, LORA_B_BIAS, MAGNITUDE, AdapterTensor
from .training_length import training_seq_len_source
from .vllm_rules import ALLOWED_MAX_LORA_RANKS, CLASSIFIER_HEADS, SUPPORTED_INITS, VllmRules, installed_vllm_rules, round_max_lora_rank

MOUNT, MERGE, UNUSABLE = "mount", "merge", "unusable"
EMBEDDING_NAMES = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out", "word_embeddings")
MAX_LISTED = 3


@dataclass
class AdapterReport:
    adapter_dir: str
    weights_file: str
    rank: int
    alpha: float
    use_rslora: bool
    use_dora: bool
    target_modules: list[str] | str
    modules_to_save: list[str]
    bias: str
    lora_bias: bool
    fan_in_fan_out: bool
    rank_pattern: dict
    alpha_pattern: dict
    init_lora_weights: bool | str
    unsupported_features: list[str]       # PEFT features neither vLLM nor lcserve's merge implement
    embedding_lora: bool
    lora_modules: int
    max_rank: int                         # largest rank over r, rank_pattern and the tensors
    base_model_name: str | None
    training_seq_len: int | None
    training_seq_len_source: str | None
    base_dir: str | None = None
    base_architecture: str | None = None
    base_vocab_size: int | None = None
    adapter_vocab_size: int | None = None
    fit_problems: list[str] = field(default_factory=list)
    verdict: str = MOUNT
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    max_lora_rank: int | None = None      # the --max-lora-rank value vLLM needs to mount it
    vllm: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def inspect_adapter(adapter_dir: Path, base_dir: Path | None = None, allow_pickle: bool = False,
                    rules: VllmRules | None = None) -> AdapterReport:
    """Read an adapter (and its base, when given) and return its report with the verdict."""
    adapter_dir = Path(adapter_dir)
    config = reader.read_config(adapter_dir)
    tensors = reader.read_tensor_infos(adapter_dir, allow_pickle)
    seq = training_seq_len_source(adapter_dir)
    report = _features(adapter_dir, config, tensors, reader.weights_file(adapter_dir, allow_pickle))
    report.training_seq_len, report.training_seq_len_source = (seq if seq else (None, None))
    if base_dir is not None:
        base_dir = Path(base_dir)
        base_config = _read_base_config(base_dir)
        base_shapes = {name: info.shape for name, info in read_model_tensors(base_dir).items()}
        report.base_dir = str(base_dir)
        report.base_architecture = (base_config.get("architectures") or [None])[0]
        fit = check_fit(tensors, base_shapes, base_config, report.fan_in_fan_out, _adapter_tokenizer_size(adapter_dir))
        report.fit_problems, report.base_vocab_size, report.adapter_vocab_size = fit
    decide_verdict(report, rules or installed_vllm_rules())
    return report


def _features(adapter_dir: Path, config: dict, tensors: list[AdapterTensor], weights: Path) -> AdapterReport:
    rank_pattern = config.get("rank_pattern") or {}
    tensor_ranks = [t.shape[0] for t in tensors if t.kind in (LORA_A, EMB_A) and t.shape]
    lora_modules = {t.module for t in tensors if t.kind in (LORA_A, LORA_B, EMB_A, EMB_B)}
    init = config.get("init_lora_weights", True)
    unsupported = []
    if isinstance(init, str) and init.lower() not in SUPPORTED_INITS:
        unsupported.append(f"init_lora_weights={init!r} (the adapter only works on the base PEFT modified at "
                           "init; convert it with PEFT's path_initial_model_for_weight_conversion)")
    for key, label in (("alora_invocation_tokens", "aLoRA (activated LoRA)"), ("layer_replication", "layer_replication"),
                       ("use_qalora", "QALoRA"), ("use_bdlora", "BD-LoRA"),
                       ("target_parameters", "target_parameters (LoRA on raw parameters)")):
        if config.get(key):
            unsupported.append(label)
    targets = config.get("target_modules")
    return AdapterReport(
        adapter_dir=str(adapter_dir),
        weights_file=weights.name,
        rank=int(config["r"]),
        alpha=config["lora_alpha"],
        use_rslora=bool(config.get("use_rslora")),
        use_dora=bool(config.get("use_dora")),
        target_modules=sorted(targets) if isinstance(targets, list) else targets,
        modules_to_save=list(config.get("modules_to_save") or []),
        bias=str(config.get("bias") or "none"),
        lora_bias=bool(config.get("lora_bias")),
        fan_in_fan_out=bool(config.get("fan_in_fan_out")),
        rank_pattern=dict(rank_pattern),
        alpha_pattern=dict(config.get("alpha_pattern") or {}),
        init_lora_weights=init,
        unsupported_features=unsupported,
        embedding_lora=any(t.kind in (EMB_A, EMB_B) or (t.kind in (LORA_A, LORA_B) and _is_embedding(t.module))
                           for t in tensors),
        lora_modules=len(lora_modules),
        max_rank=max([int(config["r"]), *[int(v) for v in rank_pattern.values()], *tensor_ranks]),
        base_model_name=config.get("base_model_name_or_path"),
        training_seq_len=None,
        training_seq_len_source=None,
    )


def _is_embedding(module: str) -> bool:
    return module.rsplit(".", 1)[-1] in EMBEDDING_NAMES


def decide_verdict(report: AdapterReport, rules: VllmRules) -> None:
    """Fill verdict, reasons, notes and max_lora_rank from the report's features (pure)."""
    unusable = list(report.fit_problems) + list(report.unsupported_features)
    merge: list[str] = []
    notes: list[str] = []
    if report.use_dora:
        merge.append("DoRA (use_dora): vLLM rejects it (\"vLLM does not yet support DoRA\")")
    extra_saved = [m for m in report.modules_to_save if m not in CLASSIFIER_HEADS]
    if extra_saved:
        merge.append(f"modules_to_save {extra_saved}: vLLM rejects full-module replacements other than "
                     "classification heads")
    if report.bias != "none":
        merge.append(f"bias={report.bias!r}: vLLM rejects adapters that train base biases")
    if report.lora_bias:
        merge.append("lora_bias: vLLM rejects LoRA B biases")
    if report.rank_pattern or report.alpha_pattern:
        patterns = ", ".join(k for k in ("rank_pattern", "alpha_pattern") if getattr(report, k))
        if rules.honors_rank_alpha_patterns:
            notes.append(f"{patterns}: {rules.describe()} applies per-module rank and scale like PEFT")
        else:
            merge.append(f"{patterns}: {rules.describe()} reads only the global r/lora_alpha, so the patterned "
                         "modules would be mis-scaled without any error")
    if report.embedding_lora:
        merge.append("embedding/lm_head LoRA: vLLM mounts it only on architectures that declare embedding "
                     "modules (not Gemma 3) and with vocabularies up to 258048; a merge is exact everywhere")
    max_lora_rank = round_max_lora_rank(report.max_rank)
    if max_lora_rank is None:
        merge.append(f"rank {report.max_rank} is above vLLM's largest --max-lora-rank {ALLOWED_MAX_LORA_RANKS[-1]}")
    if report.training_seq_len:
        notes.append(f"trained at {report.training_seq_len} tokens ({report.training_seq_len_source})")
    if unusable:
        report.verdict, report.reasons = UNUSABLE, unusable + merge
    elif merge:
        report.verdict, report.reasons = MERGE, merge
    else:
        report.verdict, report.reasons = MOUNT, []
    report.notes = notes
    report.max_lora_rank = max_lora_rank
    report.vllm = rules.describe()


def check_fit(tensors: list[AdapterTensor], base_shapes: dict[str, tuple[int, ...]], base_config: dict,
              fan_in_fan_out: bool, adapter_tokenizer_size: int | None = None
              ) -> tuple[list[str], int | None, int | None]:
    """(problems, base vocab, adapter vocab): does every adapter tensor fit a base tensor? (pure)"""
    base_vocab = _base_vocab(base_config, base_shapes)
    by_module: dict[str, dict[str, AdapterTensor]] = defaultdict(dict)
    for t in tensors:
        by_module[t.module if t.kind != FULL else t.base_key][t.kind] = t
    missing, problems = [], []
    adapter_vocab = None
    for module, parts in sorted(by_module.items()):
        if FULL in parts:
            t = parts[FULL]
            if t.base_key not in base_shapes:
                missing.append(t.base_key)
            elif tuple(base_shapes[t.base_key]) != t.shape:
                if _is_embedding(t.base_key.rsplit(".", 1)[0]):
                    adapter_vocab = t.shape[0]
                problems.append(f"{t.key}: shape {list(t.shape)} does not fit base {t.base_key} "
                                f"{list(base_shapes[t.base_key])}")
            continue
        weight_key = f"{module}.weight"
        if weight_key not in base_shapes:
            missing.append(weight_key)
            continue
        problems.extend(_module_fit(module, parts, base_shapes, fan_in_fan_out))
        if EMB_A in parts:
            adapter_vocab = parts[EMB_A].shape[1]
    lora_count = sum(1 for parts in by_module.values() if FULL not in parts)
    if missing:
        if len(missing) >= lora_count and lora_count:
            problems.insert(0, f"none of the adapter's {lora_count} LoRA modules exist in the base (e.g. {missing[0]}): "
                               "the adapter was trained for another architecture")
        else:
            shown = ", ".join(missing[:MAX_LISTED]) + (f" (+{len(missing) - MAX_LISTED} more)" if len(missing) > MAX_LISTED else "")
            problems.insert(0, f"{len(missing)} adapter tensors have no counterpart in the base: {shown}")
    if adapter_vocab is not None and base_vocab is not None and adapter_vocab != base_vocab:
        problems.append(f"vocabularies differ: the adapter embeds {adapter_vocab} tokens, the base {base_vocab}")
    if adapter_tokenizer_size is not None and base_vocab is not None and adapter_tokenizer_size > base_vocab:
        problems.append(f"the adapter's tokenizer has {adapter_tokenizer_size} tokens, more than the base's "
                        f"{base_vocab} embedding rows (it was trained with added tokens)")
        adapter_vocab = adapter_vocab or adapter_tokenizer_size
    return _cap(problems), base_vocab, adapter_vocab


def _module_fit(module: str, parts: dict[str, AdapterTensor], base_shapes: dict, fan_in_fan_out: bool) -> list[str]:
    weight = tuple(base_shapes[f"{module}.weight"])
    if EMB_A in parts or EMB_B in parts:
        if EMB_A not in parts or EMB_B not in parts:
            return [f"{module}: has only one of lora_embedding_A/B"]
        a, b = parts[EMB_A].shape, parts[EMB_B].shape
        if len(weight) != 2 or a[0] != b[1] or b[0] != weight[1]:
            return [f"{module}: embedding LoRA A {list(a)} / B {list(b)} does not fit base {list(weight)}"]
        return []
    if LORA_A not in parts or LORA_B not in parts:
        return [f"{module}: has only one of lora_A/lora_B"]
    a, b = parts[LORA_A].shape, parts[LORA_B].shape
    if len(weight) != 2 or len(a) != 2 or len(b) != 2:
        return [f"{module}: only 2-D (linear) weights are handled; base {list(weight)}, lora_A {list(a)}"]
    out_f, in_f = (weight[1], weight[0]) if fan_in_fan_out else weight
    problems = []
    if a[0] != b[1]:
        problems.append(f"{module}: lora_A rank {a[0]} != lora_B rank {b[1]}")
    if a[1] != in_f or b[0] != out_f:
        problems.append(f"{module}: lora_A {list(a)} / lora_B {list(b)} do not fit base weight {list(weight)} "
                        f"(expects in={in_f}, out={out_f})")
    if MAGNITUDE in parts and parts[MAGNITUDE].shape[-1] != out_f:
        problems.append(f"{module}: DoRA magnitude {list(parts[MAGNITUDE].shape)} does not fit out={out_f}")
    if LORA_B_BIAS in parts:
        bias = base_shapes.get(f"{module}.bias")
        if bias is None:
            problems.append(f"{module}: adapter has a lora_B bias but the base layer has no bias")
        elif tuple(bias) != parts[LORA_B_BIAS].shape:
            problems.append(f"{module}: lora_B bias {list(parts[LORA_B_BIAS].shape)} does not fit base bias {list(bias)}")
    return problems


def _cap(problems: list[str]) -> list[str]:
    if len(problems) <= MAX_LISTED + 1:
        return problems
    return problems[:MAX_LISTED] + [f"... and {len(problems) - MAX_LISTED} more shape problems"]


def _base_vocab(base_config: dict, base_shapes: dict) -> int | None:
    for name, shape in base_shapes.items():
        if name.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight")) and len(shape) == 2:
            return int(shape[0])
    text = base_config.get("text_config") or {}
    return base_config.get("vocab_size") or text.get("vocab_size")


def _read_base_config(base_dir: Path) -> dict:
    path = base_dir / "config.json"
    if not base_dir.is_dir():
        raise ModelError(f"{base_dir}: base model folder not found")
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path}: missing; pass a Hugging Face model folder as --base") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: not valid JSON ({e})") from None


def _adapter_tokenizer_size(adapter_dir: Path) -> int | None:
    """Tokens in a tokenizer saved beside the adapter (trainers save it when they add tokens)."""
    path = adapter_dir / "tokenizer.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    vocab = (doc.get("model") or {}).get("vocab")
    size = 0
    if isinstance(vocab, dict) and vocab:
        size = max(vocab.values()) + 1
    elif isinstance(vocab, list):
        size = len(vocab)
    added = [t.get("id", -1) for t in doc.get("added_tokens") or []]
    return max([size, *[i + 1 for i in added]]) or None
