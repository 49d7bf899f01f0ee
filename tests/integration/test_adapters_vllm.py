"""The adapters against the real vLLM CPU engine: the demo adapter's style, vLLM accepting
exactly what inspect calls `mount` and rejecting what it calls `merge`, and the mounted
adapter agreeing with the merged model that `lcserve serve --mode merge` serves from a second engine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from lcserve.adapters.inspection import Verdict, inspect_adapter
from lcserve.adapters.merge import PROVENANCE
from lcserve.adapters.reader import read_adapter
from lcserve.adapters.runtime import load_lora_adapter, unload_lora_adapter
from lcserve.adapters.style import corpus_examples, style_score
from lcserve.errors import EngineError
from tests.conftest import free_port
from tests.integration.agreement import NEAR_TIE, own_logprobs, prompt_logprobs
from tests.integration.test_adapters_verify import REAL_CASES, real_adapter
from tests.integration.test_serve_script import wait_health

pytestmark = pytest.mark.integration

MERGED_NAME = "writer"  # `serve --mode merge` serves the merge under the adapter's name
ANSWER_TOKENS = 96


def chat(url: str, model: str, prompt: str, max_tokens: int = ANSWER_TOKENS, top_logprobs: int = 0) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    if top_logprobs:
        body.update(logprobs=True, top_logprobs=top_logprobs)
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    response.raise_for_status()
    return response.json()["choices"][0]


def test_demo_adapter_answers_in_the_trained_style(engine):
    """Held-out prompts (not in the training corpus), greedy: style-marker rate, base vs adapter."""
    prompts = [row["prompt"] for row in corpus_examples("heldout")]
    jobs = [(model, p) for model in (engine.base_model, engine.adapter_model) for p in prompts]
    with ThreadPoolExecutor(len(jobs)) as pool:  # all at once: vLLM batches base and LoRA requests together
        replies = [c["message"]["content"] for c in pool.map(lambda job: chat(engine.url, *job), jobs)]
    base, adapter = style_score(replies[: len(prompts)]), style_score(replies[len(prompts) :])
    print(
        f"\nstyle-marker rate on {len(prompts)} held-out prompts: base {base.rate:.0%} "
        f"({base.markers_per_answer:.2f} markers/answer), adapter {adapter.rate:.0%} "
        f"({adapter.markers_per_answer:.2f}), sign-off {base.signed_off} vs {adapter.signed_off}"
    )
    assert adapter.rate >= 0.8 and adapter.rate - base.rate >= 0.5
    assert adapter.signed_off >= len(prompts) // 2 > base.signed_off


MISREAD = {  # what a reader that ignores the feature computes: the global lora_alpha / r everywhere
    "rslora": lambda c: {**c, "use_rslora": False},
    "rank_pattern": lambda c: {
        **c,
        "alpha_pattern": {k: c["lora_alpha"] * rank / c["r"] for k, rank in c["rank_pattern"].items()},
    },
}
PROBE_TEXT = "The keeper climbed the stairs at dusk, lit the great lamp, and wrote in the log that the sea was calm."


@pytest.mark.parametrize("case", list(REAL_CASES))
def test_vllm_enforces_the_inspect_verdict(case, engine, real_adapters_root, tmp_path):
    """What inspect calls `merge` for a rejection reason, vLLM refuses to load; what it calls
    `mount`, vLLM loads and computes like PEFT (not like a reader that ignores the feature)."""
    adapter = real_adapter(case, engine.model_dir, real_adapters_root)
    report = inspect_adapter(read_adapter(adapter), engine.model_dir)
    name = f"test-{case}"
    if report.verdict == Verdict.MERGE:
        with pytest.raises(EngineError) as err:
            load_lora_adapter(engine.url, name, str(adapter))
        word = {"dora": "DoRA", "modules_to_save": "modules_to_save", "trainable_tokens": "trainable_tokens_delta"}[
            case
        ]
        assert word in str(err.value) and any(word in r for r in report.reasons)
        return
    assert report.verdict == Verdict.MOUNT
    load_lora_adapter(engine.url, name, str(adapter))
    try:
        served = prompt_logprobs(engine.url, name, PROBE_TEXT)
    finally:
        unload_lora_adapter(engine.url, name)
    misread = tmp_path / "misread"
    shutil.copytree(adapter, misread)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (misread / "adapter_config.json").write_text(json.dumps(MISREAD[case](config)))
    right, wrong = (_peft_logprobs(engine.model_dir, a, PROBE_TEXT) for a in (adapter, misread))
    served_ids = [int(next(iter(entry))) for entry in served]
    assert served_ids == [token for token, _ in right]
    to_right = _mean_abs([v for v in own_logprobs(served)], [lp for _, lp in right])
    to_wrong = _mean_abs([v for v in own_logprobs(served)], [lp for _, lp in wrong])
    print(f"\n{case}: vLLM vs PEFT {to_right:.3f}, vs a reader ignoring {case} {to_wrong:.3f}")
    assert to_right < 0.25 * to_wrong


def _mean_abs(a: list[float], b: list[float]) -> float:
    return sum(abs(x - y) for x, y in zip(a, b)) / len(a)


def _peft_logprobs(base, adapter, text: str) -> list[tuple[int, float]]:
    """(token, log-probability) of each prompt token after the first, base + adapter in PEFT (fp32)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(base)(text, return_tensors="pt")["input_ids"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    return list(zip(targets.tolist(), logprobs[torch.arange(len(targets)), targets].tolist()))


@pytest.fixture(scope="module")
def merged_engine(engine, demo_adapter, tmp_path_factory):
    """A second vLLM started the way users start it: `lcserve serve MODEL --adapter writer=DIR --mode merge`
    (merged on first use into $LCSERVE_HOME/merged, bf16 as the base, served as `writer`)."""
    home = tmp_path_factory.mktemp("merged-engine")
    port = free_port()
    env = {
        **os.environ,
        "LCSERVE_HOME": str(home),
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lcserve.cli",
            "serve",
            str(engine.model_dir),
            "--adapter",
            f"{MERGED_NAME}={demo_adapter}",
            "--mode",
            "merge",
            "--no-gateway",
            "--port",
            str(port),
            "--max-model-len",
            "2048",
            "--log-file",
            str(home / "vllm.log"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(home / "stderr").open("w"),
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_health(url, proc, 600)
        (merged,) = (home / "merged").iterdir()
        assert json.loads((merged / PROVENANCE).read_text())["adapter_training_seq_len"] == 256
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_mounted_adapter_matches_merged_model(engine, merged_engine):
    """Greedy answers: the same tokens, or a different path only where two tokens were nearly tied."""
    prompts = [row["prompt"] for row in corpus_examples("heldout")][:8]
    with ThreadPoolExecutor(8) as pool:
        mounted = list(pool.map(lambda p: chat(engine.url, engine.adapter_model, p, top_logprobs=2), prompts))
        merged = list(pool.map(lambda p: chat(merged_engine, MERGED_NAME, p, top_logprobs=2), prompts))
    identical = 0
    for prompt, m, g in zip(prompts, mounted, merged):
        a, b = m["logprobs"]["content"], g["logprobs"]["content"]
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x["token"] != y["token"]), None)
        if first is None:
            assert len(a) == len(b), (prompt, m["message"], g["message"])
            assert max(abs(x["logprob"] - y["logprob"]) for x, y in zip(a, b)) < NEAR_TIE
            identical += 1
            continue
        margins = [e["top_logprobs"][0]["logprob"] - e["top_logprobs"][1]["logprob"] for e in (a[first], b[first])]
        assert min(margins) < NEAR_TIE, (prompt, first, margins, m["message"], g["message"])
    print(f"\nmounted vs merged greedy: {identical}/{len(prompts)} identical, the rest part at near-ties")
    assert style_score([g["message"]["content"] for g in merged]).rate >= 0.8


def _top1(entry: dict) -> str:
    return next(token for token, info in entry.items() if info["rank"] == 1)


def test_mounted_and_merged_prompt_logprobs_agree(engine, merged_engine, demo_adapter):
    """Teacher-forced log-probabilities over a fixed text (past the 256-token training length)."""
    text = " ".join(row["response"] for row in corpus_examples("train")[:8])

    mounted = prompt_logprobs(engine.url, engine.adapter_model, text)
    merged = prompt_logprobs(merged_engine, MERGED_NAME, text)
    assert len(mounted) == len(merged) > 256
    diffs, top_agree = [], 0
    for a, b in zip(mounted, merged):
        actual = next(iter(a))  # the prompt's own token comes first
        diffs.append(abs(a[actual]["logprob"] - b[actual]["logprob"]))
        top_agree += _top1(a) == _top1(b)
    reference = [lp for _, lp in _peft_logprobs(engine.model_dir, demo_adapter, text)]
    to_ref = _mean_abs(own_logprobs(mounted), reference)
    ordered = sorted(diffs)
    print(
        f"\nmounted vs merged over {len(diffs)} tokens: mean |dlogprob| {sum(diffs) / len(diffs):.4f}, "
        f"p99 {ordered[int(0.99 * len(ordered))]:.3f}, max {ordered[-1]:.3f}, top-1 agreement "
        f"{top_agree / len(diffs):.1%}; mounted vs PEFT fp32 mean {to_ref:.4f}"
    )
    # the two serving paths differ by no more than bf16 arithmetic already differs from fp32 PEFT
    assert sum(diffs) / len(diffs) < 2 * to_ref and ordered[int(0.99 * len(ordered))] < 0.5
    assert top_agree / len(diffs) >= 0.97
