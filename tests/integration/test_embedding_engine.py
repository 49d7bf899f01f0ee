"""`lcserve serve` on the embedded MiniLM, on the real vLLM CPU build: /v1/embeddings through the
gateway matches sentence-transformers' own `encode`, and each long-input policy does what it says.

One engine for the module (MiniLM is tiny: ready in about 30 s), launched from the same
`describe_launch` that `lcserve serve MODEL --max-model-len 512 --adapter tuned=DIR` uses, with a LoRA
mounted beside the base (vLLM 0.32's BertEmbeddingModel declares SupportsLoRA: through the gateway its
vectors equal PEFT's); one gateway per policy in front of it, as `--embedding-policy` would start them.
The first gateway holds an API key, as `lcserve serve --api-key-file` starts it: the scheduled retrieval
probe must go through it with that key.
"""

from __future__ import annotations

import base64
import dataclasses

import httpx
import numpy as np
import pytest
from rich.console import Console

from lcserve import embedded as emb
from lcserve.deploy.plan_types import PlanRequest
from lcserve.engine import engine_client
from lcserve.errors import ProbeError
from lcserve.options import API_KEY_ENV
from lcserve.serving.cli import read_inputs
from lcserve.serving.embeddings import POLICY_HEADER, chunk_windows, special_wrap
from lcserve.serving.gateway import Gateway
from lcserve.serving.launch import ServeOptions, describe_launch
from lcserve.serving.probes.tasks import load_document
from lcserve.serving.stack import Stack
from lcserve.serving.supervisor import ExternalEngine
from tests.unit.test_embedding_adapters import make_minilm_lora, peft_vectors

pytestmark = pytest.mark.integration

NAME = emb.EMBEDDING_SERVED_NAME
ADAPTER = "tuned"
MAX_MODEL_LEN = 512  # past sentence-transformers' max_seq_length (256): vLLM's override is planned
KEY = "embedding-gateway-key"  # the "reject" gateway's (the stack's own); the others hold none
AUTH = {"Authorization": f"Bearer {KEY}"}


