"""The flag tripwire: for every target and topology, the vLLM flags that reach the engine equal the
plan's, one for one. KServe once dropped --tensor-parallel-size on one path (kserve/kserve#5773); a
renderer that drops, adds or repeats a flag fails here, whichever target it is.

Written once, over all targets. What reaches vLLM is read as the cluster would run it:
- k8s, kserve, compose: the container runs `lcserve serve`; its argv, with the pod's paths mapped to
  this machine, runs as `lcserve serve --dry-run`, which prints the vLLM command it would start;
- lws: the leader's vLLM command, and with the mp executor each worker's, parsed out of the YAML;
- production-stack: the chart's own template applied to the values (`chart_argv`, transcribed from
  vllm-project/production-stack helm/templates/deployment-vllm-multi.yaml at f1f9822).
Expected: `deploy plan --json`'s vllm_args, the adapters' --lora-modules; with --executor, that executor
in the place of the plan's backend.
"""

from __future__ import annotations

import json
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from lcserve import embedded as emb
from lcserve.cli import cli
from lcserve.deploy.pods import ADAPTER_ROOT, API_KEY_FILE, MODEL_DIR, PROFILE_FILE
from lcserve.deploy.targets import HEADLESS, TARGETS
from tests.unit.test_adapters_inspect import write_adapter
from tests.unit.test_deploy_parallel import LLAMA_70B
from tests.unit.test_serve_dry_run_pinned import PINNED_CPU

IDENTITY = {"--model", "--served-model-name", "--host", "--port", "--uds"}  # where the engine is, not how
MULTI_NODE = {"--nnodes", "--node-rank", "--master-addr", "--master-port", "--headless"}  # the mp executor's own
CHART_ADAPTERS = "/data/adapters"  # production-stack mounts its volume at /data


@dataclass(frozen=True)
class Case:
    id: str
    model: str  # a key of the `inputs` fixture
    args: tuple[str, ...]
    adapter: bool
    targets: tuple[str, ...]
    executor: str | None = None


ONE_NODE = ("k8s", "kserve", "production-stack", "compose")
POOLING = ("k8s", "kserve", "compose")
L40S = ("--profile", "l40s")
H100_NODES = ("--profile", "h100-80gb", "--gpus", "8", "--nodes", "2")  # TP 8 x PP 2, a stage per node
CASES = [
    Case("1gpu", "gemma", (*L40S, "--gpus", "1"), False, ONE_NODE),
    Case("1gpu-lora", "gemma", (*L40S, "--gpus", "1"), True, ONE_NODE),
    Case("tp2", "gemma", (*L40S, "--gpus", "2", "--tp", "2"), False, ONE_NODE),
    Case("tp2-lora", "gemma", (*L40S, "--gpus", "2", "--tp", "2", "--max-model-len", "8192"), True, ONE_NODE),
    Case("cpu", "gemma", ("--profile", "cpu-pinned", "--max-num-seqs", "8", "--kv-cache-gib", "2"), False, ONE_NODE),
    Case("cpu-tp2-lora", "gemma", ("--profile", "cpu-pinned", "--tp", "2"), True, ONE_NODE),
    Case("tp8xpp2-ray", "llama70b", H100_NODES, False, ("lws",), "ray"),
    Case("tp8xpp2-ray-lora", "llama70b", H100_NODES, True, ("lws",), "ray"),
    Case("tp8xpp2-mp", "llama70b", H100_NODES, False, ("lws",), "mp"),
    Case("tp8xpp2-mp-lora", "llama70b", (*H100_NODES, "--max-model-len", "16384"), True, ("lws",), "mp"),
    Case("embedding-1gpu", "minilm", L40S, False, POOLING),
    Case("embedding-512", "minilm", (*L40S, "--max-model-len", "512"), False, POOLING),  # --hf-overrides
    Case("embedding-cpu", "minilm", ("--profile", "cpu-pinned"), False, POOLING),
]
RUNS = [(c, t) for c in CASES for t in c.targets]


@pytest.fixture(scope="module")
def inputs(embedded_model_dir, demo_adapter, tmp_path_factory) -> dict:
    """Models (folder), their adapter (served name, folder), and the pinned CPU profile file."""
    root = tmp_path_factory.mktemp("flags")
    llama = root / "llama-70b"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps(LLAMA_70B))
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    ops = write_adapter(root / "ops", {"r": 16}, {f"{q}.lora_A.weight": (16, 8192), f"{q}.lora_B.weight": (8192, 16)})
    writer = shutil.copytree(demo_adapter, root / "adapters" / "writer")
    profile = root / "cpu-pinned.yaml"
    profile.write_text(yaml.safe_dump(PINNED_CPU))
    return {
        "gemma": (embedded_model_dir, writer),
        "llama70b": (llama, ops),
        "minilm": (emb.embedding_model_path(), None),
        "profile": profile,
        "root": root,
        "pod plans": [],
    }


