"""`lcserve serve`: the main job. Resolve the model, plan vLLM's settings, launch and wait."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

import click
from rich.console import Console
from rich.progress import TextColumn

from lcserve import embedded as emb
from lcserve.adapters.inspection import AdapterReport, inspect_adapter
from lcserve.adapters.merge import PROVENANCE, merge_adapter
from lcserve.adapters.mount import MODES, decide_mode, parse_adapter_spec, vllm_lora_args
from lcserve.adapters.reader import adapter_sha256
from lcserve.deploy.adapters_info import read_adapter
from lcserve.deploy.hardware import resolve_profile
from lcserve.deploy.plan import ServePlan, plan_deployment
from lcserve.errors import ModelError, PlanError
from lcserve.model_config import read_model
from lcserve.paths import demo_adapter_dir, lcserve_home
from lcserve.progress import progress_bar

from .cpu_lora import ENV_VAR as CPU_LORA_ENV
from .cpu_lora import SEGMENTED
from .engine import EngineProcess, EngineSpec, free_port, vllm_build, vllm_command
from .probe_schedule import ProbeSchedule
from .probes.runner import ProbeConfig
from .stack import run_stack


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


def merged_model(name: str, report: AdapterReport, base_dir: Path, console: Console, dry_run: bool) -> Path:
    """A merged copy of base + adapter, cached by both identities (merging again is wasted work)."""
    adapter_dir = Path(report.adapter_dir)
    digest = adapter_sha256(adapter_dir)
    out_dir = lcserve_home() / "merged" / f"{name}-{digest[:12]}-{base_dir.name}"
    if dry_run:
        return out_dir
    try:
        provenance = json.loads((out_dir / PROVENANCE).read_text())
    except (OSError, json.JSONDecodeError):
        provenance = {}
    if provenance.get("adapter_sha256") != digest or provenance.get("base_dir") != str(base_dir.resolve()):
        console.print(f"merging {adapter_dir} into {base_dir} -> {out_dir}")
        merge_adapter(adapter_dir, base_dir, out_dir, force=True)
    return out_dir


def demo_adapter(console: Console, dry_run: bool) -> list[str]:
    """`writer=<demo adapter>` for the embedded default, trained on first use (about a minute)."""
    from lcserve.adapters.train import is_trained, train_demo_adapter

    if not is_trained():
        if dry_run:
            return []
        console.print("training the demo adapter `writer` (first run only; `--base-only` skips it)...")
        with progress_bar(console, TextColumn("{task.completed}/{task.total} steps")) as progress:
            train_demo_adapter(progress=progress)
    return [f"writer={demo_adapter_dir()}"]


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
@click.option("--adapter", "adapter_specs", multiple=True, metavar="NAME=DIR",
              help="LoRA adapter (PEFT folder) to serve beside the base as NAME (repeatable).")
@click.option("--mode", type=click.Choice(MODES), default="auto", show_default=True,
              help="Mount adapters in vLLM, merge them into the base, or auto (merge when vLLM cannot mount it "
                   "or with --adapter-only).")
@click.option("--adapter-only", is_flag=True,
              help="One adapter serves all traffic (nobody needs the plain base): auto mode merges it.")
@click.option("--base-only", is_flag=True,
              help="Embedded default only: serve the base without the demo adapter `writer`.")
@click.option("--gateway/--no-gateway", default=True, show_default=True,
              help="Put lcserve's gateway (/metrics, context checks, 503 while restarting) on PORT, vLLM behind it.")
@click.option("--api-key", envvar="LCSERVE_API_KEY",
              help="Bearer token the gateway requires (env LCSERVE_API_KEY); enables adapter load/unload routes.")
@click.option("--probe-on-start", is_flag=True,
              help="Run the quick long-context probe (base vs adapters) once vLLM is ready; results become the "
                   "gateway's lcserve_probe_* gauges and files under $LCSERVE_HOME/probes.")
@click.option("--probe-every", type=click.FloatRange(min=1), metavar="MINUTES",
              help="Run the quick probe every MINUTES (it shares the engine with your traffic).")
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
def serve(model, port, host, adapter_specs, mode, adapter_only, base_only, gateway, api_key, probe_on_start,
          probe_every, profile, max_model_len, max_num_seqs, gpu_memory_utilization, kv_dtype,
          rope_scaling, served_model_name, ready_timeout, log_file, dry_run, vllm_args) -> None:
    """Serve MODEL (a model folder; default: the embedded Gemma 3 270M with its demo adapter `writer`
    mounted) with vLLM until Ctrl-C.

    The planner (`lcserve deploy plan`) chooses the context window, concurrency, batch size and
    memory for the hardware profile; explicit options become its targets and are checked.
    Arguments after the options (or after `--`) go to vLLM unchanged and win over the plan, e.g.
    `lcserve serve /models/m -- --enable-prefix-caching`.
    """
    console = Console(stderr=True, soft_wrap=True)  # log lines stay whole when piped
    if model is not None and model.startswith("-"):  # MODEL omitted: click gave it the first vLLM argument
        model, vllm_args = None, (model, *vllm_args)
    if (probe_on_start or probe_every) and not gateway:
        raise click.UsageError("--probe-on-start/--probe-every publish through the gateway; drop --no-gateway")
    model_arg, default_name, model_dir = resolve_model(model, console)
    build = vllm_build()
    if model in (None, "embedded") and not adapter_specs and not base_only:
        adapter_specs = demo_adapter(console, dry_run)
    args: list[str] = []
    env: dict[str, str] = {}
    notes: list[str] = []
    plan = None
    adapters = [parse_adapter_spec(a) for a in adapter_specs]
    if adapters and model_dir is None:
        raise ModelError(f"{model_arg} is not a local folder; adapters need the base's folder to be checked against")
    served_name = served_model_name or default_name
    mounted: list[tuple[str, Path]] = []
    training_lengths: dict[str, int] = {}
    if adapters:
        reports = [inspect_adapter(path, base_dir=model_dir) for _, path in adapters]
        decision = decide_mode(reports, mode, all_traffic=adapter_only)
        notes.append(f"adapters: {decision.mode} ({'; '.join(decision.reasons)})")
        for (name, _), report in zip(adapters, reports):
            if report.training_seq_len:
                training_lengths[name] = report.training_seq_len
        if decision.mode == "merge":
            name = adapters[0][0]
            merged_dir = merged_model(name, reports[0], model_dir, console, dry_run)
            notes.append(f"serving the merge of {adapters[0][1]} into {model_dir}: {merged_dir}")
            if not dry_run:  # a dry run plans on the base: same architecture, nothing written
                model_dir = merged_dir
            model_arg, served_name = str(merged_dir), served_model_name or name
        else:
            mounted = adapters
    if model_dir is not None:
        plan = plan_for(model_dir, profile, [path for _, path in mounted], max_model_len, max_num_seqs, kv_dtype,
                        rope_scaling)
        if build == "cpu" and not plan.profile.is_cpu:
            raise PlanError(f"--profile {profile} is a GPU profile but this machine runs vLLM's CPU build; serve with "
                            "--profile auto (or cpu), and plan for other hardware with `lcserve deploy plan --profile`")
        args = plan.vllm_args()
        if mounted:  # the plan sizes LoRA capacity; the adapters themselves are named here
            lora = vllm_lora_args(mounted, served_name, reports)
            args += lora[lora.index("--lora-modules"):lora.index("--max-lora-rank")]
        env = {k: v for k, v in plan.env.items() if k not in os.environ}
        if mounted and build == "cpu" and CPU_LORA_ENV not in os.environ:
            env[CPU_LORA_ENV] = SEGMENTED
            notes.append(f"{CPU_LORA_ENV}={SEGMENTED}: one matrix product per run of tokens instead of vLLM's "
                         "per-token weight copies (LoRA prefill about 5x faster on the CPU build; =stock restores vLLM's)")
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
    engine_port = free_port() if gateway else port
    spec = EngineSpec(model=model_arg, served_model_name=served_name, host="127.0.0.1" if gateway else host,
                      port=engine_port, extra_args=args + passthrough, env=env)
    if dry_run:
        click.echo(json.dumps({"command": vllm_command(spec), "env": env, "notes": notes, "build": build,
                               "gateway": f"http://{host}:{port}" if gateway else None,
                               "training_lengths": training_lengths,
                               "plan": plan.to_json() if plan else None}, indent=2))
        return
    for note in notes:
        console.print(f"[dim]{note}[/dim]")
    log_path = log_file or lcserve_home() / "logs" / f"vllm-{port}.log"
    context = plan.max_model_len if plan else max_model_len
    if not gateway:
        _run_until_signal(EngineProcess(spec, log_path), context, ready_timeout, console)
        return
    if api_key:  # the gateway's adapter load/unload routes need vLLM's runtime LoRA API, behind the key
        spec.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    console.print(f"starting vLLM for {served_name} on internal port {engine_port} (log: {log_path}); "
                  f"gateway on {host}:{port}")
    names = [served_name, *(name for name, _ in mounted)]
    probe = None
    if probe_on_start or probe_every:
        probe = ProbeSchedule(ProbeConfig(base=served_name, adapters=tuple(name for name, _ in mounted)),
                              lcserve_home() / "probes", on_start=probe_on_start,
                              every_s=probe_every * 60 if probe_every else None)
    run_stack(spec, gateway_host=host, gateway_port=port, api_key=api_key, training_lengths=training_lengths,
              log_path=log_path, ready_timeout_s=ready_timeout, probe=probe,
              on_ready=lambda stack: console.print(
                  f"[green]ready[/green] in {time.monotonic() - started:.0f} s: {stack.url}/v1 serves "
                  f"{', '.join(repr(n) for n in names)} (max_model_len {context}; metrics at {stack.url}/metrics); "
                  "Ctrl-C stops"))
    console.print("stopped")


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
