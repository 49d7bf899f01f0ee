"""vLLM's own KV-cache capacity for a set of vLLM arguments, computed in-process with no engine.

The oracle replays, with vLLM 0.32's own functions, the path a real engine takes from its
arguments to its logged "KV cache size: N tokens, Maximum concurrency for L tokens per
request: Xx":

1. the `VllmConfig`: vLLM's argument parser and `EngineArgs.create_engine_config()` (the CPU
   platform's `check_and_update_config` included: block size, VLLM_CPU_KVCACHE_SPACE, chunked
   prefill off for the CPU MLA kernel);
2. each worker's layer specs: the model class is instantiated on the meta device (nothing is
   allocated, no weights are read) under that config, and every attention layer's
   `get_kv_cache_spec` is collected by `vllm.v1.worker.gpu.attn_utils.get_kv_cache_spec`, which
   is what the model runner's `get_kv_cache_spec` does; before that, as the executor does after
   loading the model, `update_block_size_for_backend` aligns a hybrid's attention block size and
   Mamba page (state layers report a `MambaSpec` as attention layers report theirs);
3. the engine core's `_initialize_kv_caches`, step for step: `register_all_kvcache_specs`,
   `resolve_kv_cache_layout`, `get_kv_cache_configs` (grouping, pipeline projection, the
   smallest block count over ranks), `generate_scheduler_kv_cache_config`, the scheduler's
   block size, and `get_kv_cache_capacity` (the figures `update_kv_cache_capacity` logs).

The byte budget is the caller's: the planner's `kv_bytes` stands where a worker's
`determine_available_memory()` would answer (on the CPU build that answer is
VLLM_CPU_KVCACHE_SPACE, read by vLLM itself from the environment when the config is built).

Distributed state (the least fake that runs in one process): model code reads its tensor- and
pipeline-parallel place from vLLM's group coordinators, so `init_distributed_environment` runs
once for real with a world of 1 on gloo, as vLLM's own CPU tests do. For a rank of a TP or PP
plan, `rank_place` hands the model code a copy of those real coordinators that reports that
rank's world size and rank; building on the meta device does no collective, so only those
numbers are read, and everything else (heads per rank, KV-head replication, the layers of a
stage) is vLLM's model code.

Limits: it runs on the CPU build, so the attention backend is the CPU one; a GPU backend's
own spec customisation (`customize_spec`, kernel block sizes) is not seen, which matters only
where a backend changes the page (not for the full-attention and MLA specs checked on GPU
budgets here).
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType


@dataclass(frozen=True)
class VllmCapacity:
    """What vLLM's engine core would compute and log for one deployment."""

    kv_bytes: int  # the budget per worker
    num_blocks: int
    block_size: int  # the scheduler's block size (the smallest of the groups')
    kv_tokens: int  # vLLM's "KV cache size: N tokens"
    max_concurrency: float  # vLLM's "Maximum concurrency for L tokens per request"
    max_model_len: int
    groups: tuple[str, ...]  # one line per KV cache group: spec kind, layers, block size


_STORE_DIR: Path | None = None  # set while this module's one-process world is up


def init_single_process_distributed(vllm_config) -> None:
    """A real gloo world of one process with TP = PP = 1 groups, once (vLLM's own CPU-test set-up)."""
    global _STORE_DIR
    from vllm.config import set_current_vllm_config
    from vllm.distributed.parallel_state import (
        init_distributed_environment,
        initialize_model_parallel,
        model_parallel_is_initialized,
    )

    if model_parallel_is_initialized():
        return
    _STORE_DIR = Path(tempfile.mkdtemp(prefix="lcserve-kv-oracle-"))
    with set_current_vllm_config(vllm_config):
        init_distributed_environment(
            world_size=1, rank=0, distributed_init_method=f"file://{_STORE_DIR / 'store'}", local_rank=0, backend="gloo"
        )
        initialize_model_parallel(1, 1, backend="gloo")


def shutdown_distributed() -> None:
    """Undo `init_single_process_distributed` (nothing if it did not run)."""
    global _STORE_DIR
    if _STORE_DIR is None:
        return
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    destroy_model_parallel()
    destroy_distributed_environment()
    shutil.rmtree(_STORE_DIR, ignore_errors=True)
    _STORE_DIR = None


def _group_view(group, world_size: int, rank_in_group: int):
    """The real coordinator, reporting a place in a group of `world_size` (global ranks 0..n-1)."""
    view = copy.copy(group)
    view.world_size, view.rank_in_group = world_size, rank_in_group
    view.ranks, view.rank = list(range(world_size)), rank_in_group
    return view


