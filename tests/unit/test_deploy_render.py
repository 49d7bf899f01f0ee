"""`lcserve deploy render`: every target's files validate offline, and each check fails on a manifest
that breaks it.

Real validation: Kubernetes' own OpenAPI schemas for built-in kinds (PyPI `kubernetes-validate`,
strict: unknown fields fail); typed models generated from the KEDA and prometheus-operator CRDs
(PyPI `cloudcoil-models-keda` / `-prometheus-operator`: a field the model does not know is dropped,
so a document that does not survive the round trip fails); promtool on the PrometheusRule's rules.
Structural (no published schema on a registry here): LeaderWorkerSet and KServe (their pod templates
are checked as Pods by the Kubernetes schemas), production-stack's values (the chart's own fields,
and the flags its template writes), compose and the Dockerfiles.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner
from cloudcoil.models.keda.v1alpha1 import ScaledObject
from cloudcoil.models.prometheus_operator.v1 import PrometheusRule, ServiceMonitor

from lcserve.cli import cli
from lcserve.deploy.targets import STACK_FIELDS
from tests.unit.test_deploy_parallel import LLAMA_70B
from tests.unit.test_readme_commands import LLAMA_3_1_8B

K8S_VERSION = "1.37.0"
CRD_MODELS = {"ScaledObject": ScaledObject, "ServiceMonitor": ServiceMonitor, "PrometheusRule": PrometheusRule}


def render(*args: str, out: Path) -> list[dict]:
    r = CliRunner().invoke(cli, ["deploy", "render", *args, "--out", str(out)])
    assert r.exit_code == 0, r.output
    return [d for f in sorted(out.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


def pruned(value):
    """A document without empty values (what a typed model leaves out when it dumps)."""
    if isinstance(value, dict):
        return {k: pruned(v) for k, v in value.items() if v not in (None, {}, [])}
    if isinstance(value, list):
        return [pruned(v) for v in value]
    return value


def problems(doc: dict) -> list[str]:
    """What is wrong with one rendered document (empty when it validates)."""
    kind = doc.get("kind")
    if kind in CRD_MODELS:
        model = CRD_MODELS[kind].model_validate(doc)
        dumped = model.model_dump(by_alias=True, exclude_none=True, mode="json")
        return [] if pruned(dumped) == pruned(doc) else [f"{kind}: fields the CRD does not define"]
    if kind in ("LeaderWorkerSet", "InferenceService"):
        return [p for pod in pods(doc) for p in problems(pod)]
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{kind}: {e.message}"]
    return [p for pod in pods(doc) for p in pod_problems(pod["spec"])]


def pods(doc: dict) -> list[dict]:
    """The pods a document runs, as Pod documents."""
    spec = doc.get("spec", {})
    if doc["kind"] == "Deployment":
        templates = [spec["template"]]
    elif doc["kind"] == "LeaderWorkerSet":
        group = spec["leaderWorkerTemplate"]
        templates = [group["leaderTemplate"], group["workerTemplate"]]
    elif doc["kind"] == "InferenceService":
        predictor = {k: v for k, v in spec["predictor"].items() if k not in ("minReplicas", "maxReplicas")}
        templates = [{"metadata": {}, "spec": predictor}]
    else:
        return []
    return [
        {"apiVersion": "v1", "kind": "Pod", "metadata": t.get("metadata", {}), "spec": t["spec"]} for t in templates
    ]


def pod_problems(spec: dict) -> list[str]:
    """The facts the issue trackers keep asking about."""
    found = []
    if spec.get("enableServiceLinks") is not False:
        found.append("enableServiceLinks is not false")
    for c in spec["containers"]:
        res = c.get("resources", {})
        if res.get("requests", {}).get("nvidia.com/gpu") != res.get("limits", {}).get("nvidia.com/gpu"):
            found.append(f"{c['name']}: nvidia.com/gpu requests != limits")
        gpus = int(res.get("limits", {}).get("nvidia.com/gpu", 0))
        command = " ".join(c.get("command", []))
        parallel = gpus > 1 or "--tensor-parallel-size" in command or "--pipeline-parallel-size" in command
        shm = {v["name"] for v in spec.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"}
        if parallel and not any(m["mountPath"] == "/dev/shm" and m["name"] in shm for m in c.get("volumeMounts", [])):
            found.append(f"{c['name']}: no /dev/shm in memory for TP x PP > 1")
        flags = [a.split("=")[0] for a in command.split() if a.startswith("--")]
        if len(flags) != len(set(flags)):
            found.append(f"{c['name']}: a flag appears twice")
    return found


def all_problems(docs: list[dict]) -> list[str]:
    return [p for d in docs for p in problems(d)]


@pytest.fixture
def llama8b(tmp_path):
    folder = tmp_path / "llama-8b-writer"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_3_1_8B))
    return folder


L40S = ["--profile", "l40s", "--gpus", "2", "--tp", "2", "--max-model-len", "32768"]


def test_k8s_target_validates_and_each_check_can_fail(llama8b, tmp_path):
    docs = render("--model", str(llama8b), *L40S, "--target", "k8s", out=tmp_path / "k8s")
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        ["ConfigMap", "Deployment", "Service", "ServiceMonitor", "PrometheusRule", "ConfigMap", "ScaledObject"]
    )
    assert all_problems(docs) == []
    for f in (tmp_path / "k8s").glob("*.yaml"):  # every file opens with the plan's reasons
        head = f.read_text().split("apiVersion")[0]
        assert "#   max_model_len = 32768" in head and "#   startupProbe = " in head and "#   /dev/shm = " in head
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["startupProbe"]["httpGet"]["path"] == "/health" and pod["terminationGracePeriodSeconds"] > 15
    assert container["lifecycle"]["preStop"] and "--api-key-file" in container["command"]

    def broken(change) -> list[str]:
        doc = json.loads(json.dumps(deployment))
        change(doc["spec"]["template"]["spec"])
        return problems(doc)

    res = container["resources"]
    assert broken(lambda s: s["containers"][0]["resources"]["limits"].update({"nvidia.com/gpu": "1"})) == [
        "lcserve: nvidia.com/gpu requests != limits"
    ]
    assert res["limits"]["nvidia.com/gpu"] == "2"
    assert broken(lambda s: s["volumes"].pop()) != []  # the dshm volume gone: the schema passes, the shm check fails
    no_shm = broken(lambda s: (s["volumes"].pop(), s["containers"][0]["volumeMounts"].pop()))
    assert no_shm == ["lcserve: no /dev/shm in memory for TP x PP > 1"]
    assert broken(lambda s: s.update(enableServiceLinks=True)) == ["enableServiceLinks is not false"]
    assert broken(lambda s: s["containers"][0]["command"].extend(["--max-model-len", "1"])) == [
        "lcserve: a flag appears twice"
    ]
    assert broken(lambda s: s["containers"][0].update(startupProbes={})) != []  # strict schema: unknown field
    monitor = next(d for d in docs if d["kind"] == "ServiceMonitor")
    assert problems(monitor | {"spec": monitor["spec"] | {"endpoint": [{"port": "http"}]}}) != []
    scaled = next(d for d in docs if d["kind"] == "ScaledObject")
    assert problems(scaled | {"spec": scaled["spec"] | {"minReplicas": 1}}) != []
    assert [t["metadata"]["query"].split("(")[1].split("{")[0] for t in scaled["spec"]["triggers"]] == [
        "lcserve_saturation_ratio"  # issue 21: KV usage alone misses a prefill-bound saturation
    ]


def test_the_deployment_command_serves_exactly_the_plan(embedded_model_dir, tmp_path):
    """The rendered `lcserve serve` line, run as --dry-run with the pod's paths mapped here, starts vLLM with
    the plan's own arguments, each once."""
    base = ["--model", str(embedded_model_dir), "--profile", "h100-80gb", "--gpus", "2", "--tp", "2"]
    plan = json.loads(CliRunner().invoke(cli, ["deploy", "plan", *base, "--json"]).stdout)
    docs = render(*base, "--target", "k8s", out=tmp_path / "k8s")
    profile = tmp_path / "profile.yaml"
    profile.write_text(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["profile.yaml"])
    key = tmp_path / "api-key"
    key.write_text("k\n")
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    mapped = {"/models/model": str(embedded_model_dir), "/etc/lcserve/profile/profile.yaml": str(profile)}
    mapped["/etc/lcserve/api-key/api-key"] = str(key)
    args = [mapped.get(a, a) for a in command[1:]]
    r = CliRunner().invoke(cli, [*args[:1], "--dry-run", *args[1:]], env={"LCSERVE_HOME": str(tmp_path / "home")})
    assert r.exit_code == 0, r.output
    vllm = json.loads(r.stdout)["command"]
    where = max(i for i, a in enumerate(vllm) if a in ("--port", "--uds"))  # the engine's port or socket
    tail = vllm[where + 2 :]
    assert tail == plan["vllm_args"]
    flags = [a for a in vllm if a.startswith("--")]
    assert len(flags) == len(set(flags))


