"""The demo adapter's writing style (a lighthouse keeper's advice) and how to count it.

The shipped corpus opens every answer with "Ahoy, friend!", closes it with "Fair winds and
steady lights!" and uses nautical words. Fixed phrases make the style countable with plain
substring matches, which is robust for greedy decoding on a 270M model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .training_length import LCSERVE_METADATA

OPENER = "Ahoy, friend!"
SIGN_OFF = "Fair winds and steady lights!"
MARKERS = (
    "ahoy",
    "fair winds",
    "steady lights",
    "shipshape",
    "lighthouse",
    "harbour",
    "steady as she goes",
    "hold your course",
    "aye,",
)
CORPUS_FILE = "writer_corpus.jsonl"


def markers_in(text: str) -> list[str]:
    """The style markers present in `text` (case-insensitive), in MARKERS order."""
    low = text.lower()
    return [m for m in MARKERS if m in low]


@dataclass(frozen=True)
class StyleScore:
    answers: int
    styled: int  # answers with at least one marker
    signed_off: int  # answers that contain the sign-off phrase
    markers_per_answer: float

    @property
    def rate(self) -> float:
        return self.styled / self.answers if self.answers else 0.0


def style_score(answers: list[str]) -> StyleScore:
    """Marker rate over a set of answers (e.g. greedy replies to the held-out prompts)."""
    found = [markers_in(a) for a in answers]
    return StyleScore(
        answers=len(answers),
        styled=sum(1 for f in found if f),
        signed_off=sum(1 for a in answers if "fair winds" in a.lower()),
        markers_per_answer=sum(len(f) for f in found) / len(answers) if answers else 0.0,
    )


def corpus_bytes() -> bytes:
    return resources.files("lcserve.adapters").joinpath("data", CORPUS_FILE).read_bytes()


def corpus_examples(split: str) -> list[dict]:
    """Rows of the shipped corpus: `train` (prompt + response) or `heldout` (prompt only)."""
    rows = [json.loads(line) for line in corpus_bytes().decode().splitlines() if line.strip()]
    return [r for r in rows if r["split"] == split]


def is_demo_writer(adapter_dir: Path) -> bool:
    """True for an adapter trained on the shipped corpus (its lcserve metadata names the corpus' hash):
    its style markers are MARKERS, and the held-out prompts are new to it."""
    try:
        meta = json.loads((Path(adapter_dir) / LCSERVE_METADATA).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("corpus_sha256") == hashlib.sha256(corpus_bytes()).hexdigest()
