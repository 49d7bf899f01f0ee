"""Serve adapters with vLLM: mount them or merge them, and say why.

`decide_mode` picks mount or merge for `lcserve serve --mode auto|mount|merge` from the inspect
reports (pure). `lora_modules_args` is the one producer of vLLM's `--lora-modules`; the LoRA
capacity flags (`--enable-lora`, `--max-loras`, `--max-lora-rank`, `--max-cpu-loras`) come from
`lcserve.vllm_rules.lora_options`, through the plan when lcserve serves. `mount_args` composes
the two for `lcserve adapters mount-args`, for users who start vLLM themselves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from lcserve.errors import AdapterError
from lcserve.vllm_rules import lora_options, option_args, options_to_args

from .inspection import AdapterReport, Verdict, inspect_adapter
from .reader import read_adapter


class Mode(StrEnum):
    """`lcserve serve --mode`: let lcserve decide, or serve every adapter one way."""

    AUTO = "auto"
    MOUNT = Verdict.MOUNT.value
    MERGE = Verdict.MERGE.value


MODES = tuple(mode.value for mode in Mode)  # the --mode choices (click matches Enum members by name, not value)


@dataclass(frozen=True)
class ModeDecision:
    mode: Mode  # MOUNT or MERGE
    reasons: list[str] = field(default_factory=list)


def decide_mode(reports: list[AdapterReport], mode: Mode | str = Mode.AUTO, all_traffic: bool = False) -> ModeDecision:
    """Mount or merge a set of adapters; AdapterError when the requested mode cannot serve them.

    auto: merge when inspect says merge, or when a single adapter serves all traffic
    (`all_traffic`: nobody needs the plain base; a merged model has no LoRA overhead, and
    users report mounted LoRA 2x-10x slower); mount otherwise, which keeps the base served too.
    """
    try:
        mode = Mode(mode)
    except ValueError:
        raise AdapterError(f"--mode {mode!r}: choose one of {', '.join(MODES)}") from None
    if not reports:
        raise AdapterError("no adapters given; pass --adapter NAME=DIR")
    for r in reports:
        if r.verdict == Verdict.UNUSABLE:
            raise AdapterError(f"{r.adapter.path}: cannot be served: {'; '.join(r.reasons)}")
    needs_merge = [r for r in reports if r.verdict == Verdict.MERGE]
    if mode == Mode.MOUNT:
        if needs_merge:
            r = needs_merge[0]
            raise AdapterError(f"{r.adapter.path}: vLLM cannot mount it ({'; '.join(r.reasons)}); use --mode merge")
        return ModeDecision(Mode.MOUNT, ["--mode mount"])
    if mode == Mode.MERGE or needs_merge or (all_traffic and len(reports) == 1):
        if len(reports) > 1 and needs_merge:
            r = needs_merge[0]
            raise AdapterError(
                f"{r.adapter.path}: vLLM cannot mount it ({'; '.join(r.reasons)}) and a merged model "
                "serves one adapter; serve it on its own with --mode merge"
            )
        if len(reports) > 1:
            raise AdapterError(
                f"--mode merge serves one adapter per model, but {len(reports)} adapters were given; "
                "use --mode mount, or serve each merged model separately"
            )
        r = reports[0]
        if mode == Mode.MERGE:
            return ModeDecision(Mode.MERGE, ["--mode merge"])
        if r.verdict == Verdict.MERGE:
            return ModeDecision(Mode.MERGE, r.reasons)
        return ModeDecision(
            Mode.MERGE,
            [
                "one adapter serves all traffic: a merged model runs without LoRA overhead "
                "(mounted LoRA is reported 2x-10x slower)"
            ],
        )
    if len(reports) == 1:
        return ModeDecision(
            Mode.MOUNT,
            [
                "vLLM accepts the adapter as it is; mounting keeps the base served beside it "
                "(declare that the adapter serves all traffic to merge instead)"
            ],
        )
    return ModeDecision(Mode.MOUNT, [f"{len(reports)} adapters share one base: vLLM mounts them side by side"])


def parse_adapter_spec(spec: str) -> tuple[str, Path]:
    """`NAME=DIR` (the form of `lcserve serve --adapter`)."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise AdapterError(
            f"--adapter {spec!r}: expected NAME=DIR, e.g. writer=~/.cache/lcserve/adapters/gemma-3-270m-writer"
        )
    if any(c in name for c in " ,{}\"'"):
        raise AdapterError(f"--adapter {spec!r}: the name may not contain spaces, commas, braces or quotes")
    return name, Path(path).expanduser()


def lora_modules_args(mounted: list[tuple[str, AdapterReport]], base_model_name: str) -> list[str]:
    """`--lora-modules` for each (served name, inspect report) on the base served as `base_model_name`.

    The one producer of that flag, in vLLM's JSON form (so a path may hold any character).
    AdapterError when a name repeats or shadows the base, or vLLM cannot mount an adapter as it is.
    """
    if not mounted:
        raise AdapterError("no adapters to mount")
    names = [name for name, _ in mounted]
    if len(set(names)) != len(names) or base_model_name in names:
        raise AdapterError(f"adapter names must be unique and differ from the base name {base_model_name!r}: {names}")
    for _, r in mounted:
        if r.verdict != Verdict.MOUNT:
            raise AdapterError(f"{r.adapter.path}: vLLM cannot mount it as it is ({'; '.join(r.reasons)}); merge it")
    return option_args(
        "lora-modules", [lora_module(n, str(r.adapter.path.resolve()), base_model_name) for n, r in mounted]
    )


def lora_module(name: str, path: str, base_model_name: str) -> str:
    """One `--lora-modules` value in vLLM's JSON form (so a path may hold any character)."""
    return json.dumps({"name": name, "path": path, "base_model_name": base_model_name})


def mount_args(adapters: list[tuple[str, Path]], base_model_name: str) -> list[str]:
    """Every vLLM argument that mounts `adapters` (name, folder): LoRA capacity for exactly these
    adapters, then their `--lora-modules`.

    `--max-lora-rank` is the adapters' largest rank rounded up to a value vLLM allows (vLLM
    pre-allocates LoRA memory for that rank in every wrapped layer, so no larger than needed);
    `--max-loras` is the number of adapters, so all of them can run in one batch.
    """
    reports = [inspect_adapter(read_adapter(path)) for _, path in adapters]
    modules = lora_modules_args([(name, r) for (name, _), r in zip(adapters, reports)], base_model_name)
    capacity = lora_options(max_loras=len(reports), max_lora_rank=max(r.max_lora_rank for r in reports))
    return options_to_args(capacity) + modules
