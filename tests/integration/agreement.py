"""What two vLLM engines running the same weights in bf16 must agree on, and no more.

Across TP degrees, pipeline stages, or mounted against merged, bf16 sums run in another order:
greedy paths may part where two tokens are nearly tied, so exact text is not a promise. These
helpers compare what is: the greedy path up to its first fork, the margins at that fork, and the
teacher-forced log-probabilities of one fixed text.
"""

from __future__ import annotations

import httpx

NEAR_TIE = 0.5  # logprob margin under which bf16 noise may flip a greedy choice (measured: see callers)


def greedy(url: str, model: str, prompt: str, max_tokens: int, key: str | None = None) -> list[dict]:
    """The greedy continuation's per-token entries, each with its top-2 alternatives (`key`: a gateway's)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 2}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=300)
    r.raise_for_status()
    lp = r.json()["choices"][0]["logprobs"]
    return [
        {"token": t, "logprob": p, "top": sorted(top.values(), reverse=True)}
        for t, p, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"])
    ]


def greedy_fork(a: list[dict], b: list[dict], near_tie: float = NEAR_TIE) -> int | None:
    """Index where two greedy paths part, or None when they never do. Raises AssertionError when they
    differ by more than bf16 noise: a logprob gap of `near_tie` or more before the fork, or a fork
    where either engine's top two candidates were not nearly tied."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x["token"] != y["token"]:
            margins = [e["top"][0] - e["top"][1] for e in (x, y)]
            assert min(margins) < near_tie, f"paths part at token {i} without a near-tie: margins {margins}"
            return i
        assert abs(x["logprob"] - y["logprob"]) < near_tie, (i, x, y)
    assert len(a) == len(b)
    return None


def prompt_logprobs(url: str, model: str, text: str) -> list[dict]:
    """vLLM's teacher-forced log-probabilities of `text`'s tokens after the first (own token first)."""
    body = {"model": model, "prompt": text, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 1}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    r.raise_for_status()
    return r.json()["choices"][0]["prompt_logprobs"][1:]


def own_logprobs(entries: list[dict]) -> list[float]:
    """The log-probability of each prompt token (vLLM lists the prompt's own token first)."""
    return [next(iter(entry.values()))["logprob"] for entry in entries]


def gap_summary(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """(mean, p99, max) of |a - b| over paired log-probabilities."""
    assert len(a) == len(b) and a
    gaps = sorted(abs(x - y) for x, y in zip(a, b))
    return sum(gaps) / len(gaps), gaps[int(0.99 * (len(gaps) - 1))], gaps[-1]
