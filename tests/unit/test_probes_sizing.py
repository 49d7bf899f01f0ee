"""Exact prompt sizing against a deterministic tokenizer function (no engine)."""

import re

import pytest

from lcserve.errors import ProbeError
from lcserve.serving.probes.sizing import Filler, Insert, fit, insert_position, repeated, with_inserts
from lcserve.serving.probes.tasks import (
    ANSWER_TOKENS,
    control_cells,
    control_prompts,
    document_prefix,
    load_document,
    needle_cells,
    needle_text,
    passkey_cells,
    render,
    size_cells,
)


def toy_count(text: str) -> int:
    """A deterministic stand-in for a tokenizer: BOS, one token per punctuation mark, one per
    word, one more per 6 letters of a long word (so the count is not linear in words)."""
    words = re.findall(r"\w+", text)
    return 1 + len(re.findall(r"[^\w\s]", text)) + sum(1 + len(w) // 6 for w in words)


class Counting:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, arg):
        self.calls += 1
        return self.fn(arg)


DOC = load_document()
FILLER = Filler(DOC)
WORDS_PER_TOKEN = FILLER.words / toy_count(DOC)


def brute_force(count, budget, upper):
    return max(n for n in range(upper + 1) if count(n) <= budget)


@pytest.mark.parametrize("budget", [1, 7, 50, 333, 1000])
@pytest.mark.parametrize("guess", [0, 1, 40, 400, 10_000])
def test_fit_finds_the_largest_fitting_prefix_whatever_the_guess(budget, guess):
    filler = Filler(DOC[:8000])

    def count(n):
        return toy_count(filler.prefix(n))

    assert fit(count, budget, filler.words, guess) == brute_force(count, budget, filler.words)


def test_fit_returns_upper_when_everything_fits():
    assert fit(lambda n: n, 10_000, 50, 20) == 50


def test_fit_needs_few_tokenizer_calls_from_a_good_guess():
    count = Counting(lambda n: toy_count(FILLER.prefix(n)))
    budget = 8000
    n = fit(count, budget, FILLER.words, int(budget * WORDS_PER_TOKEN))
    assert count(n) <= budget < count(n + 1)
    assert count.calls <= 2 + 14  # two checks above + the search itself; bisecting all words would take 16+


def test_filler_prefixes_end_on_words():
    filler = Filler("one two,  three\nfour")
    assert [filler.prefix(n) for n in range(5)] == ["", "one", "one two,", "one two,  three", "one two,  three\nfour"]


def test_repeated_document_is_back_to_back():
    assert repeated(" a b. ", 3) == "a b.\n\na b.\n\na b."


def test_insert_positions_snap_to_sentence_ends():
    hay = "First one. Second one! Third one? Last"
    assert insert_position(hay, 0.0) == 0
    assert insert_position(hay, 1.0) == len(hay)
    assert hay[: insert_position(hay, 0.5)].endswith("one!")


def test_with_inserts_places_every_needle_and_reports_real_depths():
    hay = "Alpha beta. Gamma delta. Epsilon zeta. Eta theta."
    text, depths = with_inserts(hay, [Insert(0.5, "NEEDLE."), Insert(0.0, "FIRST."), Insert(1.0, "LAST.")])
    assert text.startswith("FIRST. Alpha") and text.endswith("theta. LAST.")
    assert "delta. NEEDLE. Epsilon" in text
    assert depths == [round(len("Alpha beta. Gamma delta.") / len(hay), 3), 0.0, 1.0]
    assert "  " not in text


def test_with_inserts_on_an_empty_haystack_keeps_the_needles():
    text, depths = with_inserts("", [Insert(0.3, "A."), Insert(0.7, "B.")])
    assert "A." in text and "B." in text and depths == [0.0, 0.0]


@pytest.mark.parametrize("length", [256, 1024, 4096])
def test_sized_cells_fit_exactly_and_keep_their_needles(length):
    count = Counting(toy_count)
    cells = needle_cells(length, (0.0, 0.5, 1.0), 2, seed=0)
    prompts = size_cells(cells, FILLER, count, WORDS_PER_TOKEN)
    budget = length - ANSWER_TOKENS
    for p in prompts:
        assert p.tokens == toy_count(p.text) <= budget
        assert needle_text(p.cell) in p.text
        for key, value, _ in p.cell.distractors:
            assert f"for {key} is: {value}." in p.text
    # exact: the first cell's haystack is the longest that fits (one more word overflows)
    first = prompts[0]
    assert toy_count(render(first.cell, FILLER.prefix(first.haystack_words + 1))[0]) > budget


def test_one_haystack_per_length_so_the_text_before_the_needle_is_shared():
    prompts = size_cells(passkey_cells(2048, (0.25, 0.75), seed=1), FILLER, toy_count, WORDS_PER_TOKEN)
    shallow, deep = prompts
    before_shallow = shallow.text.split(" " + needle_text(shallow.cell))[0]
    assert shallow.haystack_words == deep.haystack_words
    assert deep.text.startswith(before_shallow)
    assert 0.15 < shallow.depth_actual < 0.35 and 0.65 < deep.depth_actual < 0.85


def test_cells_are_the_same_for_every_call_with_one_seed():
    assert needle_cells(512, (0.0, 1.0), 2, seed=3) == needle_cells(512, (0.0, 1.0), 2, seed=3)
    assert needle_cells(512, (0.0, 1.0), 2, seed=3) != needle_cells(512, (0.0, 1.0), 2, seed=4)
    golds = [c.gold for c in needle_cells(512, (0.0, 0.5, 1.0), 3, seed=0)]
    distractor_values = [v for _, v, _ in needle_cells(512, (0.0,), 3, seed=0)[0].distractors]
    assert all(len(g) == 7 and g.isdigit() for g in golds + distractor_values)


def test_a_length_too_short_for_the_template_is_a_clear_error():
    with pytest.raises(ProbeError, match="length 48 is too short for the needle prompt"):
        size_cells(needle_cells(48, (0.5,), 2, seed=0), FILLER, toy_count, WORDS_PER_TOKEN)


def test_control_has_no_text_and_document_prefix_fits():
    prompts = control_prompts(control_cells(3, seed=0), toy_count)
    assert all("is:" not in p.text and p.cell.gold not in p.text for p in prompts)
    text, tokens = document_prefix(FILLER, toy_count, 1000, WORDS_PER_TOKEN)
    assert tokens == toy_count(text) <= 1000 and DOC.startswith(text)


def test_a_task_without_depths_has_no_prompts():
    """A tier may leave a task out (e.g. passkey only): no cells, no prompts, no error."""
    assert size_cells(needle_cells(2048, (), 2, seed=1), FILLER, toy_count, WORDS_PER_TOKEN) == []


def test_needle_cells_hold_several_prompts_per_depth_each_with_its_own_key():
    """4 prompts a depth: distinct keys (from each other and the distractors) at every seed, so a
    cell's answers are 4 independent retrievals; the distractors are the same in every prompt."""
    for seed in range(200):
        cells = needle_cells(2048, (0.0, 0.5, 1.0), 2, seed, per_depth=4)
        keys = [c.key for c in cells] + [k for k, _, _ in cells[0].distractors]
        assert len(cells) == 12 and len(set(keys)) == 14, seed
        assert [c.depth for c in cells] == [0.0] * 4 + [0.5] * 4 + [1.0] * 4
        assert len({c.distractors for c in cells}) == 1
    # one prompt a depth: the cells of before
    assert needle_cells(1024, (0.5,), 2, 0) == needle_cells(1024, (0.5,), 2, 0, per_depth=4)[:1]
