"""Exact prompt sizing: how much haystack fits so that prompt + answer budget = the target length.

The count comes from the served tokenizer (vLLM `/tokenize`), passed in as a function, so the
search is tested against any deterministic tokenizer. The filler is cut at word ends, and
needles go in at sentence ends, so the text stays natural; the part of the haystack before a
needle is the same text at every depth, which lets the prefix cache reuse it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

_WORD = re.compile(r"\S+")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s)")


class Filler:
    """A long text cut into word prefixes: `prefix(n)` is the text up to the end of word n."""

    def __init__(self, text: str):
        self.text = text
        self.cuts = [m.end() for m in _WORD.finditer(text)]

    @property
    def words(self) -> int:
        return len(self.cuts)

    def prefix(self, n: int) -> str:
        return self.text[: self.cuts[n - 1]] if n > 0 else ""


def repeated(document: str, times: int) -> str:
    """The document back to back `times` times, for haystacks longer than the document."""
    return "\n\n".join([document.strip()] * max(1, times))


@dataclass(frozen=True)
class Insert:
    """A text to hide in the haystack at `depth` (0 = before all of it, 1 = after all of it)."""

    depth: float
    text: str


def insert_position(haystack: str, depth: float) -> int:
    """The sentence end (or the start / end of the haystack) closest to `depth` of its characters."""
    target = depth * len(haystack)
    candidates = [0, len(haystack)] + [m.end() for m in _SENTENCE_END.finditer(haystack)]
    return min(candidates, key=lambda pos: (abs(pos - target), pos))


def with_inserts(haystack: str, inserts: list[Insert]) -> tuple[str, list[float]]:
    """The haystack with each insert at its depth; also the real depth of each (share of the
    haystack's characters before it), since sentence ends only approximate the requested one."""
    placed = sorted((insert_position(haystack, ins.depth), i) for i, ins in enumerate(inserts))
    pieces: list[str] = []
    start = 0
    for pos, i in placed:
        pieces.append(haystack[start:pos])
        text = inserts[i].text
        pieces.append(" " + text if pos > 0 else (text + " " if haystack else text))
        start = pos
    pieces.append(haystack[start:])
    size = max(1, len(haystack))
    actual = [0.0] * len(inserts)
    for pos, i in placed:
        actual[i] = round(pos / size, 3)
    return "".join(pieces), actual


def fit(count: Callable[[int], int], budget: int, upper: int, guess: int) -> int:
    """The largest n in [0, upper] with count(n) <= budget, for a non-decreasing count with
    count(0) <= budget (the caller checks that the empty filler fits).

    A bracket is grown from `guess` (a linear estimate) in doubling steps, then bisected: a
    long prompt is sized in about ten tokenizer calls instead of twenty.
    """
    if upper == 0:
        return 0
    step = max(1, guess // 64)
    probe = min(max(guess, 1), upper)
    if count(probe) <= budget:
        fits = probe
        while True:
            if fits == upper:
                return upper
            probe = min(fits + step, upper)
            if count(probe) > budget:
                over = probe
                break
            fits, step = probe, step * 2
    else:
        over = probe
        while True:
            probe = max(over - step, 0)
            if probe == 0 or count(probe) <= budget:
                fits = probe
                break
            over, step = probe, step * 2
    while over - fits > 1:
        mid = (fits + over) // 2
        if count(mid) <= budget:
            fits = mid
        else:
            over = mid
    return fits
