"""Every planning setting declared once, as vLLM's config dataclasses declare theirs.

A `Setting` names a field of `PlanRequest` in vLLM's words and says everything the commands need:
its flags (the first shown, the rest older spellings kept hidden), type and range, help, whether
vLLM takes it (then `-- --flag VALUE` passed through to vLLM is planned with, not appended after
the plan), whether only the cluster commands take it, and how `serve_vllm.sh` or the environment
spell it. From the declarations come the options of `deploy plan|render|check` and `serve`, the
reader of passed-through vLLM arguments, the value checks, and how each command words an error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import click

from lcserve.errors import PlanError
from lcserve.options import RenamedOption
from lcserve.vllm_rules import KV_CACHE_DTYPES, human_readable_int

from .inputs import CPU_KV_CACHE_ENV
from .plan_types import TRAINING_RATIO_WARN, PlanRequest

SERVE, DEPLOY = "serve", "deploy"  # the commands that plan: `lcserve serve` and `lcserve deploy plan|render|check`
# serve_vllm.sh's settings after MODEL and PORT, in its order (each declared below with its `positional` name)
SCRIPT_ARGUMENTS = ("max_num_seqs", "max_model_len", "gpu_memory_utilization")


@dataclass(frozen=True)
class Setting:
    name: str  # the PlanRequest field: vLLM's name where vLLM has the setting
    flags: tuple[str, ...]  # the option; later ones are older spellings, hidden from the help
    type: click.ParamType
    help: str
    vllm: bool = False  # vLLM takes it: a passed-through value is planned with instead of appended
    commands: tuple[str, ...] = (SERVE, DEPLOY)  # the planning commands with this option
    default: object = None
    minimum: float | None = None  # values below are refused by `check_values` (None: no bound)
    above: bool = False  # the value must be strictly above `minimum`
    invalid: str = "must be at least 1"  # what `check_values` says of a value out of range
    positional: str | None = None  # serve_vllm.sh's name for it
    env: str | None = None  # `serve` reads it from this variable instead of an option
    parse: Callable[[str], object] | None = None  # a passed-through value (default: the type's conversion)

    @property
    def flag(self) -> str:
        return self.flags[0]

    @property
    def vllm_flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def option(self):
        return click.option(
            *self.flags,
            self.name,
            cls=RenamedOption,
            type=self.type,
            default=self.default,
            show_default=self.default is not None,
            help=self.help,
        )

    def read(self, text: str):
        """A passed-through vLLM value; ValueError when vLLM would refuse it too."""
        if self.parse:
            return self.parse(text)
        try:
            return self.type.convert(text, None, None)
        except click.BadParameter as e:
            raise ValueError(str(e)) from None


def _max_model_len(text: str) -> int | None:
    """vLLM's "auto" (or -1) is the largest length that fits: what the planner picks when unset."""
    return None if text.strip() in ("auto", "-1") else human_readable_int(text)


