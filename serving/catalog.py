"""The served models and their limits: what admission checks a prompt against, and what the
exporter counts each request against.

vLLM's `/v1/models` is the one list of what is served: the base, and each adapter (`parent` set),
each with the engine's max_model_len. The list changes when the engine restarts (the supervisor
bumps `generation`) and when an adapter is loaded or unloaded at runtime, so the catalog re-reads
it then, and only then. The training length comes from each model's folder (adapter metadata, or
the base's max_position_embeddings) unless the operator declared one.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import aiohttp

from lcserve.adapters.training_length import training_seq_len
from lcserve.model_config import base_training_len, is_embedding_model

from .adapter_metrics import LoadedAdapter, adapter_rank
from .embeddings import DEFAULT_POLICY
from .metrics import ModelLimits
from .upstream import UPSTREAM_FAILURES, Upstream


def model_limits(entry: dict, overrides: dict[str, int], policies: dict[str, str] | None = None) -> ModelLimits:
    """Limits of one `/v1/models` entry. vLLM sets `root` to the base's folder, or for an adapter
    (`parent` set) to the adapter's folder; an explicit override wins over both. An embedding model
    (named in `policies` by `serve`, or recognised by its folder) carries its long-input policy."""
    name = entry["id"]
    policies = policies or {}
    training = overrides.get(name)
    root = Path(entry["root"]) if entry.get("root") else None
    local = root is not None and root.is_dir()
    if training is None and local:
        training = training_seq_len(root) if entry.get("parent") else base_training_len(root)
    max_len = entry.get("max_model_len")
    embed = name in policies or (local and not entry.get("parent") and is_embedding_model(root))
    parent = entry.get("parent")
    return ModelLimits(
        name,
        training,
        max_len if isinstance(max_len, int) else None,
        task="embed" if embed else "generate",
        policy=policies.get(name, DEFAULT_POLICY),
        adapter=LoadedAdapter(name, parent, "mount", adapter_rank(root)) if isinstance(parent, str) else None,
    )


def base_dir(entries: list[dict]) -> Path | None:
    """The served base's folder (the first entry without `parent`), when it is one on this machine:
    adapters loaded at run time are inspected against it."""
    for entry in entries:
        if not entry.get("parent") and entry.get("root") and Path(entry["root"]).is_dir():
            return Path(entry["root"])
    return None


class ModelCatalog:
    """`/v1/models` as ModelLimits by name, read once per engine generation and after each
    adapter load or unload (`mark_stale`)."""

    def __init__(
        self,
        upstream: Upstream,
        training_lengths: dict[str, int] | None = None,
        embedding_policies: dict[str, str] | None = None,
        merged: dict[str, LoadedAdapter] | None = None,
    ):
        self.upstream = upstream
        self.merged = dict(merged or {})  # served name -> the adapter merged into it at start
        self.training_lengths = dict(training_lengths or {})
        self.embedding_policies = dict(embedding_policies or {})
        self._models: dict[str, ModelLimits] = {}
        self.base_dir: Path | None = None  # the base's folder, when vLLM names one on this machine
        self._generation = -1
        self._stale = False
        self._lock = asyncio.Lock()

    def mark_stale(self) -> None:
        """An adapter was loaded or unloaded: read `/v1/models` again before the next use."""
        self._stale = True

    async def model(self, name: str | None) -> ModelLimits | None:
        """The served model a request names (vLLM's default when none: the first, the base);
        None for a name the engine does not serve (vLLM then answers with its own 404)."""
        models = await self.models()
        if name is None:
            return next(iter(models.values()), None)
        return models.get(name)

    async def models(self) -> dict[str, ModelLimits]:
        """The served models; the last list read while the engine cannot answer."""
        if not self._outdated():
            return self._models
        async with self._lock:
            if not self._outdated():
                return self._models
            generation = self.upstream.engine.generation
            entries = await self._read_entries()
            if entries is None:
                return self._models
            self._stale = False
            models = {
                e["id"]: model_limits(e, self.training_lengths, self.embedding_policies) for e in entries if "id" in e
            }
            for e in entries:  # an adapter mounted on an embedding model embeds too
                parent = models.get(e.get("parent"))
                if parent is not None and parent.task == "embed" and e.get("id") in models:
                    models[e["id"]] = dataclasses.replace(models[e["id"]], task="embed", policy=parent.policy)
            for name in self.merged.keys() & models.keys():
                models[name] = dataclasses.replace(models[name], adapter=self.merged[name])
            self._models = models
            self.base_dir = base_dir(entries)
            self._generation = generation
            return self._models

    def _outdated(self) -> bool:
        return self._stale or self._generation != self.upstream.engine.generation

    async def _read_entries(self) -> list[dict] | None:
        try:
            async with self.upstream.session.get(
                self.upstream.url("/v1/models"), timeout=aiohttp.ClientTimeout(total=10)
            ) as r:
                return (await r.json())["data"] if r.status == 200 else None
        except (*UPSTREAM_FAILURES, ValueError, KeyError):
            return None
