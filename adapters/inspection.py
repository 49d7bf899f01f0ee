"""Inspect a LoRA adapter (optionally against its base) and decide: mount it in vLLM, or merge it.

Takes the adapter as `read_adapter` read it, reads the base's safetensors headers and the
adapter's values (a full read, to refuse NaN/inf: adapters are small). The `Verdict` follows
vLLM's real rules (see lcserve/vllm_rules.py): `mount` when vLLM's reader
accepts the adapter as it is and computes the same function as PEFT; `merge` when vLLM rejects
it or would silently mis-scale it (lcserve's merge handles those); `unusable` when the adapter
does not fit the base or uses a feature neither path can serve faithfully.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from lcserve.errors import ModelError
from lcserve.model_facts import text_config, tied_embeddings
from lcserve.rope_check import adapter_findings
from lcserve.safetensors_header import read_model_tensors
from lcserve.vllm_rules import (
    ALLOWED_MAX_LORA_RANKS,
    CLASSIFIER_HEADS,
    SUPPORTED_INITS,
    VllmRules,
    installed_vllm_rules,
    round_max_lora_rank,
)

from . import reader
from .reader import AdapterTensor, LoraAdapter, TensorKind

EMBEDDING_NAMES = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out", "word_embeddings")
MAX_LISTED = 3
LORA_KINDS = (TensorKind.LORA_A, TensorKind.LORA_B, TensorKind.EMB_A, TensorKind.EMB_B)


class Verdict(StrEnum):
    """How an adapter can be served (a str, so JSON and comparisons read "mount", "merge", "unusable")."""

    MOUNT = "mount"  # vLLM accepts it as it is and computes what PEFT computes
    MERGE = "merge"  # vLLM rejects it or would mis-scale it; lcserve's merge serves it exactly
    UNUSABLE = "unusable"  # it does not fit the base, or uses a feature neither path serves faithfully


@dataclass
class AdapterReport:
    """What inspect found about one adapter (and its base, when given), and the verdict."""

    adapter: LoraAdapter
    weights_file: str
    unsupported_features: list[str]  # PEFT features neither vLLM nor lcserve's merge implement
    embedding_lora: bool
    lora_modules: int
    max_rank: int  # largest rank over r, rank_pattern and the tensors
    trainable_tokens: dict[str, int] = field(default_factory=dict)  # module -> rows PEFT trained whole
    nonfinite_tensors: list[str] = field(default_factory=list)  # tensors holding NaN/inf
    base_dir: str | None = None
    base_architecture: str | None = None
    base_vocab_size: int | None = None
    adapter_vocab_size: int | None = None
    fit_problems: list[str] = field(default_factory=list)
    verdict: Verdict = Verdict.MOUNT
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    max_lora_rank: int | None = None  # the --max-lora-rank value vLLM needs to mount it
    vllm: str = ""

    def to_json(self) -> dict:
        """The `adapters inspect --json` document; scripts read it, so its keys and their order stay put."""
        a = self.adapter
        return {
            "adapter_dir": str(a.path),
            "weights_file": self.weights_file,
            "rank": a.r,
            "alpha": a.lora_alpha,
            "use_rslora": a.use_rslora,
            "use_dora": a.use_dora,
            "target_modules": sorted(a.target_modules) if isinstance(a.target_modules, tuple) else a.target_modules,
            "modules_to_save": list(a.modules_to_save),
            "bias": a.bias,
            "lora_bias": a.lora_bias,
            "fan_in_fan_out": a.fan_in_fan_out,
            "rank_pattern": dict(a.rank_pattern),
            "alpha_pattern": dict(a.alpha_pattern),
            "init_lora_weights": a.init_lora_weights,
            "unsupported_features": list(self.unsupported_features),
            "embedding_lora": self.embedding_lora,
            "lora_modules": self.lora_modules,
            "max_rank": self.max_rank,
            "base_model_name": a.base_model_name_or_path,
            "training_seq_len": a.training_seq_len,
            "training_seq_len_source": a.training_seq_len_source,
            "base_dir": self.base_dir,
            "base_architecture": self.base_architecture,
            "base_vocab_size": self.base_vocab_size,
            "adapter_vocab_size": self.adapter_vocab_size,
            "fit_problems": list(self.fit_problems),
            "verdict": self.verdict,
            "reasons": list(self.reasons),
            "notes": list(self.notes),
            "max_lora_rank": self.max_lora_rank,
            "vllm": self.vllm,
            "trainable_token_indices": (
                a.trainable_token_indices
                if isinstance(a.trainable_token_indices, dict)
                else list(a.trainable_token_indices)
            ),
            "trainable_tokens": dict(self.trainable_tokens),
            "nonfinite_tensors": list(self.nonfinite_tensors),
        }


def inspect_adapter(
    adapter: LoraAdapter, base_dir: Path | None = None, allow_pickle: bool = False, rules: VllmRules | None = None
) -> AdapterReport:
    """Read the adapter's tensors (and its base's headers, when given) and return its report with the verdict."""
    tensors = reader.read_tensor_infos(adapter.path, allow_pickle)
    report = _features(adapter, tensors, reader.weights_file(adapter.path, allow_pickle))
    report.nonfinite_tensors = reader.nonfinite_tensors(adapter.path, allow_pickle)
    base_config = None
    if base_dir is not None:
        base_dir = Path(base_dir)
        base_config = _read_base_config(base_dir)
        base_shapes = {name: info.shape for name, info in read_model_tensors(base_dir).items()}
        report.base_dir = str(base_dir)
        report.base_architecture = (base_config.get("architectures") or [None])[0]
        rows = {t.module: adapter.token_indices(t.module) for t in tensors if t.kind == TensorKind.TOKENS}
        fit = check_fit(
            tensors, base_shapes, base_config, adapter.fan_in_fan_out, _adapter_tokenizer_size(adapter.path), rows
        )
        report.fit_problems, report.base_vocab_size, report.adapter_vocab_size = fit
    decide_verdict(report, rules or installed_vllm_rules())
    # An adapter folder with a config.json (axolotl, unsloth) trained under other positions or RoPE.
    report.notes += [f.message for f in adapter_findings(adapter.path, base_config, f"the base {base_dir}")]
    return report


def _features(adapter: LoraAdapter, tensors: list[AdapterTensor], weights: Path) -> AdapterReport:
    tensor_ranks = [t.shape[0] for t in tensors if t.kind in (TensorKind.LORA_A, TensorKind.EMB_A) and t.shape]
    return AdapterReport(
        adapter=adapter,
        weights_file=weights.name,
        unsupported_features=unsupported_features(adapter),
        embedding_lora=any(
            t.kind in (TensorKind.EMB_A, TensorKind.EMB_B)
            or (t.kind in (TensorKind.LORA_A, TensorKind.LORA_B) and _is_embedding(t.module))
            for t in tensors
        ),
        lora_modules=len({t.module for t in tensors if t.kind in LORA_KINDS}),
        max_rank=max([adapter.max_rank, *tensor_ranks]),
        trainable_tokens={t.module: t.shape[0] for t in tensors if t.kind == TensorKind.TOKENS and t.shape},
    )


def unsupported_features(adapter: LoraAdapter) -> list[str]:
    """The PEFT features neither vLLM nor lcserve's merge implement, as the report names them (pure)."""
    found = []
    init = adapter.init_lora_weights
    if isinstance(init, str) and init.lower() not in SUPPORTED_INITS:
        found.append(
            f"init_lora_weights={init!r} (the adapter only works on the base PEFT modified at "
            "init; convert it with PEFT's path_initial_model_for_weight_conversion)"
        )
    for used, label in (
        (adapter.alora_invocation_tokens, "aLoRA (activated LoRA)"),
        (adapter.layer_replication, "layer_replication"),
        (adapter.use_qalora, "QALoRA"),
        (adapter.use_bdlora, "BD-LoRA"),
        (adapter.target_parameters, "target_parameters (LoRA on raw parameters)"),
    ):
        if used:
            found.append(label)
    return found