POSITIVE = click.IntRange(min=1)
SETTINGS: tuple[Setting, ...] = (
    Setting(
        "max_model_len",
        ("--max-model-len", "--context"),
        POSITIVE,
        "Context window in tokens (default: the model's derived maximum, or the largest that fits).",
        vllm=True,
        minimum=1,
        invalid="must be a positive number of tokens",
        positional="MAX_MODEL_LEN",
        parse=_max_model_len,
    ),
    Setting(
        "max_num_seqs",
        ("--max-num-seqs",),
        POSITIVE,
        "vLLM's cap on sequences in one batch (default: vLLM's own for the device). A cap, not a "
        "promise: the plan says how many fit at full length and at what length all of them fit.",
        vllm=True,
        minimum=1,
        positional="MAX_NUM_SEQS",
    ),
    Setting(
        "full_context_requests",
        ("--full-context-requests", "--concurrency"),
        POSITIVE,
        "Requests of max_model_len the KV cache must hold at once: refused when they cannot fit (default 1; "
        "the CPU build sizes its cache for the profile's default_concurrency).",
        minimum=1,
    ),
    Setting(
        "gpu_memory_utilization",
        ("--gpu-memory-utilization",),
        click.FloatRange(0, 1, min_open=True),
        "Fraction of GPU memory vLLM may use, in (0, 1] (default: the planner's for the profile; GPU only).",
        vllm=True,
        positional="GPU_MEM_UTIL",
    ),
    Setting(
        "max_num_batched_tokens",
        ("--max-num-batched-tokens",),
        POSITIVE,
        "Tokens vLLM schedules in one step (default: vLLM's for the device); a sliding-window layer holds "
        "window - 1 + this many tokens of each request.",
        vllm=True,
        minimum=1,
        parse=human_readable_int,
    ),
    Setting(
        "block_size",
        ("--block-size",),
        POSITIVE,
        "Tokens per KV-cache block (default: what vLLM picks for the device and model).",
        vllm=True,
        minimum=1,
    ),
    Setting(
        "kv_cache_dtype",
        ("--kv-cache-dtype", "--kv-dtype"),
        click.Choice(list(KV_CACHE_DTYPES)),
        "KV cache dtype; fp8 halves a bf16 cache.",
        vllm=True,
        default="auto",
    ),
    Setting(
        "tensor_parallel_size",
        ("--tensor-parallel-size", "--tp"),
        POSITIVE,
        "Tensor-parallel size. Default: the smallest that fits.",
        vllm=True,
        minimum=1,
    ),
    Setting(
        "pipeline_parallel_size",
        ("--pipeline-parallel-size", "--pp"),
        POSITIVE,
        "Pipeline-parallel size (default: --nodes, one stage per node).",
        vllm=True,
        minimum=1,
    ),
    Setting(
        "nodes",
        ("--nodes",),
        POSITIVE,
        "Nodes per replica, each with --gpus GPUs: TP within a node, one pipeline stage per node.",
        commands=(DEPLOY,),
        default=1,
        minimum=1,
    ),
    Setting(
        "target_concurrency",
        ("--target-concurrency",),
        POSITIVE,
        "Requests of max_model_len to serve at once over all replicas: sets the replica count.",
        commands=(DEPLOY,),
        minimum=1,
    ),
    Setting(
        "rope_scaling",
        ("--rope-scaling",),
        click.Choice(["yarn"]),
        "Allow --max-model-len above the model's maximum by YaRN (passed as --hf-overrides).",
    ),
    Setting(
        "kv_cache_gib",
        ("--kv-cache-gib",),
        click.INT,
        "CPU: fix VLLM_CPU_KVCACHE_SPACE (GiB) instead of sizing it.",
        commands=(DEPLOY,),
        env=CPU_KV_CACHE_ENV,
    ),
    Setting(
        "training_ratio_warn",
        ("--training-ratio-warn", "--train-ratio-warn"),
        click.FLOAT,
        "Warn when max_model_len / training length exceeds this.",
        default=TRAINING_RATIO_WARN,
    ),
    Setting(
        "slo_ttft_ms",
        ("--slo-ttft-ms",),
        click.FLOAT,
        "Median time to first token to meet (ms): the plan chooses max_num_seqs (and, with "
        "--target-concurrency, the replicas) from its speed model, or refuses with the best achievable.",
        minimum=0,
        above=True,
        invalid="a latency target must be above 0 ms",
    ),
    Setting(
        "slo_itl_ms",
        ("--slo-itl-ms",),
        click.FLOAT,
        "Median inter-token latency to meet (ms); see --slo-ttft-ms.",
        minimum=0,
        above=True,
        invalid="a latency target must be above 0 ms",
    ),
    Setting(
        "expected_prompt_len",
        ("--expected-prompt-len",),
        click.INT,
        "Prompt tokens of the load the speed predictions are for (default: the adapter's training "
        "length, else min(1024, max_model_len / 2)).",
        minimum=1,
    ),
    Setting(
        "expected_output_len",
        ("--expected-output-len",),
        click.INT,
        "Output tokens of that load (default 128).",
        minimum=1,
    ),
)


def check_declarations(settings: tuple[Setting, ...]) -> dict[str, Setting]:
    """The settings by name; ValueError when a name or a flag is declared twice, or a name is not a
    PlanRequest field."""
    fields = {f.name for f in dataclasses.fields(PlanRequest)}
    owner: dict[str, str] = {}
    for s in settings:
        if s.name not in fields:
            raise ValueError(f"setting {s.name} is not a PlanRequest field")
        for key in {s.name, *s.flags, *([s.vllm_flag] if s.vllm else [])}:
            if key in owner:
                raise ValueError(f"{key} is declared twice: by {owner[key]} and by {s.name}")
            owner[key] = s.name
    return {s.name: s for s in settings}