def case_args(case: Case, inputs: dict) -> list[str]:
    model, adapter = inputs[case.model]
    args = [a if a != "cpu-pinned" else str(inputs["profile"]) for a in case.args]
    return ["--model", str(model), *args, *(["--adapter", str(adapter)] if case.adapter else [])]


def pairs(argv: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """vLLM arguments as (flag, values) in order: a flag owns the words up to the next flag. Flags are
    compared as vLLM reads them (`--max_loras` is `--max-loras`); JSON values by their content."""
    out: list[tuple[str, tuple[str, ...]]] = []
    for a in argv:
        if a.startswith("--"):
            name, eq, value = a.partition("=")
            out.append(("--" + name[2:].replace("_", "-"), (value,) if eq else ()))
        else:
            out[-1] = (out[-1][0], (*out[-1][1], canonical(a)))
    return out


def canonical(value: str) -> str:
    return json.dumps(json.loads(value), sort_keys=True) if value.startswith("{") else value


def engine_flags(argv: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """The flags that say how vLLM runs: its argv without where the engine is, and without the mp
    executor's node flags (`test_deploy_render` checks those)."""
    return sorted(p for p in pairs(argv) if p[0] not in IDENTITY | MULTI_NODE)


def chart_argv(spec: dict) -> list[str]:
    """vllm-stack's container command for one modelSpec, as its template writes it (transcribed)."""
    argv = ["--host", "0.0.0.0", "--port", "8000"]  # after `vllm serve MODEL_URL`
    argv += ["--enable-lora"] if spec.get("enableLoRA") else []
    config = spec.get("vllmConfig", {})
    if "enableChunkedPrefill" in config:
        argv.append("--enable-chunked-prefill" if config["enableChunkedPrefill"] else "--no-enable-chunked-prefill")
    argv.append("--enable-prefix-caching" if config.get("enablePrefixCaching") else "--no-enable-prefix-caching")
    for key, flag in (
        ("maxModelLen", "--max-model-len"),
        ("dtype", "--dtype"),
        ("tensorParallelSize", "--tensor-parallel-size"),
        ("maxNumSeqs", "--max-num-seqs"),
        ("gpuMemoryUtilization", "--gpu_memory_utilization"),
        ("maxLoras", "--max_loras"),
    ):
        if key in config:
            argv += [flag, str(config[key])]
    return argv + [str(a) for a in config.get("extraArgs", [])]


def dry_run(serve_argv: list[str], env: dict, profile_text: str, inputs: dict, case: Case) -> list[str]:
    """The vLLM command `lcserve serve` starts for a pod's argv and environment, the pod's paths mapped here
    and back. The plan `serve` made on the pod goes into inputs["pod plans"]."""
    model, adapter = inputs[case.model]
    profile, key = inputs["root"] / f"{case.id}-profile.yaml", inputs["root"] / "api-key"
    profile.write_text(profile_text)
    key.write_text("k\n")
    here = {MODEL_DIR: str(model), ADAPTER_ROOT: str(inputs["root"] / "adapters"), PROFILE_FILE: str(profile)}
    here[API_KEY_FILE] = str(key)

    def mapped(text: str, pairs_: dict) -> str:
        for a, b in sorted(pairs_.items(), key=lambda kv: -len(kv[0])):
            text = text.replace(a, b)
        return text

    assert serve_argv[:2] == ["lcserve", "serve"], serve_argv
    args = [mapped(a, here) for a in serve_argv[2:]]
    unset = dict.fromkeys(("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "LCSERVE_CPU_LORA_OPS"))
    env = unset | {"LCSERVE_HOME": str(inputs["root"] / "home"), **env}
    r = CliRunner().invoke(cli, ["serve", args[0], "--dry-run", *args[1:]], env=env)
    assert r.exit_code == 0, r.output
    launch = json.loads(r.stdout)
    inputs["pod plans"].append(launch["plan"])
    command = launch["command"]
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"], command
    return [mapped(a, {v: k for k, v in here.items()}) for a in command[3:]]


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def reaching_vllm(target: str, out: Path, inputs: dict, case: Case) -> dict[str, list[str]]:
    """Container -> the vLLM arguments it starts the engine with, read out of the rendered files."""
    docs = [d for f in sorted(out.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    kinds = {d.get("kind"): d for d in docs}
    profile = next((d["data"]["profile.yaml"] for d in docs if d.get("kind") == "ConfigMap" and "profile.yaml"
                    in d.get("data", {})), None)  # fmt: skip
    if target == "k8s":
        container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
        return {"lcserve": dry_run(container["command"], env_of(container), profile, inputs, case)}
    if target == "kserve":
        container = kinds["InferenceService"]["spec"]["predictor"]["containers"][0]
        return {"kserve-container": dry_run(container["command"], env_of(container), profile, inputs, case)}
    if target == "compose":
        service = yaml.safe_load((out / "compose.yaml").read_text())["services"]["lcserve"]
        argv = [*service["entrypoint"], *service["command"]]
        env = service.get("environment", {})
        return {"lcserve": dry_run(argv, env, (out / "profile.yaml").read_text(), inputs, case)}
    if target == "production-stack":
        (spec,) = yaml.safe_load((out / "values.yaml").read_text())["servingEngineSpec"]["modelSpec"]
        return {"vllm": chart_argv(spec)}
    assert target == "lws", target
    group = kinds["LeaderWorkerSet"]["spec"]["leaderWorkerTemplate"]
    found = {}
    for role in ("leaderTemplate", "workerTemplate"):
        for c in group[role]["spec"]["containers"]:
            command = c["command"]
            if command[:2] == ["sh", "-c"] and "exec " in command[2]:  # ray: the Ray head, then the server
                command = shlex.split(command[2].split("exec ", 1)[1])
            if command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"] or command[1:3] == ["-c", HEADLESS]:
                found[c["name"]] = command[3:]
    return found


def expected_flags(case: Case, target: str, inputs: dict) -> list[tuple[str, tuple[str, ...]]]:
    """The plan's vLLM arguments (`deploy plan --json`), the adapter's --lora-modules, and what a target
    states on purpose beside them."""
    r = CliRunner().invoke(cli, ["deploy", "plan", *case_args(case, inputs), "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    inputs["plan"] = plan
    argv = list(plan["vllm_args"])
    if case.executor:  # `render --executor`: the chosen executor in the place of the plan's backend
        argv[argv.index("--distributed-executor-backend") + 1] = case.executor
    served = emb.EMBEDDING_SERVED_NAME if case.model == "minilm" else Path(plan["model"]).name
    if case.adapter:
        name = inputs[case.model][1].name
        root = CHART_ADAPTERS if target == "production-stack" else ADAPTER_ROOT
        argv += ["--lora-modules", json.dumps({"name": name, "path": f"{root}/{name}", "base_model_name": served})]
    if target == "production-stack":
        argv.append("--enable-prefix-caching")  # vLLM's default, stated: the chart would write --no-... otherwise
    if PINNED_CPU["name"] in plan["profile"] and target in ("k8s", "kserve", "compose"):
        argv.append("--enforce-eager")  # `lcserve serve` on vLLM's CPU build (serving/launch.py), not the planner
    return sorted(pairs(argv))


@pytest.mark.parametrize("case, target", RUNS, ids=[f"{c.id}-{t}" for c, t in RUNS])
def test_the_flags_reaching_vllm_are_the_plans(case, target, inputs, tmp_path):
    executor = ["--executor", case.executor] if case.executor else []
    out = tmp_path / target
    r = CliRunner().invoke(
        cli, ["deploy", "render", *case_args(case, inputs), "--target", target, *executor, "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    expected = expected_flags(case, target, inputs)
    inputs["pod plans"].clear()
    found = reaching_vllm(target, out, inputs, case)
    roles = {"lws": {"vllm-leader", "vllm-worker"} if case.executor == "mp" else {"vllm-leader"}}
    assert set(found) == roles.get(target, set(found)) and found, found
    for container, argv in found.items():
        assert engine_flags(argv) == expected, f"{target} {container}"
    for pod_plan in inputs["pod plans"]:  # `lcserve serve` planned on the pod: the same KV cache, environment
        same = ("kv_cache_tokens", "env")
        assert {k: pod_plan[k] for k in same} == {k: inputs["plan"][k] for k in same}, target


def test_every_target_and_topology_is_covered():
    """Every rendering target with a plan has cases; 12 topologies at least, embedding models among them."""
    assert {t for _, t in RUNS} == set(TARGETS) - {"dockerfile"}
    assert len(CASES) >= 12 and {c.model for c in CASES} >= {"gemma", "llama70b", "minilm"}
    assert {c.executor for c in CASES} == {None, "ray", "mp"} and any(c.adapter for c in CASES)


def test_the_embedding_policies_are_serves():
    """`deploy render --embedding-policy` offers what `lcserve serve --embedding-policy` takes."""
    from lcserve.deploy.pooling import EMBEDDING_POLICIES
    from lcserve.serving.embeddings import POLICIES

    assert EMBEDDING_POLICIES == POLICIES