def _is_embedding(module: str) -> bool:
    return module.rsplit(".", 1)[-1] in EMBEDDING_NAMES


# Architectures whose vLLM 0.32 model class does not implement SupportsLoRA: vLLM serves no adapter on them
# (tests/unit/test_hybrid_plan.py checks the hybrid families against vLLM's own `supports_lora`).
NO_LORA_ARCHITECTURES = ("Zamba2ForCausalLM",)


def architecture_reasons(architecture: str | None) -> list[str]:
    """A merge reason when vLLM's class for the base architecture takes no LoRA at all."""
    if architecture in NO_LORA_ARCHITECTURES:
        return [f"the base's vLLM class {architecture} does not implement SupportsLoRA: vLLM mounts no adapter on it"]
    return []


def decide_verdict(report: AdapterReport, rules: VllmRules) -> None:
    """Fill verdict, reasons, notes and max_lora_rank from the report's features (pure)."""
    adapter = report.adapter
    unusable = list(report.fit_problems) + list(report.unsupported_features)
    if report.fit_problems:
        trained_on = f" ({adapter.base_model_name_or_path})" if adapter.base_model_name_or_path else ""
        unusable.append(
            f"the adapter was trained on another base{trained_on}: serve it on that one (check with "
            "`lcserve adapters inspect ADAPTER --base BASE`)"
        )
    if report.nonfinite_tensors:
        unusable.insert(0, nonfinite_reason(report.nonfinite_tensors))
    merge: list[str] = architecture_reasons(report.base_architecture)
    notes: list[str] = []
    if adapter.use_dora:
        merge.append('DoRA (use_dora): vLLM rejects it ("vLLM does not yet support DoRA")')
    extra_saved = [m for m in adapter.modules_to_save if m not in CLASSIFIER_HEADS]
    if extra_saved:
        merge.append(
            f"modules_to_save {extra_saved}: vLLM rejects full-module replacements other than classification heads"
        )
    if adapter.bias != "none":
        merge.append(f"bias={adapter.bias!r}: vLLM rejects adapters that train base biases")
    if adapter.lora_bias:
        merge.append("lora_bias: vLLM rejects LoRA B biases")
    if adapter.rank_pattern or adapter.alpha_pattern:
        patterns = ", ".join(k for k in ("rank_pattern", "alpha_pattern") if getattr(adapter, k))
        if rules.honors_rank_alpha_patterns:
            notes.append(f"{patterns}: {rules.describe()} applies per-module rank and scale like PEFT")
        else:
            merge.append(
                f"{patterns}: {rules.describe()} reads only the global r/lora_alpha, so the patterned "
                "modules would be mis-scaled without any error"
            )
    if report.embedding_lora:
        merge.append(
            "embedding/lm_head LoRA: vLLM mounts it only on architectures that declare embedding "
            "modules (not Gemma 3) and with vocabularies up to 258048; a merge is exact everywhere"
        )
    if report.trainable_tokens:
        rows = ", ".join(f"{n} rows of {m}" for m, n in sorted(report.trainable_tokens.items()))
        merge.append(
            f"trainable_token_indices ({rows}): vLLM's LoRA loader has no TrainableTokens and refuses "
            f'the tensor ("...token_adapter.{TensorKind.TOKENS} is unsupported LoRA weight"); '
            "a merge writes the rows as PEFT does, tied lm_head included"
        )
    max_lora_rank = round_max_lora_rank(report.max_rank)
    if max_lora_rank is None:
        merge.append(f"rank {report.max_rank} is above vLLM's largest --max-lora-rank {ALLOWED_MAX_LORA_RANKS[-1]}")
    if adapter.training_seq_len:
        notes.append(f"trained at {adapter.training_seq_len} tokens ({adapter.training_seq_len_source})")
    if unusable:
        report.verdict, report.reasons = Verdict.UNUSABLE, unusable + merge
    elif merge:
        report.verdict, report.reasons = Verdict.MERGE, merge
    else:
        report.verdict, report.reasons = Verdict.MOUNT, []
    report.notes = notes
    report.max_lora_rank = max_lora_rank
    report.vllm = rules.describe()


