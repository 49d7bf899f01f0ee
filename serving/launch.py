"""What `lcserve serve` launches, decided from what the user typed and what the files say.

`describe_launch` is a pure function: options + inputs -> the vLLM command, its environment
and the notes that explain them (exactly what `--dry-run` prints). Everything with effects
happens around it in `serving/cli.py`: preparing the embedded model, training the demo
adapter, reading folders, merging, and starting the engine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from lcserve.adapters.inspection import AdapterReport
from lcserve.adapters.mount import ModeDecision, decide_mode, lora_modules_args
from lcserve.adapters.reader import LoraAdapter
from lcserve.deploy.hardware import Profile
from lcserve.deploy.inputs import CPU_KV_CACHE_ENV, cpu_kv_cache_space
from lcserve.deploy.plan import PlanRequest, ServePlan, plan_deployment
from lcserve.deploy.pooling import PoolingPlan, plan_pooling
from lcserve.deploy.settings import take_vllm_args
from lcserve.engine import EngineSpec, vllm_command
from lcserve.errors import ModelError, PlanError
from lcserve.model_config import ModelInfo
from lcserve.vllm_rules import lora_options, options_to_args

from .cpu_lora import ENV_VAR as CPU_LORA_ENV
from .cpu_lora import SEGMENTED


@dataclass(frozen=True)
class ServeOptions:
    """What the user typed (`lcserve serve` options, or `serve_vllm.sh` arguments)."""

    model: str | None = None
    port: int = 8000
    host: str = "127.0.0.1"
    adapters: tuple[tuple[str, Path], ...] = ()  # (served name, folder)
    mode: str = "auto"
    adapter_only: bool = False
    gateway: bool = True
    profile: str = "auto"
    gpus: int | None = None  # GPUs per node, instead of the profile's count
    request: PlanRequest = PlanRequest()  # the planner's settings (deploy/settings.py declares each)
    served_model_name: str | None = None
    vllm_args: tuple[str, ...] = ()
    dry_run: bool = False  # a dry run may describe another machine: a GPU profile on this CPU build
    embedding_policy: str = "reject"  # an embedding model's long-input policy (serving/embeddings.py)
    training_len: int | None = None  # an embedding model's training length, when its folder does not say
    engine_socket_dir: Path | None = None  # the private folder of vLLM's socket (default: a fresh one)


@dataclass(frozen=True)
class ServedAdapter:
    """One `--adapter NAME=FOLDER` and what inspect found in it, paired once where the inputs are read."""

    name: str
    folder: Path
    report: AdapterReport

    @property
    def adapter(self) -> LoraAdapter:
        return self.report.adapter


@dataclass(frozen=True)
class ServeInputs:
    """What the files and the machine say, read before the launch is described."""

    model_arg: str  # the folder (or hub id) vLLM loads
    default_name: str  # the served name when the user gives none
    model: ModelInfo | None  # None for a hub id: no plan
    build: str  # "cpu" or "gpu": which vLLM is installed
    profile: Profile | None
    environ: dict[str, str]  # the variables that reach vLLM from the environment
    engine_port: int
    adapters: tuple[ServedAdapter, ...] = ()  # the option adapters, in order
    merged_dir: Path | None = None  # where the merge of the first adapter is (or would be) cached
    engine_socket: str | None = None  # behind the gateway: vLLM's Unix socket (`--uds`), its only address


@dataclass
class Launch:
    """The engine to start and everything `--dry-run` shows about it."""

    spec: EngineSpec
    build: str
    gateway_url: str | None
    notes: list[str]
    training_lengths: dict[str, int]
    plan: ServePlan | PoolingPlan | None
    served_names: list[str]  # the base (or merged model) first, then mounted adapters
    merge: tuple[LoraAdapter, Path, Path] | None = None  # (adapter, base, out) when the first adapter is merged
    max_model_len: int | None = None
    embedding_policies: dict[str, str] = dataclasses.field(default_factory=dict)  # served name -> policy

    def to_json(self) -> dict:
        out = {
            "command": vllm_command(self.spec),
            "env": self.spec.env,
            "notes": self.notes,
            "build": self.build,
            "gateway": self.gateway_url,
            "training_lengths": self.training_lengths,
            "plan": self.plan.to_json() if self.plan else None,
        }
        if self.embedding_policies:
            out["embedding_policies"] = self.embedding_policies
        return out


def describe_launch(options: ServeOptions, inputs: ServeInputs) -> Launch:
    """The vLLM command, environment and notes for these options (pure: no files, no processes)."""
    notes: list[str] = []
    options = take_planned_flags(options)
    if options.dry_run and inputs.build == "cpu" and inputs.profile and not inputs.profile.is_cpu:
        notes.append(
            f"dry run for {inputs.profile.name}: the command a machine with that GPU runs (this machine has "
            "vLLM's CPU build)"
        )
        inputs = dataclasses.replace(inputs, build="gpu")
    model_arg, model = inputs.model_arg, inputs.model
    served_name = options.served_model_name or inputs.default_name
    mounted = list(inputs.adapters)
    training_lengths = {a.name: a.adapter.training_seq_len for a in inputs.adapters if a.adapter.training_seq_len}
    merge = None
    if inputs.adapters:
        decision = adapter_mode(options, inputs)
        notes.append(f"adapters: {decision.mode} ({'; '.join(decision.reasons)})")
        if decision.mode == "merge":
            first, merged_dir = inputs.adapters[0], inputs.merged_dir
            notes.append(f"serving the merge of {first.folder} into {model.path}: {merged_dir}")
            merge = (first.adapter, model.path, merged_dir)
            model = dataclasses.replace(model, path=merged_dir)
            model_arg, served_name, mounted = str(merged_dir), options.served_model_name or first.name, []
    args, env, plan = planned_args(options, inputs, model, mounted, served_name, notes)
    passthrough = list(options.vllm_args)
    if inputs.build == "cpu" and "--enforce-eager" not in passthrough and "-O" not in " ".join(passthrough):
        args.append("--enforce-eager")
        notes.append("CPU build: --enforce-eager (torch.compile warm-up takes minutes on small CPUs)")
    spec = EngineSpec(
        model=model_arg,
        served_model_name=served_name,
        host="127.0.0.1" if options.gateway else options.host,
        port=inputs.engine_port if options.gateway else options.port,
        args=args + passthrough,
        env=env,
        uds=inputs.engine_socket if options.gateway else None,
    )
    if spec.uds:
        notes.append(
            f"vLLM listens on the Unix socket {spec.uds} only (0700 folder, no TCP port): the gateway is its door"
        )
    policies = {}
    if isinstance(plan, PoolingPlan):
        policies = {name: plan.policy for name in [served_name, *(a.name for a in mounted)]}
        if plan.training_len:
            training_lengths[served_name] = plan.training_len
    return Launch(
        spec=spec,
        build=inputs.build,
        gateway_url=f"http://{options.host}:{options.port}" if options.gateway else None,
        notes=notes,
        training_lengths=training_lengths,
        plan=plan,
        served_names=[served_name, *(a.name for a in mounted)],
        merge=merge,
        max_model_len=plan.max_model_len if plan else options.request.max_model_len,
        embedding_policies=policies,
    )


def adapter_mode(options: ServeOptions, inputs: ServeInputs) -> ModeDecision:
    if inputs.model is None:
        raise ModelError(
            f"{inputs.model_arg} is not a local folder; adapters need the base's folder to be checked against"
        )
    return decide_mode([a.report for a in inputs.adapters], options.mode, all_traffic=options.adapter_only)


def planned_args(
    options: ServeOptions,
    inputs: ServeInputs,
    model: ModelInfo | None,
    mounted: list[ServedAdapter],
    served_name: str,
    notes: list[str],
) -> tuple[list[str], dict[str, str], ServePlan | None]:
    """The plan's vLLM arguments and environment, and the notes that explain them."""
    environ, build = inputs.environ, inputs.build
    if model is None:
        notes.append(
            f"{inputs.model_arg} is not a local folder: no plan (lcserve reads config.json to plan); "
            "your explicit settings go to vLLM as they are"
        )
        args = [
            a
            for option, value in (
                ("--max-model-len", options.request.max_model_len),
                ("--max-num-seqs", options.request.max_num_seqs),
            )
            if value is not None
            for a in (option, str(value))
        ]
        env = {}
        plan = None
    elif model.pooling is not None:
        plan = plan_pooling(
            inputs.profile, model, plan_request(options, inputs), options.embedding_policy, options.training_len
        )
        args, env = plan.vllm_args(), {k: v for k, v in plan.env.items() if k not in environ}
        notes += plan.summary()
        if mounted:  # vLLM 0.32's BertEmbeddingModel declares SupportsLoRA; it gave PEFT's vectors here
            rank = max(a.report.max_lora_rank or 16 for a in mounted)
            args += options_to_args(lora_options(len(mounted), rank))
            args += lora_modules_args([(a.name, a.report) for a in mounted], served_name)
    else:
        plan = plan_deployment(inputs.profile, model, [a.adapter for a in mounted], plan_request(options, inputs))
        if build == "cpu" and not plan.profile.is_cpu:
            raise PlanError(
                f"--profile {options.profile} is a GPU profile but this machine runs vLLM's CPU build; "
                "serve with --profile auto (or cpu), and plan for other hardware with "
                "`lcserve deploy plan --profile`"
            )
        args = plan.vllm_args()
        if mounted:  # the plan sizes LoRA capacity; the adapters themselves are named here
            args += lora_modules_args([(a.name, a.report) for a in mounted], served_name)
        env = {k: v for k, v in plan.env.items() if k not in environ}
        if mounted and build == "cpu" and CPU_LORA_ENV not in environ:
            env[CPU_LORA_ENV] = SEGMENTED
            notes.append(
                f"{CPU_LORA_ENV}={SEGMENTED}: one matrix product per run of tokens instead of vLLM's "
                "per-token weight copies (benchmarks/bench_cpu_lora.py measures both; =stock restores "
                "vLLM's)"
            )
        notes += plan_summary(plan, environ)
    if CPU_KV_CACHE_ENV in environ and build == "cpu":
        notes.append(f"{CPU_KV_CACHE_ENV}={environ[CPU_KV_CACHE_ENV]} GiB (from the environment)")
    if options.request.gpu_memory_utilization is not None:
        if build == "cpu":
            notes.append(
                "--gpu-memory-utilization is ignored on the CPU build: the KV cache is sized by VLLM_CPU_KVCACHE_SPACE"
            )
        elif plan is None:
            args += ["--gpu-memory-utilization", str(options.request.gpu_memory_utilization)]
    return args, env, plan


