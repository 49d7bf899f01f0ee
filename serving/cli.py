"""`lcserve serve`: the main job. Resolve the model, plan vLLM's settings, launch and wait."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import click
from rich.console import Console

from lcserve import embedded as emb
from lcserve.deploy.adapters_info import read_adapter
from lcserve.deploy.hardware import resolve_profile
from lcserve.deploy.plan import ServePlan, plan_deployment
from lcserve.errors import ModelError, PlanError
from lcserve.model_config import read_model
from lcserve.paths import lcserve_home

from .engine import EngineProcess, EngineSpec, vllm_build, vllm_command


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


def plan_for(model_dir: Path, profile: str, adapter_dirs: list[Path], max_model_len: int | None,
             max_num_seqs: int | None, kv_dtype: str, rope_scaling: str | None = None) -> ServePlan:
    """The planner's choice for this model on this hardware; explicit values become its targets."""
    prof = resolve_profile(profile)
    kv_env = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    kv_cache_gib = int(kv_env) if prof.is_cpu and kv_env and kv_env.isdigit() else None
    return plan_deployment(prof, read_model(model_dir), adapters=[read_adapter(d) for d in adapter_dirs],
                           context=max_model_len, concurrency=max_num_seqs, kv_dtype=kv_dtype,
                           rope_scaling=rope_scaling, kv_cache_gib=kv_cache_gib)


def override_option(args: list[str], option: str, value: str) -> list[str]:
    """`args` with `option`'s value replaced (or appended)."""
    if option in args:
        i = args.index(option)
        return args[:i + 1] + [value] + args[i + 2:]
    return args + [option, value]


def plan_summary(plan: ServePlan) -> list[str]:
    lines = [f"plan ({plan.profile.name}): max_model_len {plan.max_model_len}, max_num_seqs {plan.max_num_seqs}, "
             f"KV cache {plan.kv_tokens:,} tokens = {plan.max_concurrency:.2f} requests at full context "
             "(`lcserve deploy plan` explains every number)"]
    lines += [f"{k}={v}: {r.why}" for k, v in plan.env.items() for r in plan.reasons
              if r.setting == k and k not in os.environ]
    return lines + [f"warning: {w}" for w in plan.warnings]


@click.command(context_settings={"ignore_unknown_options": True, "help_option_names": ["-h", "--help"]})
@click.argument("model", required=False)
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="Port to serve on.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless told otherwise).")
@click.option("--profile", default="auto", show_default=True,
              help="Hardware profile for the planner (`lcserve deploy profiles`), or auto (NVML, else CPU).")
@click.option("--max-model-len", type=click.IntRange(min=16),
              help="Context window (default: the planner's, the model's maximum when it fits).")
@click.option("--max-num-seqs", type=click.IntRange(min=1),
              help="Requests that must fit at full context at once (default: the planner's).")
@click.option("--gpu-memory-utilization", type=click.FloatRange(0, 1, min_open=True),
              help="Override the planner's fraction of GPU memory, in (0, 1] (GPU build only).")
@click.option("--kv-dtype", type=click.Choice(["auto", "fp8", "fp8_e4m3", "fp8_e5m2"]), default="auto",
              show_default=True, help="KV cache dtype; fp8 halves a bf16 cache.")
@click.option("--rope-scaling", type=click.Choice(["yarn"]),
              help="Allow --max-model-len above the model's maximum by YaRN (passed as --hf-overrides).")
@click.option("--served-model-name", help="Name clients use (default: the folder name).")
@click.option("--ready-timeout", type=click.IntRange(min=1), default=900, show_default=True,
              help="Seconds to wait for vLLM to become ready.")
