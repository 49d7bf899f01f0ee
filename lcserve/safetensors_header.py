"""Read safetensors headers without loading tensors (shapes, dtypes, sizes).

A safetensors file is an 8-byte little-endian header length, a JSON header, then raw data.
Reading only the header lets every command inspect multi-GB models in milliseconds.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError
from .model_facts import DTYPE_BYTES

MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path | None = None  # None: a tensor computed from config.json, not read from a file

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES.get(self.dtype, 0)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor infos and `__metadata__` of one safetensors file; ModelError when it is corrupt."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise ModelError(f"{path}: not a safetensors file (shorter than 8 bytes); re-create or re-download it")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise ModelError(
                    f"{path}: corrupt safetensors header (length {header_len} > file size {size}); re-create or re-download it"
                )
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise ModelError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: corrupt safetensors header ({e}); re-create or re-download it") from None
    metadata = header.pop("__metadata__", {}) or {}
    data_len = size - 8 - header_len
    tensors: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        start, end = meta["data_offsets"]
        if end > data_len:
            raise ModelError(
                f"{path}: truncated safetensors file (tensor {name} ends at byte {end}, data has {data_len}); "
                "re-create or re-download it"
            )
        tensors[name] = TensorInfo(name, meta["dtype"], tuple(meta["shape"]), path)
    return tensors, metadata


def safetensors_files(model_dir: Path) -> list[Path]:
    """The model's safetensors shards, in index order when there is an index."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelError(f"{index}: unreadable index ({e}); re-create the model folder") from None
        return [model_dir / name for name in dict.fromkeys(weight_map.values())]
    return sorted(model_dir.glob("*.safetensors"))


def index_total_size(model_dir: Path) -> int | None:
    """`metadata.total_size` of model.safetensors.index.json (the bytes of all shards' tensors):
    the weight size of a model whose shards are not downloaded. None without an index or the field."""
    index = Path(model_dir) / "model.safetensors.index.json"
    if not index.exists():
        return None
    try:
        total = (json.loads(index.read_text()).get("metadata") or {}).get("total_size")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ModelError(f"{index}: unreadable index ({e}); re-create or re-download it") from None
    if total is None:
        return None
    if not isinstance(total, (int, float)) or total <= 0:
        raise ModelError(f"{index}: metadata.total_size is {total!r}, not a byte count; re-download the index")
    return int(total)


def read_model_tensors(model_dir: Path) -> dict[str, TensorInfo]:
    """All tensors of a model folder, from headers only."""
    files = safetensors_files(model_dir)
    if not files:
        raise ModelError(
            f"{model_dir}: no *.safetensors weights; lcserve reads safetensors only (convert the model first)"
        )
    out: dict[str, TensorInfo] = {}
    for f in files:
        out.update(read_header(f)[0])
    return out