def test_lws_target_for_two_nodes(tmp_path):
    model = tmp_path / "llama-70b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_70B))
    docs = render("--model", str(model), "--profile", "h100-80gb", "--gpus", "8", "--nodes", "2", "--target", "lws",
                  out=tmp_path / "lws")  # fmt: skip
    assert all_problems(docs) == []
    group = next(d for d in docs if d["kind"] == "LeaderWorkerSet")
    assert group["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    lwt = group["spec"]["leaderWorkerTemplate"]
    assert lwt["size"] == 2 and set(lwt) == {"size", "restartPolicy", "leaderTemplate", "workerTemplate"}
    leader = " ".join(lwt["leaderTemplate"]["spec"]["containers"][0]["command"])
    worker = " ".join(lwt["workerTemplate"]["spec"]["containers"][0]["command"])
    assert "leader --ray_cluster_size=$(LWS_GROUP_SIZE)" in leader and "--distributed-executor-backend ray" in leader
    assert "--tensor-parallel-size 8 --pipeline-parallel-size 2" in leader
    assert "worker --ray_address=$(LWS_LEADER_ADDRESS)" in worker
    svc = next(d for d in docs if d["kind"] == "Service")
    leader_labels = lwt["leaderTemplate"]["metadata"]["labels"]
    assert svc["spec"]["selector"] == {"leaderworkerset.sigs.k8s.io/name": "lcserve", "role": "leader"}
    assert leader_labels["role"] == "leader"
    text = (tmp_path / "lws" / "lcserve-lws.yaml").read_text()
    assert "# " in text.splitlines()[0] and "--executor mp runs without Ray" in text  # the alternative named
    assert "distributed_executor_backend = ray: the default on GPUs" in text


def test_lws_mp_executor_runs_a_headless_vllm_per_worker(tmp_path):
    """--executor mp: vLLM's own multi-node mode, every rank from the LeaderWorkerSet's variables (Kubernetes
    expands $(VAR) in a command), the workers headless; no Ray anywhere."""
    model = tmp_path / "llama-70b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_70B))
    docs = render("--model", str(model), "--profile", "h100-80gb", "--gpus", "8", "--nodes", "2", "--target", "lws",
                  "--executor", "mp", out=tmp_path / "lws")  # fmt: skip
    assert all_problems(docs) == []
    lwt = next(d for d in docs if d["kind"] == "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
    leader = lwt["leaderTemplate"]["spec"]["containers"][0]["command"]
    worker = lwt["workerTemplate"]["spec"]["containers"][0]["command"]
    nodes = ["--nnodes", "$(LWS_GROUP_SIZE)", "--node-rank", "$(LWS_WORKER_INDEX)",
             "--master-addr", "$(LWS_LEADER_ADDRESS)", "--master-port", "29501"]  # fmt: skip
    assert leader[:3] == ["python3", "-m", "vllm.entrypoints.openai.api_server"] and leader[-8:] == nodes
    assert worker[:2] == ["python3", "-c"] and worker[-9:] == [*nodes, "--headless"]
    for command in (leader, worker):
        assert command[command.index("--distributed-executor-backend") + 1] == "mp"
    text = (tmp_path / "lws" / "lcserve-lws.yaml").read_text()
    assert "ray" not in " ".join(leader + worker).lower() and "distributed_executor_backend = mp: --executor mp" in text
    # vLLM on a Unix socket in an emptyDir that only the leader's two containers mount: the gateway is its door
    pod = lwt["leaderTemplate"]["spec"]
    socket = leader[leader.index("--uds") + 1]
    gateway = pod["containers"][1]["command"]  # it waits for vLLM's /health: a restart would recreate the group
    assert gateway[:2] == ["sh", "-c"] and gateway[2].startswith("python3 -c ") and f"' {socket} && exec " in gateway[2]
    assert "--port" not in leader and shlex.split(gateway[2].split("exec ")[1])[2:4] == ["--upstream", f"unix:{socket}"]
    (volume,) = [v for v in pod["volumes"] if "emptyDir" in v and not v["emptyDir"]]
    for c in pod["containers"]:
        assert any(
            m["name"] == volume["name"] and m["mountPath"] == str(Path(socket).parent) for m in c["volumeMounts"]
        )
    assert volume["name"] not in str(lwt["workerTemplate"])


def test_lws_executor_choices_fail_in_one_line(tmp_path):
    model = tmp_path / "llama-70b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_70B))
    nodes = ["--model", str(model), "--profile", "h100-80gb", "--gpus", "8", "--nodes", "2"]
    r = CliRunner().invoke(cli, ["deploy", "render", *nodes, "--target", "lws", "--executor", "gloo",
                                 "--out", str(tmp_path / "a")])  # fmt: skip
    assert r.exit_code == 2 and "'gloo' is not one of 'ray', 'mp'" in r.output
    r = CliRunner().invoke(cli, ["deploy", "render", "--model", str(model), "--profile", "h100-80gb", "--target",
                                 "k8s", "--executor", "mp", "--out", str(tmp_path / "b")])  # fmt: skip
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "--executor mp says how the nodes of a LeaderWorkerSet join; it is for --target lws" in r.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_embedding_model_renders_with_the_same_schema_checks(tmp_path):
    """`deploy render --model $(lcserve embedded path --embedding)`: the pooling plan in `lcserve serve` on one
    device for k8s, KServe and compose, the same checks as the generative renderings; no KV or LoRA figures."""
    from lcserve import embedded

    minilm = str(embedded.embedding_model_path())
    for target, out in (("k8s", "k8s"), ("kserve", "kserve")):
        docs = render("--model", minilm, "--profile", "l40s", "--target", target, out=tmp_path / out)
        assert all_problems(docs) == [] and docs
    deployment = next(d for d in render("--model", minilm, "--profile", "l40s", "--target", "k8s",
                                        "--embedding-policy", "chunk", out=tmp_path / "k8s-chunk")
                      if d["kind"] == "Deployment")  # fmt: skip
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--embedding-policy") + 1] == "chunk"
    assert command[command.index("--served-model-name") + 1] == "all-minilm-l6-v2"
    assert "--adapter" not in command and "--rope-scaling" not in command
    text = (tmp_path / "k8s" / "lcserve.yaml").read_text()
    head = text.split("apiVersion")[0]
    assert "runner = pooling" in head and "kv_cache = none" in head
    assert not any(w in head for w in ("KV cache capacity", "num_blocks", "LoRA buffers", "max_lora_rank"))
    compose = render("--model", minilm, "--profile", "cpu", "--target", "compose", out=tmp_path / "compose")
    service = next(d for d in compose if "services" in d)["services"]["lcserve"]
    assert "deploy" not in service and "shm_size" not in service  # one CPU process: no GPUs, no shared memory


def test_embedding_render_refusals_are_one_line(tmp_path):
    from lcserve import embedded

    minilm = str(embedded.embedding_model_path())

    def fails(*args: str) -> str:
        r = CliRunner().invoke(cli, ["deploy", "render", "--model", minilm, "--profile", "l40s", *args])
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
        return r.output

    assert "is an embedding model" in fails("--target", "production-stack", "--out", str(tmp_path / "a"))
    assert "render --target k8s, kserve, compose" in fails("--target", "lws", "--out", str(tmp_path / "b"))
    adapter = tmp_path / "some-adapter"
    adapter.mkdir()
    assert "merge the adapter" in fails("--target", "k8s", "--adapter", str(adapter), "--out", str(tmp_path / "c"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["some-adapter"]


def test_kserve_production_stack_compose_and_dockerfiles(llama8b, tmp_path):
    isvc = render("--model", str(llama8b), *L40S, "--target", "kserve", out=tmp_path / "kserve")
    assert all_problems(isvc) == []
    predictor = next(d for d in isvc if d["kind"] == "InferenceService")["spec"]["predictor"]
    assert "--tensor-parallel-size" in predictor["containers"][0]["command"]

    (values,) = render("--model", str(llama8b), *L40S, "--target", "production-stack", out=tmp_path / "stack")
    (spec,) = values["servingEngineSpec"]["modelSpec"]
    config = spec["vllmConfig"]
    assert config["tensorParallelSize"] == 2 and spec["shmSize"] and spec["requestGPU"] == 2
    assert spec["requestCPU"] == 8 and spec["requestMemory"] == "31Gi"  # the chart requires both; 2 x 7.48 GiB + 16
    assert set(config) <= set(STACK_FIELDS.values()) | {"extraArgs", "enablePrefixCaching"}
    assert config["enablePrefixCaching"] is True  # else the chart writes --no-enable-prefix-caching
    chart_flags = [f"--{k}" for k, v in STACK_FIELDS.items() if v in config] + ["--enable-lora"] * spec["enableLoRA"]
    flags = chart_flags + [a for a in config["extraArgs"] if a.startswith("--")]
    assert len(flags) == len(set(flags)), flags  # the chart's flags and extraArgs never repeat one

    compose = render("--model", str(llama8b), *L40S, "--target", "compose", out=tmp_path / "compose")
    service = next(d for d in compose if "services" in d)["services"]["lcserve"]
    assert service["shm_size"] and service["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 2
    CliRunner().invoke(cli, ["deploy", "render", "--target", "dockerfile", "--out", str(tmp_path / "docker")])
    docker = {p.name: p.read_text() for p in (tmp_path / "docker").iterdir()}
    assert (
        docker["Dockerfile.gpu"].count("FROM vllm/vllm-openai:v0.32.") == 1
        and "lcserve[cpu]" in docker["Dockerfile.cpu"]
    )


def test_bad_render_requests_write_nothing(llama8b, tmp_path):
    def fails(*args: str) -> str:
        r = CliRunner().invoke(cli, ["deploy", "render", "--model", str(llama8b), *args])
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1, r.output
        return r.output

    unknown = fails("--profile", "l40s", "--target", "helm", "--out", str(tmp_path / "a"))
    assert "--target helm: unknown target; choose one of k8s, lws" in unknown
    assert "--target lws" in fails("--profile", "h100-80gb", "--gpus", "8", "--nodes", "2", "--target", "k8s",
                                   "--out", str(tmp_path / "b"))  # fmt: skip
    assert "not divisible" in fails("--profile", "l40s", "--gpus", "4", "--tp", "3", "--target", "k8s",
                                    "--out", str(tmp_path / "c"))  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama-8b-writer"]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    for force in ([], ["--force"]):  # a folder lcserve did not write is never replaced
        out = fails("--profile", "l40s", "--target", "k8s", "--out", str(tmp_path / "d"), *force)
        assert "holds files lcserve did not write" in out
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["notes.txt"]
    (tmp_path / "d" / "notes.txt").unlink()
    ok = CliRunner().invoke(
        cli, ["deploy", "render", "--model", str(llama8b), "--profile", "l40s", "--target", "k8s",
              "--out", str(tmp_path / "d"), "--force"],
    )  # fmt: skip
    assert ok.exit_code == 0 and len(list((tmp_path / "d").glob("*.yaml"))) == 3


def test_promtool_checks_the_rendered_rules(llama8b, tmp_path):
    from tests.integration.prometheus_server import prometheus_tools

    docs = render("--model", str(llama8b), *L40S, "--target", "k8s", out=tmp_path / "k8s")
    rule = next(d for d in docs if d["kind"] == "PrometheusRule")
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    _, promtool = prometheus_tools()
    result = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr
    rules.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [{"alert": "A", "expr": "sum(("}]}]}))
    assert subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True).returncode != 0