@click.option("--log-file", type=click.Path(path_type=Path), help="vLLM's log (default: $LCSERVE_HOME/logs/vllm-PORT.log).")
@click.option("--dry-run", is_flag=True, help="Print the plan, vLLM command and environment as JSON; start nothing.")
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED)
def serve(model, port, host, profile, max_model_len, max_num_seqs, gpu_memory_utilization, kv_dtype,
          rope_scaling, served_model_name, ready_timeout, log_file, dry_run, vllm_args) -> None:
    """Serve MODEL (a model folder; default: the embedded Gemma 3 270M) with vLLM until Ctrl-C.

    The planner (`lcserve deploy plan`) chooses the context window, concurrency, batch size and
    memory for the hardware profile; explicit options become its targets and are checked.
    Arguments after the options (or after `--`) go to vLLM unchanged and win over the plan, e.g.
    `lcserve serve /models/m -- --enable-prefix-caching`.
    """
    console = Console(stderr=True)
    if model is not None and model.startswith("-"):  # MODEL omitted: click gave it the first vLLM argument
        model, vllm_args = None, (model, *vllm_args)
    model_arg, default_name, model_dir = resolve_model(model, console)
    build = vllm_build()
    args: list[str] = []
    env: dict[str, str] = {}
    notes: list[str] = []
    plan = None
    if model_dir is not None:
        plan = plan_for(model_dir, profile, [], max_model_len, max_num_seqs, kv_dtype, rope_scaling)
        if build == "cpu" and not plan.profile.is_cpu:
            raise PlanError(f"--profile {profile} is a GPU profile but this machine runs vLLM's CPU build; serve with "
                            "--profile auto (or cpu), and plan for other hardware with `lcserve deploy plan --profile`")
        args = plan.vllm_args()
        env = {k: v for k, v in plan.env.items() if k not in os.environ}
        notes += plan_summary(plan)
    else:
        notes.append(f"{model_arg} is not a local folder: no plan (lcserve reads config.json to plan); "
                     "your explicit settings go to vLLM as they are")
        for option, value in (("--max-model-len", max_model_len), ("--max-num-seqs", max_num_seqs)):
            if value is not None:
                args += [option, str(value)]
    for key in ("VLLM_CPU_KVCACHE_SPACE",):
        if key in os.environ and build == "cpu":
            notes.append(f"{key}={os.environ[key]} GiB (from the environment)")
    if gpu_memory_utilization is not None:
        if build == "cpu":
            notes.append("--gpu-memory-utilization is ignored on the CPU build: the KV cache is sized by "
                         "VLLM_CPU_KVCACHE_SPACE")
        else:
            args = override_option(args, "--gpu-memory-utilization", str(gpu_memory_utilization))
    passthrough = list(vllm_args)
    if build == "cpu" and "--enforce-eager" not in passthrough and "-O" not in " ".join(passthrough):
        args.append("--enforce-eager")
        notes.append("CPU build: --enforce-eager (torch.compile warm-up takes minutes on small CPUs)")
    spec = EngineSpec(model=model_arg, served_model_name=served_model_name or default_name, host=host, port=port,
                      extra_args=args + passthrough, env=env)
    if dry_run:
        click.echo(json.dumps({"command": vllm_command(spec), "env": env, "notes": notes, "build": build,
                               "plan": plan.to_json() if plan else None}, indent=2))
        return
    for note in notes:
        console.print(f"[dim]{note}[/dim]")
    log_path = log_file or lcserve_home() / "logs" / f"vllm-{port}.log"
    _run_until_signal(EngineProcess(spec, log_path), plan.max_model_len if plan else max_model_len,
                      ready_timeout, console)


def _run_until_signal(engine: EngineProcess, max_model_len: int | None, ready_timeout: int, console: Console) -> None:
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
                      f"'{engine.spec.served_model_name}' (max_model_len {max_model_len}); Ctrl-C stops")
        while not stop["requested"] and engine.alive():
            time.sleep(0.5)
        if not engine.alive() and not stop["requested"]:
            console.print(f"[red]vLLM exited with code {engine.returncode}[/red]; last log lines:\n{engine.log_tail(20)}")
            raise SystemExit(1)
    finally:
        console.print("stopping vLLM...")
        engine.stop()