def take_planned_flags(options: ServeOptions) -> ServeOptions:
    """The options with the plan's own flags moved from the passed-through vLLM arguments into the request."""
    request, rest = take_vllm_args(options.request, options.vllm_args)
    return dataclasses.replace(options, request=request, vllm_args=rest)


def plan_request(options: ServeOptions, inputs: ServeInputs) -> PlanRequest:
    """The planner's request: the user's explicit values, and a KV cache size the environment fixes."""
    fixed_gib = cpu_kv_cache_space(inputs.environ) if inputs.profile.is_cpu else None
    return dataclasses.replace(options.request, kv_cache_gib=fixed_gib)


def plan_summary(plan: ServePlan, environ: dict[str, str]) -> list[str]:
    lines = [
        f"plan ({plan.profile.name}): max_model_len {plan.max_model_len}, max_num_seqs {plan.max_num_seqs}, "
        f"KV cache {plan.kv_tokens:,} tokens = {plan.max_concurrency:.2f} requests at full context; "
        f"all {plan.max_num_seqs} sequences fit at once up to about {plan.max_num_seqs_fit_len:,} tokens each "
        "(`lcserve deploy plan` explains every number)"
    ]
    if plan.speed:
        lines.append(plan.speed["summary"])
    lines += [
        f"{k}={v}: {r.why}" for k, v in plan.env.items() for r in plan.reasons if r.setting == k and k not in environ
    ]
    return lines + [f"warning: {w}" for w in plan.warnings]