def anchored(text: str) -> list[str]:
    """The anchors and aliases in a YAML text, as the YAML parser reads them."""
    events = yaml.parse(text)
    return [
        f"*{e.anchor}" if isinstance(e, yaml.AliasEvent) else f"&{e.anchor}"
        for e in events
        if getattr(e, "anchor", None)
    ]


def rendered_yaml(llama8b: Path, out: Path) -> dict[str, str]:
    """Every YAML file of every target (LWS for two nodes), and `deploy plan --format yaml`."""
    from lcserve.deploy.targets import TARGETS

    llama70b = out / "llama-70b"
    llama70b.mkdir(parents=True)
    (llama70b / "config.json").write_text(json.dumps(LLAMA_70B))
    two_nodes = ["--model", str(llama70b), "--profile", "h100-80gb", "--gpus", "8", "--nodes", "2"]
    texts = {}
    for target in TARGETS:
        args = two_nodes if target == "lws" else ["--model", str(llama8b), *L40S]
        render(*args, "--target", target, out=out / target)
        texts |= {f"{target}/{f.name}": f.read_text() for f in sorted((out / target).glob("*.yaml"))}
    plan = CliRunner().invoke(cli, ["deploy", "plan", "--model", str(llama8b), *L40S, "--format", "yaml"])
    return texts | {"plan --format yaml": plan.output}


