"""The demo adapter's corpus, its style markers, and training-length metadata sources."""

from __future__ import annotations

import json

import pytest

from lcserve.adapters.style import MARKERS, OPENER, SIGN_OFF, corpus_bytes, corpus_examples, markers_in, style_score
from lcserve.adapters.train import (
    UNPACKED_RECIPE,
    TrainConfig,
    _batches,
    _config_json,
    _packed_batches,
    is_trained,
    pack,
)
from lcserve.adapters.training_length import training_seq_len, training_seq_len_source


def test_corpus_is_small_styled_and_has_unseen_heldout_prompts():
    assert len(corpus_bytes()) < 300_000
    train, heldout = corpus_examples("train"), corpus_examples("heldout")
    assert len(train) >= 200 and len(heldout) >= 20
    for row in train:
        assert row["response"].startswith(OPENER) and row["response"].endswith(SIGN_OFF)
    seen = {r["prompt"].lower() for r in train}
    assert not seen & {r["prompt"].lower() for r in heldout}


def test_style_score_counts_markers():
    assert markers_in("Ahoy, friend! Keep it shipshape. Fair winds and steady lights!") == [
        "ahoy",
        "fair winds",
        "steady lights",
        "shipshape",
    ]
    score = style_score(["Ahoy, friend! x. Fair winds and steady lights!", "Plain advice.", "Keep it shipshape."])
    assert (score.answers, score.styled, score.signed_off) == (3, 2, 1)
    assert score.rate == pytest.approx(2 / 3) and score.markers_per_answer == pytest.approx(4 / 3)
    assert all(m == m.lower() for m in MARKERS)


def test_training_batches_score_only_answers_and_respect_the_length():
    examples = [(list(range(10, 10 + n)), 4) for n in (6, 9, 300)]
    config = TrainConfig(seq_len=256, batch_size=2, epochs=2)
    batches = _batches([(ids[: config.seq_len], p) for ids, p in examples], config)
    assert len(batches) == 4
    for input_ids, attention, labels in batches:
        assert input_ids.shape[1] <= 256
        assert (labels[:, :4] == -100).all()  # prompt tokens are never scored
        assert ((labels != -100) <= (attention == 1)).all()  # nor padding
    assert [b[0].tolist() for b in batches] == [
        b[0].tolist() for b in _batches([(ids[:256], p) for ids, p in examples], config)
    ]  # seeded: same order every run


def test_is_trained_needs_metadata_matching_corpus_and_recipe(tmp_path):
    assert not is_trained(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "lcserve_adapter.json").write_text(json.dumps({"format_version": 1, "corpus_sha256": "0"}))
    assert not is_trained(tmp_path)


def test_training_length_sources(tmp_path):
    assert training_seq_len(tmp_path) is None
    (tmp_path / "training_args.json").write_text(json.dumps({"max_seq_length": 1024}))
    assert training_seq_len_source(tmp_path) == (1024, "training_args.json:max_seq_length")
    (tmp_path / "axolotl.yml").write_text("base_model: x\nsequence_len: 2048\n")
    assert training_seq_len_source(tmp_path) == (2048, "axolotl.yml")
    (tmp_path / "lcserve_adapter.json").write_text(json.dumps({"training_seq_len": 256}))
    assert training_seq_len_source(tmp_path) == (256, "lcserve_adapter.json")


@pytest.mark.parametrize(
    "content",
    ["{broken", json.dumps({"training_seq_len": "256"}), json.dumps([1]), json.dumps({"training_seq_len": 0})],
)
def test_training_length_ignores_unusable_metadata(tmp_path, content):
    (tmp_path / "lcserve_adapter.json").write_text(content)
    (tmp_path / "bad.yaml").write_text(": : :\n  - [")
    assert training_seq_len(tmp_path) is None


def test_pack_fills_rows_of_exactly_seq_len_and_scores_only_answer_tokens():
    examples = [([1, 2, 3, 4, 5], 2), ([6, 7, 8], 1), ([9, 10, 11, 12], 3)]  # (ids, prompt length)
    rows = pack(examples, 4, [2, 0, 1])
    assert [ids for ids, _ in rows] == [[9, 10, 11, 12], [1, 2, 3, 4], [5, 6, 7, 8]]
    assert [s for _, s in rows] == [[False, False, False, True], [False, False, True, True], [True, False, True, True]]
    assert pack(examples, 13, [0, 1, 2]) == []  # 12 tokens do not fill one row: nothing, not a short row


def test_the_demo_recipe_trains_every_position_up_to_its_training_length():
    """Packed rows of exactly seq_len: the metadata's longest_row_tokens (the widest batch) is seq_len."""
    config = TrainConfig()
    assert (config.seq_len, config.packed_tokens_per_step) == (256, 1024)
    examples = [(list(range(1, 1 + n)), 5) for n in (60, 94, 71, 88) * 20]  # lengths like the corpus's
    batches = _packed_batches(examples, config)
    assert {ids.shape for ids, _, _ in batches} == {(4, 256)}  # 4 rows a step, no padding
    assert max(ids.shape[1] for ids, _, _ in batches) == config.seq_len
    assert max(ids.shape[1] for ids, _, _ in _batches(examples, UNPACKED_RECIPE)) == 94  # the old recipe: 94


def test_packing_is_part_of_the_recipe_identity_and_the_unpacked_recipe_is_unchanged():
    assert "packed_tokens_per_step" not in _config_json(UNPACKED_RECIPE)  # an adapter trained before stays valid
    assert _config_json(TrainConfig(seq_len=1024, packed_tokens_per_step=1024))["packed_tokens_per_step"] == 1024
