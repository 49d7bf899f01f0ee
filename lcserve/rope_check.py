"""Does a model or adapter keep the positions and RoPE of the base it runs on?

vLLM builds its rotary tables from the config.json of the folder it serves. An adapter trained
under another RoPE (a stretched `max_position_embeddings`, a `rope_scaling` the base lacks) is
served under the base's, and a merged model whose config.json was edited serves positions its
weights never saw. `rope_findings` (pure) names each such difference and the fix; the two
readers below it feed it the config.json files, and `adapters inspect` and `deploy plan` show
what it finds. Positions and RoPE are read by `lcserve.model_config`'s own readers, so this
check and the planner never disagree on what a config says.

A config that records `lcserve_rope_tiling` (the "repeated table" variant built by
`benchmarks/bench_rope_tiling.py` and served with the `serving/rope_tiling.py` plugin) is
flagged on its own: positions past the table alias earlier ones (docs/findings.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .model_facts import read_merge_provenance, rope_parameters, text_config

TILING_KEY = "lcserve_rope_tiling"  # {"original_length": L0} in config.json: rows past L0 reuse rows from 0
ADAPTER = "adapter"  # the subject is an adapter: vLLM serves it under the base's config
MODEL = "model"  # the subject is a model folder vLLM serves with its own config


@dataclass(frozen=True)
class RopeFinding:
    """One difference: the config field, the subject's and the base's values, and the sentence for people."""

    field: str
    value: object
    base_value: object
    message: str


def rope_settings(config: dict) -> tuple[int | None, dict[str, dict]]:
    """(max_position_embeddings, RoPE parameters by layer type) as `lcserve.model_config` reads them."""
    text = text_config(config)
    positions = text.get("max_position_embeddings")
    return (positions if isinstance(positions, int) else None), rope_parameters(text)


def tiling_length(config: dict) -> int | None:
    """The L0 a "repeated table" variant records in its config.json, else None."""
    value = (text_config(config).get(TILING_KEY) or {}).get("original_length")
    return value if isinstance(value, int) and value > 0 else None


def tiled_config(config: dict, original_length: int) -> dict:
    """`config` recording that its rotary tables repeat past `original_length` (what the variant writes)."""
    return {**config, TILING_KEY: {"original_length": original_length}}


def rope_findings(
    config: dict, base_config: dict | None, subject: str, base: str = "its base", served_as: str = MODEL
) -> list[RopeFinding]:
    """The position and RoPE differences of `config` from `base_config`, each with its fix (pure).

    `served_as` says whose config vLLM will use: ADAPTER (the base's) or MODEL (the subject's own).
    Only fields both configs state are compared (a partial config is not a mismatch), except a
    scaling `factor`, which is 1 when absent. With no base, only a recorded tiling is checked.
    """
    found = []
    tile = tiling_length(config)
    if tile is not None and (base_config is None or tiling_length(base_config) != tile):
        found.append(
            RopeFinding(
                TILING_KEY,
                tile,
                None if base_config is None else tiling_length(base_config),
                f"{subject}: config.json records {TILING_KEY} (original_length {tile}): its rotary tables repeat "
                f"past position {tile}, so a token at position p is encoded as if at p mod {tile} and distances "
                f"across each seam are wrong (measured in docs/findings.md); serve it with --max-model-len {tile} "
                f"or less, or use the base's config.json without {TILING_KEY} (and --rope-scaling yarn to go "
                "past the base's length)",
            )
        )
    if base_config is None:
        return found
    if served_as == ADAPTER:
        consequence = "vLLM serves the adapter under the base's config.json, not the one it was trained with"
        fix = "serve it on a base with the same settings, or re-train it on this base"
    else:
        consequence = f"vLLM serves {subject} with its own config.json, which its base's weights were not trained for"
        fix = f"restore the base's value in {subject}/config.json (`lcserve adapters merge` keeps it)"
    positions, rope = rope_settings(config)
    base_positions, base_rope = rope_settings(base_config)
    if positions is not None and base_positions is not None and positions != base_positions:
        found.append(
            RopeFinding(
                "max_position_embeddings",
                positions,
                base_positions,
                f"{subject}: max_position_embeddings {positions} differs from {base}'s {base_positions}: "
                f"{consequence}; {fix}",
            )
        )
    for layer_type, key, value, base_value in _rope_differences(rope, base_rope):
        # dotted, not rope_parameters[...]: the CLIs print with rich, which reads [...] as markup
        where = "rope_parameters" if layer_type == "default" else f"rope_parameters.{layer_type}"
        found.append(
            RopeFinding(
                f"{where}.{key}",
                value,
                base_value,
                f"{subject}: RoPE {where}.{key} is {value!r}, {base}'s is {base_value!r}: {consequence}; {fix}",
            )
        )
    return found


def _rope_differences(rope: dict[str, dict], base_rope: dict[str, dict]) -> list[tuple[str, str, object, object]]:
    """(layer type, key, value, base value) for each RoPE parameter the two configs set differently."""
    out = []
    for layer_type, mine, theirs in _paired(rope, base_rope):
        keys = set(mine) & set(theirs)
        if "factor" in set(mine) | set(theirs):
            keys.add("factor")
        for key in sorted(keys):
            value, base_value = mine.get(key, 1.0), theirs.get(key, 1.0)
            if value != base_value:
                out.append((layer_type, key, value, base_value))
    return out


def _paired(rope: dict[str, dict], base_rope: dict[str, dict]) -> list[tuple[str, dict, dict]]:
    """The parameter sets to compare, by layer type.

    One single set ("default": an older transformers' `rope_theta` + `rope_scaling`) against sets
    per layer type is compared with the full-attention set, the layers those older fields
    described (with every set when there is none).
    """
    for single, per_type, flip in ((rope, base_rope, False), (base_rope, rope, True)):
        if set(single) == {"default"} and "default" not in per_type:
            types = ["full_attention"] if "full_attention" in per_type else sorted(per_type)
            pairs = [(t, single["default"], per_type[t]) for t in types]
            return [(t, b, a) if flip else (t, a, b) for t, a, b in pairs]
    return [(t, rope[t], base_rope[t]) for t in sorted(set(rope) & set(base_rope))]


# --- the edges: read config.json files, never raise (a check must not stop inspect or a plan) ---


def read_config(folder: Path) -> dict | None:
    """A folder's config.json as a dict, or None when it has none or it is unreadable."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def recorded_base(model_dir: Path) -> Path | None:
    """The base a merged model records (`base_dir` of lcserve_merge.json), or None."""
    provenance = read_merge_provenance(model_dir)
    return Path(provenance.base_dir) if provenance and provenance.base_dir else None


def adapter_findings(adapter_dir: Path, base_config: dict | None, base: str = "the base") -> list[RopeFinding]:
    """An adapter folder's config.json (as axolotl and unsloth save it) against the base it runs on."""
    config = read_config(adapter_dir)
    if config is None:
        return []
    return rope_findings(config, base_config, f"adapter {Path(adapter_dir).name}", base, ADAPTER)


def served_model_findings(model_dir: Path) -> list[RopeFinding]:
    """What `read_model` records and `deploy plan` warns about: the served model against the base it
    records (a merge's lcserve_merge.json), and a tiling it records."""
    config = read_config(model_dir)
    if config is None:
        return []
    base_dir = recorded_base(model_dir)
    base_config = read_config(base_dir) if base_dir else None
    return rope_findings(config, base_config, str(model_dir), f"its base {base_dir}" if base_dir else "its base")
