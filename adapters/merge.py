"""Merge a LoRA adapter into its base, streaming one tensor at a time over safetensors.

PEFT's `merge_and_unload` + `save_pretrained` holds the whole model in memory. Here each
output shard gets its header first (the shapes are known), then its tensors one by one:
untouched tensors are copied in chunks straight from the base file, touched tensors are
read, merged in fp32 and written. Peak memory is the adapter plus the largest touched
tensor, whatever the model size.

Supported: LoRA, rsLoRA, rank/alpha patterns, DoRA, embedding LoRA, `modules_to_save` and
trained biases (whole tensors replaced), `lora_bias`, `fan_in_fan_out`, TrainableTokens
(`trainable_token_indices`: embedding rows replaced). The output keeps the
base's config (long-context fields checked), tokenizer and generation config, and adds
`lcserve_merge.json` (hashes of base and adapter, the adapter's training length). It is
written to a temporary sibling folder and renamed at the end; the base is never written.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from lcserve import __version__
from lcserve.embedded import MARKER as EMBEDDED_MARKER
from lcserve.errors import AdapterError, ModelError
from lcserve.model_facts import (
    DTYPE_BYTES,
    FLOAT_DTYPES,
    TORCH_NAMES,
    MergeProvenance,
    dtype_code,
    tied_embeddings,
    untied_config,
    write_merge_provenance,
)
from lcserve.model_facts import MERGE_PROVENANCE as PROVENANCE
from lcserve.paths import check_free_space, check_output, output_dir
from lcserve.safetensors_header import read_header, safetensors_files

from . import reader
from .inspection import Verdict, inspect_adapter
from .reader import LoraAdapter, TensorKind
from .scale import scaled_adapter

OUT_DTYPES = {name: dtype_code(name) for name in ("bf16", "fp16", "fp32")}  # --dtype -> safetensors code
INDEX_FILE = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
COPY_CHUNK_BYTES = 16 << 20
# The adapter's features (as `adapters inspect` reports them) that lcserve_merge.json records.
PROVENANCE_FEATURES = (
    "use_rslora",
    "use_dora",
    "rank_pattern",
    "alpha_pattern",
    "modules_to_save",
    "bias",
    "lora_bias",
    "fan_in_fan_out",
    "trainable_token_indices",
)
# config.json fields that decide long-context behaviour: a merge must not change any of them.
LONG_CONTEXT_KEYS = (
    "max_position_embeddings",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "sliding_window",
    "layer_types",
    "sliding_window_pattern",
    "_sliding_window_pattern",
    "max_window_layers",
    "use_sliding_window",
    "original_max_position_embeddings",
    "attention_chunk_size",
)


@dataclass(frozen=True)
class MergeResult:
    out_dir: Path
    merged_modules: int
    replaced_tensors: int
    dtype: str
    seconds: float
    provenance: dict


def merge_adapter(
    adapter: LoraAdapter,
    base_dir: Path,
    out_dir: Path,
    dtype: str | None = None,
    force: bool = False,
    progress=None,
    allow_pickle: bool = False,
    scale: float = 1.0,
) -> MergeResult:
    """Merge `adapter` into `base_dir`, writing a complete model folder at `out_dir`; `scale` multiplies
    the adapter's LoRA scale (adapters/scale.py) and is recorded, so `verify` compares like with like."""
    started = time.monotonic()
    adapter_dir, base_dir, out_dir = adapter.path, Path(base_dir), Path(out_dir)
    if dtype is not None and dtype not in OUT_DTYPES:
        raise AdapterError(f"--dtype {dtype!r}: choose one of {', '.join(OUT_DTYPES)}")
    _check_destination(out_dir, base_dir, adapter_dir, force)
    report = inspect_adapter(adapter, base_dir, allow_pickle=allow_pickle)
    if report.verdict == Verdict.UNUSABLE:
        raise AdapterError(f"{adapter_dir}: cannot merge into {base_dir}: {'; '.join(report.reasons)}")
    adapter = scaled_adapter(adapter, scale)
    tensors = reader.load_tensors(adapter_dir, allow_pickle)  # finite: inspect refused NaN/inf above
    base_config = json.loads((base_dir / "config.json").read_text())
    plan = build_plan(adapter, tensors)
    untie = _needs_untie(plan, base_config, adapter)

    shards = safetensors_files(base_dir)
    layouts = [_shard_layout(path, plan, OUT_DTYPES.get(dtype), untie) for path in shards]
    missing = set(plan) - {name for layout in layouts for name, *_ in layout.entries}
    if missing:
        raise AdapterError(f"{adapter_dir}: targets {sorted(missing)[0]} which the base weights do not contain")
    base_hashes: dict[str, str] = {}
    with output_dir(out_dir, force) as tmp:
        check_free_space(out_dir, tmp, _output_bytes(base_dir, layouts), "the merged model")
        total = sum(layout.source_bytes for layout in layouts)
        task = progress.add_task("merging", total=total) if progress else None
        for layout in layouts:
            base_hashes[layout.path.name] = _write_shard(layout, plan, tmp / layout.path.name, progress, task)
        weight_map = {name: layout.path.name for layout in layouts for name, *_ in layout.entries}
        if (base_dir / INDEX_FILE).exists() or len(layouts) > 1:
            total_size = sum(layout.out_data_bytes for layout in layouts)
            (tmp / INDEX_FILE).write_text(
                json.dumps(
                    {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2
                )
                + "\n"
            )
        out_config = _copy_model_files(base_dir, tmp, base_config, dtype, untie)
        _check_long_context(base_config, out_config)
        adapter_hash = reader.adapter_sha256(adapter_dir, allow_pickle)
        provenance = _provenance(
            adapter, adapter_hash, base_dir, base_hashes, plan, report.to_json(), dtype, scale, untie
        )
        write_merge_provenance(tmp, provenance)
    if progress:
        progress.update(task, completed=total, description="merged")
    return MergeResult(
        out_dir,
        provenance.merged_modules,
        provenance.replaced_tensors,
        dtype or "as base",
        round(time.monotonic() - started, 2),
        provenance.to_json(),
    )


def _provenance(
    adapter: LoraAdapter,
    adapter_hash: str,
    base_dir: Path,
    base_hashes: dict[str, str],
    plan: dict,
    inspected: dict,
    dtype: str | None,
    scale: float,
    untie: bool,
) -> MergeProvenance:
    """What lcserve_merge.json records: the bytes merged (hashes), how, and the adapter's training length."""
    return MergeProvenance(
        lcserve_version=__version__,
        base_dir=str(base_dir.resolve()),
        base_safetensors_sha256=base_hashes,
        adapter_dir=str(adapter.path.resolve()),
        adapter_sha256=adapter_hash,
        adapter_training_seq_len=adapter.training_seq_len,
        adapter_training_seq_len_source=adapter.training_seq_len_source,
        adapter_base_model_name=adapter.base_model_name_or_path,
        dtype=dtype or "as base",
        lora_scale=scale,
        merged_modules=sum(1 for ops in plan.values() if ops.kind in (OpKind.LORA, OpKind.EMBEDDING)),
        replaced_tensors=sum(1 for ops in plan.values() if ops.replace is not None),
        replaced_token_rows={name: len(ops.rows[0]) for name, ops in plan.items() if ops.kind == OpKind.ROWS},
        untied_lm_head=untie,
        features={k: inspected[k] for k in PROVENANCE_FEATURES},
    )


# ---------------------------------------------------------------- planning (what happens to each base tensor)


class OpKind(StrEnum):
    """What the merge computes for one base tensor."""

    REPLACE = "replace"  # only a whole tensor from the adapter
    LORA = "lora"  # W + scaling * B @ A (DoRA: renormalised by the magnitude)
    EMBEDDING = "embedding"  # W + scaling * (B @ A).T
    BIAS = "bias"  # b + scaling * lora_B bias
    ROWS = "rows"  # W with some rows replaced whole (TrainableTokens), PEFT's index_copy


@dataclass
class TensorOps:
    """What the merge does to one base tensor."""

    kind: OpKind = OpKind.REPLACE
    lora_a: object = None
    lora_b: object = None
    scaling: float = 1.0
    magnitude: object = None  # DoRA
    fan_in_fan_out: bool = False
    add: object = None  # lora_B bias * scaling
    replace: object = None  # a whole tensor from the adapter, used instead of the base's
    rows: tuple | None = None  # (row indices, their new values): TrainableTokens


def build_plan(adapter: LoraAdapter, tensors: dict) -> dict[str, TensorOps]:
    """base tensor name -> TensorOps, from the adapter's config and its (loaded) tensors."""
    plan: dict[str, TensorOps] = {}
    for key, tensor in tensors.items():
        module, kind = reader.parse_key(key)
        if kind == TensorKind.FULL:
            plan.setdefault(module, TensorOps()).replace = tensor
            continue
        if kind == TensorKind.TOKENS:  # inspect checked the rows fit and that nothing else touches this module
            ops = plan.setdefault(f"{module}.weight", TensorOps())
            ops.kind, ops.rows = OpKind.ROWS, (adapter.token_indices(module), tensor)
            continue
        _, scaling = adapter.rank_and_scaling(module)
        if kind == TensorKind.LORA_B_BIAS:
            ops = plan.setdefault(f"{module}.bias", TensorOps())
            ops.kind, ops.add = OpKind.BIAS, tensor.float() * scaling
            continue
        ops = plan.setdefault(f"{module}.weight", TensorOps())
        embedding = kind in (TensorKind.EMB_A, TensorKind.EMB_B) or ops.kind == OpKind.EMBEDDING
        ops.kind = OpKind.EMBEDDING if embedding else OpKind.LORA
        ops.scaling, ops.fan_in_fan_out = scaling, adapter.fan_in_fan_out
        if kind in (TensorKind.LORA_A, TensorKind.EMB_A):
            ops.lora_a = tensor
        elif kind in (TensorKind.LORA_B, TensorKind.EMB_B):
            ops.lora_b = tensor
        elif kind == TensorKind.MAGNITUDE:
            ops.magnitude = tensor
    for name, ops in plan.items():
        if ops.kind in (OpKind.LORA, OpKind.EMBEDDING) and (ops.lora_a is None or ops.lora_b is None):
            raise AdapterError(f"adapter module {name}: lora_A or lora_B is missing; re-save the adapter with PEFT")
        if ops.kind == OpKind.EMBEDDING and ops.magnitude is not None:
            raise AdapterError(f"adapter module {name}: DoRA on an embedding layer is not supported by lcserve merge")
    return plan


def merged_tensor(base, ops: TensorOps):
    """The merged value of one base tensor (fp32), exactly as PEFT's merge computes it. `base` is
    read for this call (token rows are written into it when it is already fp32)."""
    import torch

    weight = (base if ops.replace is None else ops.replace).float()
    if ops.kind == OpKind.REPLACE:
        return weight
    if ops.kind == OpKind.BIAS:
        return weight + ops.add
    if ops.kind == OpKind.ROWS:
        indices, values = ops.rows
        return weight.index_copy_(0, torch.tensor(indices), values.float())  # in place: the caller's copy
    a, b = ops.lora_a.float(), ops.lora_b.float()
    if ops.kind == OpKind.EMBEDDING:
        return weight + (b @ a).T * ops.scaling
    delta = (b @ a) * ops.scaling  # (out, in)
    if ops.magnitude is None:
        return weight + (delta.T if ops.fan_in_fan_out else delta)
    oriented = weight.T if ops.fan_in_fan_out else weight  # DoRA: per-output-row norm of W + delta
    norm = torch.linalg.norm(oriented + delta, dim=1)
    merged = (ops.magnitude.float() / norm).view(-1, 1) * (oriented + delta)
    return merged.T if ops.fan_in_fan_out else merged


def _needs_untie(plan: dict[str, TensorOps], base_config: dict, adapter: LoraAdapter) -> bool:
    """A tied base needs its own lm_head when the two sides stop being equal: PEFT applies an
    embedding LoRA or replacement to the input side only (unless ensure_weight_tying), and token
    rows given for lm_head alone to the output side only. Token rows of the input embedding keep
    the tie: PEFT's tied token adapter gives lm_head the same rows (and its merge writes them to
    the one shared matrix)."""
    if not tied_embeddings(base_config):
        return False
    if "lm_head.weight" in plan:
        return True
    input_side = any(name.endswith("embed_tokens.weight") and ops.kind != OpKind.ROWS for name, ops in plan.items())
    return input_side and not adapter.ensure_weight_tying


# ---------------------------------------------------------------- streaming safetensors I/O


@dataclass
class _ShardLayout:
    path: Path
    data_start: int  # where the base shard's data section starts
    entries: list  # (out name, source name, src dtype, out dtype, shape, src offsets)
    source_bytes: int
    out_data_bytes: int


def _shard_layout(path: Path, plan: dict, out_dtype: str | None, untie: bool) -> _ShardLayout:
    read_header(path)  # validates: corrupt or truncated shards fail here with one line
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    entries = []
    for name, meta in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        src = meta["dtype"]
        if src not in TORCH_NAMES:  # the dtypes this merge can read and write
            raise ModelError(f"{path}: tensor {name} has dtype {src}, which lcserve cannot merge")
        dst = out_dtype if (out_dtype and src in FLOAT_DTYPES) else src
        entries.append((name, name, src, dst, tuple(meta["shape"]), tuple(meta["data_offsets"])))
        if untie and name.endswith("embed_tokens.weight") and (name in plan or "lm_head.weight" in plan):
            entries.append(("lm_head.weight", name, src, dst, tuple(meta["shape"]), tuple(meta["data_offsets"])))
    source_bytes = sum(e[5][1] - e[5][0] for e in entries)
    out_bytes = sum(math.prod(e[4]) * DTYPE_BYTES[e[3]] for e in entries)
    return _ShardLayout(path, 8 + header_len, entries, source_bytes, out_bytes)


def _write_shard(layout: _ShardLayout, plan: dict, out_path: Path, progress, task) -> str:
    """Write one output shard; returns the sha256 of the base shard (hashed while it is read)."""
    header, offset = {}, 0
    for out_name, _, _, dst, shape, _ in layout.entries:
        size = math.prod(shape) * DTYPE_BYTES[dst]
        header[out_name] = {"dtype": dst, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    digest = hashlib.sha256()
    hashed_to = 0
    with layout.path.open("rb") as src, out_path.open("wb") as out:
        digest.update(src.read(layout.data_start))
        hashed_to = layout.data_start
        out.write(struct.pack("<Q", len(raw)) + raw)
        for out_name, _, src_dtype, dst, shape, (start, end) in layout.entries:
            begin = layout.data_start + start
            hashing = begin == hashed_to
            if out_name in plan:  # an untied lm_head reads the embedding's bytes and gets its own ops
                src.seek(begin)
                data = src.read(end - start)
                if hashing:
                    digest.update(data)
                value = merged_tensor(_from_bytes(data, src_dtype, shape), plan[out_name])
                if not bool(value.isfinite().all()):
                    raise AdapterError(
                        f"merging into {out_name} gives NaN/inf values; the adapter is broken "
                        "or the output dtype overflows (try --dtype bf16 or fp32)"
                    )
                out.write(_to_bytes(value, dst))
            else:
                _copy(src, out, begin, end - start, src_dtype, dst, digest if hashing else None)
            if hashing:
                hashed_to = begin + end - start
            if progress:
                progress.advance(task, end - start)
    if hashed_to != layout.path.stat().st_size:  # gaps or unordered data: hash the file the plain way
        digest = hashlib.sha256()
        with layout.path.open("rb") as f:
            for block in iter(lambda: f.read(COPY_CHUNK_BYTES), b""):
                digest.update(block)
    return digest.hexdigest()


def _copy(src, out, begin: int, size: int, src_dtype: str, dst_dtype: str, digest) -> None:
    """Copy one tensor's bytes in chunks, converting the dtype chunk by chunk when asked."""
    src.seek(begin)
    item = DTYPE_BYTES[src_dtype]
    chunk = COPY_CHUNK_BYTES - COPY_CHUNK_BYTES % item
    remaining = size
    while remaining:
        data = src.read(min(chunk, remaining))
        if not data:
            raise ModelError(f"{src.name}: ended early (truncated); re-create or re-download it")
        remaining -= len(data)
        if digest is not None:
            digest.update(data)
        if src_dtype == dst_dtype:
            out.write(data)
        else:
            out.write(_to_bytes(_from_bytes(data, src_dtype, (len(data) // item,)), dst_dtype))


def _from_bytes(data: bytes, dtype: str, shape: tuple[int, ...]):
    import torch

    if not data:
        return torch.empty(shape, dtype=getattr(torch, TORCH_NAMES[dtype]))
    return torch.frombuffer(bytearray(data), dtype=getattr(torch, TORCH_NAMES[dtype])).reshape(shape)


def _to_bytes(tensor, dtype: str) -> bytes:
    import torch

    t = tensor.to(getattr(torch, TORCH_NAMES[dtype])).contiguous()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


# ---------------------------------------------------------------- the folder around the weights


def _check_destination(out_dir: Path, base_dir: Path, adapter_dir: Path, force: bool) -> None:
    out, base, adapter = out_dir.resolve(), base_dir.resolve(), adapter_dir.resolve()
    if out == base or base in out.parents or out in base.parents:
        raise AdapterError(
            f"--out {out_dir}: is the base model folder (or contains it, or lies inside it); "
            "lcserve never writes a base model; choose a new folder"
        )
    if out == adapter or adapter in out.parents or out in adapter.parents:
        raise AdapterError(f"--out {out_dir}: overlaps the adapter folder {adapter_dir}; choose a new folder")
    check_output(out_dir, force)  # a file, the working directory, a folder lcserve did not write


def _output_bytes(base_dir: Path, layouts: list) -> int:
    """What the merged folder will take: the new shards (headers included) and the copied files."""
    shards = sum(layout.data_start + layout.out_data_bytes for layout in layouts)
    copied = sum(p.stat().st_size for p in base_dir.iterdir() if p.is_file() and p.suffix not in WEIGHT_SUFFIXES)
    return shards + copied


def _copy_model_files(base_dir: Path, out_dir: Path, base_config: dict, dtype: str | None, untie: bool) -> dict:
    """Tokenizer, generation config, chat template...: everything but the weights and lcserve's
    embedded marker; config.json gets the new dtype (and an untied lm_head when needed)."""
    for path in sorted(base_dir.iterdir()):
        if path.is_dir() and (path / "config.json").is_file() and (base_dir / "modules.json").is_file():
            shutil.copytree(path, out_dir / path.name)  # a sentence-transformers module (1_Pooling, ...)
            continue
        if (
            not path.is_file()
            or path.name in ("config.json", INDEX_FILE, EMBEDDED_MARKER, PROVENANCE)
            or path.suffix in WEIGHT_SUFFIXES
        ):
            continue
        shutil.copy2(path, out_dir / path.name)
    config = json.loads(json.dumps(base_config))
    if dtype:
        torch_name = TORCH_NAMES[OUT_DTYPES[dtype]]
        for key in ("dtype", "torch_dtype"):
            if key in config or key == "dtype":
                config[key] = torch_name
    if untie:
        config = untied_config(config)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config


def long_context_fields(config: dict) -> dict:
    """The config fields (top level and text_config) that set how far and how the model attends."""
    fields = {k: config[k] for k in LONG_CONTEXT_KEYS if k in config}
    text = config.get("text_config")
    if isinstance(text, dict):
        fields.update({f"text_config.{k}": text[k] for k in LONG_CONTEXT_KEYS if k in text})
    return fields


def _check_long_context(base_config: dict, out_config: dict) -> None:
    before, after = long_context_fields(base_config), long_context_fields(out_config)
    if before != after:
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        raise AdapterError(f"the merged config.json changed long-context fields {changed}; this is a bug in lcserve")
