"""The merged-model cache of `lcserve serve`: one merge per adapter bytes and base, reused while its
provenance still names both (merging a large base takes minutes)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lcserve.model_facts import MergeProvenance, read_merge_provenance
from lcserve.paths import lcserve_home, mark_output

from .merge import merge_adapter
from .reader import LoraAdapter, adapter_sha256

if TYPE_CHECKING:
    from rich.console import Console


def merged_dir(name: str, adapter: LoraAdapter, base_dir: Path) -> Path:
    """Where the merge of this adapter into this base is cached, named by both identities."""
    return lcserve_home() / "merged" / f"{name}-{adapter_sha256(adapter.path)[:12]}-{base_dir.name}"


def is_cached_merge(adapter: LoraAdapter, base_dir: Path, out_dir: Path) -> bool:
    """Whether `out_dir`'s provenance names these adapter bytes and this base (another merge is stale)."""
    provenance = read_merge_provenance(out_dir) or MergeProvenance()
    return provenance.adapter_sha256 == adapter_sha256(adapter.path) and provenance.base_dir == str(base_dir.resolve())


def ensure_merged(adapter: LoraAdapter, base_dir: Path, out_dir: Path, console: Console) -> None:
    """Merge unless `out_dir` already holds this adapter's merge into this base (merging again is wasted work)."""
    if is_cached_merge(adapter, base_dir, out_dir):
        return
    console.print(f"merging {adapter.path} into {base_dir} -> {out_dir}")
    if out_dir.is_dir():  # the cache is lcserve's own (`merged_dir`), marked or not (older lcserve)
        mark_output(out_dir)
    merge_adapter(adapter, base_dir, out_dir, force=True)