def nonfinite_reason(names: list[str]) -> str:
    """The one line inspect (and so merge, verify, mount) gives for an adapter holding NaN/inf (pure)."""
    more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
    return (
        f"tensor {names[0]}{more} holds NaN/inf values: the adapter is broken and vLLM would serve garbage "
        "from it; re-train it, or re-export it from a checkpoint without NaN/inf"
    )


def check_fit(
    tensors: list[AdapterTensor],
    base_shapes: dict[str, tuple[int, ...]],
    base_config: dict,
    fan_in_fan_out: bool,
    adapter_tokenizer_size: int | None = None,
    token_indices: dict[str, tuple[int, ...] | None] | None = None,
) -> tuple[list[str], int | None, int | None]:
    """(problems, base vocab, adapter vocab): does every adapter tensor fit a base tensor? (pure)

    `token_indices`: module -> the rows `trainable_token_indices` gives it (None when it gives none).
    """
    base_vocab = _base_vocab(base_config, base_shapes)
    by_module: dict[str, dict[str, AdapterTensor]] = defaultdict(dict)
    for t in tensors:
        by_module[t.module if t.kind != TensorKind.FULL else t.base_key][t.kind] = t
    missing, problems = [], []
    adapter_vocab = None
    for module, parts in sorted(by_module.items()):
        if TensorKind.FULL in parts:
            t = parts[TensorKind.FULL]
            if t.base_key not in base_shapes:
                missing.append(t.base_key)
            elif tuple(base_shapes[t.base_key]) != t.shape:
                if _is_embedding(t.base_key.rsplit(".", 1)[0]):
                    adapter_vocab = t.shape[0]
                problems.append(
                    f"{t.key}: shape {list(t.shape)} does not fit base {t.base_key} {list(base_shapes[t.base_key])}"
                )
            continue
        if TensorKind.TOKENS in parts:
            weight_key = token_rows_target(module, base_shapes, base_config)
            if weight_key is None:
                missing.append(f"{module}.weight")
            else:
                problems.extend(
                    _token_rows_fit(module, parts, base_shapes[weight_key], (token_indices or {}).get(module))
                )
            continue
        weight_key = f"{module}.weight"
        if weight_key not in base_shapes:
            missing.append(weight_key)
            continue
        problems.extend(_module_fit(module, parts, base_shapes, fan_in_fan_out))
        if TensorKind.EMB_A in parts:
            adapter_vocab = parts[TensorKind.EMB_A].shape[1]
    lora_count = sum(1 for parts in by_module.values() if not {TensorKind.FULL, TensorKind.TOKENS} & set(parts))
    if missing:
        if len(missing) >= lora_count and lora_count:
            problems.insert(
                0,
                f"none of the adapter's {lora_count} LoRA modules exist in the base (e.g. {missing[0]}): "
                "the adapter was trained for another architecture",
            )
        else:
            shown = ", ".join(missing[:MAX_LISTED]) + (
                f" (+{len(missing) - MAX_LISTED} more)" if len(missing) > MAX_LISTED else ""
            )
            problems.insert(0, f"{len(missing)} adapter tensors have no counterpart in the base: {shown}")
    if adapter_vocab is not None and base_vocab is not None and adapter_vocab != base_vocab:
        problems.append(f"vocabularies differ: the adapter embeds {adapter_vocab} tokens, the base {base_vocab}")
    if adapter_tokenizer_size is not None and base_vocab is not None and adapter_tokenizer_size > base_vocab:
        problems.append(
            f"the adapter's tokenizer has {adapter_tokenizer_size} tokens, more than the base's "
            f"{base_vocab} embedding rows (it was trained with added tokens)"
        )
        adapter_vocab = adapter_vocab or adapter_tokenizer_size
    return _cap(problems), base_vocab, adapter_vocab