def test_no_rendered_file_has_yaml_anchors_or_aliases(llama8b, tmp_path):
    """Each document reads on its own: a value used twice (the LWS leader's and workers' volumes) is written twice."""
    texts = rendered_yaml(llama8b, tmp_path)
    assert len(texts) >= 10 and "lws/lcserve-lws.yaml" in texts
    assert {name: anchored(text) for name, text in texts.items() if anchored(text)} == {}


def test_the_anchor_check_can_fail(llama8b, tmp_path, monkeypatch):
    """With PyYAML's default (aliases for shared values), the LWS rendering has anchors and the check sees them."""
    from lcserve.deploy.render import YamlDumper

    monkeypatch.setattr(YamlDumper, "ignore_aliases", yaml.SafeDumper.ignore_aliases)
    texts = rendered_yaml(llama8b, tmp_path)
    assert "&id001" in anchored(texts["lws/lcserve-lws.yaml"]) and "*id001" in anchored(texts["lws/lcserve-lws.yaml"])


def test_profiles_in_80_columns_show_every_name_whole(tmp_path):
    """`deploy profiles` in an 80-column terminal: each name (what users copy into --profile) whole on its
    row, a long one of the user's included; the other columns wrap instead."""
    shipped = Path(__file__).resolve().parents[2] / "deploy" / "profiles"
    user = tmp_path / "profiles"
    user.mkdir()
    long_name = "acme-h100-80gb-sxm-nvlink-rack7"
    text = (shipped / "h100-80gb.yaml").read_text().replace("name: h100-80gb", f"name: {long_name}")
    (user / "acme.yaml").write_text(text)
    names = [yaml.safe_load(p.read_text())["name"] for p in sorted(shipped.glob("*.yaml"))] + [long_name]
    r = CliRunner().invoke(cli, ["deploy", "profiles"], env={"COLUMNS": "80", "LCSERVE_HOME": str(tmp_path)})
    assert r.exit_code == 0, r.output
    table = r.output.split("auto -> ")[0].splitlines()
    assert max(len(line) for line in table) <= 80
    cells = [line.split("│")[1].strip() for line in table if line.startswith("│")]
    assert all(name in cells for name in names), [c for c in cells if c]
