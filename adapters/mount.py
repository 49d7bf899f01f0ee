"""Serve adapters with vLLM: mount them (LoRA arguments) or merge them, and say why.

`vllm_lora_args` turns adapters into the flags vLLM needs; `decide_mode` picks mount or merge
for `lcserve serve --mode auto|mount|merge` from the inspect reports (pure).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lcserve.errors import AdapterError

from .inspection import MERGE, MOUNT, UNUSABLE, AdapterReport, inspect_adapter
from .vllm_rules import ALLOWED_MAX_LORA_RANKS, round_max_lora_rank

MODES = ("auto", "mount", "merge")


@dataclass(frozen=True)
class ModeDecision:
    mode: str                      # "mount" | "merge"
    reasons: list[str] = field(default_factory=list)


def decide_mode(reports: list[AdapterReport], mode: str = "auto", all_traffic: bool = False) -> ModeDecision:
    """Mount or merge a set of adapters; AdapterError when the requested mode cannot serve them.

    auto: merge when inspect says merge, or when a single adapter serves all traffic
    (`all_traffic`: nobody needs the plain base; a merged model has no LoRA overhead, and
    users report mounted LoRA 2x-10x slower); mount otherwise, which keeps the base served too.
    """
    if mode not in MODES:
        raise AdapterError(f"--mode {mode!r}: choose one of {', '.join(MODES)}")
    if not reports:
        raise AdapterError("no adapters given; pass --adapter NAME=DIR")
    for r in reports:
        if r.verdict == UNUSABLE:
            raise AdapterError(f"{r.adapter_dir}: cannot be served: {'; '.join(r.reasons)}")
    needs_merge = [r for r in reports if r.verdict == MERGE]
    if mode == "mount":
        if needs_merge:
            r = needs_merge[0]
            raise AdapterError(f"{r.adapter_dir}: vLLM cannot mount it ({'; '.join(r.reasons)}); use --mode merge")
        return ModeDecision(MOUNT, ["--mode mount"])
    if mode == "merge" or needs_merge or (all_traffic and len(reports) == 1):
        if len(reports) > 1 and needs_merge:
            r = needs_merge[0]
            raise AdapterError(f"{r.adapter_dir}: vLLM cannot mount it ({'; '.join(r.reasons)}) and a merged model "
                               "serves one adapter; serve it on its own with --mode merge")
        if len(reports) > 1:
            raise AdapterError(f"--mode merge serves one adapter per model, but {len(reports)} adapters were given; "
                               "use --mode mount, or serve each merged model separately")
        r = reports[0]
        if mode == "merge":
            return ModeDecision(MERGE, ["--mode merge"])
        if r.verdict == MERGE:
            return ModeDecision(MERGE, r.reasons)
        return ModeDecision(MERGE, ["one adapter serves all traffic: a merged model runs without LoRA overhead "
                                    "(mounted LoRA is reported 2x-10x slower)"])
    if len(reports) == 1:
        return ModeDecision(MOUNT, ["vLLM accepts the adapter as it is; mounting keeps the base served beside it "
                                    "(declare that the adapter serves all traffic to merge instead)"])
    return ModeDecision(MOUNT, [f"{len(reports)} adapters share one base: vLLM mounts them side by side"])


def parse_adapter_spec(spec: str) -> tuple[str, Path]:
    """`NAME=DIR` (the form of `lcserve serve --adapter`)."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise AdapterError(f"--adapter {spec!r}: expected NAME=DIR, e.g. writer=~/.cache/lcserve/adapters/gemma-3-270m-writer")
    if any(c in name for c in " ,{}\"'"):
        raise AdapterError(f"--adapter {spec!r}: the name may not contain spaces, commas, braces or quotes")
    return name, Path(path).expanduser()


def vllm_lora_args(adapters: list[tuple[str, Path]], base_model_name: str,
                   reports: list[AdapterReport] | None = None, max_loras: int | None = None) -> list[str]:
    """The vLLM flags that mount `adapters` (name, dir) on the base served as `base_model_name`.

    `--max-lora-rank` is the adapters' largest rank rounded up to a value vLLM allows (vLLM
    pre-allocates LoRA memory for that rank in every wrapped layer, so no larger than needed);
    `--max-loras` defaults to the number of adapters, so all of them can run in one batch.
    """
    if not adapters:
        raise AdapterError("no adapters to mount")
    names = [name for name, _ in adapters]
    if len(set(names)) != len(names) or base_model_name in names:
        raise AdapterError(f"adapter names must be unique and differ from the base name {base_model_name!r}: {names}")
    reports = reports or [inspect_adapter(path) for _, path in adapters]
    for r in reports:
        if r.verdict != MOUNT:
            raise AdapterError(f"{r.adapter_dir}: vLLM cannot mount it as it is ({'; '.join(r.reasons)}); merge it")
    max_rank = max(r.max_rank for r in reports)
    max_lora_rank = round_max_lora_rank(max_rank)
    if max_lora_rank is None:
        raise AdapterError(f"rank {max_rank} is above vLLM's largest --max-lora-rank {ALLOWED_MAX_LORA_RANKS[-1]}; merge it")
    modules = [json.dumps({"name": name, "path": str(Path(path).resolve()), "base_model_name": base_model_name})
               for name, path in adapters]
    return ["--enable-lora", "--lora-modules", *modules, "--max-lora-rank", str(max_lora_rank),
            "--max-loras", str(max_loras or len(adapters))]