def token_rows_target(module: str, base_shapes: dict, base_config: dict) -> str | None:
    """The base tensor whose rows a TrainableTokens delta replaces: the module's own weight, or, for
    lm_head of a tied base (no lm_head tensor of its own), the input embedding it shares (pure)."""
    if f"{module}.weight" in base_shapes:
        return f"{module}.weight"
    if module.rsplit(".", 1)[-1] == "lm_head" and tied_embeddings(base_config):
        return next((name for name in base_shapes if name.endswith("embed_tokens.weight")), None)
    return None


def _token_rows_fit(
    module: str, parts: dict[str, AdapterTensor], weight: tuple[int, ...], rows: tuple[int, ...] | None
) -> list[str]:
    delta = parts[TensorKind.TOKENS].shape
    if len(parts) > 1:
        return [
            f"{module}: has both trainable tokens and LoRA tensors; PEFT does not build such adapters "
            "(re-save the adapter with PEFT)"
        ]
    if rows is None:
        return [
            f"{module}: has trainable token rows but adapter_config.json field `trainable_token_indices` "
            "names none for it (re-save the adapter with PEFT)"
        ]
    if len(weight) != 2 or len(delta) != 2 or delta != (len(rows), weight[1]):
        return [
            f"{module}: trainable tokens {list(delta)} do not fit {len(rows)} rows of base {list(weight)}; "
            "pass the base the adapter was trained on with --base"
        ]
    if max(rows) >= weight[0]:
        return [
            f"{module}: trainable token id {max(rows)} is past the base's {weight[0]} embedding rows (the "
            "adapter was trained on a resized vocabulary); pass that resized base with --base"
        ]
    return []


