"""What every pod of a rendering shares: the `lcserve serve` command, volumes, probes, resources, the
monitoring and autoscaling objects, and the plan's reasons as comments. deploy/targets.py assembles them
into each target's files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lcserve.model_facts import GIB, cdiv

from . import estimates as est
from .hardware import profile_document
from .plan import Reason, ServePlan
from .pooling import PoolingPlan
from .render import to_yaml, to_yaml_documents
from .settings import SERVE, SETTINGS

Plan = ServePlan | PoolingPlan  # an embedding model's plan renders as a generative one does, on one device
PARALLEL = ("tensor_parallel_size", "pipeline_parallel_size")  # 1 is every plan's default: not written

PORT = 8000  # the gateway (lcserve serve) in every pod
ENGINE_SOCKET = "/run/lcserve/vllm.sock"  # vLLM behind the gateway where a rendering starts it (LWS leader)
MODEL_DIR = "/models/model"
ADAPTER_ROOT = "/models/adapters"
PROFILE_FILE = "/etc/lcserve/profile/profile.yaml"
API_KEY_FILE = "/etc/lcserve/api-key/api-key"
# /dev/shm: NCCL (GPU) and the CPU build's shared-memory all-reduce need more than the runtime's 64 MiB.
SHM_SIZE = {"gpu": "16Gi", "cpu": "2Gi"}
PRESTOP_SECONDS = 15  # endpoints stop sending new requests before SIGTERM reaches the gateway
DRAIN_SECONDS = 300  # in-flight streams of long-context requests finish within this
PROBE_PERIOD_SECONDS = 10
# KEDA scales on the gateway's saturation figure (serving/capacity.py: the largest of KV usage, requests
# queued per request running, and observed ITL over 1.5x the plan's): summed over replicas, one replica
# per SCALE_SATURATION of it, so replicas are added before any of them reaches 1.0 (saturated).
SCALE_SATURATION = 0.8


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
    vllm_args: tuple[str, ...] = ()  # the user's vLLM arguments after the plan's (`deploy render -- ...`)
    executor: str | None = None  # --target lws: "ray" or "mp" (None: targets.default_executor)


# --- what every pod shares ---------------------------------------------------------------------


def header(plan: Plan, title: str) -> str:
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


def node_weight_bytes(plan: Plan) -> int:
    """Weights one node reads from the volume at start."""
    return plan.memory["weights"] * max(plan.gpus_per_node, 1)


def startup_failures(plan: Plan) -> int:
    """Startup probe periods before the pod is restarted: twice the estimated load time."""
    return cdiv(2 * est.load_seconds(node_weight_bytes(plan)), PROBE_PERIOD_SECONDS)


def cluster_reasons(plan: Plan) -> list[Reason]:
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


def dump(plan: Plan, title: str, docs: list[dict]) -> str:
    return header(plan, title) + to_yaml_documents(docs, width=1000)


def labels(release: Release) -> dict[str, str]:
    return {"app.kubernetes.io/name": release.name, "app.kubernetes.io/part-of": "lcserve"}


def serve_command(plan: Plan, release: Release) -> list[str]:
    """`lcserve serve` with the plan's own settings as its targets (it plans again on the pod, from the
    same profile file, and refuses anything that no longer fits)."""
    args = ["lcserve", "serve", MODEL_DIR, "--host", "0.0.0.0", "--port", str(PORT), "--profile", PROFILE_FILE]
    args += ["--served-model-name", release.served_model_name]
    for s in SETTINGS:  # every setting vLLM takes, as the plan fixed it: the pod's plan is this one
        value = getattr(plan, s.name, None) if s.vllm and SERVE in s.commands else None
        if value not in (None, s.default) and not (s.name in PARALLEL and value == 1):
            args += [s.flag, str(value)]
    if isinstance(plan, PoolingPlan):  # its --hf-overrides follow from max_model_len on the pod too
        args += ["--embedding-policy", plan.policy]
    elif plan.hf_overrides:
        args += ["--rope-scaling", "yarn"]
    args += ["--api-key-file", API_KEY_FILE]
    for name in release.adapters:
        args += ["--adapter", f"{name}={ADAPTER_ROOT}/{name}"]
    if release.adapters:
        args += ["--mode", "mount", "--allow-adapter-dir", ADAPTER_ROOT]
    return args + (["--", *release.vllm_args] if release.vllm_args else [])


def resources(plan: Plan) -> dict:
    """GPUs: equal requests and limits (extended resources allow nothing else). CPU: the planned cores."""
    if plan.profile.is_cpu:
        cpus = str(plan.profile.cores or 1)
        memory = f"{plan.profile.memory_bytes // GIB}Gi"
        return {"requests": {"cpu": cpus, "memory": memory}, "limits": {"cpu": cpus, "memory": memory}}
    gpus = str(plan.gpus_per_node)
    return {"requests": {"nvidia.com/gpu": gpus}, "limits": {"nvidia.com/gpu": gpus}}


def needs_shm(plan: Plan) -> bool:
    return plan.ranks > 1


def volumes(plan: Plan, release: Release) -> tuple[list[dict], list[dict]]:
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


def probes(plan: Plan) -> dict:
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


def serve_container(plan: Plan, release: Release, name: str = "lcserve", port_name: str = "http") -> dict:
    _, mounts = volumes(plan, release)
    return {
        "name": name,
        "image": release.image,
        "command": serve_command(plan, release),
        # the plan's environment (the CPU build's KV cache space and cores): `serve` plans with it as given
        **({"env": [{"name": k, "value": v} for k, v in plan.env.items()]} if plan.env else {}),
        "ports": [{"name": port_name, "containerPort": PORT}],
        "resources": resources(plan),
        "volumeMounts": mounts,
        **probes(plan),
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SECONDS)]}}},
    }


def pod_spec(plan: Plan, release: Release, containers: list[dict]) -> dict:
    vols, _ = volumes(plan, release)
    return {
        "enableServiceLinks": False,  # a Service named vllm would inject VLLM_PORT=tcp://..., which vLLM misreads
        "terminationGracePeriodSeconds": PRESTOP_SECONDS + DRAIN_SECONDS,
        "containers": containers,
        "volumes": vols,
    }


def profile_configmap(plan: Plan, release: Release) -> dict:
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


def scaled_object(plan: Plan, release: Release, kind: str) -> dict:
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
