"""End to end: `rlft run experiments/sentiment_classify.py:tiny`, then load and export the result."""

import json
import os

import numpy as np
import pytest

import rlft
from rlft.cli.main import main
from tests.experiments.conftest import assert_rlft_eval_reproduces_the_report, run_tiny_preset



@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return run_tiny_preset(tmp_path_factory, "sentiment_classify")


@pytest.mark.slow
def test_tiny_run_writes_report_metrics_and_checkpoints(tiny_run):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    from rlft.data.human_ratings import load_split

    report = json.load(open(os.path.join(tiny_run, "eval", "report.json")))
    assert report["test_examples"] == 128
    assert 0.0 <= report["model_accuracy"] <= 1.0
    # The VADER figure is reproducible from the data and the judge alone.
    judge = SentimentIntensityAnalyzer()
    test = [r for r in load_split("movie_reviews", "test") if abs(r["rating"]) > 0.5][:128]
    vader = np.mean([(judge.polarity_scores(r["text"])["compound"] >= 0) == (r["rating"] > 0) for r in test])
    assert report["vader_accuracy"] == pytest.approx(vader)
    assert "| VADER lexicon (compound >= 0) |" in open(os.path.join(tiny_run, "eval", "report.md")).read()
    for stage, steps in (("pretrain", 8), ("sft", 6)):
        lines = [json.loads(l) for l in open(os.path.join(tiny_run, stage, "metrics.jsonl"))]
        assert [l["step"] for l in lines] == list(range(1, steps + 1))
        assert all(np.isfinite(l["train/loss"]) for l in lines)
        assert os.listdir(os.path.join(tiny_run, stage, "tensorboard"))
        assert steps in [int(d) for d in os.listdir(os.path.join(tiny_run, stage, "checkpoints")) if d.isdigit()]
    assert json.load(open(os.path.join(tiny_run, "run_config.json")))["sft"]["steps"] == 6


@pytest.mark.slow
def test_load_and_export_the_run(tiny_run, tmp_path):
    import torch
    import transformers

    model = rlft.load(tiny_run)  # the last stage (sft)
    assert model.kind == "lm" and model.tokenizer.pad_token_id != model.tokenizer.eos_token_id
    ids = np.array([model.tokenizer.encode("a wonderful, moving film\nSentiment:")])
    same = rlft.load(os.path.join(tiny_run, "sft", "checkpoints", "6"))
    np.testing.assert_array_equal(model.logits(ids), same.logits(ids))
    assert np.abs(rlft.load(os.path.join(tiny_run, "pretrain")).logits(ids) - model.logits(ids)).max() > 1e-3

    # Greedy generation from the run continues with the logits' argmax, step after step.
    out = model.generate(["a wonderful, moving film\nSentiment:"], max_new_tokens=3, temperature=0)
    assert isinstance(out["text"][0], str)
    context = ids
    for t in range(int(out["mask"][0].sum())):
        assert out["tokens"][0, t] == int(np.argmax(model.logits(context)[0, -1]))
        context = np.concatenate([context, out["tokens"][:, t:t + 1]], axis=1)

    assert main(["export", tiny_run, "--out", str(tmp_path / "hf")]) == 0
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        ref = torch_model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(model.logits(ids), ref, atol=1e-4, rtol=0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer.encode("a wonderful, moving film") == model.tokenizer.encode("a wonderful, moving film")


@pytest.mark.slow
def test_rlft_eval_reproduces_the_report(tiny_run):
    assert_rlft_eval_reproduces_the_report(tiny_run)
