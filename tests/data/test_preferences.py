"""Preference pairs: human-rating pairs (gap, determinism, no held-out leakage), a TFDS source with
explicit fields, and pair batches."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from rlft.data import human_ratings
from rlft.data.batching import pad_right
from rlft.data.preferences import (PreferencePair, encode_pairs, load_pairs, pad_pairs,
                                   preference_data_config, rating_pairs)
from rlft.errors import RlftError


def fake_rows(split: str, n: int = 40) -> list[dict]:
    """Rows of one split; sentences 0-4 of each split also occur (same text) in every other split."""
    rng = np.random.default_rng(len(split))
    rows = [{"id": f"{split}{i}", "text": f"shared sentence {i}", "rating": float(rng.uniform(-4, 4))}
            for i in range(5)]
    rows += [{"id": f"{split}{i}", "text": f"{split} sentence {i}", "rating": float(rng.uniform(-4, 4))}
             for i in range(5, n)]
    return rows


@pytest.fixture
def fake_load_split(monkeypatch):
    monkeypatch.setattr(human_ratings, "load_split", lambda source, split, data_dir=None: fake_rows(split))


def test_rating_pairs_respect_the_gap_and_are_deterministic():
    rows = fake_rows("train")
    rating = {r["text"]: r["rating"] for r in rows}
    pairs = rating_pairs(rows, 100, 1.5, seed=[0, 1], prompt="P:")
    assert len(pairs) == 100 and pairs == rating_pairs(rows, 100, 1.5, seed=[0, 1], prompt="P:")
    assert pairs != rating_pairs(rows, 100, 1.5, seed=[0, 2], prompt="P:")
    assert all(p.prompt == "P:" and rating[p.chosen] - rating[p.rejected] >= 1.5 for p in pairs)
    assert len({frozenset((p.chosen, p.rejected)) for p in pairs}) == 100  # no pair twice
    few = rating_pairs(rows[:3], 100, 1.0, seed=0)  # at most 3 pairs exist: stops, no endless loop
    assert len(few) <= 3
    with pytest.raises(RlftError, match="data.min_gap"):
        rating_pairs(rows, 10, 0.0, seed=0)


def test_no_held_out_sentence_in_a_training_pair(fake_load_split):
    cfg = preference_data_config(pairs_per_sentence=3.0)
    pairs = {s: load_pairs(cfg, s) for s in ("train", "validation", "test")}
    texts = {s: {t for p in ps for t in (p.chosen, p.rejected)} for s, ps in pairs.items()}
    held_out = {r["text"] for s in ("validation", "test") for r in fake_rows(s)}
    assert len(pairs["train"]) == 120 and texts["train"] and not texts["train"] & held_out
    assert not texts["validation"] & {r["text"] for r in fake_rows("test")}
    assert texts["train"] <= {r["text"] for r in fake_rows("train")}  # this split's sentences only
    assert texts["test"] <= {r["text"] for r in fake_rows("test")}
    assert "shared sentence 0" in {r["text"] for r in fake_rows("test")}
    assert pairs["train"] == load_pairs(cfg, "train")  # deterministic per split
    assert len(load_pairs(preference_data_config(max_pairs=7), "test")) == 7


def test_no_test_sentence_in_real_training_pairs():
    try:
        test_texts = {r["text"] for r in human_ratings.load_split("movie_reviews", "test")}
    except RlftError as e:
        pytest.skip(f"human-rated sentences unavailable: {e}")
    cfg = preference_data_config(max_pairs=20000)
    train = load_pairs(cfg, "train")
    assert len(train) == 20000
    assert not {t for p in train for t in (p.chosen, p.rejected)} & test_texts


class TinyPreferencePairs(tfds.core.GeneratorBasedBuilder):
    """A tiny dataset with explicit (nested) prompt/chosen/rejected text fields."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
            "question": tfds.features.Text(),
            "answers": {"good": tfds.features.Text(), "bad": tfds.features.Text()},
            "score": np.float32,
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(6), "test": self._generate_examples(2)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"question": f"q{i}", "answers": {"good": f"good {i}", "bad": f"bad {i}"}, "score": 1.0}


def test_tfds_source_with_configured_fields(tmp_path):
    TinyPreferencePairs(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    cfg = preference_data_config(pairs="tfds:tiny_preference_pairs", data_dir=str(tmp_path),
                                 prompt_field="question", chosen_field="answers.good",
                                 rejected_field="answers.bad")
    train = load_pairs(cfg, "train")
    assert sorted(train) == sorted(PreferencePair(f"q{i}", f"good {i}", f"bad {i}") for i in range(6))
    assert len(load_pairs(cfg, "test")) == 2
    cfg.max_pairs = 4
    assert len(load_pairs(cfg, "train")) == 4
    cfg.prompt_field = ""
    assert all(p.prompt == "" for p in load_pairs(cfg, "test"))
    cfg.chosen_field = "answers.best"
    with pytest.raises(RlftError, match="data.chosen_field='answers.best'"):
        load_pairs(cfg, "test")
    cfg.chosen_field = "score"
    with pytest.raises(RlftError, match="not a text field"):
        load_pairs(cfg, "test")
    cfg.pairs = "tfds:no_such_dataset_here"
    with pytest.raises(RlftError, match="no_such_dataset_here"):
        load_pairs(cfg, "test")
    cfg.pairs = "hf:whatever"
    with pytest.raises(RlftError, match="data.pairs"):
        load_pairs(cfg, "test")


class FakeTokenizer:
    eos_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [2 + (ord(c) % 60) for c in text]


def test_pair_batches_stack_chosen_and_rejected():
    pairs = [PreferencePair("ab", "cde", "f"), PreferencePair("", "gh", "ijklmnopq")]
    encoded = encode_pairs(FakeTokenizer(), pairs, bos_id=0)
    assert encoded[0] == (([0, 2 + 97 % 60, 2 + 98 % 60], [2 + ord(c) % 60 for c in "cde"] + [0]),
                          ([0, 2 + 97 % 60, 2 + 98 % 60], [2 + ord("f") % 60, 0]))
    batch, stats = pad_pairs(encoded, 8, pad_id=1)
    assert batch.tokens.shape == (2, 2, 8) and batch.loss_mask.dtype == np.float32
    for j in range(2):
        want, _ = pad_right([e[j] for e in encoded], 8, pad_id=1)
        for got_field, want_field in zip(batch, want):
            np.testing.assert_array_equal(got_field[:, j], want_field)
    assert stats.num_examples == 4 and stats.num_completion_truncated == 1  # 1 + 10 tokens > 8
    assert batch.tokens[0, 1, 4] == 0 and batch.tokens[0, 1, 5] == 1 and batch.segment_ids[0, 1, 5] == 0