def _module_fit(module: str, parts: dict[str, AdapterTensor], base_shapes: dict, fan_in_fan_out: bool) -> list[str]:
    weight = tuple(base_shapes[f"{module}.weight"])
    if TensorKind.EMB_A in parts or TensorKind.EMB_B in parts:
        if TensorKind.EMB_A not in parts or TensorKind.EMB_B not in parts:
            return [f"{module}: has only one of lora_embedding_A/B"]
        a, b = parts[TensorKind.EMB_A].shape, parts[TensorKind.EMB_B].shape
        if len(weight) != 2 or a[0] != b[1] or b[0] != weight[1]:
            return [f"{module}: embedding LoRA A {list(a)} / B {list(b)} does not fit base {list(weight)}"]
        return []
    if TensorKind.LORA_A not in parts or TensorKind.LORA_B not in parts:
        return [f"{module}: has only one of lora_A/lora_B"]
    a, b = parts[TensorKind.LORA_A].shape, parts[TensorKind.LORA_B].shape
    if len(weight) != 2 or len(a) != 2 or len(b) != 2:
        return [f"{module}: only 2-D (linear) weights are handled; base {list(weight)}, lora_A {list(a)}"]
    out_f, in_f = (weight[1], weight[0]) if fan_in_fan_out else weight
    problems = []
    if a[0] != b[1]:
        problems.append(f"{module}: lora_A rank {a[0]} != lora_B rank {b[1]}")
    if a[1] != in_f or b[0] != out_f:
        problems.append(
            f"{module}: lora_A {list(a)} / lora_B {list(b)} do not fit base weight {list(weight)} "
            f"(expects in={in_f}, out={out_f})"
        )
    if TensorKind.MAGNITUDE in parts and parts[TensorKind.MAGNITUDE].shape[-1] != out_f:
        problems.append(f"{module}: DoRA magnitude {list(parts[TensorKind.MAGNITUDE].shape)} does not fit out={out_f}")
    if TensorKind.LORA_B_BIAS in parts:
        bias, lora_bias = base_shapes.get(f"{module}.bias"), parts[TensorKind.LORA_B_BIAS].shape
        if bias is None:
            problems.append(f"{module}: adapter has a lora_B bias but the base layer has no bias")
        elif tuple(bias) != lora_bias:
            problems.append(f"{module}: lora_B bias {list(lora_bias)} does not fit base bias {list(bias)}")
    return problems


def _cap(problems: list[str]) -> list[str]:
    if len(problems) <= MAX_LISTED + 1:
        return problems
    return problems[:MAX_LISTED] + [f"... and {len(problems) - MAX_LISTED} more shape problems"]


def _base_vocab(base_config: dict, base_shapes: dict) -> int | None:
    for name, shape in base_shapes.items():
        if name.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight")) and len(shape) == 2:
            return int(shape[0])
    return text_config(base_config).get("vocab_size") or base_config.get("vocab_size")


def _read_base_config(base_dir: Path) -> dict:
    path = base_dir / "config.json"
    if not base_dir.is_dir():
        raise ModelError(
            f"{base_dir}: base model folder not found; pass --base the folder with config.json and *.safetensors"
        )
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