# The vLLM flags the plan sets from its inputs rather than from a setting: what decides each. Passed
# through, they reach vLLM after the plan's and win, as every other vLLM argument does.
DERIVED_FLAGS = {
    "--dtype": "the model's dtype, or bfloat16 where the device lacks it",
    "--distributed-executor-backend": "mp within one node, ray across nodes",
    "--enable-lora": "adapters to mount",
    "--max-loras": "the number of adapters",
    "--max-lora-rank": "the adapters' largest rank, rounded up to a rank vLLM allows",
    "--max-cpu-loras": "the number of adapters (vLLM's default, stated)",
    "--lora-target-modules": "the modules the adapters wrap",
    "--hf-overrides": "--rope-scaling yarn: the YaRN factor for max_model_len",
}
BY_NAME = check_declarations(SETTINGS)
VLLM_FLAGS = {s.vllm_flag: s for s in SETTINGS if s.vllm}  # passed-through vLLM flags the plan takes
if set(VLLM_FLAGS) & set(DERIVED_FLAGS):
    raise ValueError(f"declared both as a setting and as derived: {sorted(set(VLLM_FLAGS) & set(DERIVED_FLAGS))}")


# --- what is generated from the declarations ---------------------------------------------------------


def options(command: str):
    """The settings' options for `command` (SERVE or DEPLOY), in declaration order."""

    def decorate(f):
        for s in reversed(SETTINGS):
            if command in s.commands and not (command == SERVE and s.env):
                f = s.option()(f)
        return f

    return decorate


def argument_names(command: str, positional: bool = False) -> dict[str, str]:
    """How `command` names each setting in its errors: the option its user typed, the variable
    `serve` reads instead, or serve_vllm.sh's positional name."""
    names = {}
    for s in SETTINGS:
        name = s.env if command == SERVE and s.env else s.flag
        names[s.name] = (s.positional or name) if positional else name
    return names


def take_vllm_args(request: PlanRequest, args: tuple[str, ...]) -> tuple[PlanRequest, tuple[str, ...]]:
    """Move the planned settings out of the passed-through vLLM arguments into the request (vLLM would
    take their last value and the plan's figures would describe another engine); PlanError when one
    contradicts the same setting given to lcserve. Returns the request and the arguments left for vLLM."""
    rest, taken, args, i = [], {}, list(args), 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        flag = name.replace("_", "-") if name.startswith("--") else name
        if flag not in VLLM_FLAGS:
            rest.append(args[i])
            i += 1
            continue
        if not eq:
            if i + 1 >= len(args):
                raise PlanError(f"the passed-through vLLM argument {flag} has no value; give one, e.g. {flag} 4096")
            value, i = args[i + 1], i + 1
        setting = VLLM_FLAGS[flag]
        try:
            parsed = setting.read(value)
        except ValueError:
            raise PlanError(
                f"the passed-through vLLM argument {flag} {value!r} is not a valid value; vLLM would refuse it too",
                setting.name,
            ) from None
        own = getattr(request, setting.name)
        if own not in (None, setting.default) and parsed is not None and own != parsed:
            raise PlanError(
                f"{{{setting.name}}} {own} and the passed-through vLLM argument {flag} {value} disagree; give "
                "it once (vLLM would take the last one, and the plan would describe another engine)",
                setting.name,
            )
        taken[setting.name] = parsed if parsed is not None else own
        i += 1
    return dataclasses.replace(request, **taken), tuple(rest)


def check_values(request: PlanRequest) -> None:
    """Each setting within its declared range or choices; PlanError naming the first that is not."""
    for s in SETTINGS:
        value = getattr(request, s.name)
        if value is None:
            continue
        if isinstance(s.type, click.Choice) and value not in s.type.choices:
            raise PlanError(f"{{{s.name}}} {value}: choose one of {', '.join(s.type.choices)}", s.name)
        if s.minimum is not None and (value < s.minimum or (s.above and value == s.minimum)):
            shown = value if isinstance(value, int) else f"{value:g}"
            raise PlanError(f"{{{s.name}}} {shown}: {s.invalid}", s.name)
