"""Plans beyond one device: tensor parallelism in a node (KV heads replicated as vLLM does), pipeline
parallelism across nodes (layers split as vLLM splits them), replicas for a target concurrency, and
the tensor-parallel plan for vLLM's CPU build. Bad requests are one line that writes nothing."""

from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

from lcserve.adapters.reader import read_adapter
from lcserve.cli import cli
from lcserve.deploy.hardware import GIB, resolve_profile
from lcserve.deploy.kv import pp_partitions
from lcserve.deploy.plan import PlanRequest, plan_deployment
from lcserve.errors import PlanError
from lcserve.model_config import read_model
from tests.unit.test_readme_commands import LLAMA_3_1_8B

LLAMA_70B = LLAMA_3_1_8B | {
    "hidden_size": 8192,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "intermediate_size": 28672,
}


def config_folder(tmp_path, name: str, config: dict):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def llama8b(tmp_path):
    return config_folder(tmp_path, "llama-8b", LLAMA_3_1_8B)


@pytest.fixture
def llama70b(tmp_path):
    return config_folder(tmp_path, "llama-70b", LLAMA_70B)


def plan(*args: str) -> dict:
    r = CliRunner().invoke(cli, ["deploy", "plan", *args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def refused(*args: str) -> str:
    r = CliRunner().invoke(cli, ["deploy", "plan", *args])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    return r.output


@pytest.mark.parametrize("layers, pp", [(80, 2), (80, 3), (18, 4), (126, 8), (7, 7), (32, 5)])
def test_layers_split_as_vllm_splits_them(layers, pp, monkeypatch):
    monkeypatch.delenv("VLLM_PP_LAYER_PARTITION", raising=False)
    from vllm.distributed.utils import get_pp_indices

    vllm_parts = [end - start for start, end in (get_pp_indices(layers, r, pp) for r in range(pp))]
    assert pp_partitions(layers, pp) == vllm_parts


def test_kv_heads_are_replicated_when_tp_exceeds_them(embedded_model_dir, llama8b):
    """vLLM keeps max(1, kv_heads // TP) heads per rank: Gemma 3 270M's one KV head costs each of two
    ranks as much as the single device; Llama's eight are halved."""
    gemma = [plan("--model", str(embedded_model_dir), "--profile", "l4", "--gpus", "2", "--tp", str(t)) for t in (1, 2)]
    assert gemma[0]["kv_bytes_per_token_layer"] == gemma[1]["kv_bytes_per_token_layer"] == 2 * 1 * 256 * 2
    tp2 = next(r for r in gemma[1]["reasons"] if r["setting"] == "tensor_parallel_size")
    assert "replicates the 1 KV head(s)" in tp2["why"]
    llama = [plan("--model", str(llama8b), "--profile", "l40s", "--gpus", "2", "--tp", str(t)) for t in (1, 2)]
    assert llama[1]["kv_bytes_per_token_layer"] * 2 == llama[0]["kv_bytes_per_token_layer"]
    assert llama[1]["memory_per_device"]["weights"] == llama[0]["memory_per_device"]["weights"] // 2


def test_two_nodes_of_eight_h100_split_a_70b_by_pipeline(llama70b):
    out = plan("--model", str(llama70b), "--profile", "h100-80gb", "--gpus", "8", "--nodes", "2")
    assert (out["tensor_parallel_size"], out["pipeline_parallel_size"], out["nodes"]) == (8, 2, 2)
    assert out["layers_per_stage"] == [40, 40] and out["distributed_executor_backend"] == "ray"
    args = out["vllm_args"]
    assert args[args.index("--pipeline-parallel-size") + 1] == "2"
    flags = [a for a in args if a.startswith("--")]
    assert len(flags) == len(set(flags))
    one_node = plan("--model", str(llama70b), "--profile", "h100-80gb", "--gpus", "8", "--tp", "8")
    # each device holds half the layers: half the weights of the one-node plan, and twice its KV per token
    assert out["memory_per_device"]["weights"] == pytest.approx(one_node["memory_per_device"]["weights"] / 2, rel=1e-6)
    assert out["kv_cache_tokens"] > 2 * one_node["kv_cache_tokens"]
    why = {r["setting"]: r["why"] for r in out["reasons"]}
    assert "--nnodes 2" in why["distributed_executor_backend"]  # the mp alternative, named
    assert "[40, 40]" in why["pipeline_parallel_size"]
    uneven = plan("--model", str(llama70b), "--profile", "h100-80gb", "--gpus", "8", "--nodes", "3")
    assert uneven["layers_per_stage"] == [27, 27, 26]


def test_replicas_follow_the_target_concurrency(llama8b):
    one = plan("--model", str(llama8b), "--profile", "l40s", "--gpus", "2", "--max-model-len", "32768")
    per_replica = min(int(one["max_concurrency"]), one["max_num_seqs"])
    out = plan(
        "--model", str(llama8b), "--profile", "l40s", "--gpus", "2", "--max-model-len", "32768",
        "--target-concurrency", str(3 * per_replica + 1),
    )  # fmt: skip
    assert out["replicas"] == 4 and one["replicas"] == 1
    assert any(r["setting"] == "replicas" and f"/ {per_replica} per replica" in r["why"] for r in out["reasons"])


def test_cpu_parallel_plans_use_mp_and_one_core_list_per_rank(embedded_model_dir, demo_adapter):
    profile = dataclasses.replace(resolve_profile("cpu"), memory_bytes=32 * GIB, cores=2, cpu_ids=(0, 1))
    model = read_model(embedded_model_dir)
    one = plan_deployment(profile, model, request=PlanRequest(max_model_len=4096, kv_cache_gib=1))
    two = plan_deployment(
        profile, model, request=PlanRequest(max_model_len=4096, tensor_parallel_size=2, kv_cache_gib=1)
    )
    assert two.env == {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    assert two.vllm_options()["distributed-executor-backend"] == "mp"
    assert two.kv_tokens == one.kv_tokens  # one KV head replicated: the same cache per rank
    four_cores = dataclasses.replace(profile, cores=4, cpu_ids=(4, 5, 6, 7))
    bind = plan_deployment(four_cores, model, request=PlanRequest(max_model_len=4096, tensor_parallel_size=2)).env
    assert bind["VLLM_CPU_OMP_THREADS_BIND"] == "4,5|6,7"
    with pytest.raises(PlanError, match="--tensor-parallel-size 3: the CPU profile has 2 core"):
        plan_deployment(profile, model, request=PlanRequest(tensor_parallel_size=3))
    pp2 = plan_deployment(
        profile, model, request=PlanRequest(max_model_len=4096, pipeline_parallel_size=2, kv_cache_gib=1)
    )
    assert pp2.env["VLLM_CPU_OMP_THREADS_BIND"] == "0|1" and pp2.layers_per_stage == (9, 9)
    # vLLM groups the 18 layers over the whole model (groups of 3), then each rank keeps its own layers of
    # each group: the widest group holds 2 of them on either rank, so a block costs 2/3 of TP=1's
    assert (one.layout.block_layers, pp2.layout.block_layers) == (3, 2)
    assert pp2.capacity.num_blocks == 1024**3 // (2 * pp2.layout.page_bytes) == 4096
    assert any("compiled only" in w for w in pp2.warnings)
    # a pipeline keeps a batch per stage in flight, so sliding layers hold 2 x 2048 more tokens: vLLM 0.32
    # logged these very figures (benchmarks/bench_parallel_cpu.py): 81,621 tokens for TP 1 and 2, 85,163 for PP 2
    assert (one.kv_tokens, two.kv_tokens, pp2.kv_tokens) == (81621, 81621, 85163)
    adapter = read_adapter(demo_adapter)
    with pytest.raises(PlanError, match="--pipeline-parallel-size 2 with adapters: .* eager mode only"):
        plan_deployment(profile, model, [adapter], PlanRequest(pipeline_parallel_size=2))
    with pytest.raises(PlanError, match="--pipeline-parallel-size 4: the CPU profile has 2 core"):
        plan_deployment(profile, model, request=PlanRequest(pipeline_parallel_size=4))
    # two CPU nodes (LeaderWorkerSet, vLLM's multi-node mode): a stage per node, each node binds its own rank;
    # the same figures as PP 2 on one machine (tests/integration/test_cluster_local.py runs it)
    nodes = plan_deployment(profile, model, request=PlanRequest(max_model_len=4096, nodes=2, kv_cache_gib=1))
    assert nodes.pipeline_parallel_size == 2 and nodes.env["VLLM_CPU_OMP_THREADS_BIND"] == "0,1"
    assert nodes.kv_tokens == pp2.kv_tokens


def test_bad_parallel_requests_are_one_line(llama8b, llama70b, embedded_model_dir, tmp_path):
    heads = refused("--model", str(llama8b), "--profile", "h100-80gb", "--gpus", "8", "--tp", "3")
    assert "32 attention heads / 8 KV heads are not divisible" in heads and "largest feasible" in heads
    layers = refused("--model", str(embedded_model_dir), "--profile", "h100-80gb", "--gpus", "8", "--nodes", "20")
    assert "has 18 layers" in layers and "largest feasible: --pipeline-parallel-size 18" in layers
    mismatch = refused("--model", str(llama70b), "--profile", "h100-80gb", "--gpus", "8", "--nodes", "2", "--pp", "4")
    assert "one pipeline stage on each node" in mismatch
    huge = config_folder(tmp_path, "huge", LLAMA_70B | {"num_hidden_layers": 800})
    nowhere = refused("--model", str(huge), "--profile", "rtx-4090", "--gpus", "1")
    assert "does not fit" in nowhere and "--nodes 2" in nowhere  # names the options `deploy plan` has
    more_gpus = refused("--model", str(llama70b), "--profile", "l40s")
    assert "it fits from --gpus 4 --tensor-parallel-size 4" in more_gpus
    assert plan("--model", str(llama70b), "--profile", "l40s", "--gpus", "4")["tensor_parallel_size"] == 4
