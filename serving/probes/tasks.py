"""The probe tasks: passkey, needle grid with distractors, the no-context control, and the
prompts of the loss and repetition probes.

Every cell is generated from (seed, task, length, depth) alone, so the base and each adapter
get the very same prompt: that pairing is what makes the adapter-vs-base comparison fair.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

from lcserve.errors import ProbeError

from .sizing import Filler, Insert, fit, with_inserts

ANSWER_TOKENS = 16  # generation budget of a retrieval answer: 7 digits, spaces and punctuation fit
DOCUMENT = "persuasion.txt"

_ADJECTIVES = (
    "amber azure brave calm clever crimson dusty eager fair gentle golden hollow humble icy jolly "
    "keen lively lucky mellow misty noble olive pale proud quiet rapid rustic scarlet silent silver "
    "sleepy snowy solid sunny swift tidy velvet vivid wary windy witty young zealous bold bright"
).split()
_NOUNS = (
    "anchor badger beacon birch canyon cedar comet crane delta ember falcon fern galaxy harbor "
    "heron island jasper kettle lagoon lantern maple meadow otter orchid parrot pebble pine quarry "
    "raven reef saddle spruce thistle tiger tulip valley walnut willow yarrow zephyr acorn basin"
).split()


@dataclass(frozen=True)
class Template:
    intro: str
    needle: str  # formatted with key and value
    question: str  # formatted with key


PASSKEY = Template(
    intro="There is a pass key hidden in this text. Find it and remember it.",
    needle="The pass key is {value}. Remember it. {value} is the pass key.",
    # "number" keeps a small base model from defining the phrase ("a secret code that ...")
    question="What is the pass key number? The pass key number is",
)
NEEDLE = Template(
    intro="Some special magic numbers are hidden in this text. Remember them.",
    needle="One of the special magic numbers for {key} is: {value}.",
    question="What is the special magic number for {key} mentioned in the text? The special magic number for {key} is",
)
TEMPLATES = {"passkey": PASSKEY, "needle": NEEDLE, "control": NEEDLE}


@dataclass(frozen=True)
class Cell:
    """One retrieval question. `length` is the target context (prompt + ANSWER_TOKENS); the
    control has no haystack and length 0."""

    task: str  # passkey | needle | control
    length: int
    depth: float | None
    key: str
    gold: str
    distractors: tuple[tuple[str, str, float], ...] = ()  # (key, value, depth) of the other needles

    @property
    def id(self) -> str:
        return f"{self.task}:{self.length}:{self.depth}:{self.key}"


@dataclass(frozen=True)
class Prompt:
    """A cell made concrete: the text sent, its size by the served tokenizer, the needle's real depth."""

    cell: Cell
    text: str
    tokens: int
    depth_actual: float | None
    haystack_words: int


def load_document() -> str:
    """The shipped public-domain novel excerpt (see serving/data/README.md)."""
    return resources.files("lcserve.serving").joinpath("data", DOCUMENT).read_text(encoding="utf-8")


def _key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def passkey_cells(length: int, depths: tuple[float, ...], seed: int) -> list[Cell]:
    cells = []
    for depth in depths:
        rng = random.Random(f"{seed}:passkey:{length}:{depth}")
        cells.append(Cell("passkey", length, depth, "passkey", str(rng.randint(10000, 99999))))
    return cells


def needle_cells(length: int, depths: tuple[float, ...], distractors: int, seed: int, per_depth: int = 1) -> list[Cell]:
    """RULER-style cells: `per_depth` asked-for needles at each depth (each its own key and value, so
    a cell of the heatmap averages several prompts) plus the same distractor needles (other keys,
    other 7-digit values, fixed random depths) in every prompt of this length."""
    rng = random.Random(f"{seed}:needle:{length}:distractors")
    others: list[tuple[str, str, float]] = []
    while len(others) < distractors:
        key = _key(rng)
        if key not in (o[0] for o in others):
            others.append((key, str(rng.randint(1000000, 9999999)), round(rng.random(), 3)))
    taken = {o[0] for o in others}
    cells = []
    for depth in depths:
        for k in range(per_depth):
            rng = random.Random(f"{seed}:needle:{length}:{depth}" + (f":{k}" if k else ""))
            key = _key(rng)
            while key in taken:
                key = _key(rng)
            taken.add(key)
            value = str(rng.randint(1000000, 9999999))
            cells.append(Cell("needle", length, depth, key, value, tuple(others)))
    return cells


def control_cells(count: int, seed: int) -> list[Cell]:
    """The needle question with no text at all: any score above about 0 means answers from memory (or a bug)."""
    cells = []
    for i in range(count):
        rng = random.Random(f"{seed}:control:{i}")
        cells.append(Cell("control", 0, None, _key(rng), str(rng.randint(1000000, 9999999))))
    return cells


def needle_text(cell: Cell) -> str:
    return TEMPLATES[cell.task].needle.format(key=cell.key, value=cell.gold)


def render(cell: Cell, haystack: str) -> tuple[str, float | None]:
    """The full prompt for this cell over `haystack`, and the real depth of its needle."""
    template = TEMPLATES[cell.task]
    question = template.question.format(key=cell.key)
    if cell.task == "control":
        return f"{template.intro}\n\n{question}", None
    inserts = [Insert(cell.depth, needle_text(cell))]
    inserts += [Insert(depth, template.needle.format(key=key, value=value)) for key, value, depth in cell.distractors]
    body, depths = with_inserts(haystack, inserts)
    return f"{template.intro}\n\n{body}\n\n{question}", depths[0]


def size_cells(cells: list[Cell], filler: Filler, count: Callable[[str], int], words_per_token: float) -> list[Prompt]:
    """Prompts for the cells of one task and length over one shared haystack.

    The haystack is sized once (binary search on its words, for the first cell) so that
    prompt + ANSWER_TOKENS fits the length; each cell is then counted again and, if its
    needle tokenizes a little longer, gives up words at the end until it fits. No cells (a
    tier without this task): no prompts.
    """
    if not cells:
        return []
    length = cells[0].length
    budget = length - ANSWER_TOKENS

    def tokens_with(cell: Cell, words: int) -> int:
        return count(render(cell, filler.prefix(words))[0])

    bare = max(tokens_with(cell, 0) for cell in cells)
    if bare > budget:
        raise ProbeError(
            f"length {length} is too short for the {cells[0].task} prompt ({bare} tokens without text + {ANSWER_TOKENS} for the answer); drop it from --lengths"
        )
    words = fit(lambda n: tokens_with(cells[0], n), budget, filler.words, int(budget * words_per_token))
    prompts = []
    for cell in cells:
        n = words
        while n > 0 and tokens_with(cell, n) > budget:
            n -= 1
        text, depth = render(cell, filler.prefix(n))
        tokens = count(text)
        assert tokens <= budget and needle_text(cell) in text, f"sizing overran or lost the needle of {cell.id}"
        prompts.append(Prompt(cell, text, tokens, depth, n))
    return prompts


def control_prompts(cells: list[Cell], count: Callable[[str], int]) -> list[Prompt]:
    prompts = []
    for cell in cells:
        text, _ = render(cell, "")
        prompts.append(Prompt(cell, text, count(text), None, 0))
    return prompts


def document_prefix(
    filler: Filler, count: Callable[[str], int], tokens: int, words_per_token: float
) -> tuple[str, int]:
    """The longest word prefix of the document whose prompt is at most `tokens` tokens."""
    words = fit(lambda n: count(filler.prefix(n)), tokens, filler.words, int(tokens * words_per_token))
    text = filler.prefix(words)
    return text, count(text)