@dataclasses.dataclass
class Served:
    urls: dict[str, str]  # policy -> gateway URL
    engine_url: str
    stack: Stack
    model_dir: object
    st: object  # sentence_transformers.SentenceTransformer
    adapter: object  # the mounted LoRA's folder

    def embed(self, policy: str, inputs, **extra) -> httpx.Response:
        return httpx.post(
            f"{self.urls[policy]}/v1/embeddings",
            json={"model": NAME, "input": inputs, **extra},
            headers=AUTH,
            timeout=120,
        )

    def tokens(self, text: str, special: bool = True) -> list[int]:
        body = {"model": NAME, "prompt": text, "add_special_tokens": special}
        with engine_client(self.engine_url, timeout=120) as engine:  # vLLM's private socket
            return engine.post("/tokenize", json=body).json()["tokens"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from sentence_transformers import SentenceTransformer

    model_dir = emb.embedding_model_path()
    adapter = make_minilm_lora(tmp_path_factory.mktemp("minilm-lora") / "adapter")
    options = ServeOptions(
        model=str(model_dir),
        adapters=((ADAPTER, adapter),),
        mode="mount",
        request=PlanRequest(max_model_len=MAX_MODEL_LEN),
        port=0,
    )
    launch = describe_launch(options, read_inputs(options, Console(stderr=True)))
    assert "--enable-lora" in launch.spec.args
    assert launch.embedding_policies == {NAME: "reject", ADAPTER: "reject"}
    assert launch.training_lengths == {NAME: 128, ADAPTER: 128}
    spec = dataclasses.replace(launch.spec, env={**launch.spec.env, "VLLM_CPU_OMP_THREADS_BIND": "nobind"})
    stack = Stack(
        spec,
        gateway_port=0,
        api_key=KEY,
        training_lengths=launch.training_lengths,
        embedding_policies=launch.embedding_policies,
        log_path=tmp_path_factory.mktemp("embedding-engine") / "vllm.log",
        ready_timeout_s=600,
    )
    stack.start()
    others = []
    try:
        urls = {"reject": stack.url}
        for policy in ("truncate", "chunk"):  # as `serve --embedding-policy POLICY` starts its gateway
            engine = ExternalEngine(stack.engine.url)
            engine.start()
            gateway = Gateway(engine, training_lengths=launch.training_lengths, embedding_policies={NAME: policy})
            gateway.start("127.0.0.1", 0)
            others.append((gateway, engine))
            urls[policy] = gateway.url
        yield Served(
            urls, stack.engine.url, stack, model_dir, SentenceTransformer(str(model_dir), device="cpu"), adapter
        )
    finally:
        for gateway, engine in others:
            gateway.stop()
            engine.stop()
        stack.stop()


def words(n: int, start: int = 0) -> str:
    """n words of the shipped public-domain text (about 1.3 tokens each)."""
    return " ".join(load_document().split()[start : start + n])


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def vectors(response: httpx.Response) -> list[list[float]]:
    assert response.status_code == 200, response.text
    return [d["embedding"] for d in sorted(response.json()["data"], key=lambda d: d["index"])]


def test_vectors_match_sentence_transformers_encode(served):
    """cosine >= 0.999 against sentence-transformers on a fixed set, texts past 128 tokens included
    (all within its max_seq_length of 256, where it does not truncate)."""
    texts = [
        "The lighthouse keeper wrote in the log.",
        "Anne Elliot walked to the harbour at Lyme.",
        words(40, 100),
        words(120, 500),  # about 160 tokens: past the training length
        words(180, 1200),  # about 240 tokens
    ]
    lengths = [len(served.tokens(t)) for t in texts]
    assert max(lengths) > 200 and max(lengths) <= 256, lengths
    got = vectors(served.embed("reject", texts))
    want = served.st.encode(texts, normalize_embeddings=True)
    cosines = [cosine(g, w) for g, w in zip(got, want)]
    print(f"\ntokens {lengths}; cosine vs sentence-transformers: min {min(cosines):.6f}")
    assert min(cosines) >= 0.999, cosines
    assert cosine(got[3], want[4]) < 0.999  # the check can fail: another text's vector is far
    assert all(abs(np.linalg.norm(g) - 1) < 1e-3 for g in got)


def test_reject_refuses_beyond_max_model_len_and_counts_beyond_training(served):
    long = words(600)
    r = served.embed("reject", ["a short text", long])
    assert r.status_code == 400 and r.headers[POLICY_HEADER] == "reject"
    error = r.json()["error"]
    assert error["param"] == "input" and "input[1] has" in error["message"] and "max_model_len=512" in error["message"]
    assert "--embedding-policy truncate or chunk" in error["message"]
    ok = served.embed("reject", words(250))  # about 330 tokens: past 128 and 256, within 512
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] > 256
    metrics = httpx.get(served.urls["reject"] + "/metrics", timeout=60).text
    assert f'lcserve_requests_beyond_training_length_total{{model="{NAME}"}}' in metrics
    assert f'lcserve_embedding_inputs_total{{action="rejected",model="{NAME}",policy="reject"}} 1.0' in metrics
    assert f'lcserve_model_training_length_tokens{{model="{NAME}"}} 128.0' in metrics


def test_truncate_cuts_at_the_training_length(served):
    long = words(600)
    r = served.embed("truncate", long)
    assert r.status_code == 200 and r.headers[POLICY_HEADER] == "truncate"
    assert r.json()["usage"]["prompt_tokens"] == 128
    head = served.st.tokenizer.decode(served.tokens(long, special=False)[:126])  # 126 + [CLS] + [SEP]
    want = served.st.encode([head], normalize_embeddings=True)[0]
    similarity = cosine(vectors(r)[0], want)
    print(f"\ntruncate: cosine vs sentence-transformers on the first 128 tokens {similarity:.6f}")
    assert similarity >= 0.99
    short = served.embed("truncate", "a short text")
    assert short.json()["usage"]["prompt_tokens"] == len(served.tokens("a short text"))  # untouched


def test_chunk_embeds_a_2000_token_input_as_one_normalized_vector(served):
    text = words(1650)
    with_special, plain = served.tokens(text), served.tokens(text, special=False)
    assert len(with_special) >= 2000
    windows = chunk_windows(plain, 128, *special_wrap(with_special, plain))
    r = served.embed("chunk", [text, "a short text"])
    assert r.status_code == 200 and r.headers[POLICY_HEADER] == "chunk"
    got = vectors(r)
    assert len(got) == 2 and abs(np.linalg.norm(got[0]) - 1) < 1e-6
    assert r.json()["usage"]["prompt_tokens"] == sum(map(len, windows)) + len(served.tokens("a short text"))
    # the short input is not chunked, and the pooled vector is the token-weighted mean of the windows
    assert cosine(got[1], vectors(served.embed("reject", "a short text"))[0]) > 0.9999
    with engine_client(served.engine_url, timeout=120) as engine:  # vLLM's private socket
        direct = vectors(engine.post("/v1/embeddings", json={"model": NAME, "input": windows}))
    mean = np.average(np.asarray(direct), axis=0, weights=[len(w) for w in windows])
    assert cosine(got[0], mean) > 0.9999
    assert cosine(got[0], direct[0]) < 0.99  # more than the first window
    b64 = served.embed("chunk", text, encoding_format="base64")
    decoded = np.frombuffer(base64.b64decode(b64.json()["data"][0]["embedding"]), dtype="<f4")
    assert cosine(decoded, got[0]) > 0.9999
    metrics = httpx.get(served.urls["chunk"] + "/metrics", timeout=60).text
    assert f'lcserve_embedding_inputs_total{{action="chunked",model="{NAME}",policy="chunk"}} 2.0' in metrics


