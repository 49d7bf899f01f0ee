"""`lcserve serve`: the main job. Resolve the model, choose vLLM's settings, launch and wait."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import click
from rich.console import Console

from lcserve import embedded as emb
from lcserve.errors import ModelError
from lcserve.paths import lcserve_home
from lcserve.safetensors_header import read_model_tensors

from .engine import EngineProcess, EngineSpec, vllm_build, vllm_command

GIB = 1024**3


def node_available_bytes() -> int:
    """Memory available to vLLM's CPU worker, computed the way it does (NUMA node 0 meminfo)."""
    path = Path("/sys/devices/system/node/node0/meminfo")
    if not path.exists():
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    fields = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        fields[parts[2].rstrip(":")] = int(parts[3]) * 1024
    return sum(fields[k] for k in ("MemFree", "Active(file)", "Inactive(file)", "SReclaimable"))


def cpu_kv_space_gib(available_bytes: int) -> int:
    """Half of what vLLM's CPU worker sees as available, between 1 and 16 GiB."""
    return max(1, min(16, int(available_bytes * 0.5 // GIB)))


def resolve_model(model: str | None, console: Console) -> tuple[str, str, Path | None]:
    """(path or hub id, served name, local folder or None) for the MODEL argument."""
    if model is None or model == "embedded":
        if not emb.is_prepared():
            console.print("preparing the embedded model (first run only)...")
            emb.prepare()
        path = emb.embedded_model_path()
        return str(path), emb.SERVED_NAME, path
    looks_local = model.startswith(("/", ".", "~")) or Path(model).exists()
    if not looks_local:
        return model, model, None
    path = Path(model).expanduser().resolve()
    if not path.is_dir():
        raise ModelError(f"model folder {model} not found; pass a folder with config.json and *.safetensors, "
                         "or omit MODEL to serve the embedded default")
    return str(path), path.name, path


def max_context(model_dir: Path) -> int:
    """The model's context limit from config.json (ModelError when the folder is incomplete)."""
    config_path = model_dir / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{config_path} not found; {model_dir} is not a Hugging Face model folder") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{config_path} is not valid JSON ({e}); restore the model's config.json") from None
    text = config.get("text_config") or config
    limit = text.get("max_position_embeddings") or config.get("max_position_embeddings")
    if not isinstance(limit, int):
        raise ModelError(f"{config_path}: no max_position_embeddings; add it or pass --max-model-len")
    read_model_tensors(model_dir)  # ModelError on missing, truncated or corrupt weights
    return limit


@click.command(context_settings={"ignore_unknown_options": True, "help_option_names": ["-h", "--help"]})
@click.argument("model", required=False)
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="Port to serve on.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless told otherwise).")
@click.option("--max-num-seqs", type=click.IntRange(min=1), help="Concurrent sequences (default: vLLM's).")
@click.option("--max-model-len", type=click.IntRange(min=16), help="Context window (default: the model's maximum).")
@click.option("--gpu-memory-utilization", type=click.FloatRange(0, 1, min_open=True),
              help="Fraction of GPU memory for this instance, in (0, 1] (GPU build only).")
@click.option("--served-model-name", help="Name clients use (default: the folder name).")
@click.option("--ready-timeout", type=click.IntRange(min=1), default=900, show_default=True,
              help="Seconds to wait for vLLM to become ready.")
@click.option("--log-file", type=click.Path(path_type=Path), help="vLLM's log (default: $LCSERVE_HOME/logs/vllm-PORT.log).")
@click.option("--dry-run", is_flag=True, help="Print the vLLM command and environment as JSON; start nothing.")
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED)
def serve(model, port, host, max_num_seqs, max_model_len, gpu_memory_utilization, served_model_name,
          ready_timeout, log_file, dry_run, vllm_args) -> None:
    """Serve MODEL (a model folder; default: the embedded Gemma 3 270M) with vLLM until Ctrl-C.

    Arguments after the options (or after `--`) are passed to vLLM unchanged, e.g.
    `lcserve serve /models/m -- --enforce-eager`.
    """
    console = Console(stderr=True)
    model_arg, default_name, model_dir = resolve_model(model, console)
    if model_dir is not None:
        limit = max_context(model_dir)
        if max_model_len is not None and max_model_len > limit:
            raise ModelError(f"--max-model-len {max_model_len} is above the model's maximum context {limit} "
                             f"({model_dir / 'config.json'}: max_position_embeddings); use at most {limit}")
        max_model_len = max_model_len or limit
    build = vllm_build()
    extra = list(vllm_args)
    env: dict[str, str] = {}
    notes: list[str] = []
    if build == "cpu":
        if gpu_memory_utilization is not None:
            notes.append("--gpu-memory-utilization is ignored on the CPU build: it sizes the KV cache from "
                         "VLLM_CPU_KVCACHE_SPACE")
            gpu_memory_utilization = None
        if "VLLM_CPU_KVCACHE_SPACE" in os.environ:
            notes.append(f"CPU build: VLLM_CPU_KVCACHE_SPACE={os.environ['VLLM_CPU_KVCACHE_SPACE']} GiB (from the environment)")
        else:
            available = node_available_bytes()
            kv = cpu_kv_space_gib(available)
            env["VLLM_CPU_KVCACHE_SPACE"] = str(kv)
            notes.append(f"CPU build: VLLM_CPU_KVCACHE_SPACE={kv} GiB = half of the {available / GIB:.1f} GiB "
                         "vLLM's CPU worker sees as available (1..16 GiB)")
        if "--enforce-eager" not in extra and "-O" not in " ".join(extra):
            extra.append("--enforce-eager")
            notes.append("CPU build: --enforce-eager (torch.compile warm-up takes minutes on small CPUs)")
    spec = EngineSpec(model=model_arg, served_model_name=served_model_name or default_name, host=host, port=port,
                      max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                      gpu_memory_utilization=gpu_memory_utilization, extra_args=extra, env=env)
    if dry_run:
        click.echo(json.dumps({"command": vllm_command(spec), "env": env, "notes": notes, "build": build}, indent=2))
        return
    for note in notes:
        console.print(f"[dim]{note}[/dim]")
    log_path = log_file or lcserve_home() / "logs" / f"vllm-{port}.log"
    _run_until_signal(EngineProcess(spec, log_path), ready_timeout, console)


def _run_until_signal(engine: EngineProcess, ready_timeout: int, console: Console) -> None:
    """Start the engine, wait for readiness, then block until SIGINT/SIGTERM or the engine exits."""
    stop = {"requested": False}

    def on_signal(signum, _frame):
        stop["requested"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    started = time.monotonic()
    console.print(f"starting vLLM for {engine.spec.served_model_name} (log: {engine.log_path})")
    engine.start()
    try:
        with console.status("waiting for vLLM to become ready..."):
            engine.wait_ready(ready_timeout)
        console.print(f"[green]ready[/green] in {time.monotonic() - started:.0f} s: {engine.url}/v1 serves "
                      f"'{engine.spec.served_model_name}' (max_model_len {engine.spec.max_model_len}); Ctrl-C stops")
        while not stop["requested"] and engine.alive():
            time.sleep(0.5)
        if not engine.alive() and not stop["requested"]:
            console.print(f"[red]vLLM exited with code {engine.returncode}[/red]; last log lines:\n{engine.log_tail(20)}")
            raise SystemExit(1)
    finally:
        console.print("stopping vLLM...")
        engine.stop()
