"""End to end: `rlft run experiments/sentiment_reward.py:tiny`, its report, stats, and rlft.load().score()."""

import json
import os

import numpy as np
import pytest

import rlft
from tests.experiments.conftest import assert_rlft_eval_reproduces_the_report
from rlft.errors import RlftError


@pytest.mark.slow
def test_tiny_run_writes_report_metrics_and_reward_stats(reward_tiny_run):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    from rlft.data.human_ratings import load_split
    from rlft.data.preferences import load_pairs, preference_data_config

    report = json.load(open(os.path.join(reward_tiny_run, "eval", "report.json")))
    assert (report["train_pairs"], report["test_pairs"], report["test_sentences"]) == (512, 64, 64)
    for key in ("model_pairwise_accuracy", "vader_pairwise_accuracy", "vader_pairwise_accuracy_ties_half"):
        assert 0.0 <= report[key] <= 1.0
    assert -1.0 <= report["model_pearson"] <= 1.0
    # The VADER figures are reproducible from the data and the judge alone.
    judge = SentimentIntensityAnalyzer()
    compound = lambda t: judge.polarity_scores(t)["compound"]
    pairs = load_pairs(preference_data_config(min_gap=1.0, pairs_per_sentence=4.0), "test")[:64]
    assert report["vader_pairwise_accuracy"] == pytest.approx(
        np.mean([compound(p.chosen) > compound(p.rejected) for p in pairs]))
    test = load_split("movie_reviews", "test")[:64]
    assert report["vader_pearson"] == pytest.approx(
        np.corrcoef([compound(r["text"]) for r in test], [r["rating"] for r in test])[0, 1])
    assert "| rlft reward model |" in open(os.path.join(reward_tiny_run, "eval", "report.md")).read()

    lines = [json.loads(l) for l in open(os.path.join(reward_tiny_run, "reward", "metrics.jsonl"))]
    assert [l["step"] for l in lines] == list(range(1, 7))
    assert lines[0]["train/loss"] == pytest.approx(np.log(2.0), abs=1e-6)  # zero head: r_c = r_r = 0
    assert all(np.isfinite(l["train/bt_loss"]) and 0 <= l["train/accuracy"] <= 1 for l in lines)
    stats = json.load(open(os.path.join(reward_tiny_run, "reward", "reward_stats.json")))
    assert stats["count"] == 128 and stats["std"] > 0  # eval.max_reference_sentences of the tiny preset
    assert stats["add_bos"] and stats["add_eos"] and stats["max_length"] == 64
    assert json.load(open(os.path.join(reward_tiny_run, "stages.json"))) == [
        {"name": "pretrain", "kind": "lm"}, {"name": "reward", "kind": "scalar"}]


@pytest.mark.slow
def test_load_the_reward_model_and_score_texts(reward_tiny_run):
    from rlft.data.human_ratings import load_split

    model = rlft.load(reward_tiny_run)
    assert model.kind == "scalar" and model.reward_stats["count"] > 0
    texts = ["a wonderful, moving film", "dull and lifeless", "ok"]
    scores = model.score(texts)
    assert scores.shape == (3,) and scores.dtype == np.float32 and np.all(np.isfinite(scores))
    # A text's score depends neither on the padding nor on the other texts in its batch.
    np.testing.assert_allclose([model.score([t])[0] for t in texts], scores, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(model.score(texts + ["and so on " * 20])[:3], scores, atol=1e-6, rtol=1e-5)
    stats = model.reward_stats
    np.testing.assert_allclose(model.score(texts, normalize=True),
                               (scores - stats["mean"]) / (stats["std"] + 1e-8), rtol=1e-5)
    # score() tokenises like the experiment: it reproduces the report's correlation.
    test = load_split("movie_reviews", "test")[:64]
    r = np.corrcoef(model.score([x["text"] for x in test]), [x["rating"] for x in test])[0, 1]
    report = json.load(open(os.path.join(reward_tiny_run, "eval", "report.json")))
    assert r == pytest.approx(report["model_pearson"], abs=1e-3)
    with pytest.raises(RlftError, match="language model"):
        model.logits(np.array([[1, 2, 3]]))
    assert rlft.load(os.path.join(reward_tiny_run, "pretrain")).kind == "lm"
    with pytest.raises(RlftError, match="reward"):
        rlft.load(os.path.join(reward_tiny_run, "pretrain")).score(texts)


@pytest.mark.slow
def test_rlft_eval_reproduces_the_report(reward_tiny_run):
    assert_rlft_eval_reproduces_the_report(reward_tiny_run)
