"""Scoring of hand-made outputs: retrieval answers, rep-n, loss buckets."""

import math

import pytest

from lcserve.serving.probes.scoring import (
    Score,
    nll_by_bucket,
    position_edges,
    rep_by_window,
    rep_n,
    score_needle,
    score_passkey,
)


@pytest.mark.parametrize(
    "output, expected",
    [
        (": 4429751.\n\nWhat is the special magic", Score(1.0, False)),
        (" The special magic number for AMBER-OTTER is 4429751", Score(1.0, False)),
        ("", Score(0.0, True)),
        ("   \n ", Score(0.0, True)),
        (": 442975", Score(0.0, False)),  # partially correct: six of the seven digits
        (": 44297510", Score(1.0, False)),  # substring match, as RULER scores it
        (": 4429 751", Score(0.0, False)),
        (": 1234567.", Score(0.0, False, distractor=True)),  # another needle's value
        (": 1234567 or 4429751", Score(1.0, False)),
    ],
)
def test_needle_is_a_substring_match_with_empty_and_distractor_answers_apart(output, expected):
    assert score_needle(output, "4429751", ("1234567", "7654321")) == expected


@pytest.mark.parametrize(
    "output, expected",
    [
        (" 71432. Remember it.", Score(1.0, False)),
        (" 71432", Score(1.0, False)),
        ("", Score(0.0, True)),
        (" a secret code that is used to unlock a door.", Score(0.0, False)),
        (" 7143", Score(0.0, False)),  # partially correct
        (" 714320", Score(0.0, False)),  # the first integer must be the key itself
        (" 12345, no: 71432", Score(0.0, False)),  # only the first integer counts
    ],
)
def test_passkey_takes_the_first_integer(output, expected):
    assert score_passkey(output, "71432") == expected


def test_rep_n_by_hand():
    assert rep_n([1, 2, 3, 4], 2) == 0.0
    # bigrams (1,2) (2,1) (1,2) (2,1) (1,2): 2 unique of 5
    assert rep_n([1, 2, 1, 2, 1, 2], 2) == pytest.approx(1 - 2 / 5)
    assert rep_n([7] * 10, 4) == pytest.approx(1 - 1 / 7)
    assert rep_n([1, 2], 4) == 0.0


def test_rep_by_window_drops_the_partial_window():
    tokens = list(range(8)) + [5] * 8 + [1, 2, 3]
    assert rep_by_window(tokens, 8, 2) == [0.0, pytest.approx(1 - 1 / 7)]


def test_position_edges_are_log2_with_the_training_length():
    assert position_edges(2047, 256) == [0, 16, 32, 64, 128, 256, 512, 1024, 2047]
    assert position_edges(1000, 300) == [0, 16, 32, 64, 128, 256, 300, 512, 1000]
    assert position_edges(100, 4096) == [0, 16, 32, 64, 100]


def test_nll_by_bucket_skips_the_unscored_first_position():
    logprobs = [None, -1.0, -3.0, -2.0, -4.0, float("-inf")]
    assert nll_by_bucket(logprobs, [0, 2, 4, 6]) == [1.0, 2.5, 4.0]
    assert nll_by_bucket([None], [0, 1]) == [None]
    assert not any(math.isnan(x) for x in nll_by_bucket(logprobs, [0, 6]))
