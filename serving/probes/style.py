"""Style at length: does a fine-tuned writer keep its voice when its prompt is long?

The writer answers held-out prompts of its corpus after a long neutral preamble (the shipped
public-domain novel, as an earlier turn of the chat), greedily, through its chat template; the base answers the very same
prompts as the control. Each answer is scored by the writer's style markers (the demo writer's
own, or the user's `--style-markers FILE`) and, for the demo writer, its sign-off. The preamble
is one text per length, before the question, so the prefix cache computes it once per model.
Scoring and summary are pure functions over records.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lcserve.adapters.style import MARKERS, SIGN_OFF, corpus_examples
from lcserve.errors import ProbeError

from .sizing import Filler, fit

PREAMBLE_INTRO = "Here is some background reading. Just read it; I will ask you something after."
READ_REPLY = "I have read it. What would you like to ask?"


@dataclass(frozen=True)
class Markers:
    """What a styled answer contains: phrases matched case-insensitively, and a sign-off phrase
    (None: the user's markers say nothing about how an answer ends)."""

    phrases: tuple[str, ...]
    sign_off: str | None
    source: str  # where they come from, for the report


DEMO_MARKERS = Markers(MARKERS, SIGN_OFF.lower().rstrip("!"), "the demo writer's markers (lcserve.adapters.style)")


def load_markers(path: Path) -> Markers:
    """One marker phrase per line of a UTF-8 text file (blank lines and # comments skipped); one
    ProbeError line for a file that is not text or holds no marker."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        raise ProbeError(
            f"--style-markers {path} is not a UTF-8 text file; write one style phrase per line (e.g. 'ahoy')"
        )
    phrases = tuple(
        line.strip().lower() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")
    )
    if not phrases:
        raise ProbeError(f"--style-markers {path} holds no marker; write one style phrase per line (e.g. 'ahoy')")
    return Markers(phrases, None, str(path))


def questions(count: int) -> list[str]:
    """The first `count` held-out prompts of the shipped writer corpus (never trained on)."""
    return [row["prompt"] for row in corpus_examples("heldout")[:count]]


def messages(preamble: str, question: str) -> list[dict]:
    """The chat: the neutral preamble as an earlier turn, read and acknowledged (the same text for every
    question of a length, so the prefix cache holds it), then the question as a turn of its own."""
    if not preamble:
        return [{"role": "user", "content": question}]
    return [
        {"role": "user", "content": f"{PREAMBLE_INTRO}\n\n{preamble}"},
        {"role": "assistant", "content": READ_REPLY},
        {"role": "user", "content": question},
    ]


def size_preamble(
    filler: Filler, count_chat: Callable[[list[dict]], int], length: int, answer_tokens: int, asked: list[str]
) -> tuple[str, int]:
    """The longest word prefix of the document such that every question's chat prompt plus the answer
    budget fits `length`; (preamble, words). ProbeError when even the bare question does not fit."""
    budget = length - answer_tokens
    longest = max(asked, key=len)

    def tokens(words: int) -> int:
        return max(count_chat(messages(filler.prefix(words), q)) for q in (longest, asked[0]))

    if tokens(0) > budget:
        raise ProbeError(
            f"style length {length} is too short for a question and a {answer_tokens}-token answer; "
            "drop it from --style-lengths"
        )
    words = fit(tokens, budget, filler.words, int(budget * 0.7))
    while words > 0 and max(count_chat(messages(filler.prefix(words), q)) for q in asked) > budget:
        words = max(0, words - 8)  # a question longer in tokens than the longest in characters
    return filler.prefix(words), words


def score_answer(text: str, markers: Markers) -> dict:
    """The markers found in one answer (in the order given) and whether it signs off."""
    low = text.lower()
    found = [m for m in markers.phrases if m in low]
    return {"markers": found, "signed_off": None if markers.sign_off is None else markers.sign_off in low}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def style_by_length(records: list[dict], model: str) -> dict[int, dict]:
    """Per preamble length: markers per answer, the share of answers with a marker and of those signing off."""
    rows: dict[int, list[dict]] = {}
    for r in records:
        if r["model"] == model and r["task"] == "style":
            rows.setdefault(r["length"], []).append(r)
    out = {}
    for length, rs in sorted(rows.items()):
        signs = [float(r["signed_off"]) for r in rs if r["signed_off"] is not None]
        out[length] = {
            "markers_per_answer": _mean([float(len(r["markers"])) for r in rs]),
            "styled": _mean([float(bool(r["markers"])) for r in rs]),
            "signed_off": _mean(signs),
            "n": len(rs),
        }
    return out


def paired_markers(records: list[dict], base: str, writer: str) -> dict[int, list[float]]:
    """Writer minus base markers per answer, per length, on the same questions."""
    style = [r for r in records if r["task"] == "style"]
    base_by_cell = {r["cell"]: r for r in style if r["model"] == base}
    diffs: dict[int, list[float]] = {}
    for r in style:
        if r["model"] == writer and r["cell"] in base_by_cell:
            diffs.setdefault(r["length"], []).append(float(len(r["markers"]) - len(base_by_cell[r["cell"]]["markers"])))
    return dict(sorted(diffs.items()))


def verdict_line(by_length: dict, writer: dict) -> str:
    """'Does the writer keep its voice at long context?' per length: kept (the paired interval of
    writer - base markers above 0), lost (at or below 0) or undecided (it crosses 0)."""
    parts = []
    for length, r in by_length.items():
        if r is None:
            continue
        decision = "kept" if r["lo"] > 0 else "lost" if r["hi"] <= 0 else "undecided"
        mine = writer.get(length) or writer.get(str(length)) or {}
        signed = mine.get("signed_off")
        tail = f", signed off {signed:.0%}" if signed is not None else ""
        parts.append(
            f"{length}: {mine.get('markers_per_answer', 0):.1f} markers/answer{tail}, "
            f"writer - base {r['mean']:+.2f} [{r['lo']:+.2f}, {r['hi']:+.2f}] {decision}"
        )
    return "style at length (does the writer keep its voice?): " + "; ".join(parts)
