"""Scoring of single probe outputs: retrieval answers, repetition, loss by position.

Pure functions over plain values, so every rule can be checked on hand-made outputs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_FIRST_INT = re.compile(r"\d+")


@dataclass(frozen=True)
class Score:
    """One retrieval answer: `correct` is 0 or 1; an empty answer is wrong *and* counted apart,
    because "said nothing" (format broken, early stop) and "said the wrong number" (lost the
    needle) are different failures."""

    correct: float
    empty: bool
    distractor: bool = False


def score_needle(output: str, gold: str, distractors: tuple[str, ...] = ()) -> Score:
    """RULER's string_match: the gold value appears in the answer (case-insensitive).

    `distractor` marks a wrong answer that repeats another needle's value, which means the
    model found a needle but not the one it was asked for.
    """
    text = output.strip().lower()
    if not text:
        return Score(0.0, True)
    if gold.lower() in text:
        return Score(1.0, False)
    return Score(0.0, False, any(d.lower() in text for d in distractors))


def score_passkey(output: str, gold: str) -> Score:
    """The passkey test's rule: the first integer of the reply equals the key."""
    text = output.strip()
    if not text:
        return Score(0.0, True)
    match = _FIRST_INT.search(text)
    return Score(1.0 if match and match.group(0) == gold else 0.0, False)


def rep_n(tokens: list[int], n: int) -> float:
    """Share of repeated n-grams, 1 - unique/total (0 = no repeats; near 1 = a loop)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def rep_by_window(tokens: list[int], window: int, n: int) -> list[float]:
    """rep-n of each full window of `window` tokens (a trailing partial window is dropped,
    so every figure covers the same number of tokens)."""
    return [rep_n(tokens[i : i + window], n) for i in range(0, len(tokens) - window + 1, window)]


def position_edges(num_positions: int, training_len: int, first: int = 16) -> list[int]:
    """Bucket edges over token positions: 0, then powers of two from `first`, plus the
    training length itself, ending at `num_positions`. Log2 buckets keep the far positions
    (few buckets, many tokens) as readable as the near ones."""
    edges = {0, num_positions}
    edge = first
    while edge < num_positions:
        edges.add(edge)
        edge *= 2
    if 0 < training_len < num_positions:
        edges.add(training_len)
    return sorted(edges)


def nll_by_bucket(logprobs: list[float | None], edges: list[int]) -> list[float | None]:
    """Mean negative log-likelihood (nats/token) of the positions in each [edge_i, edge_i+1).

    `logprobs[i]` is log p(token i | tokens < i); position 0 has no prediction (None) and is
    skipped. A bucket with no scored position gives None.
    """
    means: list[float | None] = []
    for lo, hi in zip(edges, edges[1:]):
        values = [-lp for lp in logprobs[lo:hi] if lp is not None and math.isfinite(lp)]
        means.append(sum(values) / len(values) if values else None)
    return means