@contextlib.contextmanager
def rank_place(tp: int, pp: int, tp_rank: int, pp_rank: int) -> Iterator[None]:
    """Model code built inside sees itself as rank (tp_rank, pp_rank) of a TP x PP world."""
    from vllm.distributed import parallel_state as ps

    saved = ps._TP, ps._PP
    ps._TP, ps._PP = _group_view(ps._TP, tp, tp_rank), _group_view(ps._PP, pp, pp_rank)
    try:
        yield
    finally:
        ps._TP, ps._PP = saved


@contextlib.contextmanager
def _environ(env: Mapping[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def engine_config(model_dir: Path, vllm_args: Sequence[str], env: Mapping[str, str] = MappingProxyType({})):
    """vLLM's `VllmConfig` for `vllm serve MODEL ARGS` (parsed by vLLM's own parser) under `env`."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", str(model_dir), "--skip-tokenizer-init", *vllm_args])
    with _environ(env):
        vllm_config = EngineArgs.from_cli_args(args).create_engine_config()
    from vllm.platforms import current_platform

    current_platform.update_block_size_for_backend(vllm_config)  # as the executor does (hybrid models)
    return vllm_config


def worker_kv_cache_spec(model_dir: Path, vllm_args: Sequence[str], env: Mapping[str, str], tp_rank: int, pp_rank: int):
    """One worker's {layer name: KVCacheSpec} and its supported KV layouts, from vLLM's model code
    built on the meta device (a fresh config per worker, as each worker process has its own)."""
    import torch
    from vllm.distributed.kv_transfer.kv_connector.utils import get_current_attn_backends
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.utils import get_supported_kv_cache_layouts
    from vllm.v1.worker.gpu.attn_utils import get_kv_cache_spec

    vllm_config = engine_config(model_dir, vllm_args, env)
    parallel = vllm_config.parallel_config
    init_single_process_distributed(vllm_config)
    with rank_place(parallel.tensor_parallel_size, parallel.pipeline_parallel_size, tp_rank, pp_rank):
        with torch.device("meta"):
            initialize_model(vllm_config)
        # as each worker does once its model is loaded (executor): a hybrid's attention block size is
        # raised and its Mamba page padded here, before the layers report their specs
        current_platform.update_block_size_for_backend(vllm_config)
        specs = get_kv_cache_spec(vllm_config)
        layouts = [layout.name for layout in get_supported_kv_cache_layouts(get_current_attn_backends(vllm_config))]
    return specs, layouts


def vllm_kv_capacity(
    model_dir: Path,
    vllm_args: Sequence[str],
    kv_bytes: int | None = None,
    env: Mapping[str, str] = MappingProxyType({}),
) -> VllmCapacity:
    """vLLM's KV capacity for `vllm serve model_dir *vllm_args` with `kv_bytes` per worker (None: the
    CPU build's own budget, VLLM_CPU_KVCACHE_SPACE from `env`)."""
    from vllm.v1.attention.backends.utils import resolve_kv_cache_layout
    from vllm.v1.core import kv_cache_utils as kcu
    from vllm.v1.core.single_type_kv_cache_manager import register_all_kvcache_specs

    core_config = engine_config(model_dir, vllm_args, env)  # the engine core's copy
    tp = core_config.parallel_config.tensor_parallel_size
    pp = core_config.parallel_config.pipeline_parallel_size
    workers = [worker_kv_cache_spec(model_dir, vllm_args, env, t, p) for p in range(pp) for t in range(tp)]
    specs = [s for s, _ in workers]
    if kv_bytes is None:
        kv_bytes = core_config.cache_config.kv_cache_memory_bytes
        assert kv_bytes, "no KV budget: pass kv_bytes, or VLLM_CPU_KVCACHE_SPACE in env"

    register_all_kvcache_specs(core_config)
    resolve_kv_cache_layout(core_config, [layouts for _, layouts in workers], [x for s in specs for x in s.values()])
    configs = kcu.get_kv_cache_configs(core_config, specs, [kv_bytes] * len(specs))
    scheduler = kcu.generate_scheduler_kv_cache_config(configs)
    groups = scheduler.kv_cache_groups
    prefix_cacheable = [g.kv_cache_spec.block_size for g in groups if g.kv_cache_spec.prefix_cacheable]
    core_config.cache_config.block_size = min(prefix_cacheable or [g.kv_cache_spec.block_size for g in groups])
    tokens, concurrency = kcu.get_kv_cache_capacity(core_config, scheduler)
    return VllmCapacity(
        kv_bytes=kv_bytes,
        num_blocks=scheduler.num_blocks,
        block_size=core_config.cache_config.block_size,
        kv_tokens=tokens,
        max_concurrency=concurrency,
        max_model_len=core_config.model_config.max_model_len,
        groups=tuple(
            f"{type(g.kv_cache_spec).__name__} x {len(g.layer_names)} layers, block {g.kv_cache_spec.block_size}"
            for g in groups
        ),
    )
