"""Renderings of a ServePlan: a human table with reasons, vLLM's YAML `--config`, shell lines."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table
from rich.text import Text

from lcserve.vllm_rules import option_args

from .hardware import GIB, SHIPPED_DIR, Profile
from .plan import ServePlan
from .settings import BY_NAME, SCRIPT_ARGUMENTS, SETTINGS


class YamlDumper(yaml.SafeDumper):
    """The writer of every YAML file lcserve renders: no anchors or aliases (a value used twice is
    written twice, so each document reads on its own, as a hand-written one does), and multi-line
    strings (the profile file, the dashboard) as literal blocks, readable in review."""

    def ignore_aliases(self, data) -> bool:
        return True


YamlDumper.add_representer(
    str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style="|" if "\n" in v else None)
)


def to_yaml(data, **options) -> str:
    """`data` as one YAML document, keys in their order (`options`: PyYAML's, e.g. width)."""
    return yaml.dump(data, Dumper=YamlDumper, sort_keys=False, **options)


def to_yaml_documents(docs: list, **options) -> str:
    """Several YAML documents in one file, separated by `---`."""
    return yaml.dump_all(docs, Dumper=YamlDumper, sort_keys=False, **options)


def vllm_config_yaml(plan: ServePlan) -> str:
    """A vLLM `--config` file (long option names as keys; vLLM adds model/port from the command line)."""
    return to_yaml(plan.vllm_options())


def env_lines(plan: ServePlan) -> str:
    """Shell assignments for scripts: `eval "$(lcserve deploy plan ... --format env)"`, one per serve_vllm.sh
    argument the plan sets."""
    lines = [f"{s.positional}={_script_value(plan, s.name)}" for s in SETTINGS if s.positional]
    lines.append(f"VLLM_PLAN_ARGS={shlex.quote(plan.shell_args())}")
    lines += [f"export {k}={shlex.quote(v)}" for k, v in plan.env.items()]
    return "\n".join(lines)


def serve_line(plan: ServePlan, port: int = 8000, passthrough: tuple[str, ...] = ()) -> str:
    """The `./serve_vllm.sh MODEL PORT MAX_NUM_SEQS MAX_MODEL_LEN GPU_MEM_UTIL -- ...` line."""
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in plan.env.items())
    positional = {BY_NAME[name].vllm_flag[2:] for name in SCRIPT_ARGUMENTS}
    rest = [a for key, value in plan.vllm_options().items() if key not in positional for a in option_args(key, value)]
    rest += passthrough
    values = [shlex.quote(str(plan.model.path)), str(port), *(_script_value(plan, n) for n in SCRIPT_ARGUMENTS)]
    line = "./serve_vllm.sh " + " ".join(values) + (" -- " + shlex.join(rest) if rest else "")
    return f"{env} {line}" if env else line


def _script_value(plan: ServePlan, name: str) -> str:
    value = getattr(plan, name)
    return "auto" if value is None else str(value)


def print_plan(plan: ServePlan, console: Console, port: int = 8000, passthrough: tuple[str, ...] = ()) -> None:
    m, p = plan.model, plan.profile
    console.print(
        Text.assemble(
            ("Plan ", "bold"),
            f"{m.path.name} ({m.architecture}, {m.param_count / 1e6:.0f}M params, "
            f"{m.attention_summary}) on {p.count} x {p.display_name or p.name} ",
            (f"[{p.source}]", "dim"),
        )
    )
    console.print(
        Text.assemble(
            "  max_model_len ",
            (str(plan.max_model_len), "bold"),
            ", KV capacity ",
            (f"{plan.kv_tokens:,}", "bold"),
            " tokens, max concurrency at full context ",
            (f"{plan.max_concurrency:.2f}x", "bold"),
        )
    )
    if plan.ranks > 1 or plan.replicas > 1:
        console.print(
            Text.assemble(
                "  TP ",
                (str(plan.tensor_parallel_size), "bold"),
                " x PP ",
                (str(plan.pipeline_parallel_size), "bold"),
                f" on {plan.nodes} node(s), ",
                (str(plan.replicas), "bold"),
                " replica(s); memory per device below",
            )
        )
    for r in plan.reasons:
        console.print(Text.assemble("  ", (r.setting, "bold cyan"), " = ", (r.value, "bold")))
        console.print(Text("      " + r.why, style="dim"))
    mem = Table(title="memory per device", header_style="bold", title_justify="left")
    mem.add_column("part")
    mem.add_column("GiB", justify="right")
    for k, v in plan.memory.items():
        mem.add_row(k.replace("_", " "), f"{v / GIB:.2f}")
    console.print(mem)
    for w in plan.warnings:
        console.print(Text.assemble(("warning: ", "yellow"), w))
    env = " ".join(f"{k}={v}" for k, v in plan.env.items())
    console.print(
        Text.assemble(
            ("vLLM arguments: ", "bold"), (env + " " if env else "") + shlex.join([*plan.vllm_args(), *passthrough])
        ),
        soft_wrap=True,
    )
    console.print(Text.assemble(("serve_vllm.sh: ", "bold"), serve_line(plan, port, passthrough)), soft_wrap=True)


def print_profiles(profiles: list[Profile], detected: Profile, console: Console) -> None:
    """The profiles table. Names are what users copy into --profile: never cut; the other columns
    wrap to fit the terminal."""
    table = Table(header_style="bold")
    table.add_column("name", no_wrap=True, min_width=max((len(p.name) for p in profiles), default=4))
    for col in ("kind", "GiB/device", "count", "GB/s", "bf16", "fp8", "interconnect", "source"):
        table.add_column(col, overflow="fold")
    for p in profiles:
        source = "shipped" if Path(p.source).parent == SHIPPED_DIR else p.source
        table.add_row(
            p.name,
            p.kind,
            f"{p.memory_gib:.1f}",
            str(p.count),
            str(p.memory_bandwidth_gbs or "-"),
            _yn(p.bf16),
            _yn(p.fp8),
            p.interconnect or "-",
            source,
        )
    console.print(table)
    console.print(
        Text.assemble(
            "auto -> ",
            (detected.name, "bold"),
            f": {detected.count} x {detected.display_name}, "
            f"{detected.memory_gib:.1f} GiB"
            + (f", {detected.cores} cores" if detected.cores else "")
            + f" ({detected.source})",
        )
    )


def _yn(flag: bool) -> str:
    return "yes" if flag else "no"