def test_each_bad_input_gets_one_clear_400(served):
    cases = {
        "empty string": ("", "empty string"),
        "a list holding an empty string": (["text", ""], "input[1] is an empty string"),
        "an empty list": ([], "empty list"),
        "too many inputs": (["x"] * 2049, "at most 2048"),
    }
    for case, (value, said) in cases.items():
        r = served.embed("reject", value)
        assert r.status_code == 400 and said in r.json()["error"]["message"], (case, r.text)
    unknown = httpx.post(
        served.urls["reject"] + "/v1/embeddings",
        json={"model": NAME, "input": "x"},
        headers={POLICY_HEADER: "squash", **AUTH},
        timeout=60,
    )
    assert unknown.status_code == 400 and "reject, truncate, chunk" in unknown.json()["error"]["message"]
    for path, body in (("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions", {"messages": []})):
        r = httpx.post(served.urls["reject"] + path, json={"model": NAME, **body}, headers=AUTH, timeout=60)
        assert r.status_code == 400 and "is an embedding model" in r.json()["error"]["message"], r.text


def test_retrieval_probe_quick_tier_reports_recall_by_length_per_policy(served, tmp_path):
    """The quick tier as `lcserve serve --probe-on-start` runs it: the model found on the engine's socket,
    the probe through the keyed gateway with the stack's key. Recall@1 and MRR by length and depth for
    full, truncate and chunk, the effective length and verdict, and the files; the figures go in the README."""
    from lcserve.serving.probe_schedule import ProbeSchedule
    from lcserve.serving.probes.retrieval import run_retrieval_probe, served_embedding_model
    from lcserve.serving.probes.runner import ProbeConfig

    entry = served_embedding_model(served.urls["reject"], NAME, KEY)
    assert entry is not None and entry["id"] == NAME
    with pytest.raises(ProbeError, match=f"answered 401.*the gateway's key in {API_KEY_ENV}"):
        run_retrieval_probe(served.urls["reject"], entry, "quick")
    schedule = ProbeSchedule(ProbeConfig(base=NAME), tmp_path)
    schedule.gateway_url, schedule.gateway_key = served.stack.url, served.stack.api_key  # as Stack.start sets them
    summary = schedule.run_once(served.engine_url)
    assert summary is not None, schedule.last_error
    (out,) = tmp_path.iterdir()
    print("\n" + (out / "report.md").read_text())
    policies = summary["policies"]
    assert set(policies) == {"full", "truncate", "chunk"} and summary["training_len"] == 128
    assert max(policies["full"]["by_length"]) == 512 and max(policies["chunk"]["by_length"]) == 2048
    assert policies["full"]["by_length"][64]["recall_at_1"] >= 0.5  # short documents retrieve
    # truncation at 128 tokens loses the facts placed deep in long documents: the probe can tell
    deep = policies["truncate"]["grid"][2048][0.9]
    assert deep < policies["truncate"]["grid"][64][0.9]
    assert {"summary.json", "records.jsonl", "report.md", "retrieval_by_length.png"} <= {p.name for p in out.iterdir()}
    assert len(summary["verdict"]) == 4 and summary["wall_s"] > 0


def test_a_mounted_adapter_embeds_as_peft_does(served):
    texts = ["The keeper lit the lamp at dusk.", "Anne walked along the Cobb at Lyme in the wind."]
    tuned = np.array(vectors(served.embed("reject", texts, model=ADAPTER)))
    base = np.array(vectors(served.embed("reject", texts)))
    want = peft_vectors(served.adapter, texts)
    cosines = (tuned * want).sum(axis=1)
    print(
        f"\nmounted LoRA vs PEFT: cosine min {cosines.min():.6f}; adapter vs base {(tuned * base).sum(axis=1).max():.4f}"
    )
    assert cosines.min() >= 0.999
    assert (tuned * base).sum(axis=1).max() < 0.99  # the adapter changes the vectors: the check can fail
